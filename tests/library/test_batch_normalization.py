"""kerasbn.BatchNormalization against float64 numpy and Keras' own layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from tests.helpers import reference

EPS = 1e-3
SHAPES_AND_AXES = [
    ((32, 6), -1),
    ((32, 6), 1),
    ((8, 5, 6), -1),
    ((8, 6, 5), 1),
    ((4, 5, 5, 6), -1),
    ((4, 6, 5, 5), 1),
    ((4, 5, 6, 5), 2),
    ((2, 3, 4, 4, 6), -1),
    ((2, 6, 3, 4, 4), 1),
]


def _data(shape, seed=0, loc=3.0, spread=2.0):
    rng = np.random.RandomState(seed)
    return (rng.normal(loc, spread, shape)).astype("float32")


def _keras_twin(**kwargs):
    """Keras' own layer, initialized like :func:`_layer`."""
    return keras.layers.BatchNormalization(
        epsilon=EPS,
        gamma_initializer=keras.initializers.RandomUniform(0.5, 1.5, seed=1),
        beta_initializer=keras.initializers.RandomUniform(-1, 1, seed=2),
        **kwargs,
    )


def _fusable(shape, axis):
    return axis % len(shape) in (1, len(shape) - 1)


FUSABLE_SHAPES_AND_AXES = [(s, a) for s, a in SHAPES_AND_AXES if _fusable(s, a)]


def _layer(axis, fused, **kwargs):
    kwargs.setdefault("gamma_initializer", keras.initializers.RandomUniform(0.5, 1.5, seed=1))
    kwargs.setdefault("beta_initializer", keras.initializers.RandomUniform(-1, 1, seed=2))
    return kerasbn.BatchNormalization(axis=axis, fused=fused, epsilon=EPS, **kwargs)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shape,axis", SHAPES_AND_AXES)
def test_training_forward_backward_and_moving_statistics(shape, axis, fused):
    if fused and not _fusable(shape, axis):
        fused = None  # the kernels take the channel axis first or last only
    x = _data(shape)
    dy = _data(shape, seed=1, loc=0.0, spread=1.0)
    layer = _layer(axis, fused, momentum=0.9)
    layer.build(shape)
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True)
        loss = tf.reduce_sum(y * dy)
    dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])

    y_ref, mu, var = reference.bn_forward(x, axis, gamma, beta, EPS)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    dx_ref, dgamma_ref, dbeta_ref = reference.bn_backward(x, dy, axis, gamma, EPS)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-4, atol=1e-3)

    # Algorithm 2: the variance fed to the average is m/(m-1) * var_B.
    m = x.size // x.shape[axis]
    np.testing.assert_allclose(layer.moving_mean, 0.9 * 0 + 0.1 * mu, rtol=1e-5)
    np.testing.assert_allclose(
        layer.moving_variance, 0.9 * 1 + 0.1 * var * m / (m - 1), rtol=1e-5
    )


