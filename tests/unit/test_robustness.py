"""Bad input gets a typed error naming the file/layer; outputs are replaced only when complete; inputs untouched."""
import hashlib
import re
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


# == bad input never costs a file, never escapes untyped =============================================================
import os  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

from click.testing import CliRunner  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qfrewrite import io_utils  # noqa: E402
from qfrewrite.cli import main  # noqa: E402
from qfrewrite.errors import OutputError  # noqa: E402
from qfrewrite.images import load_image, read_labels  # noqa: E402
from qfrewrite.io_utils import OutputSet  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NATIVE_NOISE = ("absl::InitializeLog", "oneDNN custom operations", "XNNPACK delegate", "cpu_feature_guard")


def _onnx_classifier(path, classes=2, c=4, hw=8, conv_bias=None, bn_var=None, two_inputs=False, open_hw=False):
    """Conv(3x3, stride 2) + BatchNormalization + Relu + GlobalAveragePool + Flatten + Gemm, NCHW."""
    import onnx

    rng = np.random.default_rng(0)
    var = np.full(c, 0.5, np.float32) if bn_var is None else np.asarray(bn_var, np.float32)

    def init(name, a):
        return numpy_helper.from_array(np.asarray(a, np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g", "be", "m", "v"], ["bn1"], name="bn1"),
             helper.make_node("Relu", ["bn1"], ["r1"]), helper.make_node("GlobalAveragePool", ["r1"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1, name="fc")]
    inits = [init("w", rng.normal(scale=0.3, size=(c, 3, 3, 3))), init("b", np.zeros(conv_bias or c)),
             init("g", np.ones(c)), init("be", np.zeros(c)), init("m", np.zeros(c)), init("v", var),
             init("fw", rng.normal(size=(classes, c))), init("fb", np.zeros(classes))]
    dims = ["N", 3, "H", "W"] if open_hw else ["N", 3, hw, hw]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)]
    if two_inputs:
        nodes.insert(0, helper.make_node("Add", ["a", "b2"], ["x"]))
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("a", "b2")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    onnx.save(m, str(path))
    return path


def _keras_classifier(classes=2):
    import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False, name="conv1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(classes, activation="softmax", name="fc")(x))


@pytest.fixture
def job(tmp_path):
    """A folder holding model.onnx (2 classes), model.h5 (the demo model's bytes) and images/ with labels."""
    from PIL import Image

    _onnx_classifier(tmp_path / "model.onnx")
    shutil.copy(DEMO_MODEL, tmp_path / "model.h5")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"i{i}.png")
    (images / "labels.tsv").write_text("".join(f"i{i}.png\t{i % 2}\n" for i in range(4)))
    return tmp_path


