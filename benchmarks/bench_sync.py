"""Synchronized BN: kerasbn vs keras.layers.BatchNormalization(synchronized=True).

For 2, 4 and 8 logical CPU replicas (one fresh process each, since devices
are fixed when TensorFlow starts), one layer's training step -- forward,
backward, moving-statistics update, under strategy.run in tf.function -- on
per-replica (16, 28, 28, 64) float32, alternating in one process:
kerasbn synchronized, Keras synchronized, kerasbn unsynchronized, Keras
unsynchronized. Also the collective ops per replica in the traced step, and
the relative error of the synchronized variance at channel means 1e2 and
1e4 (std 1) against float64 numpy.

    .venv/bin/python benchmarks/bench_sync.py [--replicas 2 4 8] [--repeats 15]
"""

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import markdown_table, time_alternating  # noqa: E402

COLLECTIVES = ("CollectiveReduceV2", "CollectiveGatherV2", "NcclAllReduce", "CollectiveReduce")


def worker(replicas: int, repeats: int, shape=(16, 28, 28, 64)) -> dict:
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    import keras

    import kerasbn

    makers = {
        "kerasbn sync": lambda **k: kerasbn.SyncBatchNormalization(**k),
        "keras sync": lambda **k: keras.layers.BatchNormalization(synchronized=True, **k),
        "kerasbn local": lambda **k: kerasbn.BatchNormalization(**k),
        "keras local": lambda **k: keras.layers.BatchNormalization(**k),
    }

    def make_step(make, x, **kwargs):
        with strategy.scope():
            layer = make(**kwargs)
            layer.build((None,) + x_shape(x)[1:])

        @tf.function
        def train(x):
            def step(x):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = layer(x, training=True)
                    loss = tf.reduce_sum(y * y)
                return tape.gradient(loss, [x] + layer.trainable_weights)[0]

            return strategy.run(step, (x,))

        return layer, train

    def x_shape(x):
        return tuple(strategy.experimental_local_results(x)[0].shape)

    def distribute(arrays):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(arrays[ctx.replica_id_in_sync_group]))

    rng = np.random.RandomState(0)
    x = distribute([rng.normal(1, 2, shape).astype("float32") for _ in range(replicas)])
    steps, collectives = {}, {}
    for name, make in makers.items():
        _, train = make_step(make, x)
        graph = train.get_concrete_function(x).graph
        counts = Counter(op.type for op in graph.get_operations())
        collectives[name] = sum(counts[t] for t in COLLECTIVES) / replicas
        steps[name] = (lambda train=train: strategy.experimental_local_results(train(x))[0].numpy())
    times = time_alternating(steps, repeats=repeats, inner=3)

    errors = {}
    for loc in (1e2, 1e4):
        arrays = [(rng.normal(0, 1, (16, 8, 8, 4)) + loc).astype("float32")
                  for _ in range(replicas)]
        truth = np.concatenate(arrays).reshape(-1, 4).astype(np.float64).var(0)
        for name in ("kerasbn sync", "keras sync"):
            kwargs = {"momentum": 0.0}
            if name.startswith("kerasbn"):
                kwargs["unbiased_variance"] = False  # compare like with like
            layer, train = make_step(makers[name], distribute(arrays), **kwargs)
            train(distribute(arrays))
            variance = layer.moving_variance.numpy()
            errors[f"{name} @ mean {loc:g}"] = {
                "relative_error": float(np.max(np.abs(variance / truth - 1))),
                "variance": [round(float(v), 3) for v in variance],
            }
    return {"replicas": replicas, "times": times, "collectives": collectives, "errors": errors}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats)))
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    results = []
    for n in args.replicas:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", str(n), "--repeats", str(args.repeats)],
            capture_output=True, text=True, env=env, check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{n} replicas done", flush=True)
    rows = []
    for r in results:
        t, c = r["times"], r["collectives"]
        rows.append([
            r["replicas"],
            f"{t['kerasbn sync'] * 1e3:.1f}", f"{t['keras sync'] * 1e3:.1f}",
            f"{t['kerasbn sync'] / t['keras sync']:.2f}",
            f"{t['kerasbn sync'] / t['kerasbn local']:.2f}",
            f"{t['kerasbn sync'] / t['keras local']:.2f}",
            f"{c['kerasbn sync']:g} / {c['keras sync']:g}",
        ])
    print()
    print(markdown_table(
        ["replicas", "kerasbn sync ms", "Keras sync ms", "vs Keras sync",
         "vs kerasbn local", "vs Keras local", "collectives/replica (kerasbn / Keras)"], rows))
    print()
    error_rows = []
    for r in results[:1]:
        for key, value in r["errors"].items():
            error_rows.append([key, f"{value['relative_error']:.1e}", value["variance"]])
    print(f"Variance of the global batch, std 1, float32, {results[0]['replicas']} replicas:")
    print(markdown_table(["layer @ channel mean", "max relative error", "variances"], error_rows))


if __name__ == "__main__":
    main()
