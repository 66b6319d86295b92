"""Converted models of every shape, one training-mode forward on 2 replicas.

Usage: python tests/helpers/convert_worker.py --out result.npz  (or ``measure(strategy)`` in a process
whose two logical CPUs were set up before TensorFlow initialized: tests/conftest.py does)

For each model of ``tests.helpers.zoo_models`` (and the keras-hub backbones when keras-hub is
installed), saves the largest difference between the 2-replica training-mode output and the
original model's training-mode output on the whole global batch, relative to the output's
scale, and the same for the moving statistics after that step; and, as a control, the same
comparison for the model cloned without conversion (Keras' per-replica BN), which must differ.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests.helpers.distributed import make_strategy  # noqa: E402


def _two_replica_forward(strategy, model, x):
    halves = np.split(x, 2)
    inputs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(halves[ctx.replica_id_in_sync_group]))
    step = tf.function(lambda v: strategy.run(lambda t: model(t, training=True), (v,)))
    return np.concatenate([np.asarray(t) for t in strategy.experimental_local_results(step(inputs))])


def _moving(model):
    return np.concatenate([np.ravel(w.numpy()) for w in model.weights if "moving_" in w.name])


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    strategy, _ = make_strategy(2)
    np.savez(args.out, **measure(strategy))


def measure(strategy) -> dict:
    """The relative differences for every model, under a 2-replica ``strategy``."""
    import keras

    import kerasbn
    from tests.helpers import zoo_models

    # keras-hub's MobileNetV3 (34 BN layers) stands for the backbones here: their conversion, saving,
    # folding and export are tested whole in tests/library/test_other_models.py; this 2-replica
    # trace of each is the suite's costliest per model (about 4 s), and the merge it checks is the same.
    hub = {name: build for name, build in zoo_models.hub_backbones().items() if name == "mobilenet_v3"}
    builders = {**zoo_models.SHAPES, **hub}
    result = {}
    for name, build in builders.items():
        keras.utils.set_random_seed(0)
        model = zoo_models.trained(build()[0])
        x = zoo_models.input_batch(model, n=16, seed=7)
        with strategy.scope():
            synced = kerasbn.convert_sync_batchnorm(model)
            unsynced = kerasbn.model_walk.clone_model(model, kerasbn.model_walk.clone_layer)
        # The reference last: its forward updates the original's moving statistics.
        y_sync = _two_replica_forward(strategy, synced, x)
        y_unsync = _two_replica_forward(strategy, unsynced, x)
        y_ref = np.asarray(model(x, training=True))
        scale = float(np.std(y_ref))
        result[f"{name}_sync"] = np.max(np.abs(y_sync - y_ref)) / scale
        result[f"{name}_unsync"] = np.max(np.abs(y_unsync - y_ref)) / scale
        moving_ref = _moving(model)
        result[f"{name}_moving"] = np.max(np.abs(_moving(synced) - moving_ref) / (1 + np.abs(moving_ref)))
    return result


if __name__ == "__main__":
    main()
