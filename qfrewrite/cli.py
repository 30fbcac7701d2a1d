"""The ``qfrewrite`` command line (also ``python -m qfrewrite``): a click group, one sub-command per job.

    qfrewrite diagnose MODEL [--data DIR] [--preprocess P] [--limit N] [--json F] [--plot F.png] [--top N]
    qfrewrite convert MODEL -o OUT.tflite --data DIR [--recipe plain|dfq|qualcomm] [--weights per-tensor|per-channel]
                      [--weight-bits N] [--rounding nearest|learned] [--preprocess P] [--onnx OUT.onnx]
    qfrewrite eval MODEL --data DIR [--reference FLOAT_MODEL]
    qfrewrite finetune MODEL --data DIR -o OUT.keras [--epochs N] [--loss kl|mse] [--init refit|match|identity] ...
    qfrewrite demo

Adding a command: decorate a function with ``@main.command()``, add :func:`data_options` for the shared calibration
data options, and :func:`reports_errors` so a :class:`~qfrewrite.errors.QfrewriteError` (an unreadable model, bad
data) ends with a one-line message and exit status 1, never a traceback (``-vv`` logs it). A command that writes
files plans them in a :class:`~qfrewrite.io_utils.OutputSet` before its long work. Heavy modules (TensorFlow,
matplotlib, rich) are imported inside the commands, so ``--help`` and start-up stay fast.

Exit status: 0 success; 1 an error (one line ``Error: ...``); 2 a usage error (a missing or bad option, also one line
``Error: ... (see 'qfrewrite CMD --help')``); 130 interrupted (Ctrl-C; SIGTERM gives 143). Either way no output file
is left half-written or changed. The terminal: each warning once (``qfrewrite: WARNING: ...``); other libraries'
log records and TensorFlow's native start-up lines only with ``-v``/``-vv`` (:mod:`qfrewrite.native_log`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
from typing import Optional

import click

__all__ = ["main", "data_options", "input_shape_option", "reports_errors", "parse_preprocess", "parse_input_shape",
           "console", "EXIT_USAGE", "EXIT_INTERRUPTED"]

log = logging.getLogger("qfrewrite.cli")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def parse_preprocess(value: Optional[str]):
    """``--preprocess``: a preset name (``inception``, ``torch``, ``tf-slim``, ``efficientnet-lite``, ``raw``) or a
    custom ``MEAN/STD`` in 0..255 units, each one number or three comma-separated (``123.7,116.3,103.5/58.4,57.1,57.4``).
    """
    if value is None:
        return None
    if "/" not in value:
        return value
    mean_s, _, std_s = value.partition("/")
    try:
        mean = tuple(float(x) for x in mean_s.split(","))
        std = tuple(float(x) for x in std_s.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a preset name or MEAN/STD numbers such as 127.5/127.5 "
                                 f"or 123.7,116.3,103.5/58.4,57.1,57.4") from None
    return mean, std


def data_options(f):
    """The calibration data options shared by the commands: ``--data``, ``--preprocess``, ``--limit``,
    ``--batch-size``."""
    f = click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1),
                     help="Images per batch through the model.")(f)
    f = click.option("--limit", type=click.IntRange(1), default=None,
                     help="Use at most this many images of --data (the first in sorted order).")(f)
    f = click.option("--preprocess", "preprocess", default=None, metavar="P",
                     help="Image preprocessing: inception, torch, tf-slim, efficientnet-lite, raw, or MEAN/STD in "
                          "0..255 units (e.g. 127.5/127.5). Default: the model's own, when it declares one.")(f)
    f = click.option("--data", "data", type=click.Path(exists=True, file_okay=False), default=None,
                     metavar="DIR", help="Image folder for calibration (JPEG/PNG, flat or one folder per class).")(f)
    return f


def parse_input_shape(value: Optional[str]):
    """``--input-shape``: comma-separated positive integers, ``?`` (or empty, ``None``) for a dimension left open."""
    if not value:
        return None
    dims = []
    for d in value.split(","):
        d = d.strip()
        if d in ("", "?", "None"):
            dims.append(None)
            continue
        try:
            n = int(d)
        except ValueError:
            n = 0
        if n < 1:
            raise click.BadParameter(f"{value!r}: expected positive integers (or ? for an open dimension), "
                                     f"such as 1,3,224,224")
        dims.append(n)
    return tuple(dims)


def input_shape_option(f):
    """``--input-shape D,D,D,D``, parsed by :func:`parse_input_shape`."""
    return click.option("--input-shape", "input_shape", default=None, metavar="D,D,D,D",
                        callback=lambda ctx, param, value: parse_input_shape(value),
                        help="Fix open input dimensions, in the source model's own layout (e.g. 1,3,48,320 "
                             "for NCHW).")(f)


def reports_errors(f):
    """Turn qfrewrite's errors (and any other failure) into a one-line message and exit status 1."""
    from .errors import QfrewriteError, one_line

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except QfrewriteError as exc:
            log.debug("%s failed", f.__name__, exc_info=True)
            raise click.ClickException(one_line(exc)) from None
        except Exception as exc:  # a failure we did not foresee: still one line, the traceback at -vv
            log.debug("%s failed", f.__name__, exc_info=True)
            raise click.ClickException(f"{type(exc).__name__}: {one_line(exc)} (run with -vv for the traceback)") \
                from None

    return wrapper


