"""Training throughput of BN-Inception: kerasbn's BN vs Keras' BatchNormalization.

The recipe's network (``recipes.inception_bn.model.bn_inception``, 1000
classes) and a clone of it with every ``kerasbn.BatchNormalization``
replaced by ``keras.layers.BatchNormalization`` (same momentum, epsilon,
weights), one SGD-momentum step each, alternating in one process; images/s
and the ratio. Then the same with 2 logical CPU replicas under
MirroredStrategy and synchronized BN on both sides (kerasbn: 2 collectives
per layer; Keras: ``synchronized=True``).

Last, the recipe's own training loop (``recipes.inception_bn.steps.make_train_loop``) at
``--steps-per-loop`` 1 against 10, a small width where Python's per-call overhead shows:
images/s of each and their ratio, alternating in one process.

    .venv/bin/python benchmarks/bench_recipe.py [--repeats 3] [--sizes 128,224] [--batches 16,32]
    .venv/bin/python benchmarks/bench_recipe.py --loop-only
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tensorflow as tf  # noqa: E402

# Two logical CPU devices before TensorFlow starts: the sync measurement needs them; the
# single-replica measurements run on the first.
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
from common import markdown_table, time_alternating  # noqa: E402

import kerasbn  # noqa: E402
from recipes.inception_bn.model import bn_inception  # noqa: E402


def with_keras_bn(model, synchronized=False):
    """``model`` with Keras' BN in place of kerasbn's, weights copied."""
    def clone(layer):
        if isinstance(layer, kerasbn.BatchNormalization):
            return keras.layers.BatchNormalization(axis=layer.axis, momentum=layer.momentum, epsilon=layer.epsilon,
                                                   synchronized=synchronized, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    twin = keras.models.clone_model(model, clone_function=clone)
    twin.set_weights(model.get_weights())
    return twin


def train_step(model, strategy, batch, size):
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)
    replicas = strategy.num_replicas_in_sync
    images = tf.random.stateless_uniform((batch * replicas, size, size, 3), (0, 1), -1, 1)
    labels = tf.random.stateless_uniform((batch * replicas,), (0, 2), 0, 1000, tf.int32)
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(2)) if replicas > 1 else None
    iterator = iter(data) if data is not None else None

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, model(x, training=True),
                                                                             from_logits=True)) / (batch * replicas)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables, strict=True))
        return loss

    @tf.function
    def step():
        if iterator is None:
            return replica_step(images, labels)
        return strategy.reduce("SUM", strategy.run(replica_step, args=next(iterator)), axis=None)

    return lambda: step().numpy()


def measure(size, batch, repeats, replicas):
    if replicas > 1:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        ours = bn_inception(1000, (size, size, 3), synchronized=replicas > 1)
        theirs = with_keras_bn(ours, synchronized=replicas > 1)
        candidates = {"kerasbn": train_step(ours, strategy, batch, size),
                      "keras": train_step(theirs, strategy, batch, size)}
    times = time_alternating(candidates, repeats=repeats, inner=1, warmup=2)
    images = batch * replicas
    return images / times["kerasbn"], images / times["keras"]


def measure_steps_per_loop(repeats, width=0.125, size=32, batch=8, loops=(1, 10)):
    """Images/s of the recipe's training loop at each steps-per-loop in ``loops``, alternating."""
    from recipes.inception_bn.steps import Objective, make_train_loop

    strategy = tf.distribute.get_strategy()
    model = bn_inception(10, (size, size, 3), width_multiplier=width)
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)
    loop = make_train_loop(strategy, model, optimizer, Objective(4e-5, batch), jit=False)
    images = tf.random.stateless_uniform((batch, size, size, 3), (0, 1), -1, 1)
    labels = tf.random.stateless_uniform((batch,), (0, 2), 0, 10, tf.int32)
    iterator = iter(strategy.distribute_datasets_from_function(
        lambda ctx: tf.data.Dataset.from_tensors((images, labels)).repeat()))
    candidates = {n: (lambda n=n: [t.numpy() for t in loop(iterator, tf.constant(n))]) for n in loops}
    times = time_alternating(candidates, repeats=repeats, inner=1, warmup=2)
    return {n: n * batch / times[n] for n in loops}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="128,224")
    parser.add_argument("--batches", default="16,32")
    parser.add_argument("--sync-size", type=int, default=128)
    parser.add_argument("--sync-batch", type=int, default=16, help="per replica")
    parser.add_argument("--loop-only", action="store_true", help="only the steps-per-loop comparison")
    args = parser.parse_args(argv)
    speeds = measure_steps_per_loop(max(args.repeats, 5))
    print(f"recipe training loop, width 0.125, 32px, batch 8, 1 replica: --steps-per-loop 1 "
          f"{speeds[1]:.1f} images/s, 10: {speeds[10]:.1f} images/s, ratio {speeds[10] / speeds[1]:.2f}x",
          flush=True)
    if args.loop_only:
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            ours, theirs = measure(size, batch, args.repeats, 1)
            rows.append([f"{size}px", batch, 1, f"{theirs:.1f}", f"{ours:.1f}", f"{ours / theirs:.2f}x"])
            print(rows[-1], flush=True)
    ours, theirs = measure(args.sync_size, args.sync_batch, args.repeats, 2)
    rows.append([f"{args.sync_size}px", f"{args.sync_batch} x 2", "2 (synchronized BN)", f"{theirs:.1f}",
                 f"{ours:.1f}", f"{ours / theirs:.2f}x"])
    print(markdown_table(["input", "batch", "replicas", "Keras BN images/s", "kerasbn images/s",
                          "kerasbn / Keras"], rows))


if __name__ == "__main__":
    main()
