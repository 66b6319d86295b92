"""Folding inference-mode batch normalization into the preceding layer.

At inference BN is the fixed affine map ``y = a * z + b`` per channel, with
``a = gamma / sqrt(moving_variance + epsilon)`` and
``b = beta - a * moving_mean`` (the paper's section 3.1). When ``z`` is the
linear output of a convolution or dense layer, ``a`` scales its kernel's
output channels and ``b`` joins its bias, and the BN disappears.
"""

from __future__ import annotations

import keras
import numpy as np

from kerasbn import model_walk
from kerasbn.backend import INFERENCE_BACKENDS, SUPPORTED_BACKENDS, require_backend

_FOLDABLE = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    keras.layers.Dense,
)


@keras.saving.register_keras_serializable(package="kerasbn")
class FoldedBatchNorm(keras.layers.Layer):
    """What a folded BN leaves behind: the identity (accepts BN's call arguments)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def bn_affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel ``(a, b)`` of ``bn``'s inference map, in float64."""
    mean = np.asarray(bn.moving_mean.numpy(), np.float64)
    variance = np.asarray(bn.moving_variance.numpy(), np.float64)
    gamma = np.asarray(bn.gamma.numpy(), np.float64) if bn.scale else 1.0
    beta = np.asarray(bn.beta.numpy(), np.float64) if bn.center else 0.0
    a = gamma / np.sqrt(variance + bn.epsilon)
    return a * np.ones_like(mean), beta - a * mean


def _channel_axis_matches(producer, bn) -> bool:
    rank = len(producer.output.shape)
    axis = bn.axis % rank
    channels_first = getattr(producer, "data_format", "channels_last") == "channels_first"
    return axis == (1 if channels_first else rank - 1)


def _producer(bn):
    """The layer whose output feeds ``bn`` alone, when BN can fold into it."""
    return _fold_target(bn)[0]


def _fold_target(bn):
    """``(producer, None)`` when ``bn`` folds into ``producer``, else ``(None, why not)``."""
    if not bn._inbound_nodes:
        return None, "it is called inside a layer's own code, which has no graph to rebuild"
    if len(bn._inbound_nodes) != 1:
        return None, "it is called more than once"
    tensors = bn._inbound_nodes[0].arguments.keras_tensors
    if len(tensors) != 1:
        return None, "it has several inputs"
    producer = tensors[0]._keras_history.operation
    if not isinstance(producer, _FOLDABLE):
        return None, f"its input comes from {type(producer).__name__}, not a convolution or Dense layer"
    if len(producer._inbound_nodes) != 1 or len(producer._outbound_nodes) != 1:
        return None, f"{producer.name} is shared, or its output also feeds another layer"
    if keras.activations.serialize(producer.activation) not in ("linear", None):
        return None, f"{producer.name} has an activation before it"
    if producer.dtype_policy.name != "float32" and producer.dtype_policy.variable_dtype != "float32":
        return None, f"{producer.name} does not keep float32 weights"
    if not _channel_axis_matches(producer, bn):
        return None, f"it normalizes another axis than {producer.name}'s channels"
    return producer, None


def unfoldable(model) -> list[str]:
    """``"name (why)"`` for every BN layer of a functional or Sequential ``model`` that cannot fold."""
    reasons = ((bn, _fold_target(bn)[1]) for bn in model_walk.batch_norm_layers(model))
    return [f"{bn.name} ({why})" for bn, why in reasons if why is not None]


def _folded_weights(producer, bn) -> list[np.ndarray]:
    a, b = bn_affine(bn)
    weights = {w.name: np.asarray(w.numpy(), np.float64) for w in producer.weights}
    bias = weights.get("bias", np.zeros_like(a))
    if isinstance(producer, keras.layers.SeparableConv2D):
        depthwise, pointwise = weights["depthwise_kernel"], weights["pointwise_kernel"]
        kernels = [depthwise, pointwise * a]
    elif isinstance(producer, keras.layers.DepthwiseConv2D):
        kernel = weights["kernel"]  # (kh, kw, in, multiplier); output i*mult + j
        kernels = [kernel * a.reshape(kernel.shape[-2], kernel.shape[-1])]
    else:
        kernels = [weights["kernel"] * a]  # output channels are the last axis
    return [k.astype("float32") for k in kernels] + [(a * bias + b).astype("float32")]


def fold_batch_norm(model):
    """A copy of ``model`` with every foldable BN folded into its producer.

    A BN layer (Keras' or kerasbn's) folds when its input is the output of
    a ``Conv1D/2D/3D``, ``DepthwiseConv2D``, ``SeparableConv2D`` (into the
    pointwise kernel) or ``Dense`` layer with no activation, used by no
    other layer, along that layer's channel axis. The producer gains a bias
    if it had none; the BN becomes a ``FoldedBatchNorm`` identity. Other BN layers stay. The
    copy computes the original's *inference* function; ``model`` is not
    modified. Folding happens in float64 before rounding to float32.

    Args:
        model: a built functional or Sequential Keras model (nested ones too).

    Returns:
        The folded copy (``model`` itself, with a warning, when it has no BN).

    Example:

    >>> import keras, kerasbn
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
    ...                           kerasbn.BatchNormalization()])
    >>> [type(l).__name__ for l in kerasbn.fold_batch_norm(model).layers]
    ['Dense', 'FoldedBatchNorm']
    """
    tool = "fold_batch_norm"
    require_backend(tool, SUPPORTED_BACKENDS + INFERENCE_BACKENDS)  # serving: inference backends too
    model_walk.check_model(model, tool)
    bns = model_walk.batch_norm_layers(model)
    if not bns:
        return model_walk.warn_no_batch_norm(model, tool)
    model_walk.require_graph_model(model, tool)
    folds = {}
    for bn in bns:
        producer = _producer(bn)
        if producer is not None:
            folds[id(producer)] = bn
    folded_bns = {id(bn) for bn in folds.values()}

    def make_layer(layer):
        if id(layer) in folded_bns:
            return FoldedBatchNorm(name=layer.name)
        config = layer.get_config()
        if id(layer) in folds:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    def set_weights(source, target):
        if id(source) in folds:
            target.set_weights(_folded_weights(source, folds[id(source)]))
        elif id(source) not in folded_bns:
            model_walk.copy_weights(source, target)

    return model_walk.clone_model(model, make_layer, set_weights)
