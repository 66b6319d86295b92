"""One BN layer: kerasbn vs Keras' layer vs TensorFlow's bare fused training kernel, one process.

Training step = forward + backward for a given output gradient ``dy``
(gradients for the input, gamma and beta) + the moving-statistics update,
inside tf.function as model.fit runs it. The bare kernel is what tf.keras 2
ran with ``BatchNormalization(fused=True)``: ``FusedBatchNormV3`` with
``is_training=True`` and its registered gradient (``FusedBatchNormGradV3``),
plus the same two moving-average updates; it has no precision guard.
Inference = forward with training=False at batch 1. Candidates alternate in
rounds; medians are reported, with ratios (below 1: kerasbn is faster).

Bandwidth: a training step must move at least 8 input-sized tensors (forward
reads x for the statistics and again to normalize, writes y; backward reads x
and dy for the sums and again for dx, writes dx). "GB/s" is those bytes over
the step's time; "of copy" divides it by the rate of a plain memory copy
(numpy's memcpy of an input-sized buffer, one thread, bytes read plus
written), measured in the same rounds: the fraction of the machine's
streaming bandwidth, at the step's working-set size, that the step reaches.

Precision (``--precision``): the bare kernel's relative variance error against
float64 as a channel's ``n * |mean| / spread`` grows (std 1), next to kerasbn's
on the same data: the evidence for ``kerasbn.kernels.tf_moments.UNSHIFTED_LIMIT``, the
point past which kerasbn shifts the input before the CPU kernel reads it.

    .venv/bin/python benchmarks/bench_layer.py [--repeats 30] [--shapes small] [--variants] [--precision]
"""

import argparse
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import markdown_table, time_alternating  # noqa: E402

import kerasbn  # noqa: E402
from kerasbn.kernels import tf_fused  # noqa: E402

TRAIN_SHAPES = [(64, 28, 28, 64), (256, 1024)]
# Around the size where fused=None switches to the fused kernels (FUSED_MIN_ELEMENTS).
SMALL_TRAIN_SHAPES = [(8, 8, 8, 32), (16, 8, 8, 64), (24, 8, 8, 64), (32, 8, 8, 64),
                      (32, 16, 16, 64), (64, 256), (128, 512), (256, 384), (256, 512)]
INFER_SHAPES = [(1, 28, 28, 64), (1, 1024)]
MIN_TENSORS_PER_TRAINING_STEP = 8


def layer_training_step(layer, x, dy, mask=None, jit_compile=False):
    @tf.function(jit_compile=jit_compile)
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
        return tape.gradient(y, [x] + layer.trainable_weights, output_gradients=dy)

    return lambda: step()[0].numpy()


def kernel_training_step(x, dy, momentum=0.99, epsilon=1e-3):
    """tf.keras 2's fused=True training step: the bare kernel, no shift."""
    channels = x.shape[-1]
    gamma, beta = tf.Variable(tf.ones([channels])), tf.Variable(tf.zeros([channels]))
    moving_mean = tf.Variable(tf.zeros([channels]))
    moving_variance = tf.Variable(tf.ones([channels]))
    x4 = x if x.shape.rank == 4 else tf.reshape(x, [x.shape[0], 1, 1, channels])
    dy4 = tf.reshape(dy, x4.shape)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x4)
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x4, gamma, beta, epsilon=epsilon, is_training=True)
        moving_mean.assign(moving_mean * momentum + (1 - momentum) * mean)
        moving_variance.assign(moving_variance * momentum + (1 - momentum) * variance)
        return tape.gradient(y, [x4, gamma, beta], output_gradients=dy4)

    return lambda: step()[0].numpy()


def copy_step(x):
    source = x.numpy()
    target = np.empty_like(source)
    return lambda: np.copyto(target, source)


def inference_step(layer, x):
    fn = tf.function(lambda: layer(x, training=False))
    return lambda: fn().numpy()


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def built(layer, shape):
    layer.build(shape)
    return layer


def training_row(shape, repeats):
    rng = np.random.RandomState(0)
    x = tf.constant(rng.normal(1, 2, shape).astype("float32"))
    dy = tf.constant(rng.normal(0, 1, shape).astype("float32"))
    candidates = {
        "kernel": kernel_training_step(x, dy),
        "keras": layer_training_step(built(keras.layers.BatchNormalization(), shape), x, dy),
        "kerasbn": layer_training_step(built(kerasbn.BatchNormalization(), shape), x, dy),
        "copy": copy_step(x),
    }
    t = time_alternating(candidates, repeats=repeats)
    tensor_bytes = x.shape.num_elements() * 4
    step_bytes = MIN_TENSORS_PER_TRAINING_STEP * tensor_bytes
    copy_rate = 2 * tensor_bytes / t["copy"]  # read + written

    def rate(name):
        return f"{step_bytes / t[name] / 1e9:.1f} ({step_bytes / t[name] / copy_rate:.2f})"

    return [shape, f"{t['kernel'] * 1e3:.3f}", f"{t['keras'] * 1e3:.3f}",
            f"{t['kerasbn'] * 1e3:.3f}", f"{t['kerasbn'] / t['kernel']:.2f}",
            f"{t['kerasbn'] / t['keras']:.2f}", f"{t['kernel'] / t['keras']:.2f}",
            rate("kernel"), rate("kerasbn"), f"{copy_rate / 1e9:.1f}"]


def inference_row(shape, repeats):
    x = tf.constant(np.random.RandomState(0).normal(1, 2, shape).astype("float32"))
    t = time_alternating({
        "keras": inference_step(built(keras.layers.BatchNormalization(), shape), x),
        "kerasbn": inference_step(built(kerasbn.BatchNormalization(), shape), x),
    }, repeats=repeats)
    return [shape, f"{t['keras'] * 1e3:.3f}", f"{t['kerasbn'] * 1e3:.3f}",
            f"{t['kerasbn'] / t['keras']:.2f}"]