def _tree(folder):
    """{relative path: sha256} of every file under ``folder`` (temporary files included: none may be left)."""
    return {p.relative_to(folder).as_posix(): _sha(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _cli(folder, *args):
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(main, list(args))
    finally:
        os.chdir(cwd)


def _one_error_line(r, status=1):
    lines = r.output.strip().splitlines()
    assert r.exit_code == status, r.output
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in r.output, r.output
    return lines[0]


CONVERT = ("convert", "model.onnx", "--data", "images", "--preprocess", "inception", "-o", "out.tflite")


@pytest.mark.parametrize("args, says", [
    (("diagnose", "model.h5", "--json", "model.h5"), "--json model.h5 is the model model.h5"),
    (("diagnose", "model.h5", "--json", "./images/../model.h5"), "is the model model.h5"),
    (("diagnose", "model.h5", "--json", "d.json", "--plot", "d.json"), "--plot d.json and --json d.json are the same"),
    (("diagnose", "model.h5", "--data", "images", "--preprocess", "inception", "--json", "images/labels.tsv"),
     "would be read as part of the images images"),
    (("eval", "model.onnx", "--data", "images", "--preprocess", "inception", "--json", "model.onnx"),
     "--json model.onnx is the model model.onnx"),
    (("eval", "model.onnx", "--data", "images", "--preprocess", "inception", "--reference", "model.h5", "--json",
      "model.h5"), "is the reference model model.h5"),
    (CONVERT + ("--onnx", "model.onnx"), "the ONNX model model.onnx is the model model.onnx"),
    (CONVERT + ("--onnx", "out.tflite"), "the ONNX model out.tflite and the TFLite model out.tflite are the same"),
    (CONVERT + ("--onnx", "out.json"), "the ONNX model out.json and the report"),
    (CONVERT + ("--onnx", "images/labels.tsv"), "labels.tsv would be read as part of the calibration images"),
    (("demo", "--out-dir", ".", "--photo", "mobilenet_v1_0.25_int8.tflite"), "is the photo"),
])
def test_an_output_that_is_an_input_or_another_output_is_refused(job, args, says):
    if args[0] == "demo":
        (job / "mobilenet_v1_0.25_int8.tflite").write_bytes(b"a file the user passes as the photo")
    before = _tree(job)
    r = _cli(job, *args)
    assert says in _one_error_line(r)
    assert _tree(job) == before


def test_an_output_reached_through_a_symlink_or_hard_link_is_the_input(job):
    os.symlink("model.h5", job / "link.json")
    os.link(job / "model.onnx", job / "hard.json")
    before = _tree(job)
    for link, model in (("link.json", "model.h5"), ("hard.json", "model.onnx")):
        r = _cli(job, "diagnose", model, "--json", link)
        assert f"--json {link} is the model {model}" in _one_error_line(r)
    assert _tree(job) == before


def test_convert_failing_late_leaves_every_previous_output_as_it_was(job, monkeypatch):
    for name in ("out.tflite", "out.json", "out.onnx"):
        (job / name).write_bytes(b"previous " + name.encode())
    before = _tree(job)
    import qfrewrite.emit.onnx_emitter as onnx_emitter

    def fail(*args, **kwargs):
        raise EmitError("the ONNX emitter failed")

    monkeypatch.setattr(onnx_emitter, "emit_onnx", fail)
    r = _cli(job, *CONVERT, "--onnx", "out.onnx")
    assert "the ONNX emitter failed" in _one_error_line(r)
    assert _tree(job) == before                       # the old model, its report and no temporary file


def test_convert_checks_its_output_folders_before_the_work(job, monkeypatch):
    import qfrewrite.api

    def never(*args, **kwargs):
        raise AssertionError("the conversion ran although an output cannot be written")

    monkeypatch.setattr(qfrewrite.api, "rewrite", never)
    r = _cli(job, *CONVERT[:-1], "model.h5/out.tflite")
    assert "the TFLite model model.h5/out.tflite: model.h5 is a file, not a folder" in _one_error_line(r)
    monkeypatch.setattr(io_utils, "_probe_folder", lambda folder: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))
    r = _cli(job, *CONVERT, "--onnx", "ro/out.onnx")
    assert "cannot write in" in _one_error_line(r) and "Permission denied" in r.output


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_the_work(job):
    ro = job / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = _cli(job, *CONVERT, "--onnx", "ro/out.onnx")
        assert "cannot write in" in _one_error_line(r)
        assert not (job / "out.tflite").exists()
    finally:
        ro.chmod(0o755)


def test_ctrl_c_during_convert_leaves_nothing_and_exits_130(job, monkeypatch):
    import qfrewrite.api

    (job / "out.tflite").write_bytes(b"previous model")
    before = _tree(job)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qfrewrite.api.PassManager, "run", interrupted)
    r = _cli(job, *CONVERT)
    assert r.exit_code == 130 and "Interrupted." in r.output and "Traceback" not in r.output
    assert _tree(job) == before


def test_output_set_is_all_or_nothing(tmp_path):
    (tmp_path / "a.json").write_bytes(b"old a")
    with pytest.raises(RuntimeError):
        with OutputSet() as outs:
            a, b = outs.add(tmp_path / "a.json", "a"), outs.add(tmp_path / "new" / "deep" / "b.bin", "b")
            outs.write_bytes(a, b"new a")
            outs.write_bytes(b, b"new b")
            raise RuntimeError("late failure")
    assert _tree(tmp_path) == {"a.json": hashlib.sha256(b"old a").hexdigest()}    # folders made for b removed too
    with OutputSet() as outs:
        outs.write_bytes(outs.add(tmp_path / "a.json", "a"), b"new a")
        outs.write_bytes(outs.add(tmp_path / "new" / "b.bin", "b"), b"new b")
    assert (tmp_path / "a.json").read_bytes() == b"new a" and (tmp_path / "new" / "b.bin").read_bytes() == b"new b"


