"""Start-up cost of BN-Inception's training step: kerasbn's BN vs Keras' BatchNormalization.

Users pay tracing on every start, and the tests pay it on every recipe run.
The first call of the recipe network's training step (trace, graph
optimization, first run) with ``kerasbn.BatchNormalization`` against the
same network with ``keras.layers.BatchNormalization`` (bench_recipe's
clone), on one replica and on 2 logical CPU replicas with synchronized BN.
Each measurement runs in a fresh process (nothing cached), the two layers
alternating; the ratio of medians is printed.

    .venv/bin/python benchmarks/bench_tracing.py [--repeats 3] [--width 0.25] [--size 64] [--batch 4]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def first_call_seconds(layer: str, replicas: int, width: float, size: int, batch: int) -> float:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import tensorflow as tf
    from bench_recipe import train_step, with_keras_bn  # sets 2 logical CPU devices

    from recipes.inception_bn.model import bn_inception

    if replicas > 1:
        strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    else:
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = bn_inception(1000, (size, size, 3), synchronized=replicas > 1,
                             width_multiplier=width)
        if layer == "keras":
            model = with_keras_bn(model, synchronized=replicas > 1)
        step = train_step(model, strategy, batch, size)
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="per replica")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        layer, replicas = args.worker[0], int(args.worker[1])
        print(json.dumps(first_call_seconds(layer, replicas, args.width, args.size, args.batch)))
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    rows = []
    for replicas in (1, 2):
        times = {"kerasbn": [], "keras": []}
        for _ in range(args.repeats):
            for layer in times:
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", layer, str(replicas),
                     "--width", str(args.width), "--size", str(args.size), "--batch", str(args.batch)],
                    capture_output=True, text=True, env=env, check=True)
                times[layer].append(json.loads(out.stdout.strip().splitlines()[-1]))
        ours, theirs = (statistics.median(times[k]) for k in ("kerasbn", "keras"))
        label = "1" if replicas == 1 else f"{replicas} (synchronized BN)"
        rows.append(f"| {label} | {theirs:.1f} | {ours:.1f} | {ours / theirs:.2f} |")
        print(rows[-1], flush=True)
    print(f"\nFirst training step of BN-Inception (width {args.width}, {args.size}px, "
          f"batch {args.batch} per replica), median of {args.repeats} fresh processes:")
    print("| replicas | Keras BN s | kerasbn s | kerasbn / Keras |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
