"""kerasbn on Keras' PyTorch backend against Keras' own BatchNormalization and PyTorch's BatchNorm2d.

A training step (forward, autograd backward, SGD update, moving-statistics update) of a small
network - 3 blocks of conv 3x3 - BN - ReLU, then global pooling and a classifier, batches of
32 x 32 x 32 x 16 - as a Keras-on-torch user trains it (the Keras model is a ``torch.nn.Module``,
``torch.optim.SGD`` over its parameters). The candidates alternate round by round
(``common.time_alternating``); medians and ratios to Keras' BN are printed:

- kerasbn (local), Keras' BN (the layer a Keras user would use instead);
- PyTorch's own network (``nn.Conv2d`` + ``nn.BatchNorm2d``, channels first), the fastest thing
  a PyTorch user could run instead (not a Keras model);
- the synchronized layer's collectives per step, counted under a 1-rank gloo group (one
  all-gather forward and one all-reduce backward per BN layer).

    .venv/bin/python benchmarks/bench_torch.py [--repeats 20] [--threads N]
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_jax import _cpu_model  # noqa: E402
from common import markdown_table, time_alternating  # noqa: E402

import kerasbn  # noqa: E402

SHAPE = (32, 32, 32, 16)
FILTERS = 32


def keras_network(bn):
    layers = [keras.Input(SHAPE[1:])]
    for _ in range(3):
        layers += [keras.layers.Conv2D(FILTERS, 3, padding="same", use_bias=False), bn(), keras.layers.ReLU()]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    return keras.Sequential(layers)


def torch_network():
    blocks, channels = [], SHAPE[-1]
    for _ in range(3):
        blocks += [torch.nn.Conv2d(channels, FILTERS, 3, padding=1, bias=False), torch.nn.BatchNorm2d(FILTERS),
                   torch.nn.ReLU()]
        channels = FILTERS
    return torch.nn.Sequential(*blocks, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(FILTERS, 10))


def step_of(module, x, y):
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    # Keras layers ignore torch's module.train(): a Keras model is told it trains.
    forward = module if isinstance(module, torch.nn.Sequential) else (lambda x: module(x, training=True))

    def step():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
    return step


def count_collectives():
    """Collectives per training step of the synchronized network, under a 1-rank gloo group."""
    import torch.distributed as dist

    counts = {"all_gather": 0, "all_reduce": 0}
    originals = {name: getattr(dist, name) for name in counts}

    def counting(name):
        def collective(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return collective

    with tempfile.TemporaryDirectory() as directory:
        dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=0, world_size=1)
        try:
            # One rank synchronizes with nothing, so the layer would skip the merge: count with a
            # group of 1 by asking for the merge explicitly (the plan's group is the world).
            from kerasbn.kernels import torch_backend

            world = torch_backend._world
            torch_backend._world = lambda: 2  # plan as for 2 ranks; the all-gather runs on 1
            model = keras_network(lambda: kerasbn.SyncBatchNormalization())
            x = torch.tensor(np.random.rand(*SHAPE).astype("float32"))
            step = step_of(model, x, torch.zeros(SHAPE[0], dtype=torch.long))
            step()
            for name in counts:
                counts[name] = 0
                setattr(dist, name, counting(name))
            step()
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)
            torch_backend._world = world
            dist.destroy_process_group()
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.RandomState(0)
    x_last = torch.tensor(rng.normal(size=SHAPE).astype("float32"))
    y = torch.tensor(rng.randint(0, 10, SHAPE[0]))
    candidates = {
        "kerasbn": step_of(keras_network(lambda: kerasbn.BatchNormalization()), x_last, y),
        "keras BN": step_of(keras_network(lambda: keras.layers.BatchNormalization()), x_last, y),
        "PyTorch BatchNorm2d (torch.nn)": step_of(torch_network(), x_last.permute(0, 3, 1, 2).contiguous(), y),
    }
    times = time_alternating(candidates, repeats=args.repeats, inner=3)
    reference = times["keras BN"]
    rows = [[name, f"{t * 1e3:.1f}", f"{t / reference:.2f}"] for name, t in times.items()]
    print(f"Training step, 3 conv-BN-ReLU blocks, batch {SHAPE}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {_cpu_model()}")
    print(markdown_table(["candidate", "ms / step", "ratio to Keras' BN"], rows))
    counts = count_collectives()
    print(f"Synchronized kerasbn, collectives per training step (3 BN layers): "
          f"{counts['all_gather']} all-gather (forward), {counts['all_reduce']} all-reduce (backward)")


if __name__ == "__main__":
    main()
