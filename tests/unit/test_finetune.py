"""finetune: the trainable Keras emission (logits, identity BatchNorms), the data-driven BatchNorm initialisation,
distillation lowering its loss, the round trip of the saved model through rewrite, and the refused inputs."""
import numpy as np
import pytest
from click.testing import CliRunner

import qfrewrite
from qfrewrite import recipes
from qfrewrite.backend.executor import run_graph
from qfrewrite.cli import main
from qfrewrite.emit.keras_emitter import emit_keras
from qfrewrite.errors import DataError, EmitError, OutputError, QfrewriteError
from qfrewrite.finetune import (_graphs, _moments, _initialise, cosine_lr, finetune, inserted_batchnorm, mix,
                                normalised_layers, refit_layers)
from qfrewrite.ir import Op, sole_reader
from tests.keras_models import randomize_bn

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")

HW = 32


def _mobilenet(hw=HW):
    """Two depthwise-separable blocks (BN + ReLU6 after every conv), a 1x1 classifier and a softmax."""
    from keras import layers as L

    x_in = keras.Input((hw, hw, 3), name="image")
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv1")(x_in)
    x = L.BatchNormalization(name="conv1_bn")(x)
    x = L.ReLU(6.0, name="conv1_relu")(x)
    for i, (c, s) in enumerate([(16, 1), (24, 2)], start=1):
        x = L.DepthwiseConv2D(3, strides=s, padding="same", use_bias=False, name=f"conv_dw_{i}")(x)
        x = L.BatchNormalization(name=f"conv_dw_{i}_bn")(x)
        x = L.ReLU(6.0, name=f"conv_dw_{i}_relu")(x)
        x = L.Conv2D(c, 1, use_bias=False, name=f"conv_pw_{i}")(x)
        x = L.BatchNormalization(name=f"conv_pw_{i}_bn")(x)
        x = L.ReLU(6.0, name=f"conv_pw_{i}_relu")(x)
    x = L.GlobalAveragePooling2D(keepdims=True, name="pool")(x)
    x = L.Conv2D(10, 1, name="conv_preds")(x)
    x = L.Reshape((10,), name="reshape")(x)
    x = L.Activation("softmax", name="predictions")(x)
    return keras.Model(x_in, x, name="tiny_mobilenet")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    m = _mobilenet()
    m.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in m.get_weights()])
    randomize_bn(m, rng)
    path = tmp_path_factory.mktemp("model") / "tiny_mobilenet.keras"
    m.save(path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """24 smooth random images (a blurred pattern per image, so crops of one image resemble each other)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("images")
    for i in range(24):
        small = rng.uniform(0, 255, (5, 5, 3)).astype(np.uint8)
        Image.fromarray(small).resize((44, 40), Image.BILINEAR).save(folder / f"img_{i:02d}.png")
    return folder


def test_emit_logits_drops_the_final_softmax_and_identity_batchnorms_keep_the_function(model_path, rng):
    graph = qfrewrite.load(model_path)
    assert graph.outputs[0].producer.op is Op.SOFTMAX
    x = rng.uniform(-1, 1, (4, HW, HW, 3)).astype(np.float32)
    full = emit_keras(graph)
    plain_logits = emit_keras(graph, logits=True)
    layers = ["conv1", "conv_pw_1", "conv_pw_2"]
    with_bn = emit_keras(graph, logits=True, batchnorm_after=layers)
    probs, logits = np.asarray(full(x)), np.asarray(plain_logits(x))
    np.testing.assert_allclose(np.asarray(keras.activations.softmax(logits)), probs, rtol=0, atol=1e-6)
    assert np.abs(logits).max() > 1.0 and not np.allclose(logits.sum(-1), 1.0)  # logits, not probabilities
    np.testing.assert_allclose(np.asarray(with_bn(x)), logits, rtol=0, atol=1e-5 * np.abs(logits).max())
    inserted = [inserted_batchnorm(with_bn, n).name for n in layers]
    assert inserted == ["conv1_bn1", "conv_pw_1_bn1", "conv_pw_2_bn1"]  # the source's conv1_bn ... keep their names
    assert {"conv1_bn", "conv_pw_1_bn"} <= {ly.name for ly in with_bn.layers}


def test_emit_refuses_unknown_batchnorm_layers(model_path):
    with pytest.raises(EmitError, match="no_such_layer"):
        emit_keras(qfrewrite.load(model_path), batchnorm_after=["no_such_layer"])


def test_normalised_layers_are_the_non_depthwise_convs_before_an_activation(model_path):
    _, student = _graphs(model_path)
    assert normalised_layers(student) == ["conv1", "conv_pw_1", "conv_pw_2"]  # not conv_preds (no activation)
    assert not student.find(Op.BATCH_NORM)
    assert [sole_reader(n.output).op for n in student.find(Op.DEPTHWISE_CONV2D)] == [Op.CONV2D, Op.CONV2D]
    assert refit_layers(student) == ["conv_pw_1", "conv_pw_2", "conv_preds"]  # 1x1 stride 1, not the 3x3 stem


def test_match_init_gives_each_layer_the_teachers_moments(model_path, rng):
    teacher_graph, student_graph = _graphs(model_path)
    layers = normalised_layers(student_graph)
    teacher = emit_keras(teacher_graph, logits=True)
    student = emit_keras(student_graph, logits=True, batchnorm_after=layers)
    x = rng.uniform(-1, 1, (32, HW, HW, 3)).astype(np.float32)
    before = _moments(keras.Model(student.inputs, inserted_batchnorm(student, "conv_pw_2").output), x, 16)
    _initialise(student, teacher, student_graph, x, 16, "match")
    for name in layers:
        s_mean, s_var = _moments(keras.Model(student.inputs, inserted_batchnorm(student, name).output), x, 16)
        t_mean, t_var = _moments(keras.Model(teacher.inputs, teacher.get_layer(name).output), x, 16)
        scale = np.sqrt(t_var.max())
        np.testing.assert_allclose(s_mean, t_mean, rtol=0, atol=1e-3 * scale)
        np.testing.assert_allclose(np.sqrt(s_var), np.sqrt(t_var), rtol=0, atol=1e-2 * scale)
    t_last = _moments(keras.Model(teacher.inputs, teacher.get_layer("conv_pw_2").output), x, 16)
    assert np.abs(before[0] - t_last[0]).max() > 0.1 * np.sqrt(t_last[1].max())  # the rewrite had moved them


def test_refit_solves_each_pointwise_layer_by_least_squares_on_the_teacher(model_path, rng):
    teacher_graph, student_graph = _graphs(model_path)
    layers = normalised_layers(student_graph)
    teacher = emit_keras(teacher_graph, logits=True)
    student = emit_keras(student_graph, logits=True, batchnorm_after=layers)
    untouched = emit_keras(student_graph, logits=True, batchnorm_after=layers)
    x = rng.uniform(-1, 1, (32, HW, HW, 3)).astype(np.float32)
    _initialise(student, teacher, student_graph, x, 16, "refit")
    _initialise(untouched, teacher, student_graph, x, 16, "match")
    layer = student.get_layer("conv_pw_1")
    xs = np.asarray(keras.Model(student.inputs, layer.input)(x), np.float64).reshape(-1, 8)
    ys = np.asarray(keras.Model(teacher.inputs, teacher.get_layer("conv_pw_1").output)(x), np.float64).reshape(-1, 16)
    design = np.concatenate([xs, np.ones((len(xs), 1))], axis=1)  # 8192 positions, 9 unknowns
    best = np.mean((design @ np.linalg.lstsq(design, ys, rcond=None)[0] - ys) ** 2)
    kernel, bias = layer.get_weights()
    refit = np.mean((xs @ kernel.reshape(8, 16) + bias - ys) ** 2)
    w0 = untouched.get_layer("conv_pw_1").get_weights()
    before = np.mean((xs @ w0[0].reshape(8, 16) + w0[1] - ys) ** 2)
    assert refit <= 1.01 * best and before > 2 * best  # the least-squares optimum (up to the small ridge)
    t = np.asarray(teacher(x))
    err_refit = np.mean((np.asarray(student(x)) - t) ** 2)
    err_match = np.mean((np.asarray(untouched(x)) - t) ** 2)
    assert err_refit < err_match  # closer to the teacher's logits than the moments alone


def test_distillation_lowers_the_loss_and_the_model_goes_back_through_rewrite(model_path, image_dir, tmp_path):
    out = tmp_path / "student.keras"
    res = finetune(model_path, image_dir, out, epochs=4, batch_size=8, lr=1e-2, init="identity", holdout=4,
                   preprocess="inception", progress=False)
    losses = [r.loss for r in res.history[1:]]
    assert len(res.history) == 5 and res.history[0].loss is None
    assert losses[-1] < 0.7 * losses[0], losses
    assert out.is_file() and not [p for p in tmp_path.iterdir() if p.name != out.name]  # no temporary left
    saved = keras.saving.load_model(out)
    x = np.random.default_rng(2).uniform(-1, 1, (4, HW, HW, 3)).astype(np.float32)
    probs = np.asarray(res.model(x))
    np.testing.assert_allclose(np.asarray(saved(x)), probs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)  # the source's softmax output is put back

    folded = qfrewrite.rewrite(out, recipes.plain(quantize=False))
    assert not folded.graph.find(Op.BATCH_NORM)
    np.testing.assert_allclose(run_graph(folded.graph, x)[0], probs, rtol=0, atol=1e-5)
    again = qfrewrite.rewrite(out, recipes.qualcomm(quantize=False))
    assert not again.report["RemoveDepthwiseBNReLU6"].modified and not again.report["ReLU6ToReLU"].modified
    np.testing.assert_allclose(run_graph(again.graph, x)[0], probs, rtol=0, atol=1e-5)
    data = np.random.default_rng(3).uniform(-1, 1, (16, HW, HW, 3)).astype(np.float32)
    tflite = qfrewrite.rewrite(out, recipes.plain(weights="per_tensor"), data=data).to_tflite()
    assert len(tflite) > 1000


def test_cosine_lr_anneals_by_the_last_step_or_the_time_budget_whichever_is_first():
    assert cosine_lr(1e-3, 0.0, 0.0, None) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 0.5, 1e6, None) == pytest.approx(5e-4)  # no budget: the step fraction alone
    assert cosine_lr(1e-3, 1.0, 0.0, None) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(1e-3, 0.1, 30.0, 1.0) == pytest.approx(5e-4)  # half the minute spent: half way down
    assert cosine_lr(1e-3, 0.5, 6.0, 1.0) == pytest.approx(5e-4)  # the steps ahead of the clock
    assert cosine_lr(1e-3, 0.2, 90.0, 1.0) == 0.0  # past the budget


def test_mixup_makes_each_image_a_convex_combination_of_itself_and_one_other():
    i = np.arange(8, dtype=np.float32)
    x = np.broadcast_to(np.stack([i, i * i], -1)[:, None, None, :], (8, 3, 3, 2)).copy()
    assert mix(x, 0.0, np.random.default_rng(0)) is x
    out = mix(x, 1.0, np.random.default_rng(0))
    assert out.shape == x.shape and np.allclose(out, out[:, :1, :1, :])  # one lambda per image
    mixed = 0
    for k in range(8):
        a, b = out[k, 0, 0]
        fits = []
        for j in range(8):  # a = lam k + (1 - lam) j and b = lam k^2 + (1 - lam) j^2 for some lam in [0, 1]
            if j == k:
                fits.append(np.isclose(a, k) and np.isclose(b, k * k))
                continue
            lam = (a - j) / (k - j)
            fits.append(-1e-6 <= lam <= 1 + 1e-6 and np.isclose(b, lam * k * k + (1 - lam) * j * j, atol=1e-4))
        assert any(fits), (k, a, b)
        mixed += not np.isclose(a, k)
    assert mixed >= 4  # most images really are mixed


def test_max_minutes_stops_training_inside_the_epoch_that_spends_it(model_path, image_dir):
    res = finetune(model_path, image_dir, epochs=50, batch_size=4, init="identity", holdout=4,
                   preprocess="inception", progress=False, max_minutes=1e-4)
    assert len(res.history) == 2 and res.history[1].loss is not None  # one (partial) epoch of 50
    assert res.history[1].seconds >= 60 * 1e-4


def test_match_init_is_closer_to_the_teacher_than_the_rewritten_graph(model_path, image_dir):
    identity = finetune(model_path, image_dir, epochs=0, init="identity", holdout=12, preprocess="inception",
                        progress=False)
    match = finetune(model_path, image_dir, epochs=0, init="match", holdout=12, preprocess="inception",
                     progress=False)
    assert match.history[0].agreement >= identity.history[0].agreement
    assert len(match.history) == 1


def test_refuses_a_bad_data_folder(model_path, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty|no image"):
        finetune(model_path, empty, tmp_path / "out.keras", epochs=1, preprocess="inception", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        finetune(model_path, tmp_path / "missing", tmp_path / "out.keras", epochs=1, preprocess="inception",
                 progress=False)
    assert not (tmp_path / "out.keras").exists()


def test_refuses_a_graph_without_depthwise_blocks(image_dir, tmp_path):
    from keras import layers as L

    x_in = keras.Input((HW, HW, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(4, 3)(x_in)))
    path = tmp_path / "plain_cnn.keras"
    keras.Model(x_in, L.Dense(3)(L.GlobalAveragePooling2D()(x))).save(path)
    with pytest.raises(QfrewriteError, match="not a MobileNet|no depthwise"):
        finetune(path, image_dir, tmp_path / "out.keras", epochs=1, preprocess="inception", progress=False)
    assert not (tmp_path / "out.keras").exists()


def test_refuses_bad_options(model_path, image_dir, tmp_path):
    with pytest.raises(OutputError, match=r"\.keras or \.h5"):
        finetune(model_path, image_dir, tmp_path / "out.tflite", progress=False)
    with pytest.raises(QfrewriteError, match="loss"):
        finetune(model_path, image_dir, loss="l1", progress=False)
    with pytest.raises(QfrewriteError, match="init"):
        finetune(model_path, image_dir, init="zeros", progress=False)
    with pytest.raises(OutputError):
        finetune(model_path, image_dir, model_path, progress=False)  # never over the source model


def test_cli_finetune_writes_the_model_and_reports_errors_in_one_line(model_path, image_dir, tmp_path):
    out = tmp_path / "ft.keras"
    res = CliRunner().invoke(main, ["finetune", str(model_path), "--data", str(image_dir), "-o", str(out),
                                    "--epochs", "1", "--batch-size", "8", "--preprocess", "inception"])
    assert res.exit_code == 0, res.output
    assert "agreement with the teacher" in res.output and out.is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["finetune", str(model_path), "--data", str(empty), "-o", str(tmp_path / "x.keras"),
                                    "--preprocess", "inception"])
    assert res.exit_code == 1 and "Error:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x.keras").exists()


def test_finetune_and_its_saved_model_raise_no_keras_input_structure_warning(model_path, image_dir, tmp_path):
    import warnings

    out = tmp_path / "student.keras"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune(model_path, image_dir, out, epochs=1, batch_size=8, init="refit", holdout=4,
                 preprocess="inception", progress=False)
        keras.saving.load_model(out)(np.zeros((2, HW, HW, 3), np.float32))
    noise = [str(w.message) for w in caught if "expected structure" in str(w.message)]
    assert not noise, noise


def test_keep_best_ends_with_the_epoch_of_lowest_held_back_loss(model_path, image_dir):
    x = np.random.default_rng(5).uniform(-1, 1, (4, HW, HW, 3)).astype(np.float32)
    opts = dict(batch_size=4, init="match", holdout=6, preprocess="inception", progress=False)
    start = finetune(model_path, image_dir, epochs=0, **opts)
    # a learning rate far too high: the epochs move away from the teacher, the initialised student stays best
    best = finetune(model_path, image_dir, epochs=2, lr=0.5, keep="best", **opts)
    last = finetune(model_path, image_dir, epochs=2, lr=0.5, keep="last", **opts)
    held = [r.held_loss for r in best.history]
    assert all(h is not None for h in held) and best.history[0].held_loss == pytest.approx(start.history[0].held_loss)
    assert min(held[1:]) > held[0], held  # the premise: training made it worse
    assert best.kept_epoch == 0 and best.kept is best.history[0] and best.agreement == best.history[0].agreement
    np.testing.assert_allclose(np.asarray(best.model(x)), np.asarray(start.model(x)), rtol=0, atol=1e-6)
    assert last.kept_epoch == 2 and "kept epoch 0" in str(best) and "kept epoch" not in str(last)
    assert np.abs(np.asarray(last.model(x)) - np.asarray(start.model(x))).max() > 1e-3
    with pytest.raises(QfrewriteError, match="keep"):
        finetune(model_path, image_dir, keep="first", progress=False)
