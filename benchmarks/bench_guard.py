"""The non-finite guard's cost: kerasbn's training step with and without it, one process.

The guard (``kerasbn.moments.all_finite`` and the select that keeps the moving statistics when it
is False) reads C values per layer. "without" traces the same layer with the guard replaced by a
constant True; the two alternate in rounds (common.time_alternating) and the ratio is printed
(above 1: the guard costs that fraction). Shapes: the layer benchmark's, the small shapes where
a fixed cost shows most, and the synchronized split path's (masked).

    .venv/bin/python benchmarks/bench_guard.py [--repeats 30]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from bench_layer import built, cpu_model, layer_training_step  # noqa: E402
from common import markdown_table, time_alternating  # noqa: E402

import kerasbn  # noqa: E402
from kerasbn import batch_normalization  # noqa: E402

CASES = [((64, 28, 28, 64), {}), ((256, 1024), {}), ((8, 8, 8, 32), {}), ((64, 256), {}),
         ((32, 16, 16, 64), {"fused": False}), ((8, 8, 8, 32), {"virtual_batch_size": 4})]


def step(shape, arguments, x, dy, guard):
    layer = built(kerasbn.BatchNormalization(**arguments), shape)
    fn = layer_training_step(layer, x, dy)
    if guard:
        fn()
        return fn
    original = batch_normalization.all_finite
    batch_normalization.all_finite = lambda statistics: tf.constant(True)
    try:
        fn()  # traced while the guard is a constant
    finally:
        batch_normalization.all_finite = original
    return fn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for shape, arguments in CASES:
        rng = np.random.RandomState(0)
        x = tf.constant(rng.normal(1, 2, shape).astype("float32"))
        dy = tf.constant(rng.normal(0, 1, shape).astype("float32"))
        t = time_alternating({"with": step(shape, arguments, x, dy, True),
                              "without": step(shape, arguments, x, dy, False)},
                             repeats=args.repeats)
        rows.append([shape, arguments or "default", f"{t['with'] * 1e3:.3f}",
                     f"{t['without'] * 1e3:.3f}", f"{t['with'] / t['without']:.3f}"])
    print(f"CPU: {cpu_model()}; TensorFlow {tf.__version__}")
    print(markdown_table(["shape", "arguments", "with guard (ms)", "without (ms)", "ratio"], rows))


if __name__ == "__main__":
    main()