class _Group(click.Group):
    """A click group whose usage errors are one line and exit 2, Ctrl-C exits 130, SIGTERM 143 (see the module
    docstring); SIGTERM unwinds like Ctrl-C so that no staged output is left behind."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            with _logging_kept():
                return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        with _sigterm_exits(), _logging_kept():
            try:
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except click.UsageError as exc:
                hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
                click.echo(f"Error: {exc.format_message().rstrip('.')}{hint}", err=True)
                sys.exit(EXIT_USAGE)
            except click.ClickException as exc:
                exc.show()
                sys.exit(exc.exit_code)
            except (click.Abort, KeyboardInterrupt, EOFError):
                click.echo("Interrupted.", err=True)  # click has ended the ^C line
                sys.exit(EXIT_INTERRUPTED)
            sys.exit(rv if isinstance(rv, int) else 0)


@contextlib.contextmanager
def _logging_kept():
    """Put the logging set-up of one invocation (:func:`_setup_logging`) back as it was afterwards, for callers that
    run the command line in their own process (tests, notebooks)."""
    logger, root = logging.getLogger("qfrewrite"), logging.getLogger()
    saved = logger.level, logger.propagate, list(logger.handlers), list(root.handlers)
    try:
        yield
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]
        root.handlers[:] = saved[3]


@contextlib.contextmanager
def _sigterm_exits():
    """During the block (main thread only), SIGTERM raises ``SystemExit(143)``, so that ``finally`` and ``with``
    blocks (the staged outputs) unwind as they do for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def console():
    """A rich console on stdout, 160 columns when stdout is not a terminal (files, pipes)."""
    from rich.console import Console

    c = Console(highlight=False)
    if not c.is_terminal:
        c = Console(highlight=False, width=160)
    return c


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is emitted (test runners swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(verbose: int) -> None:
    """qfrewrite's records on stderr once each (``qfrewrite: LEVEL: message``), at WARNING, -v INFO, -vv DEBUG.

    qfrewrite's logger does not propagate: TensorFlow's absl logging gives the root logger a handler of its own the
    first time it logs, which would print every record a second time. Other libraries' records reach the root
    logger: dropped at the default verbosity, shown from WARNING at -v and all at -vv. TensorFlow's native start-up
    lines are filtered unless -vv (:mod:`qfrewrite.native_log`).
    """
    from . import native_log

    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logger = logging.getLogger("qfrewrite")
    logger.setLevel(level)
    logger.propagate = False
    # TensorFlow's own Python warnings (tf.function retracing notes) are noise for a command-line user
    logging.getLogger("tensorflow").setLevel(logging.ERROR if verbose < 2 else logging.DEBUG)
    if not any(getattr(h, "_qfrewrite_cli", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("qfrewrite: %(levelname)s: %(message)s"))
        handler._qfrewrite_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_qfrewrite_cli", False)]:
        root.removeHandler(h)
    if verbose <= 0:
        others = logging.NullHandler()
    else:
        others = _StderrHandler()
        others.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        others.setLevel(logging.WARNING if verbose == 1 else logging.DEBUG)
    others._qfrewrite_cli = True  # type: ignore[attr-defined]
    root.addHandler(others)
    native_log.ENABLED = verbose < 2
    if native_log.ENABLED:
        native_log.quiet_tensorflow_import()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="-v: progress messages; -vv: debug messages and tracebacks.")
@click.version_option(package_name="qfrewrite", prog_name="qfrewrite")
def main(verbose: int) -> None:
    """Graph-rewriting passes that make pretrained MobileNet-family models survive 8-bit quantization."""
    _setup_logging(verbose)


@main.command()
@click.argument("model", type=str)
@data_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, metavar="F",
              help="Write the diagnosis as JSON (one entry per layer, named as in the source model).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="F.png",
              help="Draw the per-channel weight ranges of the worst layers to a PNG.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1),
              help="How many of the ranked layers to print (and plot: at most 8).")
