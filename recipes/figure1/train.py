"""The paper's Figure 1: a 3-layer, 100-unit sigmoid network with and without BN.

    python -m recipes.figure1.train --run-dir runs/figure1 [--steps 5000] [--data-dir DIR]

Trains the same network (784-100-100-100-10, sigmoid, SGD batch 60) on
Fashion-MNIST twice, plain and with ``kerasbn.BatchNormalization`` before
every sigmoid, and records every ``--record-every`` steps the test accuracy
and the 15th, 50th and 85th percentiles over the test set of the input to
one sigmoid of the last hidden layer (Figure 1b/c): without BN that
distribution drifts during training (internal covariate shift); with BN it
stays put. Writes ``figure1.png`` and ``figure1.csv`` to the run directory.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from recipes.plots import saved_figure  # noqa: E402

PERCENTILES = (15, 50, 85)


def build_mlp(batch_norm: bool, seed: int = 0):
    """The paper's network: three fully-connected sigmoid layers of 100 units."""
    import keras

    import kerasbn

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((784,))
    h = inputs
    for i in range(3):
        # Gaussian initial weights as the paper; BN's beta replaces the bias.
        h = keras.layers.Dense(100, use_bias=not batch_norm, kernel_initializer="random_normal",
                               name=f"dense_{i}")(h)
        if batch_norm:
            h = kerasbn.BatchNormalization(name=f"bn_{i}")(h)
        h = keras.layers.Activation("sigmoid", name=f"sigmoid_{i}")(h)
    outputs = keras.layers.Dense(10, name="logits")(h)
    return keras.Model(inputs, outputs, name="with_bn" if batch_norm else "without_bn")


def train_one(batch_norm, data, steps, batch_size, learning_rate, record_every, unit=0):
    """Returns rows ``(step, accuracy, p15, p50, p85)``."""
    import keras
    import tensorflow as tf

    (x_train, y_train), (x_test, y_test) = data
    model = build_mlp(batch_norm)
    # The sigmoid's input: BN's output with BN, the dense layer's output without.
    probe = keras.Model(model.inputs[0], [model.output, model.get_layer("sigmoid_2").input])
    optimizer = keras.optimizers.SGD(learning_rate)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables, strict=True))

    @tf.function
    def observe():
        logits, activation = probe(x_test, training=False)
        return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y_test), tf.float32)), \
            activation[:, unit]

    batches = (tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(len(x_train), seed=0).repeat()
               .batch(batch_size).prefetch(tf.data.AUTOTUNE))
    rows = []
    for i, (x, y) in enumerate(batches.take(steps + 1)):
        if i % record_every == 0 or i == steps:
            accuracy, activation = observe()
            rows.append((i, float(accuracy), *np.percentile(activation.numpy(), PERCENTILES)))
        if i == steps:
            break
        step(x, y)
    return rows


def plot(path, results):
    with saved_figure(path, 1, 3, dpi=110, figsize=(13, 3.8)) as axes:
        _draw(axes, results)


def _draw(axes, results) -> None:
    for name, rows in results.items():
        rows = np.array(rows)
        axes[0].plot(rows[:, 0], rows[:, 1], label=name)
    axes[0].set(title="(a) test accuracy", xlabel="training steps", ylim=(0.5, 0.9))
    axes[0].legend()
    for ax, (name, rows) in zip(axes[1:], results.items(), strict=True):
        rows = np.array(rows)
        for column, p in zip((2, 3, 4), PERCENTILES, strict=True):
            ax.plot(rows[:, 0], rows[:, column], label=f"{p}th percentile")
        ax.set(title=f"({'b' if ax is axes[1] else 'c'}) {name}: one sigmoid's input", xlabel="training steps")
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)


def main(argv=None) -> int:
    from recipes.requirements import require_recipe_extra

    require_recipe_extra()
    parser = argparse.ArgumentParser(prog="python -m recipes.figure1.train", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=60, help="the paper's: 60")
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--record-every", type=int, default=100)
    parser.add_argument("--data-dir", help="the Fashion-MNIST idx files (default: Debian's location)")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.record_every) < 1 or args.learning_rate <= 0:
        parser.error("--steps, --batch-size, --record-every and --learning-rate must be positive")

    from recipes.fashion_mnist import DatasetNotFoundError, load_fashion_mnist

    try:
        (x_train, y_train), (x_test, y_test) = load_fashion_mnist(args.data_dir)
    except DatasetNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    data = ((x_train.reshape(-1, 784).astype("float32") / 255.0, y_train.astype("int32")),
            (x_test.reshape(-1, 784).astype("float32") / 255.0, y_test.astype("int32")))
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for batch_norm in (False, True):
        name = "with BN" if batch_norm else "without BN"
        results[name] = train_one(batch_norm, data, args.steps, args.batch_size, args.learning_rate,
                                  args.record_every)
        final = results[name][-1]
        print(f"{name:>10}: test accuracy {final[1]:.4f} after {args.steps} steps; "
              f"sigmoid input percentiles 15/50/85 moved from "
              f"{'/'.join(f'{v:.2f}' for v in results[name][1][2:])} (step {results[name][1][0]}) to "
              f"{'/'.join(f'{v:.2f}' for v in final[2:])}", flush=True)
    with open(run_dir / "figure1.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "step", "test_accuracy", *(f"p{p}" for p in PERCENTILES)])
        for name, rows in results.items():
            writer.writerows([name, *row] for row in rows)
    plot(run_dir / "figure1.png", results)
    print(f"Figure 1: {run_dir / 'figure1.png'} (data: {run_dir / 'figure1.csv'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
