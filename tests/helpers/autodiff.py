"""One training call of a layer and its gradient, on whichever backend this session runs: what the
shared tests (tests/shared) need to check the same contract on TensorFlow, JAX and PyTorch."""

from __future__ import annotations

import keras
import numpy as np


def train_call(layer, x, dy, mask=None):
    """``layer(x, training=True)`` and the gradient of ``sum(y * dy)`` with respect to ``x`` and the
    layer's trainable weights. The layer's statistics are updated as a training step updates them.

    Returns ``(y, dx, weight_gradients)`` as float64 numpy arrays (gradients in the order of
    ``layer.trainable_weights``)."""
    if not layer.built:
        layer.build(x.shape)
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax(layer, x, dy, mask)
    if backend == "torch":
        return _torch(layer, x, dy, mask)
    return _tensorflow(layer, x, dy, mask)


def _jax(layer, x, dy, mask):
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def step(trainable, non_trainable, x):
        def loss(trainable, x):
            y, updated = layer.stateless_call(trainable, non_trainable, x, training=True, mask=mask)
            return jnp.sum(y.astype("float32") * dy), (y, updated)
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(trainable, x)

    (dweights, dx), (y, updated) = step(trainable, non_trainable, x)
    for variable, value in zip(layer.non_trainable_variables, updated, strict=True):
        variable.assign(value)
    return _numpy(y), _numpy(dx), [_numpy(g) for g in dweights]


def _torch(layer, x, dy, mask):
    import torch

    x = torch.tensor(np.asarray(x), requires_grad=True)
    y = layer(x, training=True, mask=None if mask is None else torch.tensor(mask))
    weights = [v.value for v in layer.trainable_variables]
    grads = torch.autograd.grad((y.float() * torch.tensor(np.asarray(dy), dtype=torch.float32)).sum(),
                                [x] + weights)
    return _numpy(y.detach()), _numpy(grads[0]), [_numpy(g) for g in grads[1:]]


def _tensorflow(layer, x, dy, mask):
    import tensorflow as tf

    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, mask=mask)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
    grads = tape.gradient(loss, [x] + list(layer.trainable_variables))
    return _numpy(y), _numpy(grads[0]), [_numpy(g) for g in grads[1:]]


def _numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(t, "float32")), np.float64)
