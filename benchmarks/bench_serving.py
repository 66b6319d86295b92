"""Inference latency of a BN-Inception-sized convolutional network, BN folded vs not.

The network: a separable 7x7 stem (depth multiplier 8), 3x3 convolutions and
Inception modules with BN-Inception's widths (1x1, 1x1-3x3, 1x1-3x3-3x3,
pool-1x1 branches concatenated) at 224x224 input, BN after every
convolution. Same process, alternating, ratio of median latencies.

    .venv/bin/python benchmarks/bench_serving.py [--repeats 15] [--image-size 224]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import markdown_table, time_alternating  # noqa: E402

import kerasbn  # noqa: E402


def conv_bn(x, filters, size, strides=1):
    x = keras.layers.Conv2D(filters, size, strides, padding="same", use_bias=False)(x)
    return keras.layers.ReLU()(kerasbn.BatchNormalization()(x))


def inception(x, f1, f3r, f3, d3r, d3, pool):
    branches = [conv_bn(conv_bn(x, f3r, 1), f3, 3), conv_bn(conv_bn(conv_bn(x, d3r, 1), d3, 3), d3, 3)]
    if f1:
        branches.insert(0, conv_bn(x, f1, 1))
    p = keras.layers.AveragePooling2D(3, 1, "same")(x)
    branches.append(conv_bn(p, pool, 1))
    return keras.layers.Concatenate()(branches)


def network(image_size=224, num_classes=1000):
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.SeparableConv2D(64, 7, 2, padding="same", depth_multiplier=8, use_bias=False)(inputs)
    x = keras.layers.ReLU()(kerasbn.BatchNormalization()(x))
    x = keras.layers.MaxPooling2D(3, 2, "same")(x)
    x = conv_bn(x, 64, 1)
    x = conv_bn(x, 192, 3)
    x = keras.layers.MaxPooling2D(3, 2, "same")(x)
    x = inception(x, 64, 64, 64, 64, 96, 32)      # 3a
    x = inception(x, 64, 64, 96, 64, 96, 64)      # 3b
    x = keras.layers.MaxPooling2D(3, 2, "same")(x)
    x = inception(x, 224, 64, 96, 96, 128, 128)   # 4a
    x = inception(x, 192, 96, 128, 96, 128, 128)  # 4b
    x = inception(x, 160, 128, 160, 128, 160, 96)  # 4c
    x = inception(x, 96, 128, 192, 160, 192, 96)  # 4d
    x = keras.layers.MaxPooling2D(3, 2, "same")(x)
    x = inception(x, 352, 192, 320, 160, 224, 128)  # 5a
    x = inception(x, 352, 192, 320, 192, 224, 128)  # 5b
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)
    model = network(args.image_size)
    folded = kerasbn.fold_batch_norm(model)
    print(f"{model.count_params() / 1e6:.1f}M parameters; "
          f"{sum(isinstance(layer, kerasbn.BatchNormalization) for layer in model.layers)} BN layers, "
          f"{sum(isinstance(layer, kerasbn.BatchNormalization) for layer in folded.layers)} left after folding")
    rows = []
    for batch in (1, 64):
        x = tf.constant(np.random.RandomState(0).normal(0, 1, (batch, args.image_size, args.image_size, 3))
                        .astype("float32"))
        plain_fn = tf.function(lambda x: model(x, training=False))
        folded_fn = tf.function(lambda x: folded(x, training=False))
        err = np.abs(plain_fn(x).numpy() - folded_fn(x).numpy()).max()
        inner = 5 if batch == 1 else 1
        repeats = args.repeats if batch == 1 else max(3, args.repeats // 3)
        candidates = {"bn": lambda f=plain_fn, x=x: f(x).numpy(),
                      "folded": lambda f=folded_fn, x=x: f(x).numpy()}
        times = time_alternating(candidates,
                                 repeats=repeats, inner=inner, warmup=2)
        rows.append([batch, f"{times['bn'] * 1e3:.1f}", f"{times['folded'] * 1e3:.1f}",
                     f"{times['bn'] / times['folded']:.2f}x", f"{err:.1e}"])
        print(rows[-1], flush=True)
    print(markdown_table(["batch", "with BN ms", "folded ms", "speed-up", "max abs output diff"], rows))


if __name__ == "__main__":
    main()
