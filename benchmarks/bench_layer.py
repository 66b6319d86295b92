"""One BN layer, kerasbn vs keras.layers.BatchNormalization, same process.

Training step = forward + backward (gradients for the input, gamma and beta)
+ moving-statistics update, inside tf.function as model.fit runs it.
Inference = forward with training=False at batch 1. Prints the ratio of
median times (kerasbn / Keras; below 1 means kerasbn is faster).

    .venv/bin/python benchmarks/bench_layer.py [--repeats 30]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import markdown_table, time_alternating  # noqa: E402

import kerasbn  # noqa: E402


def training_step(layer, x):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    return lambda: [g.numpy() for g in step()][0]


def inference_step(layer, x):
    fn = tf.function(lambda: layer(x, training=False))
    return lambda: fn().numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    cases = [
        ("train", (64, 28, 28, 64), training_step),
        ("train", (256, 1024), training_step),
        ("infer", (1, 28, 28, 64), inference_step),
        ("infer", (1, 1024), inference_step),
    ]
    rows = []
    for mode, shape, make in cases:
        x = tf.constant(np.random.RandomState(0).normal(1, 2, shape).astype("float32"))
        ours, theirs = kerasbn.BatchNormalization(), keras.layers.BatchNormalization()
        ours.build(shape)
        theirs.build(shape)
        times = time_alternating(
            {"kerasbn": make(ours, x), "keras": make(theirs, x)}, repeats=args.repeats
        )
        ratio = times["kerasbn"] / times["keras"]
        rows.append([mode, shape, f"{times['keras'] * 1e3:.3f}", f"{times['kerasbn'] * 1e3:.3f}",
                     f"{ratio:.2f}"])
        print(rows[-1], flush=True)
    print()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"{tf.config.threading.get_inter_op_parallelism_threads() or 'default'} inter-op threads")
    print(markdown_table(["step", "shape", "Keras ms", "kerasbn ms", "kerasbn / Keras"], rows))


if __name__ == "__main__":
    main()
