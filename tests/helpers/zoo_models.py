"""Minimal models for each shape of graph the tools must walk, and keras-hub backbones.

Each builder returns ``(model, bn_count)``: the number of BN layers its forward pass runs,
counted by construction (not by kerasbn's walk). Shared by the in-process tests and the
2-replica worker.
"""

import keras
import numpy as np

SHAPE = (6, 6, 3)


@keras.saving.register_keras_serializable("kerasbn_tests")
class ResidualBlock(keras.layers.Layer):
    """A user's residual block: BN in an attribute, in a list and in a dict of layers."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name="conv")
        self.bn = keras.layers.BatchNormalization(momentum=0.9, name="bn")
        self.stack = [keras.layers.Conv2D(filters, 1, name="stack_conv"),
                      keras.layers.BatchNormalization(epsilon=1e-4, name="stack_bn")]
        self.heads = {"gate": keras.layers.BatchNormalization(center=False, name="gate_bn")}

    def call(self, x, training=None):
        h = keras.ops.relu(self.bn(self.conv(x), training=training))
        for layer in self.stack:
            h = layer(h, training=training) if isinstance(layer, keras.layers.BatchNormalization) else layer(h)
        return x + h * keras.ops.sigmoid(self.heads["gate"](h, training=training))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable("kerasbn_tests")
class OwnBatchNorm(keras.layers.BatchNormalization):
    """A user's subclass of Keras' BN: kerasbn cannot know what its code relies on."""


@keras.saving.register_keras_serializable("kerasbn_tests")
class BlockWithOwnBatchNorm(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = OwnBatchNorm(name="own_bn")

    def call(self, x, training=None):
        return self.bn(x, training=training)


def _stem(inputs):
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    return keras.layers.BatchNormalization(name="stem_bn")(h)


def _head(h):
    return keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(h))


def pad_graph():
    inputs = keras.Input(SHAPE)
    h = keras.ops.pad(_stem(inputs), [[0, 0], [1, 1], [1, 1], [0, 0]])
    h = keras.layers.Conv2D(4, 3, name="after_pad")(h)
    h = keras.layers.BatchNormalization(name="after_pad_bn")(h)
    return keras.Model(inputs, _head(h)), 2


def split_graph():
    inputs = keras.Input(SHAPE)
    a, b = keras.ops.split(_stem(inputs), 2, axis=-1)
    b = keras.layers.BatchNormalization(name="split_bn")(keras.layers.Conv2D(2, 1, name="split_conv")(b))
    return keras.Model(inputs, _head(keras.ops.concatenate([a, b], axis=-1))), 2


def elementwise_graph():
    inputs = keras.Input(SHAPE)
    h = _stem(inputs)
    h = keras.layers.BatchNormalization(name="scaled_bn")(h * 2.0 + 1.0)
    return keras.Model(inputs, _head(keras.ops.relu(h))), 2


def custom_layer():
    inputs = keras.Input(SHAPE)
    h = ResidualBlock(4, name="block")(_stem(inputs))
    return keras.Model(inputs, _head(h)), 4


def nested_model():
    inner_in = keras.Input((6, 6, 4))
    inner_out = keras.layers.BatchNormalization(name="inner_bn")(ResidualBlock(4, name="inner_block")(inner_in))
    inner = keras.Model(inner_in, inner_out, name="inner")
    inputs = keras.Input(SHAPE)
    return keras.Model(inputs, _head(inner(_stem(inputs)))), 5


SHAPES = {"pad": pad_graph, "split": split_graph, "elementwise": elementwise_graph,
          "custom_layer": custom_layer, "nested_model": nested_model}


def hub_backbones():
    """keras-hub builders (no weights downloaded) with a classifier head, or {} without keras-hub:
    all three on TensorFlow, MobileNetV3 on the other backends."""
    try:
        import keras_hub
    except ImportError:
        return {}
    models = keras_hub.models

    def classify(backbone, bn_count):
        inputs = keras.Input((32, 32, 3))
        features = keras.tree.flatten(backbone(inputs))  # HGNetV2 returns every stage's map
        return keras.Model(inputs, _head(max(features, key=lambda t: t.shape[-1]))), bn_count

    def mobilenet_v3():
        # DepthwiseConvBlock / InvertedResidualBlock: BN inside custom layers.
        return classify(models.MobileNetBackbone(
            stackwise_expansion=[[16], [24, 24]], stackwise_num_blocks=[1, 2],
            stackwise_num_filters=[[8], [16, 16]], stackwise_kernel_size=[[3], [3, 3]],
            stackwise_num_strides=[[2], [1, 1]], stackwise_se_ratio=[[None], [0.25, None]],
            stackwise_activation=[["relu"], ["hard_swish", "relu"]], stackwise_padding=[[1], [1, 1]],
            output_num_filters=32, depthwise_filters=8, depthwise_stride=1,
            depthwise_residual=False, last_layer_filter=32, squeeze_and_excite=0.5,
            image_shape=(32, 32, 3)), 13)

    def resnet_v2():
        # Pre-activation ResNet: `ops.pad` nodes in the functional graph.
        return classify(models.ResNetBackbone(
            input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 64],
            stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
            use_pre_activation=True, image_shape=(32, 32, 3)), 5)

    def hgnet_v2():
        # HGNetV2ConvLayer: every BN inside custom layers.
        return classify(models.HGNetV2Backbone(
            depths=[1, 1], embedding_size=8, hidden_sizes=[16, 32], stem_channels=[3, 8, 8],
            hidden_act="relu", use_learnable_affine_block=False,
            stackwise_stage_filters=[(8, 8, 16, 1, 1, 3), (16, 8, 32, 1, 1, 3)],
            apply_downsample=[False, True], use_lightweight_conv_block=[False, True],
            image_shape=(32, 32, 3)), 13)

    builders = {"mobilenet_v3": mobilenet_v3, "resnet_v2": resnet_v2, "hgnet_v2": hgnet_v2}
    if keras.backend.backend() != "tensorflow":
        # The walk and the saving are Keras code, the same on every backend: TensorFlow's session
        # takes all three, the JAX and PyTorch sessions MobileNetV3 (BN inside custom layers, the
        # hardest walk) - the pad and split graphs above stand for ResNetV2's and HGNetV2's shapes
        # there. HGNetV2 and ResNetV2 cost the JAX session 16 s of its ~95 s of CPU (measured).
        builders = {"mobilenet_v3": mobilenet_v3}
    return builders


def every_model():
    """The graphs above and keras-hub's backbones, by name."""
    return {**SHAPES, **hub_backbones()}


def bn_layers(model):
    """BN layers found without kerasbn's walk: every tracked sublayer with moving statistics."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if hasattr(layer, "moving_mean") and hasattr(layer, "epsilon")]


def built(builder, seed=0):
    """``builder``'s ``(model, bn_count)``, the model seeded and :func:`trained`."""
    keras.utils.set_random_seed(seed)
    model, count = builder()
    return trained(model), count


def input_batch(model, n=8, seed=0):
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    return np.random.RandomState(seed).normal(1.0, 2.0, shape).astype("float32")


def trained(model, seed=0):
    """``model`` with moving statistics and gammas away from their initial values."""
    for i in range(3):
        model(input_batch(model, seed=seed + i), training=True)
    for layer in model._flatten_layers():
        if getattr(layer, "gamma", None) is not None and hasattr(layer, "moving_mean"):
            layer.gamma.assign(np.linspace(0.5, 1.5, layer.gamma.shape[0]))
    return model
