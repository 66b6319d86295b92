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
  (:func:`_shifted_fused_statistics`, the one place that guard lives).
- The merge computes deviations from the merged mean directly (within-part
  M2 plus count-weighted between-part squares), so it stays stable for any
  number of parts, empty parts included.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import tensorflow as tf

from kerasbn import cross_replica, fused


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


def all_finite(statistics) -> tf.Tensor:
    """Scalar bool: every channel's (every ghost batch's) mean and M2 is finite.

    One ``inf`` or NaN in a batch makes its statistics non-finite; merged across
    replicas, it makes them non-finite on every replica of the group, so all
    of them see the same answer.
    """
    return tf.reduce_all(tf.math.is_finite(tf.stack([statistics.mean, statistics.m2])))


# Which kernels compute a training step's statistics and output (decided once per call
# by the layer): the one-pass fused kernel (statistics and output together, local
# layer), the fused kernels split into statistics, merge and normalization
# (synchronized layer and masks' normalization), or element-wise ops.
ONE_PASS, FUSED, ELEMENTWISE = "one_pass", "fused", "elementwise"


class BatchStatistics(NamedTuple):
    """Per-channel ``(count, mean, m2)``, and the normalized output when the
    one-pass kernel computed both at once (None otherwise)."""

    count: tf.Tensor
    mean: tf.Tensor
    m2: tf.Tensor
    normalized: tf.Tensor | None = None


def batch_statistics(
    x: tf.Tensor,
    channel_axis: int,
    mask: tf.Tensor | None = None,
    *,
    kernel: str = ELEMENTWISE,
    affine: tuple | None = None,
    virtual_batch_size: int | None = None,
    synchronized: bool = False,
    group_size: int | None = None,
) -> BatchStatistics:
    """The batch statistics BN normalizes with: ``(count, mean, m2)``, each ``(C,)``.

    With ``virtual_batch_size``, each ``(G, C)`` for the ``G`` ghost batches.
    No gradient flows through them (the normalization's own backward pass
    accounts for the statistics).

    Args:
        x: input of any float dtype, rank >= 2.
        channel_axis: the positive channel axis.
        mask: optional boolean tensor of ``x``'s shape; False positions are
            left out.
        kernel: ``ONE_PASS`` (the caller checked :func:`kerasbn.fused.fusable`;
            no mask, ghost batches or synchronization) also returns the
            normalized output, ``gamma * x_hat + beta``, from the same kernel
            call, with its gradient; ``FUSED`` computes the moments with the
            fused kernel (unmasked); ``ELEMENTWISE`` with element-wise ops.
            The fused kernels see shifted data, for precision.
        affine: ``(gamma, beta, epsilon)`` for ``ONE_PASS``: float32 ``(C,)``
            vectors and the float added to the variance.
        virtual_batch_size: each consecutive group of this many examples gets
            its own statistics.
        synchronized: merge the statistics across the replicas of the current
            ``tf.distribute`` replica context (one collective).
        group_size: with ``synchronized``, replicas per group; None means all.
    """
    channels = x.shape[channel_axis]
    if kernel == ONE_PASS:
        return _shifted_fused_statistics(x, channel_axis, affine)
    x = tf.stop_gradient(x)
    if virtual_batch_size:
        x, mask = split_ghost_batches(x, mask, virtual_batch_size)
        axes = [a for a in range(x.shape.rank) if a not in (0, channel_axis + 1)]
        return BatchStatistics(
            *(tf.reshape(t, [-1, channels]) for t in local_moments(x, axes, mask)))
    if kernel == FUSED and mask is None:
        count, mean, m2, _ = _shifted_fused_statistics(x, channel_axis)
    else:
        axes = [a for a in range(x.shape.rank) if a != channel_axis]
        count, mean, m2 = (tf.reshape(t, [channels]) for t in local_moments(x, axes, mask))
    if synchronized:
        table = cross_replica.group_table(tf.stack([count, mean, m2]), group_size)
        count, mean, m2 = merge_moments(table[:, 0], table[:, 1], table[:, 2])
    return BatchStatistics(count, mean, m2)


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


def _shifted_fused_statistics(x: tf.Tensor, channel_axis: int, affine: tuple | None = None):
    """``BatchStatistics`` from the fused kernel on shifted data; with ``affine``,
    from the one-pass kernel, with the normalized output.

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

    if _cpu_kernel_without_xla():
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
    return BatchStatistics(tf.fill([channels], count), mean, m2, normalized)


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


def _cpu_kernel_without_xla() -> bool:
    """Whether the kernel is TensorFlow's CPU kernel outside XLA: no GPU is
    visible, the graph being traced is not compiled by XLA, and XLA's
    auto-clustering is off. Decided while tracing."""
    if tf.config.list_logical_devices("GPU") or tf.config.optimizer.get_jit():
        return False
    if "auto_jit" in os.environ.get("TF_XLA_FLAGS", ""):
        return False
    if tf.executing_eagerly():
        return True
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # private module moved: assume XLA may compile the graph
        return False
    return not control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


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
