"""Image folders as calibration and evaluation data: reading, resizing, centre cropping, preprocessing, labels.

An image folder holds JPEG/PNG files, flat or one sub-folder per class (``labels.tsv`` optional). Every image is
converted to RGB (grey, palette, RGBA and CMYK images included), its shorter side resized to ``shorter_side``
(default ``round(crop / 0.875)``: 256 for a 224 model, the usual ImageNet evaluation) and centre cropped to the
model's input size at offset ``round((w - crop_w) / 2), round((h - crop_h) / 2)``. Decoded crops are kept as uint8
(a quarter of the float size) and normalised batch by batch as ``(x - mean) / std`` on 0..255 RGB values.

Named presets (``PRESETS``)::

    inception          x / 127.5 - 1                 [-1, 1]  (Keras MobileNet, TF-slim inception preprocessing)
    torch              (x / 255 - m) / s             ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)
    tf-slim            (x - 128) / 128
    efficientnet-lite  (x - 127) / 128
    raw                x                             0..255, for models that hold their own Rescaling

A custom normalisation is ``(mean, std)`` in 0..255 units (scalars or one per channel). A graph may carry its default
in ``graph.meta["preprocess"]`` (a preset name or ``(mean, std)``); otherwise the caller must choose.

``labels.tsv`` (tab separated: ``file``, ``class_index``, further columns ignored; a header line is optional) maps a
file name, relative to the folder, to its class index.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .data import CalibrationSet
from .errors import DataError

__all__ = ["PRESETS", "Preprocess", "resolve_preprocess", "ImageFolder", "ImageSet", "list_images", "load_image",
           "read_labels", "load_image_folder", "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: ImageNet evaluation: the crop is 87.5% of the resized shorter side (224 of 256).
CROP_FRACTION = 0.875

_TORCH_MEAN = tuple(255.0 * m for m in (0.485, 0.456, 0.406))
_TORCH_STD = tuple(255.0 * s for s in (0.229, 0.224, 0.225))

#: preset name -> (mean, std) in 0..255 units, and a description.
PRESETS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...], str]] = {
    "inception": ((127.5,), (127.5,), "x/127.5 - 1, range [-1, 1]"),
    "torch": (_TORCH_MEAN, _TORCH_STD, "(x/255 - ImageNet mean) / ImageNet std"),
    "tf-slim": ((128.0,), (128.0,), "(x - 128) / 128"),
    "efficientnet-lite": ((127.0,), (128.0,), "(x - 127) / 128"),
    "raw": ((0.0,), (1.0,), "0..255 unchanged, for models with their own Rescaling"),
}


def _presets_text() -> str:
    return "; ".join(f"{k!r}: {v[2]}" for k, v in PRESETS.items()) + "; or a custom (mean, std) in 0..255 units"


@dataclass(frozen=True)
class Preprocess:
    """``(x - mean) / std`` per channel on 0..255 RGB values."""

    name: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, np.float32)
        inv = (1.0 / np.asarray(self.std, np.float64)).astype(np.float32)
        return (np.asarray(x, np.float32) - mean) * inv


def resolve_preprocess(preprocess=None, graph=None) -> Preprocess:
    """A :class:`Preprocess` from a preset name, ``(mean, std)``, a Preprocess, or the graph's default."""
    if preprocess is None and graph is not None:
        preprocess = graph.meta.get("preprocess")
    if preprocess is None:
        where = f" for model {graph.meta.get('source', graph.name)!r}" if graph is not None else ""
        raise DataError(f"image data needs a preprocessing choice{where}: pass preprocess= one of {_presets_text()}")
    if isinstance(preprocess, Preprocess):
        return preprocess
    if isinstance(preprocess, str):
        key = preprocess.strip().lower().replace("_", "-")
        if key not in PRESETS:
            raise DataError(f"unknown preprocessing preset {preprocess!r}; presets: {_presets_text()}")
        mean, std, _ = PRESETS[key]
        return Preprocess(key, mean, std)
    if isinstance(preprocess, dict) and {"mean", "std"} <= set(preprocess):
        preprocess = (preprocess["mean"], preprocess["std"])
    try:
        mean, std = preprocess
        mean = tuple(float(m) for m in np.atleast_1d(np.asarray(mean, np.float64)))
        std = tuple(float(s) for s in np.atleast_1d(np.asarray(std, np.float64)))
    except (TypeError, ValueError):
        raise DataError(f"preprocess must be a preset name or (mean, std), got {preprocess!r}; "
                        f"presets: {_presets_text()}") from None
    if len(mean) not in (1, 3) or len(std) not in (1, 3) or not all(np.isfinite(mean + std)) \
            or any(s <= 0 for s in std):
        raise DataError(f"custom preprocessing needs 1 or 3 finite means and positive stds (0..255 units), "
                        f"got mean={mean}, std={std}")
    return Preprocess("custom", mean, std)


