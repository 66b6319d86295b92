"""model.fit of a small convolutional model with synchronized BN, in its own process.

    python tests/helpers/fit_worker.py --replicas 2 --out result.npz        # MirroredStrategy
    python tests/helpers/fit_worker.py --multi-worker --out result.npz      # TF_CONFIG set
    python tests/helpers/fit_worker.py --replicas 2 --out a.npz --out-converted b.npz  # both builds, one process
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
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--multi-worker", action="store_true")
    parser.add_argument("--convert", action="store_true",
                        help="build with Keras' BN and convert_sync_batchnorm it")
    parser.add_argument("--out", required=True)
    parser.add_argument("--out-converted", help="also fit the converted build, into this npz")
    args = parser.parse_args(argv)
    strategy, task = make_strategy(args.replicas, args.multi_worker)
    fit(strategy, task, args.convert, args.out)
    if args.out_converted:
        fit(strategy, task, True, args.out_converted)


def fit(strategy, task, convert, out):
    import keras

    import kerasbn
    import kerasbn.compat

    keras.utils.set_random_seed(0)
    rng = np.random.RandomState(0)
    x = rng.normal(1.0, 2.0, (96, 8, 8, 3)).astype("float32")
    y = (x.mean((1, 2, 3)) > 1.0).astype("int32")
    bn = keras.layers.BatchNormalization if convert else kerasbn.SyncBatchNormalization
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, use_bias=False),
            bn(momentum=0.5),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ])
        if convert:
            model = kerasbn.convert_sync_batchnorm(model)
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(24).with_options(options)
    kerasbn.compat.patch_keras_multi_worker_fit()  # keras-team/keras#20585
    history = model.fit(data, epochs=3, verbose=0)
    layer = model.layers[1]
    copies = strategy.experimental_local_results(layer.moving_variance.value)
    np.savez(
        out,
        loss=np.array(history.history["loss"]),
        moving_variance_copies=np.stack([c.numpy() for c in copies]),
        layer_type=np.array(type(layer).__name__),
        task=np.array(task),
        replicas=np.array(strategy.num_replicas_in_sync),
    )


if __name__ == "__main__":
    main()