@pytest.mark.parametrize("shape,axis", FUSABLE_SHAPES_AND_AXES)
def test_fused_path_equals_general_path(shape, axis):
    x = tf.constant(_data(shape, seed=3, loc=-4.0, spread=0.5))
    dy = tf.constant(_data(shape, seed=4, loc=0.5, spread=1.0))
    fused, general = _layer(axis, True), _layer(axis, False)
    for _ in range(3):
        outputs = []
        for layer in (fused, general):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * dy)
            outputs.append([y, *tape.gradient(loss, [x, layer.gamma, layer.beta])])
        for a, b in zip(*outputs, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(fused.weights, general.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fused(x), general(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,axis", SHAPES_AND_AXES[::2])
def test_inference_uses_moving_statistics(shape, axis):
    layer = _layer(axis, None, momentum=0.5)
    for seed in range(3):
        layer(_data(shape, seed=seed), training=True)
    before = [w.numpy() for w in layer.non_trainable_weights]
    x = _data(shape, seed=9)
    y = layer(x, training=False)
    expected = reference.bn_inference(
        x, axis, layer.gamma.numpy(), layer.beta.numpy(),
        layer.moving_mean.numpy(), layer.moving_variance.numpy(), EPS,
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    for b, w in zip(before, layer.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(b, w.numpy())


def test_trainable_false_means_inference_and_frozen_statistics():
    layer = _layer(-1, None)
    x = _data((16, 4))
    layer(x, training=True)
    layer.trainable = False
    before = layer.moving_variance.numpy().copy()
    y = layer(x, training=True)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), before)
    np.testing.assert_allclose(y, layer(x, training=False), rtol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shape,axis", [((16, 5), -1), ((4, 6, 6, 5), -1), ((4, 5, 6, 6), 1)])
def test_agrees_with_keras_layer_when_variance_is_biased(shape, axis, fused):
    ours = _layer(axis, fused, unbiased_variance=False, momentum=0.8)
    theirs = _keras_twin(axis=axis, momentum=0.8)
    for seed in range(4):
        x = _data(shape, seed=seed)
        np.testing.assert_allclose(
            ours(x, training=True), theirs(x, training=True), rtol=1e-4, atol=1e-4
        )
    np.testing.assert_allclose(ours.moving_mean, theirs.moving_mean, rtol=1e-5)
    np.testing.assert_allclose(ours.moving_variance, theirs.moving_variance, rtol=1e-5)
    x = _data(shape, seed=7)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_momentum_none_is_the_exact_population_average(fused):
    layer = _layer(-1, fused, momentum=None)
    batches = [_data((4, 3, 3, 2), seed=s, loc=s, spread=1 + s) for s in range(5)]
    for b in batches:
        layer(b, training=True)
    flats = [reference.channels_last(b, -1) for b in batches]
    np.testing.assert_allclose(layer.moving_mean, np.mean([f.mean(0) for f in flats], 0), rtol=1e-5)
    np.testing.assert_allclose(
        layer.moving_variance, np.mean([f.var(0, ddof=1) for f in flats], 0), rtol=1e-5
    )
    assert float(layer.num_batches.numpy()) == 5.0


@pytest.mark.parametrize("shape,axis", [((12, 5), -1), ((8, 3, 3, 4), -1), ((8, 4, 3, 3), 1)])
def test_ghost_batches_normalize_each_group(shape, axis):
    k = 4
    x = _data(shape)
    layer = _layer(axis, None, virtual_batch_size=k, momentum=0.0)
    y = layer(x, training=True).numpy()
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    means, variances = [], []
    for g in range(shape[0] // k):
        part = x[g * k:(g + 1) * k]
        y_ref, mu, var = reference.bn_forward(part, axis, gamma, beta, EPS)
        np.testing.assert_allclose(y[g * k:(g + 1) * k], y_ref, rtol=1e-4, atol=1e-4)
        m = part.size // part.shape[axis]
        means.append(mu)
        variances.append(var * m / (m - 1))
    # momentum 0: the moving statistics are exactly this batch's ghost averages.
    np.testing.assert_allclose(layer.moving_mean, np.mean(means, 0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance, np.mean(variances, 0), rtol=1e-5)


def test_ghost_batch_that_does_not_divide_the_batch_is_a_clear_error():
    layer = kerasbn.BatchNormalization(virtual_batch_size=3)
    with pytest.raises(ValueError, match="virtual_batch_size.*divide"):
        layer(np.zeros((8, 2), "float32"), training=True)
    fn = tf.function(lambda x: layer(x, training=True),
                     input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="virtual_batch_size"):
        fn(np.zeros((8, 2), "float32"))
    assert fn(np.ones((6, 2), "float32")).shape == (6, 2)


needs_keras_renorm = pytest.mark.skipif(
    not reference.keras_has_renorm(), reason="this Keras has no renorm to compare with")


@needs_keras_renorm
def test_batch_renormalization_matches_keras():
    clipping = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}
    ours = _layer(-1, None, renorm=True, renorm_clipping=clipping, renorm_momentum=0.5)
    theirs = _keras_twin(renorm=True, renorm_clipping=clipping, renorm_momentum=0.5)
    for seed in range(4):
        x = _data((16, 3), seed=seed, loc=seed, spread=1 + seed)
        np.testing.assert_allclose(
            ours(x, training=True), theirs(x, training=True), rtol=1e-4, atol=1e-4
        )
    np.testing.assert_allclose(ours.renorm_mean, theirs.renorm_mean, rtol=1e-5)
    np.testing.assert_allclose(ours.renorm_stddev, theirs.renorm_stddev, rtol=1e-5)


@needs_keras_renorm
@pytest.mark.parametrize("fused", [True, False])
def test_keras_renorm_model_weights_load_into_the_kerasbn_model(fused):
    """Same architecture, Keras' BN vs kerasbn's: Keras' trained weights (moving_stddev,
    renorm_mean, renorm_stddev included) load as they are and give the same outputs."""

    def build(bn):
        inputs = keras.Input((6, 6, 3))
        h = keras.layers.Conv2D(5, 3, use_bias=False)(inputs)
        h = bn(momentum=0.8, renorm=True, renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
               renorm_momentum=0.7)(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        return keras.Model(inputs, keras.layers.Dense(2)(h))

    keras.utils.set_random_seed(3)
    theirs = build(keras.layers.BatchNormalization)
    ours = build(lambda **k: kerasbn.BatchNormalization(unbiased_variance=False, fused=fused, **k))
    theirs.compile("sgd", "mse")
    x = _data((16, 6, 6, 3), loc=2.0, spread=3.0)
    theirs.fit(x, np.ones((16, 2), "float32"), batch_size=8, epochs=2, verbose=0)
    assert [w.path.split("/")[-1] for w in ours.layers[2].weights] == \
        [w.path.split("/")[-1] for w in theirs.layers[2].weights]
    ours.set_weights(theirs.get_weights())
    x = tf.constant(_data((8, 6, 6, 3), seed=7, loc=1.0, spread=2.0))
    np.testing.assert_allclose(ours(x, training=False), theirs(x, training=False), rtol=1e-5, atol=1e-5)
    for _ in range(3):
        np.testing.assert_allclose(ours(x, training=True), theirs(x, training=True),
                                   rtol=1e-4, atol=1e-4)
    for a, b in zip(ours.layers[2].weights, theirs.layers[2].weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours(x, training=False), theirs(x, training=False), rtol=1e-5, atol=1e-5)


def test_renorm_corrections_are_clipped_against_reference():
    layer = _layer(-1, None, renorm=True, renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 1.0})
    x = _data((32, 3), loc=10.0, spread=5.0)  # far from the initial renorm stats (0, 1)
    y = layer(x, training=True).numpy()
    _, mu, var = reference.bn_forward(x, -1, 1.0, 0.0, EPS)
    sigma = np.sqrt(var + EPS)
    r = np.clip(sigma / 1.0, 0.5, 2.0)
    d = np.clip((mu - 0.0) / 1.0, -1.0, 1.0)
    x_hat = (x - mu) / sigma
    expected = layer.gamma.numpy() * (x_hat * r + d) + layer.beta.numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mask_shape,kwargs", [
    ((4, 7), {}),
    ((4, 1), {}),  # broadcast over time steps as well as channels
    ((4, 7), {"virtual_batch_size": 4}),
], ids=["sequence", "broadcast", "ghost"])
def test_mask_leaves_positions_out_of_the_statistics(fused, mask_shape, kwargs):
    if kwargs and fused:
        pytest.skip("ghost batches take the element-wise path")
    x = _data((4, 7, 3))
    mask = np.random.RandomState(5).rand(*mask_shape) > 0.4
    mask[0] = True
    full_mask = np.broadcast_to(mask, (4, 7))
    x_poisoned = x.copy()
    x_poisoned[~full_mask] = np.nan  # masked positions must not leak into anything
    layer = _layer(-1, fused, momentum=0.0, **kwargs)
    y = layer(x_poisoned, training=True, mask=mask).numpy()
    mask = full_mask
    kept = x[mask]  # (n, 3)
    y_ref, mu, var = reference.bn_forward(kept, -1, layer.gamma.numpy(), layer.beta.numpy(), EPS)
    np.testing.assert_allclose(y[mask], y_ref, rtol=1e-4, atol=1e-4)
    n = kept.shape[0]
    np.testing.assert_allclose(layer.moving_mean, mu, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance, var * n / (n - 1), rtol=1e-5)


def test_mask_propagates_through_a_model():
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    h = kerasbn.BatchNormalization(momentum=0.0)(h)
    model = keras.Model(inputs, h)
    tokens = np.array([[1, 2, 0, 0, 0], [3, 4, 5, 0, 0]])
    model(tokens, training=True)
    emb = model.layers[1](tokens).numpy()[tokens > 0]
    np.testing.assert_allclose(model.layers[2].moving_mean, emb.mean(0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16", "float16", "bfloat16"])
@pytest.mark.parametrize("fused", [True, False])
def test_half_precision_keeps_float32_statistics_and_does_not_overflow(policy, fused):
    keras.config.set_dtype_policy(policy)
    layer = kerasbn.BatchNormalization(fused=fused, momentum=0.0)
    # Activations around 1e3: their squares overflow float16 (max 65504).
    x = _data((8, 4, 4, 3), loc=1000.0, spread=300.0)
    y = layer(x, training=True)
    half = "bfloat16" if "bfloat16" in policy else "float16"
    assert y.dtype == half
    for w in (layer.moving_mean, layer.moving_variance):
        assert w.dtype == "float32"
    flat = reference.channels_last(x.astype(half).astype("float64"), -1)
    np.testing.assert_allclose(layer.moving_mean, flat.mean(0), rtol=1e-3)
    np.testing.assert_allclose(layer.moving_variance, flat.var(0, ddof=1), rtol=1e-2)
    y = np.asarray(y, np.float32)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(reference.channels_last(y, -1).std(0), 1.0, atol=0.02)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shape", [(0, 4), (0, 3, 3, 4)])
def test_empty_batch_leaves_statistics_unchanged_and_finite(shape, fused):
    layer = _layer(-1, fused)
    layer(_data((8,) + shape[1:]), training=True)
    before = [w.numpy().copy() for w in layer.weights]
    y = layer(np.zeros(shape, "float32"), training=True)
    assert y.shape == shape
    for b, w in zip(before, layer.weights, strict=True):
        np.testing.assert_array_equal(b, w.numpy())


@pytest.mark.parametrize("fused", [True, False])
def test_one_value_per_channel_stays_finite(fused):
    layer = _layer(-1, fused)
    x = _data((1, 4))
    y = layer(x, training=True).numpy()
    np.testing.assert_allclose(y[0], layer.beta.numpy(), atol=1e-6)  # x - mean = 0
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(4))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.ones(4))
    biased = _layer(-1, fused, unbiased_variance=False, momentum=0.0)
    biased(x, training=True)
    np.testing.assert_allclose(biased.moving_mean.numpy(), x[0], rtol=1e-6)
    np.testing.assert_array_equal(biased.moving_variance.numpy(), np.zeros(4))


def test_float64_inputs_use_the_general_path():
    keras.config.set_dtype_policy("float64")
    layer = _layer(-1, None)
    x = _data((16, 3)).astype("float64")
    y = layer(x, training=True)
    assert y.dtype == "float64"
    y_ref, _, _ = reference.bn_forward(x, -1, layer.gamma.numpy(), layer.beta.numpy(), EPS)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_tf_function_and_xla_match_eager(fused):
    x = _data((4, 5, 5, 3))
    eager, compiled = _layer(-1, fused), _layer(-1, fused)

    def step(layer, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y * tf.range(3, dtype=tf.float32))
        return y, tape.gradient(loss, [x] + layer.trainable_weights)

    xla = tf.function(lambda x: step(compiled, x), jit_compile=True)
    x = tf.constant(x)
    for _ in range(2):
        ye, ge = step(eager, x)
        yx, gx = xla(x)
        np.testing.assert_allclose(ye, yx, rtol=1e-4, atol=1e-4)
        for a, b in zip(ge, gx, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(eager.moving_variance, compiled.moving_variance, rtol=1e-5)


def _small_model(**bn_kwargs):
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    h = kerasbn.BatchNormalization(**bn_kwargs)(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(2)(h)
    return keras.Model(inputs, outputs)


def test_save_and_load_round_trip_without_custom_objects(tmp_path):
    model = _small_model(momentum=None, virtual_batch_size=2, unbiased_variance=True)
    x = _data((4, 6, 6, 3))
    model(x, training=True)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    bn = loaded.layers[2]
    assert isinstance(bn, kerasbn.BatchNormalization)
    assert bn.get_config() == model.layers[2].get_config()
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)
    np.testing.assert_array_equal(bn.num_batches.numpy(), 1.0)


def test_config_round_trips_every_argument():
    layer = kerasbn.BatchNormalization(
        axis=1, momentum=0.9, epsilon=1e-5, center=False, scale=True,
        gamma_regularizer="l2", beta_constraint="non_neg", unbiased_variance=False,
        renorm=True, renorm_clipping={"rmax": 3.0}, renorm_momentum=0.9, fused=False,
    )
    clone = kerasbn.BatchNormalization.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    sync = kerasbn.SyncBatchNormalization(sync_group_size=2)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sync))
    assert type(restored) is kerasbn.SyncBatchNormalization
    assert restored.sync_group_size == 2 and restored.synchronized


def test_export_serves_the_inference_output(tmp_path):
    model = _small_model()
    for seed in range(3):
        model(_data((8, 6, 6, 3), seed=seed), training=True)
    x = _data((2, 6, 6, 3), seed=11)
    model.export(str(tmp_path / "served"))
    served = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_allclose(served.serve(x), model(x, training=False), rtol=1e-5, atol=1e-6)


def test_fit_updates_moving_statistics_towards_the_data():
    # The weights stay (learning rate 0): the moving mean averages batch means of fixed features.
    # (With the weights moving it lags them, by more than the tolerance for some initializations.)
    keras.utils.set_random_seed(0)
    model = _small_model(momentum=0.5)
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=False)
    x = _data((64, 6, 6, 3), loc=2.0)
    model.fit(x, np.zeros((64, 2)), batch_size=16, epochs=2, verbose=0)
    conv = keras.Model(model.inputs, model.layers[1].output)
    features = reference.channels_last(conv(x).numpy(), -1)
    np.testing.assert_allclose(model.layers[2].moving_mean, features.mean(0), rtol=0.2, atol=0.05)


@pytest.mark.parametrize("ghost", [None, 4])
def test_masked_and_ghost_gradients_match_autodiff_of_the_naive_formula(ghost):
    """Independent reference: float64 TF autodiff through the textbook formula."""
    x = _data((8, 5, 3))
    mask = np.random.RandomState(5).rand(8, 5) > 0.3
    dy = _data((8, 5, 3), seed=2, loc=0.0, spread=1.0)
    layer = _layer(-1, None, virtual_batch_size=ghost)
    layer.build(x.shape)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(layer(xt, training=True, mask=mask) * dy)
    grads = tape.gradient(loss, [xt, layer.gamma, layer.beta])

    x64 = tf.constant(x, tf.float64)
    gamma = tf.constant(layer.gamma.numpy(), tf.float64)
    beta = tf.constant(layer.beta.numpy(), tf.float64)
    with tf.GradientTape() as tape:
        tape.watch([x64, gamma, beta])
        k = ghost or 8
        xs = tf.reshape(x64, (-1, k, 5, 3))
        w = tf.reshape(tf.cast(mask, tf.float64), (-1, k, 5, 1))
        n = tf.reduce_sum(w, (1, 2), keepdims=True)
        mu = tf.reduce_sum(xs * w, (1, 2), keepdims=True) / n
        var = tf.reduce_sum(w * (xs - mu) ** 2, (1, 2), keepdims=True) / n
        y = (xs - mu) / tf.sqrt(var + EPS) * gamma + beta
        loss = tf.reduce_sum(tf.reshape(y, x.shape) * dy)
    expected = tape.gradient(loss, [x64, gamma, beta])
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@needs_keras_renorm
def test_renorm_gradients_match_keras():
    clipping = {"rmax": 1.2, "rmin": 0.8, "dmax": 0.3}
    ours = _layer(-1, None, renorm=True, renorm_clipping=clipping, renorm_momentum=0.5)
    theirs = _keras_twin(renorm=True, renorm_clipping=clipping, renorm_momentum=0.5)
    x = tf.constant(_data((16, 2, 3), loc=2.0, spread=3.0))
    for layer in (ours, theirs):
        layer(x, training=True)  # move the renorm statistics off their initial values
    results = []
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) ** 3)
        results.append(tape.gradient(loss, [x, layer.gamma, layer.beta]))
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("fused", [True, False])
def test_large_channel_mean_against_small_spread(fused):
    """Mean 1e4, std 1, 200k values per channel: the fused kernel alone is off 56x."""
    x = (np.random.RandomState(0).normal(0, 1, (64, 56, 56, 4)) + 1e4).astype("float32")
    layer = kerasbn.BatchNormalization(fused=fused, momentum=0.0)
    y = layer(x, training=True).numpy()
    flat = reference.channels_last(x, -1)
    np.testing.assert_allclose(layer.moving_variance, flat.var(0, ddof=1), rtol=1e-4)
    np.testing.assert_allclose(reference.channels_last(y, -1).std(0), 1.0, rtol=1e-3)