# -- files and labels --------------------------------------------------------------------------------------------
def list_images(folder: Union[str, os.PathLike]) -> List[Path]:
    """The JPEG/PNG files in ``folder`` and its direct sub-folders, sorted by relative path."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: give a folder of JPEG/PNG images, a numpy array or batches")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    for sub in folder.iterdir():
        if sub.is_dir() and not sub.name.startswith("."):
            files.extend(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    files = [p for p in files if not p.name.startswith(".")]
    if not files:
        raise DataError(f"image folder {folder} holds no JPEG/PNG images (flat, or one sub-folder per class)")
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def read_labels(folder: Union[str, os.PathLike], name: str = "labels.tsv") -> Dict[str, int]:
    """``{relative file path: class index}`` from ``folder/labels.tsv`` (``file<TAB>class_index[<TAB>...]``)."""
    path = Path(folder) / name
    if not path.is_file():
        raise DataError(f"no {name} in {folder}: give labels= explicitly (one class index per image), or a "
                        f"{name} with lines 'file<TAB>class_index'")
    out: Dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) < 2:
                raise DataError(f"{path}:{lineno}: expected 'file<TAB>class_index', got {line!r}")
            try:
                out[cols[0]] = int(cols[1])
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise DataError(f"{path}:{lineno}: class index {cols[1]!r} is not an integer") from None
    if not out:
        raise DataError(f"{path} holds no labels")
    return out


def load_image(path: Union[str, os.PathLike], size: Tuple[int, int],
               shorter_side: Optional[int] = None) -> np.ndarray:
    """One image as uint8 RGB ``(h, w, 3)``: shorter side resized to ``shorter_side``, centre crop ``size``."""
    from PIL import Image, UnidentifiedImageError

    h, w = int(size[0]), int(size[1])
    target = int(shorter_side) if shorter_side else int(round(min(h, w) / CROP_FRACTION))
    target = max(target, h, w)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            iw, ih = im.size
            if min(iw, ih) != target:
                s = target / min(iw, ih)
                iw, ih = max(w, int(round(iw * s))), max(h, int(round(ih * s)))
                im = im.resize((iw, ih), Image.Resampling.BILINEAR)
            left, top = int(round((iw - w) / 2)), int(round((ih - h) / 2))
            arr = np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return arr


# -- the data objects --------------------------------------------------------------------------------------------
class ImageSet(CalibrationSet):
    """Decoded, cropped images (uint8, NHWC) normalised batch by batch; a :class:`CalibrationSet`.

    ``files`` are the image paths in order; ``labels`` their class indices when the folder has ``labels.tsv``.
    """

    def __init__(self, images: np.ndarray, preprocess: Preprocess, batch_size: int = 32,
                 files: Sequence[Path] = (), labels: Optional[np.ndarray] = None, name: str = "images"):
        if images.ndim != 4 or len(images) == 0:
            raise DataError(f"image data {name!r} is empty")
        self.images = images
        self.preprocess = preprocess
        self.batch_size = max(1, int(batch_size))
        self.files = list(files)
        self.labels = labels
        self.name = name

    def batches(self) -> Iterator[np.ndarray]:
        for s in range(0, len(self.images), self.batch_size):
            yield self.preprocess(self.images[s:s + self.batch_size])

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_batches(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def drift_batch(self, max_items: int = 16) -> List[np.ndarray]:
        return [self.preprocess(self.images[:max_items])]

    def subset(self, index) -> "ImageSet":
        """The images at ``index`` (a slice or integer array), same preprocessing."""
        idx = np.arange(len(self.images))[index]
        return ImageSet(self.images[idx], self.preprocess, self.batch_size, [self.files[i] for i in idx]
                        if self.files else (), None if self.labels is None else self.labels[idx], self.name)


class ImageFolder:
    """A folder of images to be read for a model: pass it as ``data=`` (or to :func:`qfrewrite.evaluate`).

    ``preprocess``: a preset name or ``(mean, std)`` (else the graph's default); ``limit``: use at most this many
    images (the first in sorted order); ``size``: ``(h, w)`` when the model input does not fix it;
    ``shorter_side``: resize target (default ``round(crop / 0.875)``); ``workers``: decoding threads.
    """

    def __init__(self, path: Union[str, os.PathLike], preprocess=None, limit: Optional[int] = None,
                 size: Optional[Tuple[int, int]] = None, shorter_side: Optional[int] = None,
                 workers: int = 2, progress: Optional[bool] = None):
        self.path = Path(path)
        self.preprocess = preprocess
        self.limit = limit
        self.size = size
        self.shorter_side = shorter_side
        self.workers = max(1, int(workers))
        self.progress = progress

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.path)!r}, preprocess={self.preprocess!r}, limit={self.limit})"

    def input_size(self, graph=None) -> Tuple[int, int]:
        if self.size is not None:
            return int(self.size[0]), int(self.size[1])
        if graph is None:
            raise DataError(f"reading {self.path} needs the image size: pass size=(h, w)")
        shape = graph.inputs[0].shape
        if len(shape) != 4:
            raise DataError(f"image folder {self.path} gives (N, H, W, 3) images but the model input "
                            f"{graph.inputs[0].name!r} has shape {tuple(shape)}")
        if shape[3] is not None and shape[3] != 3:
            raise DataError(f"image folder {self.path} gives RGB images (3 channels) but the model input "
                            f"{graph.inputs[0].name!r} expects {shape[3]} channels")
        if shape[1] is None or shape[2] is None:
            raise DataError(f"the model input {graph.inputs[0].name!r} has open spatial dimensions {tuple(shape)}: "
                            f"pass size=(h, w) to ImageFolder or input_shape= when loading")
        return int(shape[1]), int(shape[2])

    def read(self, graph=None, batch_size: int = 32, preprocess=None) -> ImageSet:
        """Decode the images for ``graph`` (its input size and default preprocessing)."""
        from tqdm.auto import tqdm

        pre = resolve_preprocess(preprocess if preprocess is not None else self.preprocess, graph)
        size = self.input_size(graph)
        files = list_images(self.path)
        if self.limit is not None:
            if int(self.limit) < 1:
                raise DataError(f"image limit must be a positive number, got {self.limit}")
            files = files[:int(self.limit)]
        out = np.empty((len(files), size[0], size[1], 3), np.uint8)

        def work(i):
            out[i] = load_image(files[i], size, self.shorter_side)

        disable = None if self.progress is None else not self.progress
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for _ in tqdm(pool.map(work, range(len(files))), total=len(files), desc=f"reading {self.path.name}",
                          unit="img", disable=disable, leave=False):
                pass
        labels = None
        if (self.path / "labels.tsv").is_file():
            table = read_labels(self.path)
            rel = [f.relative_to(self.path).as_posix() for f in files]
            if all(r in table for r in rel):
                labels = np.array([table[r] for r in rel], np.int64)
            else:
                missing = [r for r in rel if r not in table]
                log.warning("%s/labels.tsv has no label for %d images (e.g. %s): labels not used",
                            self.path, len(missing), missing[0])
        log.info("read %d images from %s (%dx%d, preprocess %s)", len(files), self.path, size[0], size[1], pre.name)
        return ImageSet(out, pre, batch_size, files, labels, name=str(self.path))


def load_image_folder(path, graph, preprocess=None, batch_size: int = 32, limit: Optional[int] = None) -> ImageSet:
    """Read the image folder ``path`` (or an :class:`ImageFolder`) for ``graph``."""
    if isinstance(path, ImageFolder):
        f = path
        folder = ImageFolder(f.path, f.preprocess, f.limit if f.limit is not None else limit, f.size, f.shorter_side,
                             f.workers, f.progress)
    else:
        folder = ImageFolder(path, preprocess=preprocess, limit=limit)
    return folder.read(graph, batch_size=batch_size, preprocess=preprocess)
