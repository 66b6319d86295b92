"""The recipe's distributed evaluation against a single-device evaluation of the same weights.

Usage (MirroredStrategy over N logical CPUs; devices are fixed when TensorFlow starts):
    python tests/helpers/eval_worker.py --replicas 3 --examples 997,5 --batch 16 --out result.npz

Builds the tests' tiny BN network (tests/helpers/tiny_train.py) under the strategy (seeded weights, BN statistics moved off their
initial values), runs ``make_evaluate`` over the first ``--examples`` synthetic evaluation images,
then evaluates the same images on one device in float64 numpy from the same logits' weights, and
saves both.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository

import numpy as np  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--examples", required=True, help="comma-separated counts, one evaluation each")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from tests.helpers.distributed import make_strategy

    strategy, _ = make_strategy(args.replicas)
    import keras
    import tensorflow as tf

    from recipes.inception_bn.data import load_source
    from recipes.inception_bn.steps import EvalSet, make_evaluate, network_input
    from tests.helpers.tiny_train import TINY

    keras.utils.set_random_seed(0)
    source = load_source("synthetic", image_size=32)
    with strategy.scope():
        model = TINY.build_model(10, (32, 32, 3))
        stop_flag = tf.Variable(0)
    rng = np.random.RandomState(0)
    for w in model.weights:  # statistics away from 0 and 1, so inference uses them
        if "moving_variance" in w.name:
            w.assign(rng.uniform(0.5, 2.0, w.shape).astype("float32"))
        elif "moving_mean" in w.name:
            w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    results = {"distributed": [], "single": [], "count": []}
    for examples in (int(n) for n in args.examples.split(",")):
        evaluate = make_evaluate(strategy, model, source, stop_flag, EvalSet(limit=examples, batch_size=args.batch))
        results["distributed"].append(evaluate())
        images, labels = next(iter(source.eval(examples).batch(100000)))
        logits = model(network_input(images), training=False).numpy().astype(np.float64)
        labels = labels.numpy()
        log_probs = logits - logits.max(1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
        ranks = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(1)
        results["single"].append([-log_probs[np.arange(len(labels)), labels].mean(), (ranks == 0).mean(),
                                  (ranks < 5).mean()])
        results["count"].append(len(labels))
    np.savez(args.out, **{k: np.array(v) for k, v in results.items()})


if __name__ == "__main__":
    main()