@pytest.mark.parametrize("split", [False, True], ids=["one_pass", "split"])
@pytest.mark.parametrize("shape,ratio_times_count", [
    ((64, 56, 56, 4), 9e5), ((64, 56, 56, 4), 1e8), ((256, 64), 9e5), ((256, 64), 1e9),
    ((16, 16, 16, 8), 1e9),
])
def test_statistics_keep_precision_either_side_of_the_cpu_shift_threshold(
        shape, ratio_times_count, split):
    """On CPU the kernel reads unshifted data while count * |mean| / spread <= 1e6
    (kerasbn.moments.UNSHIFTED_LIMIT); beyond that it would lose the variance
    (1e-3 to 5e-2 at 1e8), so the shift must be made. Std 1, mean from the ratio."""
    count = np.prod(shape[:-1])
    x = (np.random.RandomState(0).normal(0, 1, shape) + ratio_times_count / count).astype("float32")
    # renorm takes the split path: the statistics kernel, then normalization.
    layer = kerasbn.BatchNormalization(fused=True, momentum=0.0, renorm=split)
    y = layer(x, training=True).numpy()
    flat = reference.channels_last(x.astype(np.float64), -1)
    # The mean to 1e-4 of the spread, or to the float32 spacing at that mean.
    spacing = np.spacing(flat.mean(0).astype(np.float32)).max()
    np.testing.assert_allclose(layer.moving_mean, flat.mean(0), rtol=0, atol=1e-4 + spacing)
    np.testing.assert_allclose(layer.moving_variance, flat.var(0, ddof=1), rtol=1e-4)
    if not split:
        np.testing.assert_allclose(reference.channels_last(y, -1).std(0), 1.0, rtol=1e-3)


