"""Short distillation probes of ``qfrewrite.finetune`` (issue #15): which setting keeps the refit initialisation.

The student of ``finetune`` (refit initialisation on the training images) is trained for a few epochs with one
setting, and after every epoch it prints the mean training loss (first and last batch too) and, on held-back images,
the top-1 agreement with the teacher three ways: inference mode before the BatchNorm re-estimation, training mode
(batch statistics, batches of 32), and inference mode after the re-estimation; and the held-back KL loss before ->
after the re-estimation. Training images: the first ``--train`` even positions of the ../shared folder; held back:
the first ``--held`` odd positions.

    python benchmarks/probe_finetune.py --lr 1e-3 --train 200 --epochs 2          # diverges
    python benchmarks/probe_finetune.py --lr 1e-4 --train 500 --held 200 --epochs 6
    python benchmarks/probe_finetune.py --lr 1e-5 --bn frozen --train 500 --held 200 --epochs 6
    python benchmarks/probe_finetune.py --lr 1e-4 --mixup 1 --train 500 --held 200 --epochs 6

``--bn frozen`` trains with the BatchNorms in inference mode (their statistics fixed at the initialisation);
``--freeze-dw`` keeps the depthwise kernels fixed; ``--only batchnorm`` trains only the inserted BatchNorms' gamma
and beta (a few thousand values, against overfitting a few hundred images); ``--warmup E`` warms the learning rate
up linearly over E epochs;
``--feat W`` adds W times the mean over the normalised layers of ``mean((relu(s) - clip(t, 0, 6))^2) /
mean(clip(t, 0, 6)^2)`` (student / teacher pre-activations). ``--cache FILE`` keeps the initialised weights.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MODELS, SHARED  # noqa: E402


def main(argv=None) -> int:
    import keras
    import tensorflow as tf

    from qfrewrite import finetune as F
    from qfrewrite.emit.keras_emitter import emit_keras, keras_layer_name

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="keras_v1_025", choices=sorted(MODELS))
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--held", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bn", choices=["train", "frozen"], default="train")
    ap.add_argument("--freeze-dw", action="store_true")
    ap.add_argument("--only", choices=["all", "batchnorm"], default="all",
                    help="batchnorm: train only the inserted BatchNorms' gamma and beta")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--mixup", type=float, default=0.0)
    ap.add_argument("--feat", type=float, default=0.0)
    ap.add_argument("--init", choices=list(F.INITS), default="refit")
    ap.add_argument("--cache", help="weights file of the initialised student (read if present, else written)")
    args = ap.parse_args(argv)
    spec = MODELS[args.model]
    bs = args.batch_size

    teacher_g, student_g = F._graphs(SHARED / spec["file"])
    images, pre, crop = F._read_images(SHARED / "images" / "imagenet_sample", teacher_g, spec["preprocess"], None)
    train, held = images[0::2][:args.train], pre(F._centre(images[1::2][:args.held], crop))
    layers = F.normalised_layers(student_g)
    teacher = emit_keras(teacher_g, logits=True)
    student = emit_keras(student_g, logits=True, batchnorm_after=layers)
    stat_x = pre(F._centre(train[np.linspace(0, len(train) - 1, min(F.STAT_IMAGES, len(train))).astype(int)], crop))
    if args.cache and Path(args.cache).exists():
        student.load_weights(args.cache)
    else:
        F._initialise(student, teacher, student_g, stat_x, bs, args.init)
        if args.cache:
            student.save_weights(args.cache)
    held_t = F._predict(teacher, held, bs)
    loss_of = F._loss_fn("kl", 2.0)

    def agreement(training: bool) -> float:
        if not training:
            return F._agreement(F._predict(student, held, bs), held_t)
        return F._agreement(np.concatenate([np.asarray(student(held[s:s + bs], training=True))
                                            for s in range(0, len(held), bs)]), held_t)

    def held_loss(training: bool) -> float:  # the mean over batches of 50
        return float(np.mean([float(loss_of(student(held[s:s + 50], training=training), held_t[s:s + 50]))
                              for s in range(0, len(held), 50)]))

    print(f"teacher outputs (logits, not probabilities): range {held_t.min():.1f} .. {held_t.max():.1f}, row sums "
          f"{held_t.sum(-1).min():.1f} .. {held_t.sum(-1).max():.1f}")
    print(f"epoch 0: agreement inference {agreement(False):.3f}, training mode {agreement(True):.3f}; held-back "
          f"loss inference {held_loss(False):.3f}, training mode {held_loss(True):.3f}", flush=True)

    weights = student.trainable_variables
    if args.freeze_dw:
        frozen = {id(v) for ly in student.layers if isinstance(ly, keras.layers.DepthwiseConv2D)
                  for v in ly.trainable_variables}
        weights = [w for w in weights if id(w) not in frozen]
    if args.only == "batchnorm":
        weights = [v for n in layers for v in F.inserted_batchnorm(student, n).trainable_variables]
    print(f"training {len(weights)} variables, {sum(int(np.prod(v.shape)) for v in weights)} values", flush=True)
    steps = -(-len(train) // bs)
    if args.warmup:
        schedule = keras.optimizers.schedules.CosineDecay(0.0, (args.epochs - args.warmup) * steps,
                                                          warmup_target=args.lr, warmup_steps=args.warmup * steps)
    else:
        schedule = keras.optimizers.schedules.CosineDecay(args.lr, args.epochs * steps)
    optimizer = keras.optimizers.Adam(schedule)
    training = args.bn == "train"
    t_feat = keras.Model(teacher.inputs, [teacher.outputs[0]]
                         + [teacher.get_layer(keras_layer_name(n)).output for n in layers])
    s_feat = keras.Model(student.inputs, [student.outputs[0]]
                         + [F.inserted_batchnorm(student, n).output for n in layers])

    @tf.function(reduce_retracing=True)
    def step(x):
        t_out = t_feat(x, training=False)
        with tf.GradientTape() as tape:
            s_out = s_feat(x, training=training)
            value = loss_of(s_out[0], t_out[0])
            total = value
            if args.feat > 0:
                feat = 0.0
                for s, t in zip(s_out[1:], t_out[1:]):
                    t = tf.clip_by_value(t, 0.0, 6.0)
                    feat += tf.reduce_mean(tf.square(tf.nn.relu(s) - t)) / (tf.reduce_mean(tf.square(t)) + 1e-6)
                total = value + args.feat * feat / len(layers)
        optimizer.apply_gradients(zip(tape.gradient(total, weights), weights))
        return value

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order, losses = rng.permutation(len(train)), []
        for s in range(0, len(order), bs):
            x = F.mix(pre(F._augment(train[order[s:s + bs]], crop, rng)), args.mixup, rng)
            losses.append(float(step(tf.constant(x))))
        before, in_training, loss_before = agreement(False), agreement(True), held_loss(False)
        if training:
            F._reestimate_batchnorms(student, layers, stat_x, bs)
        print(f"epoch {epoch} {time.perf_counter() - start:.0f}s: loss {np.mean(losses):.3f} (first batch "
              f"{losses[0]:.3f}, last {losses[-1]:.3f}); agreement inference {before:.3f}, training mode "
              f"{in_training:.3f}, after re-estimation {agreement(False):.3f}; held-back loss {loss_before:.3f} -> "
              f"{held_loss(False):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
