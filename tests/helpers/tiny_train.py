"""The training recipe with a tiny BN network added to its variants, as a test process runs it.

    python -m tests.helpers.tiny_train --variant tiny [train.py's other flags]
    python -m tests.helpers.tiny_train --tiny-network --variant bn-x5 [...]   # any variant, on the tiny network

Tests of the stop, resume and cluster machinery need real processes, signals,
checkpoints and workers, not the paper's network: BN-Inception's ~70
convolution + BN layers cost ~10 s of tracing and graph optimization per
process before the first step. ``tiny`` is BN-x5's row of the table with a
two-convolution network (kerasbn BN, synchronized when asked, foldable); the
rest of ``train.main`` is the recipe's own code. The real networks are trained and
folded eagerly (tests/recipes/test_inception_bn_model.py).
"""

if __name__ == "__main__":
    # As recipes/inception_bn/train.py does: before TensorFlow starts a thread.
    from recipes.inception_bn.stopping import block_stop_signals

    block_stop_signals()

import dataclasses  # noqa: E402
import sys  # noqa: E402

from recipes.inception_bn import variants  # noqa: E402


def tiny_network(num_classes, input_shape, width_multiplier=1.0, synchronized=False, bn_momentum=0.99,
                 name="tiny", batch_norm=True, activation="relu"):
    """Conv-BN-ReLU twice, global pooling, a classifier: every part the recipe's tools touch."""
    import keras

    import kerasbn

    inputs = keras.Input(input_shape)
    h = inputs
    for i, (filters, strides) in enumerate(((8, 2), (16, 2))):
        h = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=not batch_norm,
                                name=f"conv{i}")(h)
        if batch_norm:
            h = kerasbn.BatchNormalization(momentum=bn_momentum, synchronized=synchronized, name=f"conv{i}_bn")(h)
        h = keras.layers.Activation(activation)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(num_classes, dtype="float32", name="classifier")(h)
    return keras.Model(inputs, outputs, name=name)


class TinyVariant(variants.Variant):
    def build_model(self, num_classes, input_shape, width_multiplier=1.0, synchronized=False, bn_momentum=0.99,
                    stem="imagenet"):
        return tiny_network(num_classes, input_shape, width_multiplier, synchronized, bn_momentum,
                            batch_norm=self.batch_norm, activation=self.activation)


TINY = TinyVariant(**{**dataclasses.asdict(variants.VARIANTS["bn-x5"]), "name": "tiny",
                      "description": "BN-x5's schedule on a two-convolution network (tests)", "in_paper": False})


def register() -> None:
    variants.VARIANTS.setdefault("tiny", TINY)


def on_tiny_networks(start):
    """``start`` (``subprocess.Popen``'s signature) with the recipe's training processes started as
    this module on the tiny network: for a test of a command that starts them (``compare``, ``demo``)."""
    def start_tiny(command, *args, **kwargs):
        if "recipes.inception_bn.train" in command:
            at = command.index("recipes.inception_bn.train")
            command = [*command[:at], "tests.helpers.tiny_train",
                       "--tiny-network", *command[at + 1:]]
        return start(command, *args, **kwargs)

    return start_tiny


def tiny_networks() -> None:
    """In this process only: every variant keeps its schedule and trains the tiny network."""
    for name, variant in list(variants.VARIANTS.items()):
        variants.VARIANTS[name] = TinyVariant(**dataclasses.asdict(variant))


if __name__ == "__main__":
    register()
    argv = sys.argv[1:]
    if "--tiny-network" in argv:
        argv.remove("--tiny-network")
        tiny_networks()
    from recipes.inception_bn import train

    sys.exit(train.main(argv))