def test_the_shift_pass_is_skipped_on_cpu_only_for_data_that_does_not_need_it():
    from kerasbn.kernels import tf_moments as moments

    def needed(mean, spread, count):
        return bool(moments.shift_needed(tf.constant(mean), tf.constant(spread), count))

    assert not needed([0.5, -2.0], [2.0, 1.0], 50176.0)  # centred: no pass
    assert needed([0.5, 40.0], [2.0, 1.0], 50176.0)  # one channel at 2e6
    assert needed([0.0, 3.0], [0.0, 0.0], 10.0)  # no spread in the sample
    assert not needed([0.0], [0.0], 0.0)  # empty batch

    def graph_ops(jit_compile):
        layer = kerasbn.BatchNormalization(fused=True)
        step = tf.function(lambda x: layer(x, training=True), jit_compile=jit_compile)
        graph = step.get_concrete_function(tf.TensorSpec((4, 5, 5, 6))).graph
        return {op.type for op in graph.get_operations()}

    # On CPU a cond decides; under XLA the subtraction is made (it fuses into the
    # kernel's reductions there, and XLA's E[x^2] - E[x]^2 needs it at any mean).
    assert graph_ops(False) & {"If", "StatelessIf"}
    ops_under_xla = graph_ops(True)
    assert not ops_under_xla & {"If", "StatelessIf"} and "Sub" in ops_under_xla


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mean", [10.0, 1e4])
def test_xla_keeps_precision_at_large_channel_mean(fused, mean):
    """XLA expands fused batch norm into E[x^2] - E[x]^2 (tensorflow/tensorflow#118701):
    at mean 1e4, std 1 that alone gives negative variances, and at mean 10 it is
    already off 1e-3 (a mean the CPU kernel takes unshifted)."""
    x = tf.constant((np.random.RandomState(0).normal(0, 1, (32, 16, 16, 4)) + mean).astype("float32"))
    layers = {jit: kerasbn.BatchNormalization(fused=fused, momentum=0.0) for jit in (False, True)}

    def step(layer, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * tf.range(1.0, 5.0))
        return y, tape.gradient(loss, x)

    results = {jit: tf.function(lambda x, jit=jit: step(layers[jit], x), jit_compile=jit)(x)
               for jit in (False, True)}
    flat = reference.channels_last(x.numpy().astype(np.float64), -1)
    dy = np.broadcast_to(np.arange(1.0, 5.0), x.shape)
    dx_ref, _, _ = reference.bn_backward(x.numpy(), dy, -1, np.ones(4), EPS)
    for jit, (y, dx) in results.items():
        np.testing.assert_allclose(layers[jit].moving_variance, flat.var(0, ddof=1), rtol=1e-4)
        np.testing.assert_allclose(reference.channels_last(y.numpy(), -1).std(0), 1.0, rtol=1e-3)
        # float32 holds a mean of 1e4 to 5e-4 of a unit spread; dx's terms are of size 4.
        np.testing.assert_allclose(dx, dx_ref, atol=1e-2)
    np.testing.assert_allclose(results[True][0], results[False][0], atol=2e-3)
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=1e-3, atol=1e-3)


