"""Image folders, preprocessing presets, labels and array/batch calibration data."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qfrewrite.calibration import as_calibration_set
from qfrewrite.data import CalibrationSet
from qfrewrite.errors import DataError
from qfrewrite.images import (PRESETS, ImageFolder, load_image, read_labels, resolve_preprocess)
from qfrewrite.ir import ConvAttrs, Graph, Op


def _graph(hw=8, c=3, layout=None, preprocess=None):
    g = Graph("g")
    x = g.add_input("input", (None, hw, hw, c))
    n = g.add_node(Op.CONV2D, [x, g.const(np.ones((1, 1, c, 2)))], ConvAttrs())
    g.outputs = [n.output]
    if layout:
        g.meta["input_layout"] = layout
    if preprocess:
        g.meta["preprocess"] = preprocess
    return g


def _write(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode)
    im.save(path)


@pytest.mark.parametrize("name,pixel,expected", [
    ("inception", 0, -1.0), ("inception", 255, 1.0), ("tf-slim", 128, 0.0), ("tf-slim", 0, -1.0),
    ("efficientnet-lite", 127, 0.0), ("raw", 200, 200.0),
])
def test_presets_values(name, pixel, expected):
    pre = resolve_preprocess(name)
    out = pre(np.full((1, 2, 2, 3), pixel, np.uint8))
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_torch_preset_is_imagenet_mean_std():
    pre = resolve_preprocess("torch")
    x = np.array([[[[10, 100, 200]]]], np.uint8)
    want = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(pre(x), want, rtol=1e-5)


def test_custom_and_graph_default_and_missing_choice():
    assert resolve_preprocess((100.0, 2.0))(np.full((1, 1, 1, 3), 104, np.uint8))[0, 0, 0, 0] == pytest.approx(2.0)
    assert resolve_preprocess(None, _graph(preprocess="torch")).name == "torch"
    with pytest.raises(DataError, match="inception.*torch.*tf-slim.*efficientnet-lite.*raw"):
        resolve_preprocess(None, _graph())
    with pytest.raises(DataError, match="unknown preprocessing preset 'caffe'"):
        resolve_preprocess("caffe")
    with pytest.raises(DataError, match="positive"):
        resolve_preprocess((0.0, 0.0))
    assert set(PRESETS) == {"inception", "torch", "tf-slim", "efficientnet-lite", "raw"}


def test_resize_shorter_side_and_centre_crop(tmp_path):
    # 40 x 80 (h x w) image with a vertical stripe of columns 36..43 white: after resize to shorter side
    # round(8/0.875) = 9 and a centre crop of 8 x 8, the stripe stays centred.
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 36:44] = 255
    _write(tmp_path / "a.png", arr)
    out = load_image(tmp_path / "a.png", (8, 8))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    col = out[4, :, 0].astype(int)
    assert col[3] > 100 and col[4] > 100 and col[0] < 50 and col[7] < 50
    # an image whose shorter side already has the target size is cropped, not resampled
    arr = np.arange(9 * 12 * 3, dtype=np.uint8).reshape(9, 12, 3)
    _write(tmp_path / "b.png", arr)
    np.testing.assert_array_equal(load_image(tmp_path / "b.png", (8, 8)), arr[0:8, 2:10])


def test_folder_flat_and_class_subfolders_grey_converted(tmp_path):
    rng = np.random.default_rng(0)
    _write(tmp_path / "cat" / "1.jpg", rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
    _write(tmp_path / "dog" / "2.png", rng.integers(0, 255, (10, 10), dtype=np.uint8))  # grey
    _write(tmp_path / "3.JPEG", rng.integers(0, 255, (10, 14, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    cs = as_calibration_set(str(tmp_path), _graph(), preprocess="inception", batch_size=2)
    assert len(cs) == 3 and cs.num_batches == 2
    b = next(cs.batches())
    assert b.shape == (2, 8, 8, 3) and b.dtype == np.float32 and b.min() >= -1 and b.max() <= 1
    assert [p.name for p in cs.files] == ["3.JPEG", "1.jpg", "2.png"]
    grey = cs.images[2]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
    limited = as_calibration_set(ImageFolder(tmp_path, preprocess="raw", limit=2), _graph())
    assert len(limited) == 2


def test_folder_errors(tmp_path):
    g = _graph()
    with pytest.raises(DataError, match="no JPEG/PNG"):
        as_calibration_set(str(tmp_path), g, preprocess="raw")
    with pytest.raises(DataError, match="does not exist"):
        as_calibration_set(str(tmp_path / "nope"), g, preprocess="raw")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="broken.jpg"):
        as_calibration_set(str(tmp_path), g, preprocess="raw")
    (tmp_path / "broken.jpg").unlink()
    _write(tmp_path / "ok.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="expects 1 channels"):
        as_calibration_set(str(tmp_path), _graph(c=1), preprocess="raw")
    with pytest.raises(DataError, match="preprocess"):
        as_calibration_set(str(tmp_path), g)


def test_read_labels(tmp_path):
    (tmp_path / "labels.tsv").write_text("file\tclass_index\tsynset\tname\na.png\t3\tn1\tx\nsub/b.png\t7\tn2\ty\n")
    assert read_labels(tmp_path) == {"a.png": 3, "sub/b.png": 7}
    _write(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / "sub" / "b.png", np.zeros((8, 8, 3), np.uint8))
    cs = ImageFolder(tmp_path, preprocess="raw").read(_graph())
    np.testing.assert_array_equal(cs.labels, [3, 7])
    (tmp_path / "labels.tsv").write_text("file\tclass_index\na.png\tseven\n")
    with pytest.raises(DataError, match="labels.tsv:2"):
        read_labels(tmp_path)
    with pytest.raises(DataError, match="no labels.tsv"):
        read_labels(tmp_path / "sub")


def test_arrays_in_source_layout_and_errors():
    rng = np.random.default_rng(1)
    nchw = rng.normal(size=(5, 3, 8, 8)).astype(np.float32)
    cs = as_calibration_set(nchw, _graph(layout="NCHW"), batch_size=2)
    assert cs.num_batches == 3 and len(cs) == 5
    np.testing.assert_array_equal(np.concatenate(list(cs.batches())), nchw.transpose(0, 2, 3, 1))
    with pytest.raises(DataError, match=r"NCHW, i.e. \(N, C, H, W\)"):
        as_calibration_set(nchw.transpose(0, 2, 3, 1), _graph(layout="NCHW"))
    with pytest.raises(DataError, match="expects"):
        as_calibration_set(np.zeros((2, 9, 9, 3), np.float32), _graph())
    with pytest.raises(DataError, match="NaN"):
        as_calibration_set(np.full((2, 8, 8, 3), np.nan, np.float32), _graph())
    assert len(as_calibration_set(np.zeros((7, 8, 8, 3)), _graph(), limit=3)) == 3
    batches = (np.zeros((2, 8, 8, 3)) for _ in range(4))
    assert len(as_calibration_set(batches, _graph(), limit=3)) == 3
    with pytest.raises(DataError, match="empty"):
        CalibrationSet([])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preprocess_table_equals_the_arithmetic(preset):
    """uint8 images are normalised from a 256-value table per channel: bit for bit the float32 arithmetic."""
    pre = resolve_preprocess(preset)
    x = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    x[0, 0, 0] = [0, 255, 128]
    mean, inv = pre._terms()
    want = (x.astype(np.float32) - mean) * inv
    got = pre(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(pre(x.astype(np.float32)), want)  # float input: the arithmetic itself


def test_subset_shares_the_decoded_array_and_reads_its_positions_in_order():
    from qfrewrite.images import ImageSet

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    full = ImageSet(raw, resolve_preprocess("inception"), batch_size=3, files=[f"f{i}" for i in range(10)],
                    labels=np.arange(10))
    idx = np.array([9, 0, 4, 5, 7])
    sub = full.subset(idx)
    assert sub._source is raw  # no copy of the decoded images
    assert len(sub) == 5 and sub.num_batches == 2 and sub.files == ["f9", "f0", "f4", "f5", "f7"]
    np.testing.assert_array_equal(sub.labels, idx)
    want = resolve_preprocess("inception")(raw[idx])
    np.testing.assert_array_equal(np.concatenate(list(sub.batches())), want)
    np.testing.assert_array_equal(sub.drift_batch(2)[0], want[:2])
    np.testing.assert_array_equal(sub.images, raw[idx])
    # a subset of a subset indexes the original positions
    subsub = sub.subset(slice(1, 4))
    np.testing.assert_array_equal(subsub.images, raw[[0, 4, 5]])
    assert subsub.files == ["f0", "f4", "f5"] and list(subsub.labels) == [0, 4, 5]
    with pytest.raises(DataError, match="empty"):
        full.subset(slice(0, 0))
    assert sub.images is sub.images  # gathered once, not on every access
