"""Normalizing with given statistics, and the paper's backward pass through batch statistics.

The local layer's common case never comes here: the one-pass fused kernel computes its
statistics and output together (:func:`kerasbn.kernels.tensorflow_backend.normalize_one_pass`).
What follows is the general path: synchronized statistics, masks, ghost batches, renorm, float64.

Training normalizes with the batch statistics (this replica's, or its group's merged
across replicas). The backward pass is written
out instead of differentiated through the statistics (the paper's section 3,
simplified): with ``x_hat`` the normalized input and ``N`` the group's count,

    dx = gamma / sqrt(var + eps) * (dy - w * (sum(dy) + x_hat * sum(dy * x_hat)) / N)

where ``w`` is 1 where the position counts in the statistics (0 where masked)
and the sums run over every position of the group's batch. It splits as
PyTorch's and Apex's synchronized BN split it: one pass yields
``dy * gamma / sqrt(var + eps)`` and the two per-channel sums (the fused
kernel's ``FusedBatchNormGradV3`` with fixed statistics, where it applies),
one collective sums the two vectors across the group, and one more pass adds the
correction, itself an affine map of ``x_hat``, to complete ``dx``. ``dgamma = sum(dy * x_hat)`` and
``dbeta = sum(dy)`` stay per replica: the optimizer's all-reduce sums them.
"""

from __future__ import annotations

import tensorflow as tf

from kerasbn.kernels import tf_cross_replica as cross_replica
from kerasbn.kernels import tf_fused as fused
from kerasbn.kernels.tf_moments import split_ghost_batches
from kerasbn.statistics import Moments, variance_from_moments


def normalize_with_batch_statistics(
    x: tf.Tensor,
    channel_axis: int,
    statistics: Moments,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    epsilon: float,
    *,
    mask: tf.Tensor | None = None,
    virtual_batch_size: int | None = None,
    fused_kernels: bool = False,
    synchronized: bool = False,
    group_size: int | None = None,
) -> tf.Tensor:
    """Normalizes ``x`` with its batch statistics; gradients as if through them.

    Args:
        x: the layer's input, rank >= 2.
        channel_axis: the positive channel axis.
        statistics: ``(count, mean, m2)``, each ``(C,)`` (``(G, C)`` with ghost batches),
            computed with the same ``mask`` and ``virtual_batch_size`` and merged over the
            same ``synchronized`` group.
        gamma, beta: float32 ``(C,)``.
        epsilon: added to the variance.
        fused_kernels: normalize and differentiate with the fused kernels (the caller
            checked :func:`kerasbn.kernels.tf_fused.fusable`; not with ghost batches);
            otherwise element-wise ops.

    Returns:
        ``y`` with ``x``'s shape: ``x``'s dtype on the fused path, float32
        otherwise.
    """
    count, mean, m2 = statistics
    variance = variance_from_moments(count, m2)
    if fused_kernels and not virtual_batch_size:
        return _fused_normalize(x, channel_axis, count, mean, variance, gamma, beta,
                                epsilon, mask, synchronized, group_size)
    return _elementwise_normalize(x, channel_axis, count, mean, variance, gamma, beta, epsilon,
                                  mask, virtual_batch_size, synchronized, group_size)


def _fused_normalize(x, axis, count, mean, variance, gamma, beta, epsilon, mask, synchronized,
                     group_size):
    @tf.custom_gradient
    def normalize(x, gamma, beta):
        y = fused.normalize(x, axis, mean, variance, gamma, beta, epsilon)

        def grad(dy):
            dy_scaled, sum_dy_x_hat, sum_dy = fused.normalize_grad(
                dy, x, axis, mean, variance, gamma, epsilon)
            dgamma, dbeta = sum_dy_x_hat, sum_dy
            if synchronized:
                sum_dy, sum_dy_x_hat = tf.unstack(
                    cross_replica.group_sum(tf.stack([sum_dy, sum_dy_x_hat]), group_size))
            # The correction -w * gamma * inv_std * (sum_dy + x_hat * sum_dy_x_hat) / N is
            # itself an affine map of x_hat: one more pass of the same kernel.
            scale = -gamma * tf.math.rsqrt(variance + epsilon) / tf.maximum(count, 1.0)
            correction = fused.normalize(x, axis, mean, variance, scale * sum_dy_x_hat,
                                         scale * sum_dy, epsilon)
            if mask is not None:
                correction = tf.where(mask, correction, tf.zeros([], correction.dtype))
            return dy_scaled + correction, dgamma, dbeta

        return y, grad

    return normalize(x, gamma, beta)


def _elementwise_normalize(x, axis, count, mean, variance, gamma, beta, epsilon, mask,
                           virtual_batch_size, synchronized, group_size):
    input_shape = tf.shape(x)
    x = tf.cast(x, tf.float32)
    if virtual_batch_size:
        x, mask = split_ghost_batches(x, mask, virtual_batch_size)
        axis += 1
    rank = x.shape.rank
    group_axes = [a for a in range(rank) if a != axis and not (virtual_batch_size and a == 0)]
    # Per-channel vectors broadcast against x as they are when channels come last
    # (no ghost axis); otherwise reshaped to keep C on `axis` (and G on axis 0).
    plain = axis == rank - 1 and not virtual_batch_size

    def broadcast(t, groups=False):
        if plain:
            return t
        shape = [1] * rank
        shape[axis] = -1
        if groups:
            shape[0], shape[axis] = -1, x.shape[axis]
        return tf.reshape(t, shape)

    count, mean, variance = (broadcast(t, groups=True) for t in (count, mean, variance))
    inv_std = tf.math.rsqrt(variance + epsilon)

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        gamma_b = broadcast(gamma)
        scale = gamma_b * inv_std
        y = (x - mean) * scale + broadcast(beta)

        def grad(dy):
            # Recomputed rather than kept from the forward pass: one cheap
            # pass instead of holding an input-sized tensor until backward.
            centred = x - mean
            sum_dy = tf.reduce_sum(dy, group_axes, keepdims=not plain)
            sum_dy_x_hat = tf.reduce_sum(dy * centred, group_axes, keepdims=not plain) * inv_std
            if plain:
                dgamma, dbeta = sum_dy_x_hat, sum_dy
            else:
                channel_axes = [a for a in range(rank) if a != axis]
                dgamma = tf.reshape(tf.reduce_sum(sum_dy_x_hat, channel_axes), [-1])
                dbeta = tf.reshape(tf.reduce_sum(sum_dy, channel_axes), [-1])
            if synchronized:
                sum_dy, sum_dy_x_hat = tf.unstack(
                    cross_replica.group_sum(tf.stack([sum_dy, sum_dy_x_hat]), group_size))
            inverse_count = 1.0 / tf.maximum(count, 1.0)
            # dx = scale * (dy - w * (sum_dy + x_hat * sum_dy_x_hat) / N), as per-channel
            # coefficients so that x and dy are each read once.
            slope = -scale * inv_std * sum_dy_x_hat * inverse_count
            offset = -scale * sum_dy * inverse_count
            correction = centred * slope + offset
            if mask is not None:
                correction = tf.where(mask, correction, tf.zeros([], correction.dtype))
            return dy * scale + correction, dgamma, dbeta

        return y, grad

    y = normalize(x, gamma, beta)
    return y if plain else tf.reshape(y, input_shape)
