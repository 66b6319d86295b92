"""One distributed BN step, run in its own process (devices are fixed at TF start).

Usage (MirroredStrategy over N logical CPUs):
    python tests/helpers/sync_worker.py --replicas 4 --sizes 5,3,0,4 --out result.npz
Several scenarios in one process (TensorFlow's start-up paid once; same --replicas):
    python tests/helpers/sync_worker.py --replicas 2 --batch scenarios.json
Usage (MultiWorkerMirroredStrategy: TF_CONFIG set, one process per worker):
    python tests/helpers/sync_worker.py --multi-worker --sizes 5,3 --out result.npz

Every process draws the same global data from one seed, runs one training
step of the layer under ``strategy.run`` in a ``tf.function`` (forward,
backward, moving-statistics update) and saves, for its local replicas: the
outputs, input gradients, gamma/beta gradients, moving statistics, and the
number of collective ops per replica in the traced graph. The tests compare
them with a float64 numpy reference of the global batch.
"""

import argparse
import json
import os
import sys
from collections import Counter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests.helpers.distributed import make_strategy  # noqa: E402

COLLECTIVE_OPS = ("CollectiveReduceV2", "CollectiveReduce", "CollectiveGatherV2",
                  "CollectiveGather", "NcclAllReduce", "CollectiveAllToAllV2")


def make_data(sizes, shape, channels, loc, spread, seed=0):
    rng = np.random.RandomState(seed)
    xs, dys = [], []
    for n in sizes:
        xs.append((rng.normal(0, spread, (n,) + shape + (channels,)) + loc).astype("float32"))
        dys.append(rng.normal(0, 1, (n,) + shape + (channels,)).astype("float32"))
    gamma = rng.uniform(0.5, 1.5, channels).astype("float32")
    beta = rng.uniform(-1, 1, channels).astype("float32")
    return xs, dys, gamma, beta


def make_layer(kind, group_size, momentum):
    import keras

    import kerasbn

    if kind == "keras":
        return keras.layers.BatchNormalization(synchronized=True, momentum=momentum)
    if kind == "unsync":
        return kerasbn.BatchNormalization(momentum=momentum)
    return kerasbn.SyncBatchNormalization(sync_group_size=group_size, momentum=momentum)


def scenario_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--multi-worker", action="store_true")
    parser.add_argument("--sizes", default="4,4")
    parser.add_argument("--shape", default="3,3")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--loc", type=float, default=3.0)
    parser.add_argument("--spread", type=float, default=2.0)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--momentum", type=float, default=0.5)
    parser.add_argument("--layer", choices=["kerasbn", "keras", "unsync"], default="kerasbn")
    parser.add_argument("--out", help="the result's npz (one scenario)")
    parser.add_argument("--batch", help="a JSON file of {out: [scenario arguments]}: every scenario in this "
                        "process, one after another (they must agree on --replicas / --multi-worker)")
    return parser


def main(argv=None):
    parser = scenario_parser()
    args = parser.parse_args(argv)
    if (args.out is None) == (args.batch is None):
        parser.error("give one of --out (one scenario) and --batch")
    strategy, task = make_strategy(args.replicas, args.multi_worker)
    if args.batch is None:
        np.savez(args.out, **run_scenario(strategy, task, args))
        return
    with open(args.batch) as f:
        scenarios = json.load(f)
    for out, scenario_argv in scenarios.items():
        scenario = scenario_parser().parse_args(scenario_argv)
        assert (scenario.replicas, scenario.multi_worker) == (args.replicas, args.multi_worker), scenario_argv
        try:
            result = run_scenario(strategy, task, scenario)
        except ValueError as error:  # a scenario that must fail: its message is the result
            result = {"error": np.array(str(error))}
        np.savez(out, **result)


def run_scenario(strategy, task, args):
    """One training step of the layer ``args`` describe; the arrays the tests compare."""
    sizes = [int(s) for s in args.sizes.split(",")]
    assert len(sizes) == strategy.num_replicas_in_sync, (sizes, strategy.num_replicas_in_sync)
    shape = tuple(int(s) for s in args.shape.split(",") if s)
    xs, dys, gamma, beta = make_data(sizes, shape, args.channels, args.loc, args.spread)

    with strategy.scope():
        layer = make_layer(args.layer, args.group_size, args.momentum)
        layer.build((None,) + shape + (args.channels,))
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)

    def per_replica(values):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(values[ctx.replica_id_in_sync_group])
        )

    @tf.function
    def train(x, dy):
        def step(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * dy)
            dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
            return y, dx, dgamma, dbeta

        return strategy.run(step, (x, dy))

    x, dy = per_replica(xs), per_replica(dys)
    graph = train.get_concrete_function(x, dy).graph
    counts = Counter(op.type for op in graph.get_operations())
    collectives = sum(counts[t] for t in COLLECTIVE_OPS)
    local = strategy.extended.worker_devices
    y, dx, dgamma, dbeta = (strategy.experimental_local_results(t) for t in train(x, dy))
    ids = [task * len(local) + i for i in range(len(local))]
    moving = {
        name: np.stack([v.numpy() for v in strategy.experimental_local_results(
            getattr(layer, name).value if hasattr(getattr(layer, name), "value")
            else getattr(layer, name))])
        for name in ("moving_mean", "moving_variance")
    }
    result = {
        "replica_ids": np.array(ids),
        "collectives_per_replica": np.array(collectives / len(local)),
        "fills": np.array(counts["Fill"] / len(local)),
        **moving,
    }
    for i, r in enumerate(ids):
        result[f"y_{r}"] = y[i].numpy()
        result[f"dx_{r}"] = dx[i].numpy()
        result[f"dgamma_{r}"] = dgamma[i].numpy()
        result[f"dbeta_{r}"] = dbeta[i].numpy()
    return result


if __name__ == "__main__":
    main()
