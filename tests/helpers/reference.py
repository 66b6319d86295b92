"""Float64 numpy ground truth: the paper's Algorithms 1-2 and section 3 backprop."""

import numpy as np


def channels_last(x, axis):
    """Moves the channel axis last and flattens the rest: shape (m, C)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    return x.reshape(-1, x.shape[-1])


def from_channels_last(flat, shape, axis):
    moved = list(shape)
    channels = moved.pop(axis)
    out = flat.reshape(moved + [channels])
    return np.moveaxis(out, -1, axis)


def bn_forward(x, axis, gamma, beta, eps):
    """Algorithm 1: returns y, batch mean, biased batch variance."""
    flat = channels_last(x, axis)
    mu = flat.mean(0)
    var = ((flat - mu) ** 2).mean(0)
    x_hat = (flat - mu) / np.sqrt(var + eps)
    y = gamma * x_hat + beta
    return from_channels_last(y, np.shape(x), axis), mu, var


def bn_backward(x, dy, axis, gamma, eps):
    """The paper's section 3 chain rule, term by term: dx, dgamma, dbeta."""
    flat = channels_last(x, axis)
    g = channels_last(dy, axis)
    m = flat.shape[0]
    mu = flat.mean(0)
    var = ((flat - mu) ** 2).mean(0)
    x_hat = (flat - mu) / np.sqrt(var + eps)
    dx_hat = g * gamma
    dvar = np.sum(dx_hat * (flat - mu), 0) * -0.5 * (var + eps) ** -1.5
    dmu = np.sum(-dx_hat / np.sqrt(var + eps), 0) + dvar * np.sum(-2 * (flat - mu), 0) / m
    dx = dx_hat / np.sqrt(var + eps) + dvar * 2 * (flat - mu) / m + dmu / m
    dgamma = np.sum(g * x_hat, 0)
    dbeta = np.sum(g, 0)
    return from_channels_last(dx, np.shape(x), axis), dgamma, dbeta


def bn_inference(x, axis, gamma, beta, mean, var, eps):
    """Algorithm 2's fixed affine map."""
    flat = channels_last(x, axis)
    y = gamma * (flat - mean) / np.sqrt(var + eps) + beta
    return from_channels_last(y, np.shape(x), axis)


def keras_has_renorm() -> bool:
    """Keras' own layer has Batch Renormalization from Keras 3.14 on."""
    import inspect

    import keras

    return "renorm" in inspect.signature(keras.layers.BatchNormalization.__init__).parameters