def _fused_kernel_calls(layer, x, **call_kwargs):
    """``{(op type, is_training): count}`` of the fused kernels in one traced training step."""

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, **call_kwargs)
        return tape.gradient(y, [x] + layer.trainable_weights, output_gradients=tf.ones_like(y))

    graph = step.get_concrete_function(tf.TensorSpec(x.shape, x.dtype)).graph
    calls = {}
    for op in graph.get_operations():
        if op.type.startswith("FusedBatchNorm"):
            key = (op.type, op.get_attr("is_training"))
            calls[key] = calls.get(key, 0) + 1
    return calls


ONE_PASS_CALLS = {("FusedBatchNormV3", True): 1, ("FusedBatchNormGradV3", True): 1}


@pytest.mark.parametrize("kwargs,shape", [
    ({}, (4, 5, 5, 6)),
    ({"axis": 1}, (4, 6, 5, 5)),
    ({}, (32, 6)),
    ({}, (2, 3, 4, 4, 6)),
    ({"momentum": None}, (4, 5, 5, 6)),
    ({"unbiased_variance": False}, (4, 5, 5, 6)),
    ({"center": False, "scale": False}, (4, 5, 5, 6)),
])
def test_local_training_is_one_fused_call_forward_and_one_backward(kwargs, shape):
    layer = kerasbn.BatchNormalization(fused=True, **kwargs)
    assert _fused_kernel_calls(layer, tf.zeros(shape)) == ONE_PASS_CALLS


