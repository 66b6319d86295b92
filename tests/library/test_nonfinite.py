"""A training batch whose statistics are not finite leaves the moving statistics as they were.

Each case trains a layer on a finite batch, then on the same batch with one ``inf`` or NaN, then
on a second finite batch; a twin trained on the two finite batches only is the reference: the
bad batch must change nothing, value by value, and the next batch must update as if it had
never come.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn

RNG = np.random.RandomState(0)

# name: (input shape, layer arguments, mask) - every way the layer computes its statistics.
PATHS = {
    "one_pass_kernel": ((64, 32, 32, 4), {}, False),          # >= 2**17 values: fused, one pass
    "fused_momentum_none": ((8, 6, 6, 4), {"fused": True, "momentum": None}, False),
    "elementwise": ((4, 8, 8, 16), {"fused": False}, False),
    "channels_first": ((4, 16, 8, 8), {"axis": 1}, False),
    "ghost_batches": ((8, 8, 8, 16), {"virtual_batch_size": 4}, False),
    "renorm": ((4, 8, 8, 16), {"renorm": True, "renorm_momentum": 0.9}, False),
    "masked": ((4, 8, 8, 16), {}, True),
    "rank_2": ((32, 6), {}, False),
    "biased_variance_cumulative": ((32, 6), {"unbiased_variance": False, "momentum": None}, False),
}


def _batches(shape, bad):
    x1 = RNG.normal(3.0, 2.0, shape).astype("float32")
    x2 = RNG.normal(-1.0, 3.0, shape).astype("float32")
    poisoned = x1.copy()
    poisoned.flat[poisoned.size // 2 + 3] = bad  # an unmasked position (the masks hide position 0)
    return x1, poisoned, x2


def _mask(shape, masked):
    if not masked:
        return None
    mask = np.ones(shape[:-1], bool)
    mask.flat[0] = False
    return mask


def _statistics(layer):
    return {w.name: w.numpy().copy() for w in layer.non_trainable_weights}


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_non_finite_batch_leaves_the_moving_statistics(path, bad):
    shape, arguments, masked = PATHS[path]
    x1, poisoned, x2 = _batches(shape, bad)
    mask = _mask(shape, masked)
    layer, twin = (kerasbn.BatchNormalization(momentum=arguments.pop("momentum", 0.9), **arguments)
                   for arguments in (dict(arguments), dict(arguments)))
    for bn in (layer, twin):
        bn(x1, training=True, mask=mask)
    before = _statistics(layer)
    y = layer(poisoned, training=True, mask=mask)
    after_bad = _statistics(layer)
    assert not np.isfinite(y.numpy()).all()  # the step's output says so; the statistics don't change
    assert after_bad.keys() == before.keys()
    for name in before:
        np.testing.assert_array_equal(after_bad[name], before[name], err_msg=name)
    if layer.momentum is None:
        assert float(layer.num_batches.numpy()) == 1.0
    for bn in (layer, twin):
        bn(x2, training=True, mask=mask)
    for name, value in _statistics(twin).items():
        np.testing.assert_array_equal(_statistics(layer)[name], value, err_msg=name)
    # ... and the next finite batch did move them.
    assert not np.array_equal(_statistics(layer)["moving_mean"], before["moving_mean"])


def test_a_finite_batch_with_huge_values_still_updates():
    """The guard is on the statistics, not on the magnitudes: 1e15 is a value like any other."""
    x = RNG.normal(1e15, 1e14, (64, 3)).astype("float32")
    layer = kerasbn.BatchNormalization(momentum=0.0)
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(), x.astype("float64").mean(0), rtol=1e-5)


def _two_replica_step(synchronized, replica_batches):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        layer = kerasbn.BatchNormalization(momentum=0.5, synchronized=synchronized, fused=False)
        layer.build((None, 4))

    @tf.function
    def step(batches):
        def replica_fn(batch):
            return layer(batch, training=True)

        return strategy.run(replica_fn, args=(batches,))

    def value_fn(context):
        return tf.constant(replica_batches[context.replica_id_in_sync_group])

    step(strategy.experimental_distribute_values_from_function(value_fn))
    copies = [strategy.experimental_local_results(w.value) for w in (layer.moving_mean,
                                                                     layer.moving_variance)]
    assert len(copies[0]) == 2
    return [(mean.numpy(), variance.numpy()) for mean, variance in zip(*copies, strict=True)]


def test_synchronized_replicas_skip_together_when_one_sees_a_bad_value():
    good = RNG.normal(3.0, 2.0, (6, 4)).astype("float32")
    bad = good.copy()
    bad[2, 1] = np.nan
    for mean, variance in _two_replica_step(True, [good, bad]):
        np.testing.assert_array_equal(mean, np.zeros(4, "float32"))
        np.testing.assert_array_equal(variance, np.ones(4, "float32"))


def test_unsynchronized_replicas_keep_finite_statistics_when_one_sees_a_bad_value():
    good = RNG.normal(3.0, 2.0, (6, 4)).astype("float32")
    bad = good.copy()
    bad[2, 1] = np.inf
    # The replica with the bad batch keeps (0, 1); the other moves halfway to its batch's
    # statistics; the MEAN aggregation keeps one copy: the average of the two.
    expected_mean = 0.5 * (0.5 * good.mean(0) + 0.0)
    expected_variance = 0.5 * ((0.5 + 0.5 * good.var(0, ddof=1)) + 1.0)
    for mean, variance in _two_replica_step(False, [good, bad]):
        np.testing.assert_allclose(mean, expected_mean, rtol=1e-5)
        np.testing.assert_allclose(variance, expected_variance, rtol=1e-5)


def test_mixed_precision_fit_through_an_overflowing_batch_keeps_finite_statistics():
    """float16's largest value is 65504: the first convolution overflows on one batch. The loss
    scaler skips that step's weight update; BN must skip its statistics too."""
    keras.config.set_dtype_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, use_bias=False),
        kerasbn.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2, dtype="float32"),
    ])
    optimizer = keras.optimizers.SGD(0.01)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x = RNG.normal(0.0, 1.0, (64, 8, 8, 3)).astype("float32")
    y = RNG.randint(0, 2, 64)
    x[20] = 1e5  # the third batch of 8
    bn = model.layers[1]
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for weight in bn.non_trainable_weights + model.trainable_weights:
        assert np.isfinite(np.asarray(weight.numpy(), "float64")).all(), weight.path
    assert float(model.optimizer.dynamic_scale.numpy()) < 32768.0  # the scaler saw the overflow
    predictions = model.predict(x[:8], verbose=0)
    assert np.isfinite(predictions).all()
    # The statistics moved on the 7 finite batches.
    assert not np.array_equal(bn.moving_mean.numpy(), np.zeros(8, "float32"))
