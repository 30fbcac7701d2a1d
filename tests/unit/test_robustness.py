"""Bad input gets a typed error naming the file/layer; outputs are replaced only when complete; inputs untouched."""
import hashlib
import shutil

import numpy as np
import pytest

import qfrewrite
from qfrewrite.demo.run import DEMO_IMAGES, DEMO_MODEL
from qfrewrite.errors import DataError, EmitError, ModelLoadError, QfrewriteError, UnsupportedOpError
from qfrewrite.io_utils import atomic_path
from qfrewrite.passes import FoldBatchNorm
from tests.graphs import tiny_mobilenet


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        qfrewrite.load(tmp_path / "nope.onnx")


@pytest.mark.parametrize("suffix", [".h5", ".onnx", ".pb", ".keras"])
def test_corrupt_files_name_the_file(tmp_path, suffix):
    bad = tmp_path / f"model{suffix}"
    bad.write_bytes(b"\x08\x01garbage that is no model at all" * 10)
    with pytest.raises(ModelLoadError) as info:
        qfrewrite.load(bad)
    assert str(bad) in str(info.value) or bad.name in str(info.value)


def test_truncated_h5_names_the_file(tmp_path):
    cut = tmp_path / "cut.h5"
    cut.write_bytes(DEMO_MODEL.read_bytes()[:300_000])
    with pytest.raises(ModelLoadError, match="cut.h5"):
        qfrewrite.load(cut)


def test_unknown_format(tmp_path):
    f = tmp_path / "model.tflite2"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="supported"):
        qfrewrite.load(f)


def test_unsupported_keras_layer_names_layer_and_class():
    import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inp)
    x = keras.layers.LayerNormalization(name="odd_norm")(x)
    model = keras.Model(inp, x)
    with pytest.raises(UnsupportedOpError) as info:
        qfrewrite.load(model)
    msg = str(info.value)
    assert "odd_norm" in msg and "LayerNormalization" in msg and "supported" in msg


def test_nan_weights_are_refused():
    import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="bad_conv")(inp)
    model = keras.Model(inp, x)
    k, b = model.get_layer("bad_conv").get_weights()
    k[0, 0, 0, 0] = np.nan
    model.get_layer("bad_conv").set_weights([k, b])
    with pytest.raises(ModelLoadError, match="bad_conv.*NaN or Inf|NaN or Inf.*bad_conv"):
        qfrewrite.load(model)


def test_calibration_data_errors(rng, tmp_path):
    g = tiny_mobilenet(rng)
    with pytest.raises(DataError, match="expects"):
        qfrewrite.rewrite(g, passes=[], data=np.zeros((4, 16, 16, 1), np.float32))     # wrong channel count
    with pytest.raises(DataError, match="expects"):
        qfrewrite.rewrite(g, passes=[], data=np.zeros((4, 20, 20, 3), np.float32))     # wrong size
    with pytest.raises(DataError, match="empty"):
        qfrewrite.rewrite(g, passes=[], data=np.zeros((0, 16, 16, 3), np.float32))
    with pytest.raises(DataError, match="NaN or Inf"):
        qfrewrite.rewrite(g, passes=[], data=np.full((2, 16, 16, 3), np.inf, np.float32))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no JPEG/PNG"):
        qfrewrite.rewrite(g, passes=[], data=empty, preprocess="inception")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        qfrewrite.rewrite(g, passes=[], data=junk, preprocess="inception")


def test_grey_images_are_read_as_rgb(rng, tmp_path):
    from PIL import Image

    folder = tmp_path / "grey"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8), mode="L").save(folder / f"g{i}.png")
    g = tiny_mobilenet(rng)
    res = qfrewrite.rewrite(g, passes=[], data=folder, preprocess="inception")
    assert len(res.context.data) == 3


def test_existing_output_replaced_only_when_complete(rng, tmp_path, monkeypatch):
    out = tmp_path / "model.tflite"
    out.write_bytes(b"previous model")
    res = qfrewrite.rewrite(tiny_mobilenet(rng), passes=[FoldBatchNorm()], stats=False)

    import tensorflow as tf

    def boom(self):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(tf.lite.TFLiteConverter, "convert", boom)
    with pytest.raises(EmitError, match="converter crashed"):
        res.to_tflite(out)
    assert out.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.tflite"]      # no temporary file left behind
    monkeypatch.undo()
    res.to_tflite(out)
    assert out.read_bytes()[4:8] == b"TFL3"


def test_atomic_path_removes_partial_file(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("stop")
    assert not target.exists() and not list(tmp_path.iterdir())


def test_input_file_is_never_modified(tmp_path):
    model = tmp_path / "m.h5"
    shutil.copy(DEMO_MODEL, model)
    before = _sha(model)
    res = qfrewrite.rewrite(model, passes=[FoldBatchNorm()], stats=False)
    res.to_tflite(tmp_path / "m.tflite")
    assert _sha(model) == before


def test_every_error_is_a_qfrewrite_error():
    for cls in (ModelLoadError, UnsupportedOpError, DataError, EmitError):
        assert issubclass(cls, QfrewriteError)


def test_functional_subclass_of_keras_model_is_recognised():
    import keras

    class MyModel(keras.Model):
        pass

    inp = keras.Input((8, 8, 3))
    out = keras.layers.Conv2D(4, 3, name="c")(inp)
    g = qfrewrite.load(MyModel(inp, out))
    assert [n.op.value for n in g] == ["Conv2D"]


def test_rewrite_limit_caps_the_calibration_data(rng):
    g = tiny_mobilenet(rng)
    res = qfrewrite.rewrite(g, passes=[], data=rng.normal(size=(10, 16, 16, 3)).astype(np.float32), limit=4)
    assert len(res.context.data) == 4
