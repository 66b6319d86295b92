"""recalibrate_statistics under MirroredStrategy (2 logical CPUs), in its own process.

    python tests/helpers/recalibrate_worker.py --out result.npz
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests.helpers.distributed import make_strategy  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    strategy, _ = make_strategy(replicas=2)
    import keras

    import kerasbn

    rng = np.random.RandomState(0)
    x = rng.normal(1, 2, (80, 3)).astype("float32")
    kernel = rng.normal(0, 1, (3, 4)).astype("float32")
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, use_bias=False),
                                  kerasbn.SyncBatchNormalization(momentum=0.5)])
        model.layers[0].kernel.assign(kernel)
    data = tf.data.Dataset.from_tensor_slices(x).batch(16)
    kerasbn.recalibrate_statistics(model, data, verbose=0)
    bn = model.layers[1]
    np.savez(args.out, x=x, kernel=kernel,
             moving_mean=bn.moving_mean.numpy(), moving_variance=bn.moving_variance.numpy())


if __name__ == "__main__":
    main()
