"""Random configurations (rank, axis, batch, momentum, variance, affine, scale of the data) against float64
numpy, two training steps and inference, on every backend (each backend's session runs this file)."""

import keras
import numpy as np
import pytest

import kerasbn

EPS = 1e-3


def _configuration(seed):
    rng = np.random.RandomState(seed)
    rank = int(rng.randint(2, 5))
    shape = (int(rng.randint(2, 9)),) + tuple(int(d) for d in rng.randint(1, 5, size=rank - 1))
    axis = int(rng.randint(1, rank))
    axis = axis - rank if rng.rand() < 0.5 else axis
    arguments = dict(axis=axis, momentum=[0.0, 0.5, 0.9, None][rng.randint(4)],
                     unbiased_variance=bool(rng.rand() < 0.5), center=bool(rng.rand() < 0.8),
                     scale=bool(rng.rand() < 0.8), epsilon=EPS, beta_initializer="random_normal",
                     gamma_initializer="random_uniform")
    offset, spread = 10 ** rng.uniform(-1, 3), 10 ** rng.uniform(-0.3, 1)
    batches = [rng.normal(offset * (step + 1), spread, shape).astype("float32") for step in range(2)]
    return arguments, batches


def _per_channel(x, axis):
    return np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])


@pytest.mark.parametrize("seed", range(16))
def test_random_configurations_against_float64(seed):
    arguments, batches = _configuration(seed)
    layer = kerasbn.BatchNormalization(**arguments)
    axis = arguments["axis"] % batches[0].ndim
    shape = [1] * batches[0].ndim
    shape[axis] = -1
    layer.build(batches[0].shape)
    gamma = layer.gamma.numpy().astype(np.float64) if arguments["scale"] else 1.0
    beta = layer.beta.numpy().astype(np.float64) if arguments["center"] else 0.0
    mean, variance = np.zeros(batches[0].shape[axis]), np.ones(batches[0].shape[axis])
    means, variances = [], []
    for step, x in enumerate(batches):
        y = keras.ops.convert_to_numpy(layer(x, training=True))
        flat = _per_channel(x, axis)
        batch_mean, batch_variance = flat.mean(0), flat.var(0)
        expected = ((x - batch_mean.reshape(shape)) / np.sqrt(batch_variance.reshape(shape) + EPS)
                    * np.reshape(gamma, shape if np.ndim(gamma) else ()) + np.reshape(beta, shape if np.ndim(beta) else ()))
        np.testing.assert_allclose(y, expected, rtol=2e-3, atol=2e-3, err_msg=f"{arguments} step {step}")
        m = flat.shape[0]
        population = batch_variance * m / (m - 1) if arguments["unbiased_variance"] and m > 1 else batch_variance
        means.append(batch_mean)
        variances.append(population)
        momentum = arguments["momentum"]
        if momentum is None:  # the cumulative average of the batches so far
            mean, variance = np.mean(means, 0), np.mean(variances, 0)
        else:
            mean = momentum * mean + (1 - momentum) * batch_mean
            variance = momentum * variance + (1 - momentum) * population
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-4 * np.abs(mean).max(),
                               err_msg=str(arguments))
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=2e-3, err_msg=str(arguments))
    x = batches[0]
    inferred = keras.ops.convert_to_numpy(layer(x, training=False))
    expected = ((x - layer.moving_mean.numpy().reshape(shape))
                / np.sqrt(layer.moving_variance.numpy().astype(np.float64).reshape(shape) + EPS)
                * np.reshape(gamma, shape if np.ndim(gamma) else ()) + np.reshape(beta, shape if np.ndim(beta) else ()))
    np.testing.assert_allclose(inferred, expected, rtol=2e-3, atol=2e-3 * max(1.0, np.abs(expected).max()),
                               err_msg=str(arguments))