def test_mixed_precision_takes_the_one_pass_kernel_in_half_precision():
    keras.config.set_dtype_policy("mixed_float16")
    layer = kerasbn.BatchNormalization(fused=True)
    assert _fused_kernel_calls(layer, tf.zeros((4, 5, 5, 6), "float16")) == ONE_PASS_CALLS


def test_masks_and_renorm_take_the_split_fused_path():
    # Their statistics (masked; renorm's corrections) must exist before normalizing:
    # statistics, normalization and the gradient with fixed statistics, each a call.
    split = {("FusedBatchNormV3", True): 1, ("FusedBatchNormV3", False): 2,
             ("FusedBatchNormGradV3", False): 1}
    x = tf.zeros((4, 5, 5, 6))
    assert _fused_kernel_calls(kerasbn.BatchNormalization(fused=True, renorm=True), x) == split
    masked = _fused_kernel_calls(kerasbn.BatchNormalization(fused=True), x,
                                 mask=tf.ones((4, 5, 5), tf.bool))
    assert masked == {("FusedBatchNormV3", False): 2, ("FusedBatchNormGradV3", False): 1}
    assert _fused_kernel_calls(kerasbn.BatchNormalization(virtual_batch_size=2), x) == {}
    assert _fused_kernel_calls(kerasbn.BatchNormalization(fused=False), x) == {}
