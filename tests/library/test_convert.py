"""kerasbn.convert_sync_batchnorm keeps arguments, weights and outputs: on the models of
tests/helpers/zoo_models.py (collected again on JAX: tests/jax/test_tools.py) and on two built here,
which mix Keras' and kerasbn's layers and take new arguments."""


import keras
import numpy as np
import pytest

import kerasbn
from kerasbn import model_walk
from tests.helpers import reference, zoo_models


def _keras_and_kerasbn_nested():
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
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(h)), 3


def _sequential():
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                             keras.layers.BatchNormalization(), keras.layers.Dense(2)]), 1


MODELS = {**zoo_models.every_model(), "keras_and_kerasbn_nested": _keras_and_kerasbn_nested,
          "sequential": _sequential}
ARGUMENTS = {"keras_and_kerasbn_nested": {"momentum": 0.8}, "sequential": {"momentum": 0.8}}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_conversion_is_complete_and_keeps_arguments_weights_and_outputs(name):
    model, count = zoo_models.built(MODELS[name])
    arguments = ARGUMENTS.get(name, {})
    x = zoo_models.input_batch(model)
    before = [w.numpy().copy() for w in model.weights]
    converted = kerasbn.convert_sync_batchnorm(model, **arguments)
    originals, replaced = zoo_models.bn_layers(model), zoo_models.bn_layers(converted)
    assert len(originals) == len(replaced) == count
    assert model_walk.batch_norm_layers(converted) == replaced  # kerasbn's own walk: the same layers
    for old, new in zip(originals, replaced, strict=True):
        assert type(new) is kerasbn.SyncBatchNormalization, new.name
        old_config, new_config = old.get_config(), new.get_config()
        # A BN that a custom layer's code calls is rebuilt by that layer, named as its config says
        # (keras-hub's blocks name theirs anew on any from_config); the graph's keep their names.
        named = ("name",) if old._inbound_nodes else ()
        for key in (*named, "epsilon", "momentum", "center", "scale", "axis"):
            assert new_config[key] == arguments.get(key, old_config[key]), (new.name, key)
        assert new_config["renorm"] == old_config.get("renorm", False), new.name
        # Every weight carries over, but momentum=None's batch count once a momentum is given.
        kept = [w for w in old.weights if w.name != "num_batches" or new.momentum is None]
        assert [w.name for w in new.weights] == [w.name for w in kept], new.name
        for a, b in zip(new.weights, kept, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for b, w in zip(before, model.weights, strict=True):  # the original is untouched
        np.testing.assert_array_equal(b, w.numpy())
    assert not any(isinstance(bn, kerasbn.SyncBatchNormalization) for bn in originals)
    np.testing.assert_allclose(converted(x), model(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(converted(x, training=True), model(x, training=True), rtol=1e-4, atol=1e-4)


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