@click.option("--bits", default=8, show_default=True, type=click.IntRange(2, 16), help="Weight bit width.")
@click.option("--weights", type=click.Choice(["per-tensor", "per-channel"]), default="per-tensor", show_default=True,
              help="The weight granularity the layers are ranked for.")
@click.option("--harm-images", type=click.IntRange(0), default=16, show_default=True, metavar="N",
              help="With --data: measure each layer's harm to the outputs on the first N images (0: do not).")
@click.option("--noise-images", type=click.IntRange(0), default=0, show_default=True, metavar="N",
              help="Without --data: estimate each layer's harm to the outputs on N Gaussian-noise inputs (ranks "
                   "much closer to the harm on real images than the weights alone; 0: weights only).")
@click.option("--after", "after", type=click.Choice(["dfq"]), default=None,
              help="Diagnose the graph this recipe's float rewrite leaves (needs --data): which layers still hurt.")
@input_shape_option
@reports_errors
def diagnose(model: str, data, preprocess, limit, batch_size, json_path, plot_path, top, bits, weights, harm_images,
             noise_images, after, input_shape) -> None:
    """Rank the layers of MODEL by how badly per-tensor 8-bit weights would hurt them, name their outlier and dead
    channels (with the BatchNorm scales behind them) and suggest the passes that fix them.

    MODEL: a Keras .keras/.h5 file, an ONNX file, a TF frozen GraphDef .pb, a SavedModel folder or a .tflite. With
    --data the per-channel activation ranges are measured too, and each layer's harm to the outputs (the SQNR of the
    outputs with only that layer's weights, or its output activation, quantized), which then ranks the layers;
    without data the ranking is an estimate from the weights alone. A quantized .tflite is reported as stored: its
    scales and the levels each channel's weights use.
    """
    from .diagnose import diagnose as run_diagnose
    from .images import folder_reads
    from .io_utils import OutputSet

    with OutputSet([("the model", model), ("the images", data, folder_reads)]) as outs:
        json_out = outs.add(json_path, "--json") if json_path else None
        plot_out = outs.add(plot_path, "--plot") if plot_path else None
        result = run_diagnose(model, data, preprocess=parse_preprocess(preprocess), limit=limit,
                              batch_size=batch_size, bits=bits, input_shape=input_shape,
                              weights=weights.replace("-", "_"), harm=harm_images > 0,
                              harm_images=harm_images or None, recipe=after, noise_images=noise_images)
        out = console()
        for r in result.renderables(top):
            out.print(r)
        if json_out:
            outs.write_bytes(json_out, (result.to_json() + "\n").encode())
        if plot_out:
            result.plot(outs.stage(plot_out), top=min(top, 8))
    for p in outs.paths:
        click.echo(f"wrote {p}", err=True)


@main.command()
@click.argument("model", type=str)
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), metavar="OUT.tflite",
              help="The fully int8 TFLite file to write (the report JSON goes beside it as OUT.json).")