def test_output_set_undoes_a_commit_that_fails_half_way(tmp_path, monkeypatch):
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"old " + name.encode())
    real_replace, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    with pytest.raises(OutputError, match="No space left"):
        with OutputSet() as outs:
            for name in ("a", "b"):
                outs.write_bytes(outs.add(tmp_path / name, name), b"new " + name.encode())
            monkeypatch.setattr(io_utils.os, "replace", second_fails)
    monkeypatch.undo()
    assert _tree(tmp_path) == {n: hashlib.sha256(b"old " + n.encode()).hexdigest() for n in ("a", "b")}


def test_output_set_refusals(tmp_path, monkeypatch):
    (tmp_path / "folder.json").mkdir()
    saved = tmp_path / "saved_model"
    saved.mkdir()
    images = tmp_path / "images"
    (images / "cls").mkdir(parents=True)
    from qfrewrite.images import folder_reads

    outs = OutputSet([("the model", saved), ("the images", images, folder_reads)])
    for path, says in ((tmp_path / "folder.json", "is a folder"), (saved / "variables" / "x.json", "read as part"),
                       (images / "cls" / "new.JPG", "read as part"), (images / "labels.tsv", "read as part")):
        with pytest.raises(OutputError, match=says):
            outs.add(path, "out")
    outs.add(images / "model.tflite", "not read by an image folder")
    outs.add(images / "cls" / "deeper" / "x.png", "below the class folders: not read")
    outs.add(tmp_path / "a.json", "a")
    with pytest.raises(OutputError, match="same file"):
        outs.add(tmp_path / "." / "a.json", "again")
    monkeypatch.setattr(io_utils, "_probe_folder", lambda folder: True)     # a folder that ignores case
    with pytest.raises(OutputError, match="same file"):
        outs.add(tmp_path / "A.JSON", "by another case")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with OutputSet() as outs:
            outs.write_bytes(outs.add(tmp_path / "set.bin", "x"), b"x")
        io_utils.atomic_write_bytes(tmp_path / "single.bin", b"x")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"set.bin": mode, "single.bin": mode}


def test_the_api_never_writes_over_its_source_model(job):
    from qfrewrite.diagnose import diagnose

    res = qfrewrite.rewrite(job / "model.onnx", passes=[FoldBatchNorm()], stats=False)
    diag = diagnose(job / "model.onnx")
    before = _tree(job)
    with pytest.raises(OutputError, match="is the source model"):
        res.to_onnx(job / "model.onnx")
    with pytest.raises(OutputError, match="is the source model"):
        res.to_tflite(job / "images" / ".." / "model.onnx")
    for write in (diag.to_json, diag.plot):
        with pytest.raises(OutputError, match="is the model"):
            write(job / "model.onnx")
    assert _tree(job) == before


