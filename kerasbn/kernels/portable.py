"""Kernels written once in ``keras.ops``: what every backend without special kernels shares.

- :func:`normalize_inference`: inference, on every backend (TensorFlow, JAX, PyTorch, and the
  inference-only numpy and OpenVINO backends).
- :func:`block_moments` and :func:`normalize_blocks`: a training call's statistics and
  normalization over ``(blocks, B / blocks, ...)`` views of the batch (one block per device,
  per ghost batch, or one), for the backends whose gradients come from autodiff through the
  statistics (JAX, PyTorch). TensorFlow has fused kernels and a hand-written backward
  (:mod:`kerasbn.kernels.tf_normalize`).

- :func:`eager_population_pass`: a recalibration's pass over the data, eagerly (JAX, PyTorch).

A backend passes ``pin`` (a function of a blocked tensor) where blocks must stay on their
devices (JAX's sharding constraint); None elsewhere.
"""

from __future__ import annotations

import math

from keras import ops

from kerasbn.statistics import Moments, variance_from_moments

# The shift that keeps the one-pass sums precise comes from at least this many values per
# channel of each block's first examples (one example of a feature map; 16 rows of (N, C)).
SAMPLE_VALUES = 16


def normalize_inference(x, mean, variance, gamma, beta, epsilon, *, channel_axis: int):
    """``gamma * (x - mean) / sqrt(variance + epsilon) + beta`` in float32.

    Centred first: ``x * a + (beta - mean * a)`` rounds away the output when a channel's mean
    is large against its spread. Element-wise: at serving batch sizes a fused kernel's fixed
    cost exceeds two broadcast ops (measured on TensorFlow, benchmarks/bench_layer.py).
    """
    rank = len(x.shape)
    multiplier = ops.rsqrt(ops.convert_to_tensor(variance, "float32") + epsilon)
    if gamma is not None:
        multiplier = multiplier * gamma
    mean = ops.convert_to_tensor(mean, "float32")
    if channel_axis != rank - 1:
        shape = [1] * rank
        shape[channel_axis] = -1
        mean, multiplier = ops.reshape(mean, shape), ops.reshape(multiplier, shape)
        beta = None if beta is None else ops.reshape(beta, shape)
    y = (ops.cast(x, "float32") - mean) * multiplier
    return y if beta is None else y + beta


def as_blocks(x, mask, blocks: int):
    """``x`` (and the mask) viewed as ``(blocks, B / blocks, ...)``."""
    batch = x.shape[0]
    x = ops.reshape(x, (blocks, batch // blocks) + tuple(x.shape[1:]))
    if mask is not None:
        mask = ops.broadcast_to(mask, (batch,) + tuple(mask.shape[1:]))
        mask = ops.reshape(mask, (blocks, batch // blocks) + tuple(mask.shape[1:]))
    return x, mask


def block_moments(x, channel_axis: int, mask, blocks: int, pin=None) -> Moments:
    """Each block's ``(count, mean, m2)``, each ``(blocks, C)``; differentiable in ``x``."""
    xb, mask = as_blocks(ops.cast(x, "float32"), mask, blocks)
    if pin is not None:
        xb = pin(xb)
    axis = channel_axis + 1
    axes = tuple(a for a in range(len(xb.shape)) if a not in (0, axis))
    moments = _moments(xb, axes, axis) if mask is None else _masked_moments(xb, axes, mask)
    channels = x.shape[channel_axis]
    return Moments(*(ops.reshape(t, (blocks, channels)) for t in moments))


def _moments(xb, axes, axis):
    """One pass over shifted data: ``sum(x - s)`` and ``sum((x - s)^2)`` with ``s`` a sample's
    mean, so nothing cancels when a channel's mean is large against its spread."""
    values = math.prod(xb.shape[a] for a in axes)
    stat_shape = tuple(1 if a in axes else d for a, d in enumerate(xb.shape))
    if values == 0:
        # Zeros that still depend on ``x``: an empty share takes part in the backward pass's
        # collectives like every other (torch.distributed would otherwise wait for it forever).
        zeros = ops.sum(xb, axes, keepdims=True) * 0.0
        return zeros, zeros, zeros
    per_example = math.prod(xb.shape[2:]) // max(xb.shape[axis], 1)
    examples = max(1, -(-SAMPLE_VALUES // max(per_example, 1)))
    shift = ops.stop_gradient(ops.mean(xb[:, :examples], axes, keepdims=True))
    shifted = xb - shift
    s1 = ops.sum(shifted, axes, keepdims=True)
    s2 = ops.sum(ops.square(shifted), axes, keepdims=True)
    shifted_mean = s1 / values
    m2 = ops.maximum(s2 - s1 * shifted_mean, 0.0)
    count = ops.full(stat_shape, float(values), "float32")
    return count, shift + shifted_mean, m2


def _masked_moments(xb, axes, mask):
    """Two passes over the kept positions (padded ones may hold inf or NaN: never read)."""
    broadcast_factor = math.prod(xb.shape[a] // max(mask.shape[a], 1) for a in axes)
    count = ops.sum(ops.cast(mask, "float32"), axes, keepdims=True) * broadcast_factor
    safe_count = ops.maximum(count, 1.0)
    first = ops.sum(ops.where(mask, xb, 0.0), axes, keepdims=True) / safe_count
    centred = ops.where(mask, xb - first, 0.0)
    correction = ops.stop_gradient(ops.sum(centred, axes, keepdims=True) / safe_count)
    m2 = ops.maximum(ops.sum(ops.square(centred), axes, keepdims=True)
                     - count * ops.square(correction), 0.0)
    mean = first + correction
    return ops.broadcast_to(count, mean.shape), mean, m2


def normalize_blocks(x, channel_axis: int, statistics: Moments, gamma, beta, epsilon, pin=None):
    """``gamma * (x - mean) / sqrt(variance + epsilon) + beta`` in float32: with one set of
    ``(C,)`` statistics, or per group with ``(G, C)`` ones (``pin`` then keeps each group's
    block on its device)."""
    count, mean, m2 = statistics
    scale = gamma * ops.rsqrt(variance_from_moments(count, m2) + epsilon)
    x = ops.cast(x, "float32")
    if len(mean.shape) == 1 and len(scale.shape) == 1 and len(beta.shape) == 1:
        return _affine(x, channel_axis, mean, scale, beta)
    groups = max(t.shape[0] for t in (mean, scale, beta) if len(t.shape) == 2)
    xb, _ = as_blocks(x, None, groups)
    if pin is not None:
        xb = pin(xb)
    shape = [1] * len(xb.shape)
    shape[channel_axis + 1] = x.shape[channel_axis]

    def per_group(t):
        return ops.reshape(t, [t.shape[0] if len(t.shape) == 2 else 1] + shape[1:])

    y = (xb - per_group(mean)) * per_group(scale) + per_group(beta)
    return ops.reshape(y, x.shape)


def _affine(x, channel_axis, mean, scale, beta):
    if channel_axis != len(x.shape) - 1:
        shape = [1] * len(x.shape)
        shape[channel_axis] = -1
        mean, scale, beta = (ops.reshape(t, shape) for t in (mean, scale, beta))
    return (x - mean) * scale + beta


def eager_population_pass(model, data):
    """``(step, batches)``: ``model`` in inference mode, eagerly, on numpy batches (a
    ``tf.data.Dataset`` is read as numpy)."""
    if hasattr(data, "as_numpy_iterator"):
        data = data.as_numpy_iterator()

    def step(batch):
        return model(batch, training=False)
    return step, data
