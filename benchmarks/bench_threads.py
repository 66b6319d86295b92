"""How to spend the cores on the demo's small runs: one run on all of them, or one run per core.

The recipe's training loop (``make_train_loop``) on the demo's settings (bn-baseline,
width x0.25, 56x56 Fashion-MNIST through the recipe's input pipeline, batch 32, 10
steps per call), each measurement in fresh worker processes:

* ``all cores``: one run, TensorFlow's default intra-op threads;
* ``one thread``: one run with ``TF_NUM_INTRAOP_THREADS=1``;
* ``one per core``: as many one-thread runs at once as there are cores (what
  ``compare --jobs`` does), images/s summed.

Rounds alternate the three, so machine noise spreads evenly; the table gives each
one's median images/s and its ratio to ``all cores``.

    .venv/bin/python benchmarks/bench_threads.py [--rounds 3] [--steps 200]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table  # noqa: E402

WORKER = """
import json, sys, time
import keras, tensorflow as tf
from recipes.inception_bn.data import load_source
from recipes.inception_bn.steps import network_input
from recipes.inception_bn.steps import Objective, make_train_loop
from recipes.inception_bn.variants import VARIANTS

steps = int(sys.argv[1])
variant = VARIANTS["bn-baseline"]
source = load_source("fashion_mnist", None, 56)
keras.utils.set_random_seed(0)
model = variant.build_model(10, source.image_shape, 0.25, False, 0.9)
optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
optimizer.build(model.trainable_variables)
strategy = tf.distribute.get_strategy()
loop = make_train_loop(strategy, model, optimizer, Objective(variant.weight_decay, 32), False,
                       prepare=lambda images, factors: network_input(images, factors, variant.distortion))
iterator = iter(source.train(32, variant.distortion, 0))
float(loop(iterator, tf.constant(20))[0])  # trace and warm up
start = time.perf_counter()
for _ in range(steps // 10):
    float(loop(iterator, tf.constant(10))[0])
print(json.dumps({"images_per_second": steps // 10 * 10 * 32 / (time.perf_counter() - start)}))
"""


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(processes: int, threads: int | None, steps: int) -> float:
    """Summed images/s of ``processes`` runs started together."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    if threads:
        env["TF_NUM_INTRAOP_THREADS"] = str(threads)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(steps)], stdout=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT) for _ in range(processes)]
    total = 0.0
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a benchmark worker failed (exit {proc.returncode})")
        total += json.loads(out.strip().splitlines()[-1])["images_per_second"]
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per run (after 20 warm-up steps)")
    args = parser.parse_args()
    cores = usable_cores()
    setups = {"all cores": (1, None), "one thread": (1, 1), f"one per core ({cores} runs)": (cores, 1)}
    samples = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, (processes, threads) in setups.items():
            samples[name].append(run(processes, threads, args.steps))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    base = medians["all cores"]
    print(f"{cores} cores, {args.rounds} rounds, {args.steps} steps per run")
    print(markdown_table(["set-up", "images/s (median)", "vs all cores"],
                         [[name, f"{value:.0f}", f"{value / base:.2f}x"] for name, value in medians.items()]))


if __name__ == "__main__":
    main()