# -- images and labels --------------------------------------------------------------------------------------------
def _png(path, w, h, bitdepth, colortype, rows: bytes):
    """A PNG written by hand (Pillow cannot write 16-bit colour): filter byte 0 before each row."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bitdepth, colortype, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def _rows(a):
    return b"".join(b"\x00" + r.tobytes() for r in a)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "RGB48", "LA16", "LA", "P", "RGBA", "CMYK", "1"])
def test_high_bit_depth_and_odd_modes_become_8_bit_rgb(tmp_path, mode):
    from PIL import Image

    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)   # square: read without resizing
    grey = rgb[..., 0]
    path, want = tmp_path / "x.png", np.repeat(grey[..., None], 3, axis=2)
    if mode == "I;16":
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    elif mode == "I":  # a 32-bit integer image (TIFF, named .png: Pillow goes by the content)
        Image.fromarray(grey.astype(np.int32) * 257).save(path, format="TIFF")
    elif mode == "F":
        Image.fromarray(grey.astype(np.float32) / 255.0).save(path, format="TIFF")
    elif mode == "RGB48":
        _png(path, 16, 16, 16, 2, _rows(rgb.astype(">u2") * 257))
        want = rgb
    elif mode == "LA16":
        la = np.stack([grey, np.full_like(grey, 200)], axis=2).astype(">u2") * 257
        _png(path, 16, 16, 16, 4, _rows(la))
    elif mode in ("LA", "1"):
        im = Image.fromarray(grey).convert(mode)
        im.save(path)
        want = np.asarray(im.convert("L").convert("RGB"))
    elif mode in ("P", "RGBA", "CMYK"):  # 8-bit modes: as Pillow converts the decoded file
        path = path.with_suffix(".jpg") if mode == "CMYK" else path
        Image.fromarray(rgb).convert(mode).save(path, quality=100)
        with Image.open(path) as im:
            want = np.asarray(im.convert("RGB"))
    with Image.open(path) as im:
        assert mode.startswith(im.mode) or mode in ("RGB48", "LA16")
    got = load_image(path, (16, 16), shorter_side=16)
    assert got.dtype == np.uint8 and got.shape == (16, 16, 3)
    np.testing.assert_allclose(got.astype(int), want.astype(int), atol=1 if mode == "F" else 0)
    assert got.max() < 255 or want.max() == 255        # never saturated


def test_decompression_bombs_are_refused_by_name_and_large_photos_read_quietly(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)       # the warning above 500 pixels, the error above 1000
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (30, 30), (10, 20, 30)).save(folder / "large.png")
    g = tiny_mobilenet(np.random.default_rng(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # any warning fails the test
        res = qfrewrite.rewrite(g, passes=[], data=folder, preprocess="raw")
    assert len(res.context.data) == 1
    _png(folder / "bomb.png", 40000, 40000, 8, 2, b"\x00" * 10)
    with pytest.raises(DataError, match=r"bomb\.png refused: .*exceeds limit.*Remove it"):
        qfrewrite.rewrite(g, passes=[], data=folder, preprocess="raw")


def test_labels_file_encoding_and_content(tmp_path):
    (tmp_path / "labels.tsv").write_bytes("file\tlabel\ncaf\u00e9.png\t3\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"labels\.tsv:2: not UTF-8 text \(byte 0xe9 at column 4\)"):
        read_labels(tmp_path)
    (tmp_path / "labels.tsv").write_bytes("\ufeffcaf\u00e9.png\t3\r\n./b.png\t4\r\n".encode("utf-8"))
    assert read_labels(tmp_path) == {"caf\u00e9.png": 3, "b.png": 4}       # BOM, CRLF, ./ prefix
    (tmp_path / "labels.tsv").write_text("a.png\t1\nb.png\t-1\n")
    with pytest.raises(DataError, match=r"labels\.tsv:2: class index -1 is negative"):
        read_labels(tmp_path)


def test_latin1_labels_through_the_cli(job):
    (job / "images" / "labels.tsv").write_bytes("i0.png\t1\ni1.png\t0\ncaf\u00e9.png\t1\n".encode("latin-1"))
    r = _cli(job, *CONVERT)
    assert "images/labels.tsv:3: not UTF-8 text" in _one_error_line(r)


def test_labels_that_do_not_fit_the_model_give_no_accuracy(job):
    (job / "images" / "labels.tsv").write_text("".join(f"i{i}.png\t{i + 3}\n" for i in range(4)))
    r = _cli(job, *CONVERT, "--holdout", "2")
    assert r.exit_code == 0, r.output
    assert ("top-1        not measured: the labels do not fit the model: class indices 3..6, the model gives 2 "
            "scores per image") in r.output and "float 0.0%" not in r.output
    r = _cli(job, "eval", "model.onnx", "--data", "images", "--preprocess", "inception")
    assert r.exit_code == 0 and "no accuracy: the labels do not fit the model" in r.output and "top-1" not in r.output


def test_labels_need_one_score_per_class():
    from qfrewrite.evaluate import labels_misfit

    assert labels_misfit(np.array([0, 1]), (2,)) is None and labels_misfit(np.array([0, 999]), (1001,), 1) is None
    assert "class indices 0..1000, the model gives 1001 scores per image (1000 classes after the label offset 1)" \
        in labels_misfit(np.array([0, 1000]), (1001,), 1)
    assert "outputs of shape (7, 7, 16) per image, not one score per class" in labels_misfit(np.array([1]), (7, 7, 16))
    assert labels_misfit(np.array([3]), (1, 1, 5)) is None


def test_decoding_more_than_the_memory_is_refused(tmp_path, monkeypatch):
    import qfrewrite.resources

    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    monkeypatch.setattr(qfrewrite.resources, "physical_memory", lambda: 100)
    with pytest.raises(DataError, match=r"decoding 1 images of .* at 16x16 needs about 768 B of memory, more than"):
        qfrewrite.rewrite(tiny_mobilenet(np.random.default_rng(0)), passes=[], data=tmp_path, preprocess="raw")


# -- models -------------------------------------------------------------------------------------------------------
def _negative_variance_graphdef(tmp_path, fused):
    tf = pytest.importorskip("tensorflow")
    g = tf.Graph()
    var = np.array([1.0, -1.0, 1.0, 1.0], np.float32)
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (1, 8, 8, 3), name="x")
        c = tf.nn.conv2d(x, tf.constant(np.ones((3, 3, 3, 4), np.float32)), 1, "SAME")
        if fused:
            y, *_ = tf.compat.v1.nn.fused_batch_norm(c, tf.ones(4), tf.zeros(4), tf.zeros(4), tf.constant(var),
                                                     is_training=False, name="bn")
        else:
            y = tf.nn.batch_normalization(c, tf.zeros(4), tf.constant(var), tf.zeros(4), tf.ones(4), 1e-3,
                                          name="block/BatchNorm/batchnorm")
        tf.identity(tf.reduce_mean(tf.nn.relu(y), [1, 2]), name="out")
    path = tmp_path / "m.pb"
    path.write_bytes(g.as_graph_def().SerializeToString())
    return path, "bn" if fused else "block/BatchNorm"


def _negative_variance_saved_model(tmp_path):
    tf = pytest.importorskip("tensorflow")

    class Model(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 8, 8, 3), tf.float32)])
        def serve(self, x):
            c = tf.nn.conv2d(x, tf.ones((3, 3, 3, 4)), 1, "SAME")
            y, *_ = tf.compat.v1.nn.fused_batch_norm(c, tf.ones(4), tf.zeros(4), tf.zeros(4),
                                                     tf.constant([1.0, 1.0, -2.0, 1.0]), is_training=False,
                                                     name="bn")
            return {"y": tf.reduce_mean(y, [1, 2])}

    m = Model()
    tf.saved_model.save(m, str(tmp_path / "saved"), signatures={"serving_default": m.serve})
    return tmp_path / "saved", "bn"


@pytest.mark.parametrize("source", ["keras", "onnx", "graphdef", "graphdef_unfused", "saved_model"])
def test_negative_batchnorm_variance_is_refused_at_load_naming_the_layer(tmp_path, source):
    if source == "keras":
        model, layer = _keras_classifier(), "bn1"
        g, b, m, v = model.get_layer("bn1").get_weights()
        v[2] = -0.5
        model.get_layer("bn1").set_weights([g, b, m, v])
    elif source == "onnx":
        model, layer = _onnx_classifier(tmp_path / "m.onnx", bn_var=[0.5, 0.5, -0.5, 0.5]), "bn1"
    elif source == "saved_model":
        model, layer = _negative_variance_saved_model(tmp_path)
    else:
        model, layer = _negative_variance_graphdef(tmp_path, fused=source == "graphdef")
    with pytest.raises(ModelLoadError, match=rf"BatchNorm statistics .*{layer}.*\(variance -\S+ in channel \d\)"):
        qfrewrite.load(model)


def test_negative_batchnorm_epsilon_is_refused(tmp_path):
    import onnx

    ins = [numpy_helper.from_array(np.full(3, v, np.float32), n) for n, v in (("g", 1), ("b", 0), ("m", 0), ("v", 1))]
    graph = helper.make_graph([helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=-1.0,
                                                name="bn_eps")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], ins)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ModelLoadError, match=r"bn_eps \(epsilon -1\)"):
        qfrewrite.load(tmp_path / "m.onnx")


def test_a_layer_larger_than_its_input_is_refused_at_load(tmp_path):
    path = _onnx_classifier(tmp_path / "open.onnx", open_hw=True)
    assert qfrewrite.load(path, input_shape=(1, 3, 2, 2)).inputs[0].shape == (None, 2, 2, 3)   # SAME pads: fine
    import onnx

    m = onnx.load(str(path))
    del m.graph.node[0].attribute[:]                       # the stem conv becomes 3x3 VALID, stride 1
    onnx.save(m, str(path))
    with pytest.raises(ModelLoadError, match=r"layer 'conv1' \(Conv2D\) would give an output of shape "
                                             r"\(None, 0, 0, 4\) from input \(None, 2, 2, 3\)"):
        qfrewrite.load(path, input_shape=(1, 3, 2, 2))


def test_pipes_and_devices_are_not_read_as_models(tmp_path):
    os.mkfifo(tmp_path / "model.onnx")
    for path in [tmp_path / "model.onnx"] + [d for d in ["/dev/zero"] if os.path.exists(d)]:
        with pytest.raises(ModelLoadError, match="not a regular file or folder"):
            qfrewrite.load(path)


def test_non_finite_batchnorm_statistics_name_the_layer(tmp_path):
    with pytest.raises(ModelLoadError, match=r"NaN or Inf in 1 layer\(s\): bn1 \(BatchNorm"):
        qfrewrite.load(_onnx_classifier(tmp_path / "m.onnx", bn_var=[0.5, np.nan, 0.5, 0.5]))


def test_malformed_onnx_initializers_name_the_node(tmp_path):
    with pytest.raises(ModelLoadError, match=r"node 'conv1' \(Conv\) is malformed: its bias .* has 12 values for 4"):
        qfrewrite.load(_onnx_classifier(tmp_path / "a.onnx", conv_bias=12))
    with pytest.raises(ModelLoadError, match=r"node 'bn1' \(BatchNormalization\) is malformed: its variance has 5"):
        qfrewrite.load(_onnx_classifier(tmp_path / "b.onnx", bn_var=np.ones(5)))


def test_keras_weights_that_do_not_fit_their_layer_name_it(tmp_path):
    import h5py

    path = tmp_path / "m.h5"
    _keras_classifier().save(path)
    with h5py.File(path, "r+") as f:
        name = next(n for n in _h5_datasets(f) if n.endswith("moving_variance"))
        del f[name]
        f.create_dataset(name, data=np.ones(3, np.float32))
    with pytest.raises(ModelLoadError, match=r"m\.h5: BatchNorm 'bn1': its moving variance has 3 values for 4 "
                                             r"channels"):
        qfrewrite.load(path)


def _h5_datasets(f):
    import h5py

    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def test_several_inputs_are_refused_at_load_listing_them(tmp_path):
    import keras

    a, b = keras.Input((8, 8, 3), name="img_a"), keras.Input((8, 8, 3), name="img_b")
    model = keras.Model([a, b], keras.layers.Conv2D(4, 3, name="c")(keras.layers.Add()([a, b])))
    for source, names in ((model, "'img_a' (None, 8, 8, 3), 'img_b'"),
                          (_onnx_classifier(tmp_path / "two.onnx", two_inputs=True), "'a' (None, 8, 8, 3), 'b2'")):
        with pytest.raises(ModelLoadError, match=rf"has 2 inputs \({re.escape(names)}.*one image input"):
            qfrewrite.load(source)


def test_absurd_input_shape_is_refused_with_the_memory_it_needs(job):
    _onnx_classifier(job / "open.onnx", open_hw=True)
    r = _cli(job, "convert", "open.onnx", "--data", "images", "--preprocess", "inception", "-o", "o.tflite",
             "--input-shape", "1,3,1000000,1000000")
    line = _one_error_line(r)
    assert "input shape (None, 1000000, 1000000, 3) (NHWC): one image at layer 'conv1' needs about" in line
    assert "GiB of memory, more than this machine's" in line and not (job / "o.tflite").exists()
    r = _cli(job, "convert", "open.onnx", "--data", "images", "-o", "o.tflite", "--input-shape", "1,3,0,-4")
    assert "expected positive integers" in _one_error_line(r, status=2)


# -- the terminal -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (("convert", "model.onnx", "--data", "images"), "Missing option '-o' / '--output' (see 'main convert --help')"),
    (("convert", "model.onnx", "-o", "o.tflite", "--data", "images", "--recipe", "x"), "'x' is not one of"),
    (("convrt",), "No such command 'convrt'"),
    (("diagnose", "model.h5", "--top", "0"), "Invalid value for '--top'"),
])
def test_usage_errors_are_one_line_and_exit_2(job, args, says):
    assert says in _one_error_line(_cli(job, *args), status=2)


PROBE = """
import logging
from absl import logging as absl_logging
from qfrewrite.cli import main, reports_errors

