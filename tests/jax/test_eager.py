"""A call made eagerly on JAX: the statistics, their merge, the normalization and the averages
each compile once per shape (kerasbn/kernels/jax_backend.py: ``compiled``), inference once, and
they compute what the traced call does."""

import jax
import keras
import numpy as np

import kerasbn

_COMPILES = []
# Registered once: JAX 0.7 (the floor) cannot unregister a listener.
jax.monitoring.register_event_duration_secs_listener(
    lambda name, seconds, **kwargs: _COMPILES.append(name) if name.endswith("/backend_compile_duration") else None)


def _compiles_during(call):
    """How many XLA compilations ``call()`` triggers."""
    before = len(_COMPILES)
    call()
    return len(_COMPILES) - before


def test_an_eager_training_call_on_a_new_batch_shape_compiles_its_three_kernels_at_most():
    layer = kerasbn.BatchNormalization(synchronized=True)
    rng = np.random.default_rng(0)
    layer(rng.normal(size=(8, 4, 4, 5)).astype("float32"), training=True)  # built, the small ops seen
    x = rng.normal(3.0, 2.0, size=(16, 4, 4, 5)).astype("float32")
    # Op by op, each primitive of the new shape compiled on its own: 9 compilations measured
    # before (Keras' own BN: 5); the statistics, the merge and the normalization: 3 at most.
    assert _compiles_during(lambda: layer(x, training=True)) <= 3
    assert _compiles_during(lambda: layer(x, training=True)) == 0
    assert _compiles_during(lambda: layer(x, training=False)) <= 1  # inference: one function
    # Another layer that differs in its numbers only (momentum, epsilon, renorm's) shares them all.
    other = kerasbn.BatchNormalization(synchronized=True, momentum=0.5, epsilon=0.1)
    other.build(x.shape)
    assert _compiles_during(lambda: (other(x, training=True), other(x, training=False))) == 0


def test_an_eager_training_call_computes_what_the_traced_one_does():
    rng = np.random.default_rng(1)
    x = rng.normal(100.0, 3.0, size=(12, 6, 3)).astype("float32")
    mask = rng.random((12, 6)) > 0.3
    eager = kerasbn.BatchNormalization(momentum=0.5, virtual_batch_size=4)
    traced = kerasbn.BatchNormalization(momentum=0.5, virtual_batch_size=4)
    for layer in (eager, traced):
        layer.build(x.shape)
    y_eager = eager(x, training=True, mask=mask)

    @jax.jit
    def step(trainable, non_trainable, x, mask):
        return traced.stateless_call(trainable, non_trainable, x, training=True, mask=mask)

    y_traced, moved = step([v.value for v in traced.trainable_variables],
                           [v.value for v in traced.non_trainable_variables], x, mask)
    np.testing.assert_allclose(y_eager, y_traced, rtol=1e-5, atol=1e-5)
    for variable, value in zip(eager.non_trainable_variables, moved, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable.value), value, rtol=1e-6, atol=1e-6)
    # And both are the statistics of each ghost batch's kept positions (numpy, float64).
    kept = [x[g * 4:(g + 1) * 4][mask[g * 4:(g + 1) * 4]].astype("float64") for g in range(3)]
    np.testing.assert_allclose(eager.moving_mean, 0.5 * np.mean([k.mean(0) for k in kept], 0), rtol=1e-5)
