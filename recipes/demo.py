"""A quick look at kerasbn: the same sigmoid network with and without BN.

Trains the paper's Figure 1 network (three fully-connected hidden layers of
100 sigmoid units) on Fashion-MNIST for a few thousand steps, once plain and
once with ``kerasbn.BatchNormalization`` before every sigmoid, and prints
test accuracy along the way, then what one BN layer learned: its gamma and
beta, and its moving statistics next to the exact population statistics of
its input (Algorithm 2) computed with numpy in float64.

    python -m recipes.demo [--steps 3000] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def build_mlp(batch_norm: bool, seed: int = 0):
    import keras

    import kerasbn

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((784,))
    h = inputs
    for i in range(3):
        h = keras.layers.Dense(100, use_bias=not batch_norm, name=f"dense_{i}")(h)
        if batch_norm:
            h = kerasbn.BatchNormalization(name=f"bn_{i}")(h)
        h = keras.layers.Activation("sigmoid", name=f"sigmoid_{i}")(h)
    outputs = keras.layers.Dense(10, name="logits")(h)
    return keras.Model(inputs, outputs, name="bn_mlp" if batch_norm else "mlp")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    from recipes.fashion_mnist import DatasetNotFoundError, load_fashion_mnist

    try:
        (x_train, y_train), (x_test, y_test) = load_fashion_mnist(args.data_dir)
    except DatasetNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import keras
    import tensorflow as tf

    x_train = x_train.reshape(-1, 784).astype("float32") / 255.0
    x_test = x_test.reshape(-1, 784).astype("float32") / 255.0
    steps_per_epoch = 500
    epochs = max(1, args.steps // steps_per_epoch)
    print(f"Fashion-MNIST: {len(x_train)} train / {len(x_test)} test images; "
          f"{epochs * steps_per_epoch} SGD steps of {args.batch_size}, lr {args.learning_rate}")
    results = {}
    for batch_norm in (False, True):
        model = build_mlp(batch_norm)
        model.compile(keras.optimizers.SGD(args.learning_rate),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        dataset = (
            tf.data.Dataset.from_tensor_slices((x_train, y_train))
            .shuffle(60000, seed=0).repeat().batch(args.batch_size)
        )
        accuracies = []
        for _ in range(epochs):
            model.fit(dataset, steps_per_epoch=steps_per_epoch, epochs=1, verbose=0, shuffle=False)
            _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
            accuracies.append(accuracy)
        results[model.name] = (model, accuracies)
        curve = " ".join(f"{a:.3f}" for a in accuracies)
        print(f"{'with BN' if batch_norm else 'no BN  '}: test accuracy every "
              f"{steps_per_epoch} steps: {curve}")

    model, _ = results["bn_mlp"]
    bn = model.get_layer("bn_2")
    pre_bn = keras.Model(model.inputs, model.get_layer("dense_2").output)
    features = pre_bn.predict(x_train, batch_size=1000, verbose=0).astype(np.float64)
    mean = features.mean(0)
    batches = features[: len(features) // args.batch_size * args.batch_size]
    batches = batches.reshape(-1, args.batch_size, features.shape[1])
    # Algorithm 2: E[x] and m/(m-1) * E_B[var_B] over training mini-batches.
    population_variance = batches.var(1, ddof=1).mean(0)
    print("\nWhat the last BN layer learned (first 5 of 100 units):")
    print(f"  gamma            {np.round(bn.gamma.numpy()[:5], 3)}")
    print(f"  beta             {np.round(bn.beta.numpy()[:5], 3)}")
    print(f"  moving mean      {np.round(bn.moving_mean.numpy()[:5], 3)}")
    print(f"  population mean  {np.round(mean[:5], 3)}  (numpy, float64, all training data)")
    print(f"  moving variance  {np.round(bn.moving_variance.numpy()[:5], 3)}")
    print(f"  population var   {np.round(population_variance[:5], 3)}  (Algorithm 2, unbiased)")
    error = np.abs(bn.moving_mean.numpy() - mean) / np.sqrt(population_variance)
    print(f"  moving mean within {error.max():.3f} population std of the exact mean, all units")
    plain, with_bn = results["mlp"][1][-1], results["bn_mlp"][1][-1]
    print(f"\nFinal test accuracy: no BN {plain:.3f}, with BN {with_bn:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
