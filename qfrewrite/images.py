"""Image folders as calibration and evaluation data: reading, resizing, centre cropping, preprocessing, labels.

An image folder holds JPEG/PNG files, flat or one sub-folder per class (``labels.tsv`` optional). Every image is
converted to 8-bit RGB (grey, palette, RGBA and CMYK images included; 16-bit and float images rescaled, not clipped:
:func:`_to_rgb`), its shorter side resized to ``shorter_side``
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

Bad files raise :class:`DataError` naming them: an unreadable or truncated image, an image larger than Pillow's
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` times 2, about 179 megapixels: refused, not skipped, like
any unreadable image, so that the calibration set is never silently changed), a labels file that is not UTF-8 (with
its line), and a folder whose decoded images would not fit in memory.
"""
from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .data import CalibrationSet
from .errors import DataError
from .resources import require_memory

__all__ = ["PRESETS", "Preprocess", "resolve_preprocess", "ImageFolder", "ImageSet", "list_images", "load_image",
           "read_labels", "load_image_folder", "folder_reads", "IMAGE_SUFFIXES", "LABELS_FILE"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABELS_FILE = "labels.tsv"
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
    """``(x - mean) / std`` per channel on 0..255 RGB values, in float32 as ``(float32(x) - mean) * float32(1 / std)``.

    On uint8 images (what :class:`ImageSet` holds) the result is read from a table of the 256 values per channel:
    the same float32 numbers, computed once, at a third of the time of the arithmetic on every pixel."""

    name: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def _terms(self) -> Tuple[np.ndarray, np.ndarray]:
        return (np.asarray(self.mean, np.float32),
                (1.0 / np.asarray(self.std, np.float64)).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        mean, inv = self._terms()
        x = np.asarray(x)
        if x.dtype != np.uint8 or x.ndim == 0 or x.shape[-1] not in (1, len(mean)) or len(mean) not in (1, x.shape[-1]):
            return (np.asarray(x, np.float32) - mean) * inv
        table = (np.arange(256, dtype=np.float32)[:, None] - mean) * inv  # (256, channels or 1)
        if table.shape[1] == 1:
            return table[:, 0][x]
        out = np.empty(x.shape, np.float32)
        for c in range(x.shape[-1]):
            out[..., c] = table[:, c][x[..., c]]
        return out


def resolve_preprocess(preprocess=None, graph=None) -> Preprocess:
    """A :class:`Preprocess` from a preset name, ``(mean, std)``, a Preprocess, or the graph's default."""
    if preprocess is None and graph is not None:
        preprocess = graph.meta.get("preprocess")
    if preprocess is None:
        where = f" for model {graph.meta.get('source', graph.name)!r}" if graph is not None else ""
        raise DataError(f"image data needs a preprocessing choice{where}: pass preprocess= (--preprocess) one of "
                        f"{_presets_text()}")
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
    try:
        files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        for sub in folder.iterdir():
            if sub.is_dir() and not sub.name.startswith("."):
                files.extend(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise DataError(f"cannot list image folder {exc.filename or folder}: {exc.strerror or exc}") from None
    files = [p for p in files if not p.name.startswith(".")]
    if not files:
        raise DataError(f"image folder {folder} holds no JPEG/PNG images (flat, or one sub-folder per class)")
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def read_labels(folder: Union[str, os.PathLike], name: str = LABELS_FILE) -> Dict[str, int]:
    """``{relative file path: class index}`` from ``folder/labels.tsv`` (``file<TAB>class_index[<TAB>...]``).

    UTF-8 (a byte-order mark is allowed), any line ending; a first line whose index is not a number is a header;
    ``./`` before a file name is ignored. A line that is not UTF-8, lacks a column, or holds a non-integer or negative
    index raises :class:`DataError` naming the file and line.
    """
    path = Path(folder) / name
    if not path.is_file():
        raise DataError(f"no {name} in {folder}: give labels= explicitly (one class index per image), or a "
                        f"{name} with lines 'file<TAB>class_index'")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    out: Dict[str, int] = {}
    for lineno, bline in enumerate(raw.splitlines(), 1):
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{bline[exc.start]:02x} at column "
                            f"{exc.start + 1}); save {name} as UTF-8") from None
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2:
            raise DataError(f"{path}:{lineno}: expected 'file<TAB>class_index', got {line!r}")
        try:
            index = int(cols[1])
        except ValueError:
            if lineno == 1:
                continue  # header
            raise DataError(f"{path}:{lineno}: class index {cols[1]!r} is not an integer") from None
        if index < 0:
            raise DataError(f"{path}:{lineno}: class index {index} is negative")
        key = cols[0][2:] if cols[0].startswith("./") else cols[0]
        out[key] = index
    if not out:
        raise DataError(f"{path} holds no labels")
    return out


def folder_reads(relative: Union[str, os.PathLike]) -> bool:
    """Whether an image folder reads the file at ``relative`` (a path inside it): an image at the top or one
    sub-folder down, or the top-level labels file. Outputs must not land on such a path."""
    rel = Path(relative)
    if any(part.startswith(".") for part in rel.parts):
        return False
    return (len(rel.parts) <= 2 and rel.suffix.lower() in IMAGE_SUFFIXES) or rel.as_posix() == LABELS_FILE


def _to_rgb(im):
    """An 8-bit RGB copy of a PIL image of any mode, high bit depths rescaled (never clipped at 255).

    16-bit grey (``I;16*``) and 32-bit integer (``I``, which older Pillow uses for 16-bit PNGs) are read as 16-bit
    data: ``round(v / 257)``. Float (``F``): values in [0, 1] are scaled by 255, in [0, 255] kept, larger ones read as
    16-bit. Alpha is dropped and palettes expanded (``convert("RGB")``, as torchvision and Keras read images); Pillow
    reads 16-bit RGB(A) and grey+alpha PNGs as 8-bit already.
    """
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"mode {mode} image holds NaN or Inf pixels")
        top = float(a.max()) if a.size else 0.0
        if mode == "F" and top <= 1.0:
            a = a * 255.0
        elif mode != "F" or top > 255.0:
            a = a / 257.0
        grey = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return im.convert("RGB")


def load_image(path: Union[str, os.PathLike], size: Tuple[int, int],
               shorter_side: Optional[int] = None) -> np.ndarray:
    """One image as uint8 RGB ``(h, w, 3)``: shorter side resized to ``shorter_side``, centre crop ``size``."""
    from PIL import Image, UnidentifiedImageError

    h, w = int(size[0]), int(size[1])
    target = int(shorter_side) if shorter_side else int(round(min(h, w) / CROP_FRACTION))
    target = max(target, h, w)
    try:
        with Image.open(path) as im:
            im = _to_rgb(im)
            iw, ih = im.size
            if min(iw, ih) != target:
                s = target / min(iw, ih)
                iw, ih = max(w, int(round(iw * s))), max(h, int(round(ih * s)))
                im = im.resize((iw, ih), Image.Resampling.BILINEAR)
            left, top = int(round((iw - w) / 2)), int(round((ih - h) / 2))
            arr = np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {path} refused: {exc} Remove it from the folder or shrink it.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError) as exc:
        raise DataError(f"cannot read image {path}: {exc or type(exc).__name__}") from None
    return arr


