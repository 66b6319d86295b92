"""BN-Inception (Ioffe & Szegedy 2015, appendix Figure 5) and its no-BN baseline.

The table's per-branch filter counts, as TF-slim's ``inception_v2`` builds
them: module 4c has a 128-filter pooling projection and 4d 160+192+192+...,
so both output 608 channels where the table's output column says 576. At
1000 classes the network has 11.28M trainable weights (11.30M with BN's
moving statistics); the paper's text says 13.6M, which matches no
consistent reading of its table.

Each row is ``(name, 1x1, 3x3 reduce, 3x3, double 3x3 reduce, double 3x3,
pool, pool projection, stride)``. A stride-2 module (3c, 4e) has no 1x1
branch and its pooling branch passes the input through (max pooling) so
its channels add to the output.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import keras
import tensorflow as tf

import kerasbn


class Module(NamedTuple):
    """One row of the paper's table: the filters of each branch of an inception module."""
    name: str
    f1: int        # 1x1 branch (0: none)
    f3r: int       # 3x3 reduce
    f3: int        # 3x3
    d3r: int       # double 3x3 reduce
    d3: int        # double 3x3
    pool: str      # "avg" or "max"
    proj: int      # pool projection (0: the pooled input itself)
    stride: int


MODULES = tuple(Module(*row) for row in (
    # name  1x1  3r   3x3  d3r  d3   pool   proj stride
    ("3a",  64,  64,  64,  64,  96,  "avg", 32,  1),
    ("3b",  64,  64,  96,  64,  96,  "avg", 64,  1),
    ("3c",  0,   128, 160, 64,  96,  "max", 0,   2),
    ("4a",  224, 64,  96,  96,  128, "avg", 128, 1),
    ("4b",  192, 96,  128, 96,  128, "avg", 128, 1),
    ("4c",  160, 128, 160, 128, 160, "avg", 128, 1),
    ("4d",  96,  128, 192, 160, 192, "avg", 128, 1),
    ("4e",  0,   128, 192, 192, 256, "max", 0,   2),
    ("5a",  352, 192, 320, 160, 224, "avg", 128, 1),
    ("5b",  352, 192, 320, 192, 224, "max", 128, 1),
))


@keras.saving.register_keras_serializable(package="recipes")
class LocalResponseNormalization(keras.layers.Layer):
    """GoogLeNet's across-channel LRN (the no-BN baseline keeps it; BN removes it).

    Args:
        depth_radius: half-width of the channel window (GoogLeNet: size 5, so 2).
        bias, alpha, beta: ``x / (bias + alpha * sum(x^2 over the window)) ** beta``;
            ``alpha`` is per element, as in ``tf.nn.local_response_normalization``
            (Caffe's 1e-4 over a window of 5 is 2e-5 here).
        **kwargs: base ``keras.layers.Layer`` arguments.

    Example:

    >>> LocalResponseNormalization()(tf.ones((1, 2, 2, 8))).shape
    TensorShape([1, 2, 2, 8])
    """

    def __init__(self, depth_radius=2, bias=1.0, alpha=2e-5, beta=0.75, **kwargs):
        super().__init__(**kwargs)
        self.depth_radius, self.bias, self.alpha, self.beta = int(depth_radius), float(bias), float(alpha), float(beta)

    def call(self, inputs):
        return tf.nn.local_response_normalization(inputs, self.depth_radius, self.bias, self.alpha, self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "depth_radius": self.depth_radius, "bias": self.bias,
                "alpha": self.alpha, "beta": self.beta}


