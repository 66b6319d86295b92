"""TensorFlow's fused batch-norm kernels (oneDNN on CPU, cuDNN on GPU), in one place.

Three uses: :func:`normalize_batch` is the one-pass training kernel (statistics and
output in one call forward, one gradient call backward) for the local layer;
:func:`moments`, :func:`normalize` and :func:`normalize_grad` split the same work for
the synchronized layer, whose statistics must be merged across replicas before
anything is normalized.

``FusedBatchNormV3`` and ``FusedBatchNormGradV3`` take 4D inputs with the
channel axis last ("NHWC") or second ("NCHW"); any rank >= 2 folds into that
layout without changing which values each channel reduces over.
"""

from __future__ import annotations

import os

import tensorflow as tf

FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32)


def fusable(dtype: tf.DType, rank: int, channel_axis: int) -> bool:
    """Whether the kernels take inputs of this dtype with this (positive) channel axis."""
    return dtype in FUSED_DTYPES and channel_axis in (1, rank - 1)


def _to_fused_layout(x: tf.Tensor, channel_axis: int) -> tuple[tf.Tensor, str]:
    rank = x.shape.rank
    data_format = "NHWC" if channel_axis == rank - 1 else "NCHW"
    if rank == 4:
        return x, data_format
    shape, channels = tf.shape(x), x.shape[channel_axis]
    if data_format == "NHWC":
        return tf.reshape(x, [shape[0], -1, 1, channels]), data_format
    return tf.reshape(x, [shape[0], channels, -1, 1]), data_format


def _from_fused_layout(y: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    return y if like.shape.rank == 4 else tf.reshape(y, tf.shape(like))


def normalize_batch(x, channel_axis, scale, offset, epsilon):
    """Training-mode batch normalization of ``x`` with its own statistics, in one kernel call.

    Returns ``y`` (``x``'s shape and dtype), the per-channel batch mean and the
    Bessel-corrected batch variance (float32, ``(C,)``; NaN for an empty batch).
    The gradient is TensorFlow's registered one: a single ``FusedBatchNormGradV3``
    with ``is_training=True``, which differentiates through the statistics.
    The statistics lose precision when a channel's mean is large against its
    spread: see :func:`kerasbn.kernels.tf_moments.fused_statistics` for the guard.
    """
    x4, data_format = _to_fused_layout(x, channel_axis)
    y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x4, scale=scale, offset=offset,
        mean=tf.zeros([0], tf.float32), variance=tf.zeros([0], tf.float32),
        epsilon=epsilon, is_training=True, data_format=data_format,
    )
    return _from_fused_layout(y, x), tf.stop_gradient(mean), tf.stop_gradient(variance)


def moments(x: tf.Tensor, channel_axis: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-channel batch mean and Bessel-corrected variance, shape ``(C,)``.

    NaN for an empty batch. The kernel's float32 variance loses precision
    when a channel's mean is large against its spread: see
    :func:`kerasbn.kernels.tf_moments.fused_statistics` for the guard.
    """
    channels = x.shape[channel_axis]
    x4, data_format = _to_fused_layout(x, channel_axis)
    _, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x4,
        scale=tf.ones([channels], tf.float32),
        offset=tf.zeros([channels], tf.float32),
        mean=tf.zeros([0], tf.float32),
        variance=tf.zeros([0], tf.float32),
        epsilon=1e-3,
        is_training=True,
        data_format=data_format,
    )
    return mean, variance


def normalize(x, channel_axis, mean, variance, scale, offset, epsilon) -> tf.Tensor:
    """``(x - mean) * rsqrt(variance + epsilon) * scale + offset`` in ``x``'s dtype."""
    x4, data_format = _to_fused_layout(x, channel_axis)
    y, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x4, scale=scale, offset=offset, mean=mean, variance=variance,
        epsilon=epsilon, is_training=False, data_format=data_format,
    )
    return _from_fused_layout(y, x)


def normalize_grad(dy, x, channel_axis, mean, variance, scale, epsilon):
    """One pass over ``dy`` and ``x`` for :func:`normalize` with fixed statistics.

    Returns ``dy * scale * rsqrt(variance + epsilon)`` (``x``'s shape),
    ``sum(dy * x_hat)`` and ``sum(dy)`` per channel (float32).
    """
    dy4, data_format = _to_fused_layout(dy, channel_axis)
    x4, _ = _to_fused_layout(x, channel_axis)
    dx, sum_dy_x_hat, sum_dy, *_ = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=dy4, x=x4, scale=scale, reserve_space_1=mean,
        reserve_space_2=variance, reserve_space_3=tf.zeros([0], tf.float32),
        epsilon=epsilon, is_training=False, data_format=data_format,
    )
    return _from_fused_layout(dx, x), sum_dy_x_hat, sum_dy


def cpu_kernel_without_xla() -> bool:
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
