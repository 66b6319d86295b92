"""The recipe's distributed evaluation: seconds per evaluation at 1, 2 and 4 replicas.

BN-Inception (``--width``) on the synthetic source's 1000 evaluation images at ``--size``, the
recipe's own ``make_evaluate`` under MirroredStrategy over N logical CPU devices (one fresh process
each: devices are fixed when TensorFlow starts); the first evaluation (tracing) is not timed, the
median of the next ``--repeats`` is. Logical CPU devices share this machine's cores: on GPUs each
replica is its own device, so this shows the overhead of splitting the evaluation, not its speed-up.

    .venv/bin/python benchmarks/bench_eval.py [--replicas 1 2 4] [--size 64] [--width 0.25]
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
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import markdown_table  # noqa: E402


def worker(replicas, size, width, repeats):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    from recipes.inception_bn.data import load_source
    from recipes.inception_bn.steps import EvalSet, make_evaluate
    from recipes.inception_bn.variants import VARIANTS

    source = load_source("synthetic", image_size=size)
    with strategy.scope():
        model = VARIANTS["bn-x5"].build_model(10, (size, size, 3), width_multiplier=width)
        flag = tf.Variable(0)
    evaluate = make_evaluate(strategy, model, source, flag, EvalSet(batch_size=256 // replicas))
    evaluate()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.width, args.repeats)))
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    rows = []
    for n in args.replicas:
        out = subprocess.run([sys.executable, __file__, "--worker", str(n), "--size", str(args.size), "--width",
                              str(args.width), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, env=env, check=True)
        rows.append([n, json.loads(out.stdout.strip().splitlines()[-1])])
    print(f"BN-Inception width {args.width}, {args.size}px, 1000 images, global batch 256; {os.cpu_count()} cores")
    print(markdown_table(["replicas", "seconds per evaluation", "vs 1 replica"],
                         [[n, f"{t:.2f}", f"{t / rows[0][1]:.2f}"] for n, t in rows]))


if __name__ == "__main__":
    main()