# -- the data objects --------------------------------------------------------------------------------------------
class ImageSet(CalibrationSet):
    """Decoded, cropped images (uint8, NHWC) normalised batch by batch; a :class:`CalibrationSet`.

    ``files`` are the image paths in order; ``labels`` their class indices when the folder has ``labels.tsv``.
    ``index`` (what :meth:`subset` passes): the set is the images at these positions of ``images``, read in that
    order batch by batch, so that a subset shares its parent's decoded array instead of copying it.
    """

    def __init__(self, images: np.ndarray, preprocess: Preprocess, batch_size: int = 32,
                 files: Sequence[Path] = (), labels: Optional[np.ndarray] = None, name: str = "images",
                 index: Optional[np.ndarray] = None):
        self._source = images
        self._index = None if index is None else np.asarray(index, np.intp)
        self._gathered: Optional[np.ndarray] = None
        if images.ndim != 4 or len(self) == 0:
            raise DataError(f"image data {name!r} is empty")
        self.preprocess = preprocess
        self.batch_size = max(1, int(batch_size))
        self.files = list(files)
        self.labels = labels
        self.name = name

    @property
    def images(self) -> np.ndarray:
        """The set's decoded images as one uint8 array (for a subset, gathered on first use and kept)."""
        if self._index is None:
            return self._source
        if self._gathered is None:
            self._gathered = self._source[self._index]
        return self._gathered

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Images ``start:stop`` of the set (a view of the decoded array, or a gather of a subset's positions)."""
        return self._source[start:stop] if self._index is None else self._source[self._index[start:stop]]

    def batches(self) -> Iterator[np.ndarray]:
        for s in range(0, len(self), self.batch_size):
            yield self.preprocess(self._rows(s, s + self.batch_size))

    def __len__(self) -> int:
        return len(self._source) if self._index is None else len(self._index)

    @property
    def num_batches(self) -> int:
        return -(-len(self) // self.batch_size)

    def drift_batch(self, max_items: int = 16) -> List[np.ndarray]:
        return [self.preprocess(self._rows(0, max_items))]

    def subset(self, index) -> "ImageSet":
        """The images at ``index`` (a slice or integer array), same preprocessing; the decoded array is shared, not
        copied."""
        idx = np.arange(len(self))[index]
        return ImageSet(self._source, self.preprocess, self.batch_size, [self.files[i] for i in idx]
                        if self.files else (), None if self.labels is None else self.labels[idx], self.name,
                        index=idx if self._index is None else self._index[idx])


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
                            f"pass size=(h, w) to ImageFolder, or input_shape= when loading (--input-shape)")
        return int(shape[1]), int(shape[2])

    def _labels(self, files: List[Path]) -> Optional[np.ndarray]:
        """The class index of each file from the folder's labels file, or ``None`` (no file, or files without one)."""
        if not (self.path / LABELS_FILE).is_file():
            return None
        table = read_labels(self.path)
        rel = [f.relative_to(self.path).as_posix() for f in files]
        missing = [r for r in rel if r not in table]
        if missing:
            log.warning("%s/%s has no label for %d images (e.g. %s): labels not used",
                        self.path, LABELS_FILE, len(missing), missing[0])
            return None
        return np.array([table[r] for r in rel], np.int64)

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
        labels = self._labels(files)  # before decoding: a bad labels file is reported at once
        require_memory(len(files) * size[0] * size[1] * 3,
                       f"decoding {len(files)} images of {self.path} at {size[0]}x{size[1]}", DataError,
                       "use fewer images (--limit) or a smaller input size")
        out = np.empty((len(files), size[0], size[1], 3), np.uint8)

        def work(i):
            out[i] = load_image(files[i], size, self.shorter_side)

        disable = None if self.progress is None else not self.progress
        from PIL import Image

        # photos between Pillow's warning and error limits decode fine; its warning would be noise (the filter is
        # process-wide while the block runs, so the worker threads see it too)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pool = ThreadPoolExecutor(max_workers=self.workers)
            try:
                for _ in tqdm(pool.map(work, range(len(files))), total=len(files),
                              desc=f"reading {self.path.name}", unit="img", disable=disable, leave=False):
                    pass
            except BaseException:  # a bad image or Ctrl-C: drop the queued images instead of decoding them all
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
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