@dataclasses.dataclass(frozen=True)
class _Builder:
    """The choices every convolution shares. ``batch_norm``: the BN layers' arguments, or None for none."""
    activation: str
    batch_norm: dict | None
    width_multiplier: float
    min_depth: int
    kernel_initializer: object

    def depth(self, filters):
        return max(self.min_depth, int(filters * self.width_multiplier))

    def finish(self, x, name):
        """BN before the non-linearity (section 3.2), or the non-linearity alone."""
        if self.batch_norm is not None:
            x = kerasbn.BatchNormalization(**self.batch_norm, name=f"{name}_bn")(x)
        return keras.layers.Activation(self.activation, name=f"{name}_{self.activation}")(x)

    def conv(self, x, filters, size, name, strides=1):
        # The BN's beta replaces the bias (section 3.2).
        x = keras.layers.Conv2D(self.depth(filters), size, strides, padding="same",
                                use_bias=self.batch_norm is None, kernel_initializer=self.kernel_initializer,
                                name=name)(x)
        return self.finish(x, name)

    def module(self, x, row: Module):
        prefix = f"mixed_{row.name}"
        branches = []
        if row.f1:
            branches.append(self.conv(x, row.f1, 1, f"{prefix}_1x1"))
        b = self.conv(x, row.f3r, 1, f"{prefix}_3x3_reduce")
        branches.append(self.conv(b, row.f3, 3, f"{prefix}_3x3", strides=row.stride))
        b = self.conv(x, row.d3r, 1, f"{prefix}_double_3x3_reduce")
        b = self.conv(b, row.d3, 3, f"{prefix}_double_3x3a")
        branches.append(self.conv(b, row.d3, 3, f"{prefix}_double_3x3b", strides=row.stride))
        pooling = keras.layers.AveragePooling2D if row.pool == "avg" else keras.layers.MaxPooling2D
        b = pooling(3, row.stride, padding="same", name=f"{prefix}_{row.pool}_pool")(x)
        if row.proj:
            b = self.conv(b, row.proj, 1, f"{prefix}_pool_proj")
        branches.append(b)
        return keras.layers.Concatenate(name=prefix)(branches)


# The layers before the first inception module: the paper's for 224 px images (downsampling 8x: the
# inception stages at 28, 14 and 7) or one for 28-32 px images (2x: at 14, 7 and 4 from 28 px).
STEMS = ("imagenet", "small")


