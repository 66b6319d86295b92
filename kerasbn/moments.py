"""Per-channel batch statistics as (count, mean, M2), and their stable merge.

The layer never works with (mean, variance) pairs until the very end: every
partial result -- one replica's slice, one ghost batch, one worker -- is a
triple ``(count, mean, M2)`` with ``M2 = sum((x - mean)^2)``. Triples merge
exactly and stably (Chan, Golub & LeVeque 1979), so the synchronized layer is
the local layer plus one merge, not a second implementation.

Numerical care taken here, one line each:

- Reductions run in float32 whatever the input dtype (a float16 sum of
  squares overflows at activations around 250).
- The mean takes two passes: the second adds back the rounding error of the
  first float32 sum (at channel mean 1e4 one pass leaves a relative variance
  error of ~2e-4; two passes ~1e-6 per replica).
- M2 is a sum of centred squares, never ``E[x^2] - E[x]^2``, which cancels
  catastrophically when a channel's mean is large against its spread.
- Counts are exact: from the static/dynamic shape, or from the mask; no
  input-sized tensor of ones is allocated to count.
- An empty input gives count 0, mean 0, M2 0: never NaN.
- TensorFlow's fused kernel (oneDNN on CPU) is used for speed where it
  applies, but it loses the variance when a channel's mean is large against
  its spread (measured: 56x too large at mean 1e4, std 1, 200k values per
  channel); when any channel has ``mean^2 > 1e6 * variance`` the two-pass
  computation runs instead (:func:`fused_moments`).
- The merge computes deviations from the merged mean directly (within-part
  M2 plus count-weighted between-part squares), so it stays stable for any
  number of parts, empty parts included.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf


def local_moments(
    x: tf.Tensor, axes: Sequence[int], mask: tf.Tensor | None = None
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Returns float32 ``(count, mean, m2)`` of ``x`` reduced over ``axes``.

    Args:
        x: input tensor of any float dtype.
        axes: the axes to reduce (every axis but the channel axis, and for
            ghost batches every axis but the group and channel axes).
        mask: optional boolean tensor broadcastable to ``x``; positions where
            it is False are left out of all three statistics.

    Returns:
        Three float32 tensors of the same shape, ``x``'s shape with the
        reduced axes kept as size 1. Gradients flow through ``mean`` and
        ``m2`` exactly as through the textbook formulas.
    """
    x = tf.cast(x, tf.float32)
    axes = list(axes)
    if mask is None:
        dims = tf.gather(tf.shape(x), axes)
        count = tf.cast(tf.reduce_prod(dims), tf.float32)
        safe_count = tf.maximum(count, 1.0)
        first = tf.reduce_sum(x, axes, keepdims=True) / safe_count
        # Second pass: sum(x - first) is the first pass's rounding error.
        # Its exact derivative with respect to x is zero, so stop_gradient
        # changes nothing mathematically and saves a backward pass.
        correction = tf.reduce_sum(x - first, axes, keepdims=True) / safe_count
        mean = first + tf.stop_gradient(correction)
        m2 = tf.reduce_sum(tf.math.squared_difference(x, mean), axes, keepdims=True)
        count = tf.broadcast_to(count, tf.shape(mean))
        return count, mean, m2

    mask = tf.broadcast_to(tf.cast(mask, tf.bool), tf.shape(x))
    # tf.where, not x * mask: padded positions may hold inf or NaN.
    zeros = tf.zeros_like(x)
    weights = tf.cast(mask, tf.float32)
    count = tf.reduce_sum(weights, axes, keepdims=True)
    safe_count = tf.maximum(count, 1.0)
    first = tf.reduce_sum(tf.where(mask, x, zeros), axes, keepdims=True) / safe_count
    centred = tf.where(mask, x - first, zeros)
    correction = tf.reduce_sum(centred, axes, keepdims=True) / safe_count
    mean = first + tf.stop_gradient(correction)
    centred = tf.where(mask, x - mean, zeros)
    m2 = tf.reduce_sum(tf.square(centred), axes, keepdims=True)
    return count, mean, m2


