"""TensorFlow's computation of a batch's per-channel ``(count, mean, M2)``.

The triples and their merge are :mod:`kerasbn.statistics` (every backend's); this is
how TensorFlow computes them from the input. Numerical care taken here, one line each:

- Reductions run in float32 whatever the input dtype (a float16 sum of
  squares overflows at activations around 250).
- The mean takes two passes: the second adds back the rounding error of the
  first float32 sum, which matters when a channel's mean is large against its
  spread (docs/design.md, "Precision").
- M2 is a sum of centred squares, never ``E[x^2] - E[x]^2``, which cancels
  catastrophically when a channel's mean is large against its spread.
- Counts are exact: from the static/dynamic shape, or from the mask; no
  input-sized tensor of ones is allocated to count.
- An empty input gives count 0, mean 0, M2 0: never NaN.
- TensorFlow's fused kernel (oneDNN on CPU) is used for speed where it
  applies, but it loses the variance when a channel's mean is large against
  its spread (oneDNN, and XLA's expansion into ``E[x^2] - E[x]^2``); it is
  fed data shifted by a sample of each channel wherever that can happen
  (:func:`fused_statistics`, the one place that guard lives).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

from kerasbn.kernels import tf_fused as fused
from kerasbn.statistics import Moments


def local_moments(
    x: tf.Tensor, axes: Sequence[int], mask: tf.Tensor | None = None
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Returns float32 ``(count, mean, m2)`` of ``x`` reduced over ``axes``.

    Args:
        x: input tensor of any float dtype.
        axes: the axes to reduce (every axis but the channel axis, and for
            ghost batches every axis but the group and channel axes).
        mask: optional boolean tensor of ``x``'s rank, broadcastable to it;
            positions where it is False are left out of all three statistics.

    Returns:
        Three float32 tensors of the same shape, ``x``'s shape with the
        reduced axes kept as size 1. Gradients flow through ``mean`` and
        ``m2`` exactly as through the textbook formulas.
    """
    x = tf.cast(x, tf.float32)
    axes = list(axes)
    if mask is None:
        static_dims = [x.shape[a] for a in axes]
        if None in static_dims:
            count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)
            inverse_count = 1.0 / tf.maximum(count, 1.0)
        else:  # known when traced: no ops to count
            count = float(math.prod(static_dims))
            inverse_count = 1.0 / max(count, 1.0)
        first = tf.reduce_sum(x, axes, keepdims=True) * inverse_count
        # Second pass: sum(x - first) is the first pass's rounding error.
        # Its exact derivative with respect to x is zero, so stop_gradient
        # changes nothing mathematically and saves a backward pass.
        correction = tf.reduce_sum(x - first, axes, keepdims=True) * inverse_count
        mean = first + tf.stop_gradient(correction)
        m2 = tf.reduce_sum(tf.math.squared_difference(x, mean), axes, keepdims=True)
        count = tf.fill(tf.shape(mean), tf.cast(count, tf.float32))
        return count, mean, m2

    # The mask keeps its size-1 axes (a sequence mask has none for channels): it
    # broadcasts inside tf.where, and its count is scaled by what it broadcasts over.
    mask = tf.cast(mask, tf.bool)
    x_shape, mask_shape = tf.shape(x), tf.shape(mask)
    broadcast_factor = tf.cast(tf.reduce_prod(
        [x_shape[a] // tf.maximum(mask_shape[a], 1) for a in axes]), tf.float32)
    count = tf.reduce_sum(tf.cast(mask, tf.float32), axes, keepdims=True) * broadcast_factor
    safe_count = tf.maximum(count, 1.0)
    # tf.where, not x * mask: padded positions may hold inf or NaN.
    zero = tf.zeros([], tf.float32)
    first = tf.reduce_sum(tf.where(mask, x, zero), axes, keepdims=True) / safe_count
    centred = tf.where(mask, x - first, zero)
    correction = tf.reduce_sum(centred, axes, keepdims=True) / safe_count
    mean = first + tf.stop_gradient(correction)
    # sum((x - mean)^2) over the kept positions, from the deviations from `first`
    # (off-centre only by the rounding error `correction`, so nothing cancels):
    # one pass fewer than centring again.
    m2 = tf.reduce_sum(tf.square(centred), axes, keepdims=True)
    m2 = tf.maximum(m2 - count * tf.square(tf.stop_gradient(correction)), 0.0)
    return tf.broadcast_to(count, tf.shape(mean)), mean, m2


# A shift is needed before TensorFlow's CPU kernel (oneDNN) when a channel's
# values-per-channel n times |mean| / spread exceeds this: measured on
# (256, 64) to (256, 56, 56, 4), the kernel's variance error stays at its
# centred level up to n * |mean| / spread = 1e7 on every shape but the smallest
# and reaches 1e-3 to 5e-2 at 1e8 (docs/design.md, "Precision"): a 10x margin.
UNSHIFTED_LIMIT = 1e6
# The shift and the spread that decides it come from the first examples, at
# least this many values per channel (one example of a feature map; 16 rows of
# an (N, C) input).
SAMPLE_VALUES = 16


def fused_statistics(x: tf.Tensor, channel_axis: int, affine: tuple | None = None):
    """``(Moments, None)`` from the fused kernel on shifted data; with ``affine``,
    ``(Moments, normalized output)`` from the one-pass kernel.

    The kernel's float32 variance cancels catastrophically when a channel's
    mean is large against its spread (oneDNN's float32 accumulation; XLA
    expands the kernel into ``E[x^2] - E[x]^2``; docs/design.md, "Precision").
    Statistics and normalization are shift-invariant, so the kernel sees
    ``x - shift`` with ``shift`` the first examples' per-channel mean: a value
    of the channel's own distribution, which leaves a shifted mean of the
    order of the spread. The shift is a constant to the gradient (its exact
    derivative through a normalization is zero).

    The subtraction is a pass over the input. Under XLA it fuses into the
    kernel's reductions, and the GPU kernel's precision is not measured here,
    so there it is always made; on CPU it is made only when the first examples
    show a channel whose ``n * |mean| / spread`` exceeds :data:`UNSHIFTED_LIMIT`
    (a ``tf.cond``, so the pass itself is skipped otherwise).
    """
    channels = x.shape[channel_axis]
    count = tf.cast(tf.size(x, out_type=tf.int64) // channels, tf.float32)
    shift, spread = _first_examples_moments(tf.stop_gradient(x), channel_axis)
    if affine is not None:
        # In x's dtype, so the kernel reads and writes half precision under mixed
        # precision. The shift is rounded to that dtype first: then x - shift is
        # exact wherever x is within a factor 2 of it (Sterbenz), which is where
        # precision is at stake, and the same rounded shift is added back below.
        shift = tf.cast(tf.cast(shift, x.dtype), tf.float32)
        unshifted = x
    else:
        # In float32: half-precision differences would round the statistics' input.
        unshifted = tf.cast(x, tf.float32)

    def subtract_shift():
        return unshifted - tf.cast(shift, unshifted.dtype)

    if fused.cpu_kernel_without_xla():
        needed = shift_needed(shift, spread, count)
        shifted = tf.cond(needed, subtract_shift, lambda: unshifted)
        applied_shift = tf.where(needed, shift, 0.0)
    else:
        shifted, applied_shift = subtract_shift(), shift
    if affine is None:
        normalized = None
        shifted_mean, unbiased = fused.moments(shifted, channel_axis)
    else:
        gamma, beta, epsilon = affine
        normalized, shifted_mean, unbiased = fused.normalize_batch(
            shifted, channel_axis, gamma, beta, epsilon)
    # NaN for an empty batch: back to zeros there.
    mean = tf.where(count > 0.0, shifted_mean + tf.reshape(applied_shift, [channels]), 0.0)
    m2 = tf.where(count > 1.0, unbiased * (count - 1.0), 0.0)
    return Moments(tf.fill([channels], count), mean, m2), normalized


def shift_needed(mean: tf.Tensor, spread: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """Whether any channel's ``count * |mean| / spread`` exceeds :data:`UNSHIFTED_LIMIT`
    (a zero spread with a nonzero mean does): the CPU kernel needs shifted data."""
    return tf.reduce_any(tf.abs(mean) * count > UNSHIFTED_LIMIT * spread)


def _first_examples_moments(x: tf.Tensor, channel_axis: int):
    """Per-channel mean and standard deviation of the first examples (at least
    :data:`SAMPLE_VALUES` values per channel where the shape says so), float32,
    shaped to broadcast against ``x``. NaN for an empty batch: then they only
    meet empty tensors, and the decision (a comparison) is False."""
    per_example = x.shape[1:].num_elements()
    examples = 1
    if per_example:
        examples = max(1, -(-SAMPLE_VALUES * x.shape[channel_axis] // per_example))
    sample = tf.cast(x[:examples], tf.float32)
    axes = [a for a in range(x.shape.rank) if a != channel_axis]
    mean = tf.reduce_mean(sample, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(sample, mean), axes, keepdims=True)
    return mean, tf.sqrt(variance)


def split_ghost_batches(x: tf.Tensor, mask: tf.Tensor | None, virtual_batch_size: int):
    """Reshapes ``(B, ...)`` into ``(B / k, k, ...)`` (and the mask alike).

    Raises a ValueError when ``k`` does not divide a static batch size, and
    fails with the same message at run time for a dynamic one.
    """
    k = virtual_batch_size
    batch = x.shape[0]
    if batch is not None and batch % k:
        raise ValueError(
            f"`virtual_batch_size`={k} must divide the batch size; received a batch of {batch}."
        )
    dynamic_batch = tf.shape(x)[0]
    if batch is None:
        check = tf.debugging.assert_equal(
            dynamic_batch % k, 0, message=f"`virtual_batch_size`={k} must divide the batch size"
        )
        # Ordered before the reshape, which would fail first, unclearly.
        with tf.control_dependencies([check]):
            x = tf.identity(x)
    ghost_shape = tf.concat([[dynamic_batch // k, k], tf.shape(x)[1:]], 0)
    if mask is not None:
        mask = tf.reshape(tf.broadcast_to(mask, tf.shape(x)), ghost_shape)
    x = tf.reshape(x, ghost_shape)
    return x, mask