def _network(num_classes, input_shape, build: _Builder, lrn: bool, dropout: float, name: str,
             stem: str = "imagenet"):
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}.")
    if build.width_multiplier <= 0:
        raise ValueError(f"width_multiplier must be positive, got {build.width_multiplier}.")
    if len(input_shape) != 3 or any(s is not None and s < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}.")
    batch_norm, kernel_initializer = build.batch_norm is not None, build.kernel_initializer
    inputs = keras.Input(input_shape, name="images")
    if stem == "imagenet":
        # Separable first convolution, depth multiplier 8 (TF-slim: min(depth(64) // 3, 8)).
        depth = build.depth(64)
        x = keras.layers.SeparableConv2D(depth, 7, 2, padding="same", depth_multiplier=max(1, min(depth // 3, 8)),
                                         use_bias=not batch_norm, depthwise_initializer=kernel_initializer,
                                         pointwise_initializer=kernel_initializer, name="conv1_7x7_s2")(inputs)
        x = build.finish(x, "conv1_7x7_s2")
        x = keras.layers.MaxPooling2D(3, 2, padding="same", name="pool1_3x3_s2")(x)
    else:
        # As CIFAR-scale versions of ImageNet networks: the first convolution a 3x3 at full
        # resolution and no first pooling, so the stem downsamples 2x instead of 8x.
        x = build.conv(inputs, 64, 3, "conv1_3x3")
    if lrn:
        x = LocalResponseNormalization(name="pool1_lrn")(x)
    x = build.conv(x, 64, 1, "conv2_1x1")
    x = build.conv(x, 192, 3, "conv2_3x3")
    if lrn:
        x = LocalResponseNormalization(name="conv2_lrn")(x)
    x = keras.layers.MaxPooling2D(3, 2, padding="same", name="pool2_3x3_s2")(x)
    for row in MODULES:
        x = build.module(x, row)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    # The classifier is the only fully-connected layer; logits, no softmax. In float32 under a
    # mixed-precision policy (Keras' rule for a model's output): the softmax and the served
    # logits keep full precision.
    outputs = keras.layers.Dense(num_classes, kernel_initializer="glorot_uniform", dtype="float32",
                                 name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def bn_inception(num_classes: int = 1000, input_shape=(224, 224, 3), activation: str = "relu",
                 batch_norm: bool = True, synchronized: bool = False, width_multiplier: float = 1.0,
                 dropout: float = 0.0, min_depth: int = 8, kernel_initializer="glorot_uniform",
                 bn_momentum: float = 0.99, bn_epsilon: float = 1e-3, stem: str = "imagenet",
                 name: str = "bn_inception") -> keras.Model:
    """The paper's BN-Inception: BN before every non-linearity, no LRN, no dropout.

    Args:
        num_classes: classifier outputs (logits).
        input_shape: ``(height, width, channels)``; any size from 28 up (the
            network downsamples 32x with the paper's stem, 8x with the small
            one; global average pooling follows).
        activation: the non-linearity (``"relu"``; ``"sigmoid"`` for BN-x5-Sigmoid).
        batch_norm: False builds the same network without BN (convolutions get
            biases back); see :func:`inception` for the paper's no-BN baseline.
        synchronized: ``kerasbn.BatchNormalization(synchronized=True)``: the
            global batch's statistics under a ``tf.distribute`` strategy.
        width_multiplier: scales every layer's filters (at least ``min_depth``);
            0.25 with a small ``input_shape`` gives a network a CPU trains.
        dropout: dropout rate before the classifier (the accelerated variants: 0).
        min_depth: the fewest filters any layer gets after scaling.
        kernel_initializer: for every convolution (GoogLeNet's Xavier,
            ``"glorot_uniform"``; the no-BN network depends on it, BN does not).
        bn_momentum, bn_epsilon: the BN layers' ``momentum`` and ``epsilon``.
        stem: the layers before the first inception module (``STEMS``):
            ``"imagenet"``, the paper's (a separable 7x7 convolution of stride 2
            and two 3x3 poolings of stride 2: the stages see 28, 14 and 7 px
            maps of a 224 px image), or ``"small"`` for 28-32 px images (a 3x3
            convolution of stride 1 and one pooling, as CIFAR-scale versions of
            ImageNet networks: 14, 7 and 4 px maps of a 28 px image).
        name: the model's name.

    Example:

    >>> model = bn_inception(10, input_shape=(32, 32, 1), width_multiplier=0.25)
    >>> model.output_shape
    (None, 10)
    """
    bn = {"momentum": bn_momentum, "epsilon": bn_epsilon, "synchronized": synchronized} if batch_norm else None
    build = _Builder(activation, bn, width_multiplier, min_depth, kernel_initializer)
    return _network(num_classes, tuple(input_shape), build, lrn=False, dropout=dropout, name=name, stem=stem)


def inception(num_classes: int = 1000, input_shape=(224, 224, 3), activation: str = "relu",
              width_multiplier: float = 1.0, dropout: float = 0.4, lrn: bool = True, min_depth: int = 8,
              kernel_initializer="glorot_uniform", stem: str = "imagenet", name: str = "inception") -> keras.Model:
    """The no-BN baseline: BN-Inception's layers with LRN and dropout, as GoogLeNet.

    Args:
        num_classes, input_shape, activation, width_multiplier, min_depth,
        kernel_initializer, stem, name: as :func:`bn_inception`.
        dropout: dropout rate before the classifier (GoogLeNet: 0.4).
        lrn: local response normalization after the first pooling and the
            second convolution, as GoogLeNet.

    Example:

    >>> inception(10, input_shape=(28, 28, 1), width_multiplier=0.25, stem="small").output_shape
    (None, 10)
    """
    build = _Builder(activation, None, width_multiplier, min_depth, kernel_initializer)
    return _network(num_classes, tuple(input_shape), build, lrn=lrn, dropout=dropout, name=name, stem=stem)