@click.option("--data", "data", required=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Calibration images (JPEG/PNG), a flat folder or one sub-folder per class; labels.tsv optional.")
@click.option("--recipe", type=click.Choice(["plain", "dfq", "qualcomm"]), default="dfq", show_default=True,
              help="plain: fold BN and quantize; dfq: data-free-quantization passes (best without retraining); "
                   "qualcomm: the Qualcomm depthwise block (for fine-tuning, destroys accuracy without it).")
@click.option("--weights", type=click.Choice(["per-channel", "per-tensor"]), default="per-channel",
              show_default=True, help="Weight quantization granularity.")
@click.option("--weight-bits", "weight_bits", type=click.IntRange(2, 8), default=8, show_default=True, metavar="N",
              help="Weight bit width, 2..8. 2 to 4 bits are stored as int4 in TFLite and ONNX (half the kernel bytes); "
                   "5 to 7 as int8 codes of the fewer levels (no size saving).")
@click.option("--rounding", type=click.Choice(["nearest", "learned"]), default="nearest", show_default=True,
              help="How weights are rounded to their grid: to nearest, or learned from the calibration data "
                   "(below 8 weight bits also block by block: minutes on a MobileNet).")
@click.option("--activations", type=click.Choice(["mse", "minmax", "percentile", "kl"]), default=None,
              help="Activation range selection (default: the recipe's).")
@click.option("--preprocess", default=None, metavar="P",
              help="Image preprocessing: inception, torch, tf-slim, efficientnet-lite, raw, or MEAN/STD in 0..255 "
                   "units. Default: the model's own, when it declares one.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None, metavar="OUT.onnx",
              help="Also write the quantized graph as ONNX (QDQ).")
@click.option("--holdout", type=click.IntRange(0), default=None,
              help="Images held back from calibration to check float vs int8 agreement (default: 10%, at most 100).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use at most this many images of --data.")
@click.option("--io", "io_dtype", type=click.Choice(["float32", "int8", "uint8"]), default="float32",
              show_default=True, help="Input and output type of the int8 model.")
@click.option("--output-node", "outputs", multiple=True, metavar="NAME",
              help="Output node/tensor/layer to convert up to (repeatable), e.g. MobilenetV1/Logits/SpatialSqueeze.")
@input_shape_option
@reports_errors
def convert(model, output, data, recipe, weights, weight_bits, rounding, activations, preprocess, onnx_path, holdout,
            limit, io_dtype, outputs, input_shape) -> None:
    """Convert MODEL to a fully int8 TFLite file, calibrated on --data, and check it against the float model.

    Prints a summary (op counts, size, how the weights are stored and what they take, float vs int8 agreement on
    held-back images) and writes OUT.json beside OUT.tflite with the pass report.
    """
    from .convert import convert as run_convert

    summary = run_convert(model, output, data, recipe=recipe, weights=weights.replace("-", "_"),
                          activations=activations, preprocess=parse_preprocess(preprocess), onnx_output=onnx_path,
                          holdout=holdout, limit=limit, io_dtype=io_dtype, outputs=list(outputs) or None,
                          input_shape=input_shape, weight_bits=weight_bits, rounding=rounding)
    click.echo(str(summary))


@main.command(name="eval")
@click.argument("model", type=str)
@click.option("--data", "data", required=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Labelled images: a folder with labels.tsv (file<TAB>class_index).")
@click.option("--preprocess", default=None, metavar="P",
              help="inception, torch, tf-slim, efficientnet-lite, raw, or MEAN/STD (0..255 units).")
@click.option("--reference", default=None, metavar="MODEL",
              help="A float model to compare with (SQNR and top-1 agreement).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use at most this many images.")
@click.option("--label-offset", type=int, default=None,
              help="Subtracted from the arg-max (default: 1 for 1001-class outputs, else 0).")
@click.option("--output-node", "outputs", multiple=True, metavar="NAME", help="Output node of a source model.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the scores as JSON.")
@input_shape_option
@reports_errors
def eval_(model, data, preprocess, reference, limit, label_offset, outputs, json_path, input_shape) -> None:
    """Score MODEL (a .tflite file or any source model) on a labelled image folder: top-1/top-5, and with
    --reference the SQNR and top-1 agreement."""
    import json

    from . import load
    from .evaluate import evaluate
    from .images import folder_reads
    from .io_utils import OutputSet

    def source(m):
        return m if m.lower().endswith(".tflite") else load(m, outputs=list(outputs) or None,
                                                            input_shape=input_shape)

    with OutputSet([("the model", model), ("the reference model", reference),
                    ("the images", data, folder_reads)]) as outs:
        json_out = outs.add(json_path, "--json") if json_path else None
        res = evaluate(source(model), data, reference=source(reference) if reference else None,
                       preprocess=parse_preprocess(preprocess), limit=limit, label_offset=label_offset)
        click.echo(f"{model}: {res}")
        if json_out:
            outs.write_bytes(json_out, json.dumps(res.to_dict(), indent=2).encode())


@main.command()
@click.argument("model", type=str)
@click.option("--data", "data", required=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Training images (JPEG/PNG, flat or one folder per class; no labels needed).")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), metavar="OUT.keras",
              help="The fine-tuned Keras model to write (.keras or .h5).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(0), help="Passes over the images.")
@click.option("--minutes", type=click.FloatRange(0, min_open=True), default=None,
              help="Stop after the epoch that passes this many minutes of training.")
@click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Adam's initial learning rate (cosine decay to 0 over --epochs, or by --minutes if sooner).")
@click.option("--loss", type=click.Choice(["kl", "mse"]), default="kl", show_default=True,
              help="kl: KL divergence of temperature-softened logits; mse: mean squared error of the logits.")
@click.option("--temperature", default=2.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="The temperature of --loss kl.")
@click.option("--mixup", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Mixup of the training batches, lambda ~ Beta(A, A) (0: none); the teacher labels the mixed images.")
@click.option("--init", type=click.Choice(["refit", "match", "identity"]), default="refit", show_default=True,
              help="refit: each pointwise conv solved by least squares against the teacher's output, then as match; "
                   "match: the student's BatchNorms give each pointwise layer the teacher's per-channel mean and "
                   "std; identity: they only normalise.")
@click.option("--holdout", type=click.IntRange(1), default=None,
              help="Images held back to measure the loss and top-1 agreement with the teacher (default: 10%, at "
                   "most 100).")
@click.option("--keep", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="best: end with the epoch (the initialised student included) whose held-back loss is lowest; "
                   "last: with the last epoch.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Images per step.")
@click.option("--preprocess", default=None, metavar="P",
              help="Image preprocessing: inception, torch, tf-slim, efficientnet-lite, raw, or MEAN/STD in 0..255 "
                   "units. Default: the model's own, when it declares one.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use at most this many images of --data.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the crops, flips and image order.")
@input_shape_option
@reports_errors
def finetune(model, data, output, epochs, minutes, lr, loss, temperature, mixup, init, holdout, keep, batch_size,
             preprocess, limit, seed, input_shape) -> None:
    """Distil MODEL into its Qualcomm architecture (depthwise convs without BN and ReLU6, ReLU in the pointwise
    convs) on the unlabelled images of --data, and write the fine-tuned float Keras model to OUT.

    The teacher is MODEL as given; the student gets BatchNorms after its pointwise convs, initialised from the
    teacher's statistics, and is trained on random crops and flips. A progress bar shows the loss, and the loss and
    top-1 agreement with the teacher on held-back images; OUT holds the epoch with the lowest held-back loss
    (--keep best). OUT goes back through 'qfrewrite convert' like any Keras model.
    """
    from .finetune import finetune as run_finetune

    result = run_finetune(model, data, output, epochs=epochs, batch_size=batch_size, lr=lr, loss=loss,
                          temperature=temperature, mixup=mixup, holdout=holdout, init=init, keep=keep,
                          preprocess=parse_preprocess(preprocess), limit=limit, input_shape=input_shape, seed=seed,
                          max_minutes=minutes)
    click.echo(str(result))


@main.command()
@click.option("--out-dir", default="qfrewrite-demo", show_default=True, type=click.Path(),
              help="Where the demo writes its models and report.")
@click.option("--photo", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The photo whose top-5 classes are shown (default: the bundled grace_hopper.jpg).")
@reports_errors
def demo(out_dir, photo) -> None:
    """Convert the bundled MobileNet V1 0.25 to int8: diagnosis, conversion summary, top-5 float vs int8."""
    from .demo.run import run_demo

    run_demo(out_dir, photo=photo, echo=console().print)


if __name__ == "__main__":  # pragma: no cover
    main()
