"""Batch normalization with batch statistics, with the paper's backward pass.

Forward: per-channel ``(count, mean, M2)`` (:mod:`kerasbn.moments`), merged
across the replica group (:mod:`kerasbn.cross_replica`), then
``y = (x - mean) / sqrt(var + eps) * gamma + beta``.

Backward, written out instead of differentiated through the statistics
(the paper's section 3, simplified): with ``x_hat`` the normalized input and
``N`` the group's count,

    dx = gamma / sqrt(var + eps) * (dy - w * (sum(dy) + x_hat * sum(dy * x_hat)) / N)

where ``w`` is 1 where the position counts in the statistics (0 where
masked) and the sums run over every position of the group's batch. The two
sums travel in one collective, so forward plus backward costs two
collectives per replica, and the backward pass reads ``x`` and ``dy`` a
fixed small number of times instead of replaying the statistics graph.
``dgamma = sum(dy * x_hat)`` and ``dbeta = sum(dy)`` stay per replica: the
optimizer's gradient all-reduce sums them.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from kerasbn import cross_replica
from kerasbn.moments import local_moments, variance_from_moments


def batch_statistics(
    x: tf.Tensor,
    axes: Sequence[int],
    mask: tf.Tensor | None = None,
    synchronized: bool = False,
    group_size: int | None = None,
    local_statistics=None,
):
    """This replica group's ``(count, mean, m2)`` of ``x``, keepdims layout, no gradient.

    Args:
        x: input (any float dtype; computed in float32).
        axes: axes reduced for the statistics.
        mask: optional boolean tensor broadcastable to ``x``.
        synchronized: merge across the replica group of the current
            ``tf.distribute`` replica context (one collective).
        group_size: replicas per group; None means all.
        local_statistics: optional ``f(x) -> (count, mean, m2)`` in the
            keepdims layout replacing :func:`local_moments` (the fused
            kernel, where it applies).
    """
    if local_statistics is None:
        count, mean, m2 = local_moments(tf.stop_gradient(x), list(axes), mask)
    else:
        count, mean, m2 = local_statistics(x)
    if not synchronized:
        return count, mean, m2
    shape = tf.shape(mean)
    flat = [tf.reshape(t, [-1]) for t in (count, mean, m2)]
    merged = cross_replica.global_moments(*flat, group_size=group_size)
    return tuple(tf.reshape(t, shape) for t in merged)


def normalize_with_batch_statistics(
    x: tf.Tensor,
    axes: Sequence[int],
    statistics: tuple[tf.Tensor, tf.Tensor, tf.Tensor],
    gamma: tf.Tensor,
    beta: tf.Tensor,
    epsilon: float,
    mask: tf.Tensor | None = None,
    synchronized: bool = False,
    group_size: int | None = None,
) -> tf.Tensor:
    """Normalizes ``x`` with :func:`batch_statistics`' output; returns float32 ``y``.

    Args:
        x, axes, mask, synchronized, group_size: as given to
            :func:`batch_statistics` (the backward pass sums over the same
            axes and group).
        statistics: ``(count, mean, m2)`` from :func:`batch_statistics`.
        gamma, beta: float32, broadcastable to ``x`` (keepdims layout).
        epsilon: added to the variance.
    """
    axes = list(axes)
    x = tf.cast(x, tf.float32)
    count, mean, m2 = statistics
    variance = variance_from_moments(count, m2)
    inv_std = tf.math.rsqrt(variance + epsilon)
    inv_count = 1.0 / tf.maximum(count, 1.0)

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        scale = gamma * inv_std
        y = (x - mean) * scale + beta

        def grad(dy):
            # Recomputed rather than kept from the forward pass: one cheap
            # pass instead of holding an input-sized tensor until backward.
            centred = x - mean
            sum_dy = tf.reduce_sum(dy, axes, keepdims=True)
            sum_dy_centred = tf.reduce_sum(dy * centred, axes, keepdims=True)
            dgamma = _unbroadcast(sum_dy_centred * inv_std, gamma)
            dbeta = _unbroadcast(sum_dy, beta)
            if synchronized:
                sums = cross_replica.group_sum(tf.stack([sum_dy, sum_dy_centred]), group_size)
                sum_dy, sum_dy_centred = sums[0], sums[1]
            # dx = scale * (dy - w * (sum_dy + x_hat * sum_dy_x_hat) / N), as
            # per-channel coefficients so that x and dy are each read once.
            offset = -scale * sum_dy * inv_count
            slope = -scale * sum_dy_centred * tf.square(inv_std) * inv_count
            if mask is None:
                return dy * scale + (centred * slope + offset), dgamma, dbeta
            correction = tf.where(mask, centred * slope + offset, tf.zeros_like(centred))
            return dy * scale + correction, dgamma, dbeta

        return y, grad

    return normalize(x, gamma, beta)


def _unbroadcast(total: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """Sums ``total`` (the statistics' keepdims shape) down to ``like``'s shape."""
    _, axes = tf.raw_ops.BroadcastGradientArgs(s0=tf.shape(total), s1=tf.shape(like))
    return tf.reshape(tf.reduce_sum(total, axes), tf.shape(like))