# Each layer option's training step on TRAIN_SHAPES[0], and the kernels it takes
# (kerasbn.kernels.tensorflow_backend: one_pass, fused = the split kernels, elementwise).
VARIANTS = [
    ("default", {}, "one_pass"),
    ("momentum=None", {"momentum": None}, "one_pass"),
    ("unbiased_variance=False", {"unbiased_variance": False}, "one_pass"),
    ("mixed_float16", {"dtype": "mixed_float16"}, "one_pass"),
    ("jit_compile=True", {}, "one_pass"),
    ("mask", {}, "fused"),
    ("renorm=True", {"renorm": True}, "fused"),
    ("virtual_batch_size=16", {"virtual_batch_size": 16}, "elementwise"),
    ("fused=False", {"fused": False}, "elementwise"),
]


def variant_rows(repeats):
    shape = TRAIN_SHAPES[0]
    rng = np.random.RandomState(0)
    x32 = tf.constant(rng.normal(1, 2, shape).astype("float32"))
    dy32 = tf.constant(rng.normal(0, 1, shape).astype("float32"))
    candidates = {"keras": layer_training_step(
        built(keras.layers.BatchNormalization(), shape), x32, dy32)}
    for name, kwargs, _ in VARIANTS:
        half = kwargs.get("dtype") == "mixed_float16"
        x, dy = (tf.cast(x32, "float16"), tf.cast(dy32, "float16")) if half else (x32, dy32)
        mask = tf.ones(shape[:-1], tf.bool) if name == "mask" else None
        candidates[name] = layer_training_step(
            built(kerasbn.BatchNormalization(**kwargs), shape), x, dy, mask=mask,
            jit_compile=name.startswith("jit"))
    t = time_alternating(candidates, repeats=repeats)
    return [[name, kernel, f"{t[name] * 1e3:.3f}", f"{t[name] / t['keras']:.2f}"]
            for name, _, kernel in VARIANTS]


PRECISION_SHAPES = [(256, 64), (4096, 64), (64, 28, 28, 16), (256, 28, 28, 8), (256, 56, 56, 4)]
PRECISION_RATIOS = [0, 1e6, 1e7, 1e8]


def kernel_variance(x):
    """The bare kernel's variance: kerasbn.kernels.tf_fused.moments is one FusedBatchNormV3 call, no shift."""
    _, variance = tf_fused.moments(tf.constant(x), x.ndim - 1)
    return variance.numpy()


def precision_rows():
    rng = np.random.RandomState(0)
    rows = []
    for shape in PRECISION_SHAPES:
        count = int(np.prod(shape[:-1]))
        base = rng.normal(0, 1, shape)
        row = [shape, count]
        for ratio_times_count in PRECISION_RATIOS:
            x = (base + ratio_times_count / count).astype(np.float32)
            reference = x.astype(np.float64).reshape(-1, shape[-1]).var(0, ddof=1)
            layer = kerasbn.BatchNormalization(momentum=0.0, fused=True)
            layer(x, training=True)
            errors = [np.max(np.abs(v - reference) / reference)
                      for v in (kernel_variance(x), layer.moving_variance.numpy())]
            row.append("{:.1e} / {:.1e}".format(*errors))
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--shapes", choices=["default", "small", "all"], default="default",
                        help="training shapes: the two headline ones, the small ones around "
                             "the fused=None threshold, or both")
    parser.add_argument("--variants", action="store_true",
                        help="also time each layer option's training step on the first shape")
    parser.add_argument("--precision", action="store_true",
                        help="also print the kernel's and kerasbn's variance error by n*|mean|/spread")
    args = parser.parse_args(argv)
    shapes = {"default": TRAIN_SHAPES, "small": SMALL_TRAIN_SHAPES,
              "all": TRAIN_SHAPES + SMALL_TRAIN_SHAPES}[args.shapes]
    train_rows = []
    for shape in shapes:
        train_rows.append(training_row(shape, args.repeats))
        print(train_rows[-1], flush=True)
    infer_rows = []
    if args.shapes != "small":
        for shape in INFER_SHAPES:
            infer_rows.append(inference_row(shape, args.repeats))
            print(infer_rows[-1], flush=True)
    print()
    print(f"{cpu_model()}, {tf.config.threading.get_intra_op_parallelism_threads() or 'default'}"
          f" intra-op threads; TensorFlow {tf.__version__}, Keras {keras.__version__}")
    print("Training step (forward + backward + moving statistics), float32:")
    print(markdown_table(
        ["shape", "kernel ms", "Keras ms", "kerasbn ms", "kerasbn / kernel", "kerasbn / Keras",
         "kernel / Keras", "kernel GB/s (of copy)", "kerasbn GB/s (of copy)", "copy GB/s"],
        train_rows))
    if infer_rows:
        print("\nInference (training=False):")
        print(markdown_table(["shape", "Keras ms", "kerasbn ms", "kerasbn / Keras"], infer_rows))
    if args.variants:
        print(f"\nTraining step by layer option, {TRAIN_SHAPES[0]}, against Keras' float32 step:")
        print(markdown_table(["kerasbn option", "kernels", "kerasbn ms", "vs Keras"],
                             variant_rows(args.repeats)))
    if args.precision:
        print("\nRelative variance error against float64, std 1, mean = ratio / n: bare kernel / kerasbn")
        print(markdown_table(["shape", "n per channel"] + [f"n*|mean|/spread = {r:.0e}"
                                                            for r in PRECISION_RATIOS],
                             precision_rows()))


if __name__ == "__main__":
    main()