@main.command("probe")
@reports_errors
def probe():
    absl_logging.info("absl's first record gives the root logger a handler")
    logging.getLogger("qfrewrite.probe").warning("probe warning")

main(["probe"])
"""


def test_each_warning_is_printed_once():
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("probe warning") == 1, p.stderr
    assert "qfrewrite: WARNING: probe warning" in p.stderr and "absl" not in p.stderr


SIGNALLED = """
import os, signal, sys, time
from qfrewrite.cli import main, reports_errors
from qfrewrite.io_utils import OutputSet

# a parent that ignores SIGINT (a test runner's worker) passes that on: Ctrl-C as in a terminal
signal.signal(signal.SIGINT, signal.default_int_handler)

@main.command("probe")
@reports_errors
def probe():
    with OutputSet() as outs:
        outs.write_bytes(outs.add("out.bin", "the output"), b"new")
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        time.sleep(30)

main(["probe"])
"""


@pytest.mark.parametrize("sig, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_mid_run_leaves_no_file(tmp_path, sig, status):
    (tmp_path / "out.bin").write_bytes(b"old")
    p = subprocess.run([sys.executable, "-c", SIGNALLED, sig], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == status, p.stderr
    assert [f.name for f in tmp_path.iterdir()] == ["out.bin"] and (tmp_path / "out.bin").read_bytes() == b"old"
    assert "Traceback" not in p.stderr


def test_native_start_up_lines_are_filtered_and_other_lines_kept(capfd):
    from qfrewrite import native_log

    with native_log.quiet_native_stderr():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"I0000 00:00:1 port.cc:153] oneDNN custom operations are on. You may see ...\n")
        os.write(2, b"a real native error\n")
    assert capfd.readouterr().err == "a real native error\n"


def test_convert_in_a_real_process_keeps_the_terminal_clean(job):
    """One real ``python -m qfrewrite convert`` run: no TensorFlow start-up lines, labels that do not fit said once,
    outputs with the umask's mode."""
    from PIL import Image

    _keras_classifier().save(job / "k.keras")
    Image.new("RGB", (9, 9)).save(job / "images" / "unlabelled.png")          # triggers one warning
    p = subprocess.run([sys.executable, "-m", "qfrewrite", "convert", "k.keras", "--data", "images", "--preprocess",
                        "inception", "-o", "k.tflite", "--holdout", "2"], capture_output=True, text=True,
                       timeout=600, cwd=job, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       preexec_fn=lambda: os.umask(0o027))
    assert p.returncode == 0, p.stderr
    assert not [line for line in p.stderr.splitlines() if any(n in line for n in NATIVE_NOISE)], p.stderr
    warnings_seen = [line for line in p.stderr.splitlines() if "WARNING" in line]
    assert len(warnings_seen) == len(set(warnings_seen)) >= 1, p.stderr
    assert "images/labels.tsv has no label for 1 images (e.g. unlabelled.png)" in p.stderr
    assert {(job / f).stat().st_mode & 0o777 for f in ("k.tflite", "k.json")} == {0o640}


def test_the_cli_leaves_the_logging_of_its_host_process_as_it_was(job, caplog):
    import logging

    before = logging.getLogger("qfrewrite").propagate, list(logging.getLogger().handlers)
    _cli(job, "diagnose", "missing.h5")
    assert (logging.getLogger("qfrewrite").propagate, list(logging.getLogger().handlers)) == before
    with caplog.at_level(logging.WARNING, logger="qfrewrite"):
        logging.getLogger("qfrewrite.probe").warning("seen by the host")
    assert "seen by the host" in caplog.text


def test_a_full_disk_while_staging_is_an_output_error_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "a.json").write_bytes(b"old")

    def full(self, data):
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"cannot write the report .*a\.json: No space left on device"):
        with OutputSet() as outs:
            target = outs.add(tmp_path / "a.json", "the report")
            monkeypatch.setattr(Path, "write_bytes", full)
            outs.write_bytes(target, b"new")
    monkeypatch.undo()
    assert _tree(tmp_path) == {"a.json": hashlib.sha256(b"old").hexdigest()}