def merge_moments(
    count: tf.Tensor, mean: tf.Tensor, m2: tf.Tensor, axis: int = 0
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Merges partial ``(count, mean, m2)`` triples stacked along ``axis``.

    ``M2_total = sum_i M2_i + sum_i n_i (mean_i - mean_total)^2``: exact for
    unequal counts, and parts with ``n_i = 0`` contribute nothing.
    """
    total = tf.reduce_sum(count, axis)
    safe_total = tf.maximum(total, 1.0)
    merged_mean = tf.reduce_sum(count * mean, axis) / safe_total
    deviation = mean - tf.expand_dims(merged_mean, axis)
    merged_m2 = tf.reduce_sum(m2 + count * tf.square(deviation), axis)
    return total, merged_mean, merged_m2


def variance_from_moments(count: tf.Tensor, m2: tf.Tensor) -> tf.Tensor:
    """The biased (population) variance ``M2 / n``; 0 where ``n = 0``."""
    return m2 / tf.maximum(count, 1.0)


# Above this mean^2 / variance the fused kernel's float32 variance is not
# trusted (its error grows like eps * mean^2 / variance * sqrt(n)).
FUSED_MOMENTS_MAX_RATIO = 1e6


def to_fused_layout(x: tf.Tensor, channel_axis: int) -> tuple[tf.Tensor, str]:
    """``x`` as FusedBatchNormV3's 4D input, and its data format.

    Any rank folds in: ``(N, rest, 1, C)`` ("NHWC") or ``(N, C, rest, 1)``
    ("NCHW") reduce over exactly the same values. ``channel_axis`` must be
    1 or the last axis.
    """
    rank = x.shape.rank
    data_format = "NHWC" if channel_axis == rank - 1 else "NCHW"
    if rank == 4:
        return x, data_format
    shape, channels = tf.shape(x), x.shape[channel_axis]
    if data_format == "NHWC":
        return tf.reshape(x, [shape[0], -1, 1, channels]), data_format
    return tf.reshape(x, [shape[0], channels, -1, 1]), data_format


def fused_moments(x: tf.Tensor, channel_axis: int):
    """``(count, mean, m2)`` per channel, shape ``(C,)``, via FusedBatchNormV3.

    ``x`` must have float16/bfloat16/float32 dtype and its channel axis first
    (after the batch axis) or last. Falls back to :func:`local_moments`
    inside a ``tf.cond`` when a channel's mean is too large against its
    spread for the fused kernel's precision. No gradient: the caller
    normalizes with its own differentiable function.
    """
    x = tf.stop_gradient(x)
    rank = x.shape.rank
    channels = x.shape[channel_axis]
    x_4d, data_format = to_fused_layout(x, channel_axis)
    _, mean, unbiased, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x_4d,
        scale=tf.ones([channels], tf.float32),
        offset=tf.zeros([channels], tf.float32),
        mean=tf.zeros([0], tf.float32),
        variance=tf.zeros([0], tf.float32),
        epsilon=1e-3,
        is_training=True,
        data_format=data_format,
    )
    count = tf.cast(tf.size(x, out_type=tf.int64) // channels, tf.float32)
    mean = tf.where(count > 0.0, mean, 0.0)
    m2 = tf.where(count > 1.0, unbiased * (count - 1.0), 0.0)

    def precise():
        axes = [a for a in range(rank) if a != channel_axis]
        return tuple(tf.reshape(t, [channels]) for t in local_moments(x, axes))

    def fused():
        return tf.fill([channels], count), mean, m2

    return tf.cond(fused_moments_untrusted(count, mean, m2), precise, fused)


def fused_moments_untrusted(count, mean, m2) -> tf.Tensor:
    """True when some channel's mean is too large against its spread for
    the fused kernel's float32 variance (or the statistics are not finite)."""
    variance = m2 / tf.maximum(count, 1.0)
    trusted = tf.square(mean) <= FUSED_MOMENTS_MAX_RATIO * variance + 1e-30
    return tf.logical_not(tf.reduce_all(trusted))
