"""kerasbn.convert_sync_batchnorm keeps arguments, weights and outputs."""


import keras
import numpy as np
import pytest

import kerasbn
import kerasbn.model_walk
from tests.helpers import reference


def _trained(model, shape):
    x = np.random.RandomState(0).normal(2, 3, shape).astype("float32")
    for _ in range(3):
        model(x, training=True)
    for layer in model.layers:
        if hasattr(layer, "gamma") and layer.gamma is not None:
            layer.gamma.assign(np.linspace(0.5, 1.5, layer.gamma.shape[0]))
    return x


def _bn_layers(model):
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += _bn_layers(layer)
        elif kerasbn.model_walk.is_batch_normalization(layer):
            found.append(layer)
    return found


def _nested_model():
    inner_in = keras.Input((6, 6, 4))
    inner = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inner_in)
    inner = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-4, name="inner_bn")(inner)
    block = keras.Model(inner_in, inner, name="block")
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    h = kerasbn.BatchNormalization(momentum=None, name="ours")(h)
    a = block(h)
    b = keras.layers.Conv2D(4, 1)(h)
    h = keras.layers.Concatenate()([a, b])
    renorm = {"renorm": True} if reference.keras_has_renorm() else {}
    h = keras.layers.BatchNormalization(axis=-1, center=False, name="renorm_bn", **renorm)(h)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(h))


@pytest.mark.parametrize("make", [
    _nested_model,
    lambda: keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(), keras.layers.Dense(2)]),
])
def test_conversion_keeps_weights_arguments_and_outputs(make):
    model = make()
    shape = (8,) + tuple(model.inputs[0].shape[1:])
    x = _trained(model, shape)
    before = [w.numpy().copy() for w in model.weights]
    converted = kerasbn.convert_sync_batchnorm(model, momentum=0.8)
    originals, replaced = _bn_layers(model), _bn_layers(converted)
    assert len(originals) == len(replaced) >= 1
    for old, new in zip(originals, replaced, strict=True):
        assert type(new) is kerasbn.SyncBatchNormalization
        old_config, new_config = old.get_config(), new.get_config()
        for key in ("epsilon", "center", "scale", "name"):
            assert new_config[key] == old_config[key], key
        assert new_config["renorm"] == old_config.get("renorm", False)
        assert new_config["momentum"] == 0.8
        for w in new.weights:
            match = [v for v in old.weights if v.name == w.name]
            if match:
                np.testing.assert_array_equal(w.numpy(), match[0].numpy())
    np.testing.assert_allclose(converted(x), model(x), rtol=1e-5, atol=1e-5)
    # The original is untouched.
    for b, w in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(b, w.numpy())
    assert not any(isinstance(layer, kerasbn.SyncBatchNormalization) for layer in _bn_layers(model))


def test_keras_layers_keep_their_biased_variance_unless_overridden():
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    assert not kerasbn.convert_sync_batchnorm(model).layers[0].unbiased_variance
    converted = kerasbn.convert_sync_batchnorm(model, unbiased_variance=True, sync_group_size=2)
    assert converted.layers[0].unbiased_variance
    assert converted.layers[0].sync_group_size == 2


def test_subclassed_models_and_non_models_are_refused():
    class Custom(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="subclassed"):
        kerasbn.convert_sync_batchnorm(Custom())
    with pytest.raises(TypeError, match="keras.Model"):
        kerasbn.convert_sync_batchnorm(keras.layers.BatchNormalization())
