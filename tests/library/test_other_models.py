"""Models kerasbn did not build: graphs with `keras.ops` nodes, BN inside custom layers and
nested models, keras-hub's backbones. Every tool walks them, or says exactly why not (their
conversion: tests/library/test_convert.py)."""

import sys
import warnings

import keras
import numpy as np
import pytest

import kerasbn
from tests.helpers import forkserver, zoo_models
from tests.helpers.distributed import ROOT, _env

ALL = zoo_models.every_model()


def _build(name):
    return zoo_models.built(ALL[name])


def test_bn_that_cannot_be_converted_is_refused_by_name():
    inputs = keras.Input(zoo_models.SHAPE)
    h = zoo_models.BlockWithOwnBatchNorm(name="holder")(zoo_models._stem(inputs))
    model = keras.Model(inputs, zoo_models._head(h))
    with pytest.raises(ValueError, match=r"1 of 2 BN layers.*holder/own_bn.*OwnBatchNorm"):
        kerasbn.convert_sync_batchnorm(model)


def test_a_custom_layer_without_a_config_is_refused_by_name():
    class NoConfig(keras.layers.Layer):
        def __init__(self, activation):
            super().__init__(name="no_config")
            self.activation = activation
            self.bn = keras.layers.BatchNormalization()

        def call(self, x):
            return self.activation(self.bn(x))

    inputs = keras.Input((3,))
    model = keras.Model(inputs, NoConfig(lambda t: t * 2)(inputs))
    with pytest.raises(ValueError, match="no_config.*cannot be rebuilt from its config"):
        kerasbn.convert_sync_batchnorm(model)


@pytest.mark.slow
def test_converted_models_on_two_replicas_match_the_global_batch():
    import tensorflow as tf

    from tests.helpers import convert_worker

    # The two logical CPUs tests/conftest.py configured. In-process, other tests' strategies over
    # the same devices may have used TensorFlow's collective instance keys already (a second
    # strategy restarts them: "Shape mismatch in the collective instance"), so this one reduces
    # through one device; tests/library/test_sync.py covers the collective transport in fresh processes.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    result = convert_worker.measure(strategy)
    measured = [name for name in ALL if f"{name}_sync" in result]
    assert set(zoo_models.SHAPES) <= set(measured) and len(measured) >= len(zoo_models.SHAPES)
    for name in measured:
        # Measured: 1e-7..5e-6 of the output's scale (float32 rounding of the merged statistics).
        assert result[f"{name}_sync"] < 1e-4, (name, result[f"{name}_sync"])
        assert result[f"{name}_moving"] < 1e-5, (name, result[f"{name}_moving"])
        # The control: left per-replica, the same model differs at the scale of its output.
        assert result[f"{name}_unsync"] > 1e-2, (name, result[f"{name}_unsync"])


@pytest.mark.parametrize("name", sorted(ALL))
def test_folding_keeps_outputs_and_names_what_it_cannot_fold(name):
    model, count = _build(name)
    x = zoo_models.input_batch(model)
    folded = kerasbn.fold_batch_norm(model)
    np.testing.assert_allclose(folded(x), model(x), rtol=1e-4, atol=1e-5)
    left = kerasbn.folding.unfoldable(model)
    in_code = {bn.name for bn in zoo_models.bn_layers(model) if not bn._inbound_nodes}
    for bn_name in in_code:
        assert any(entry.startswith(f"{bn_name} (it is called inside a layer's own code") for entry in left)
    assert len(zoo_models.bn_layers(folded)) == len(left)
    if name in zoo_models.SHAPES:
        assert len(left) < count  # the stem BN after a convolution folds


# keras-hub's MobileNetV3 stands for the backbones (each export is a trace and a save; the folding
# and conversion of all three are tested above).
EXPORTED = ["pad", "custom_layer", "nested_model"] + [name for name in zoo_models.hub_backbones()
                                                      if name == "mobilenet_v3"]


def test_export_serves_the_same_outputs_in_a_fresh_process(tmp_path):
    # Every model exported here, all served by one fresh process (its start-up paid once).
    expected = {}
    for name in EXPORTED:
        model, _ = _build(name)
        x = zoo_models.input_batch(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kerasbn.export_for_serving(model, tmp_path / name / "1")
        np.save(tmp_path / name / "x.npy", x)
        expected[name] = np.asarray(model(x))
    script = ("import sys, numpy as np, tensorflow as tf\n"
              "for d in sys.argv[1:]:\n"
              "    served = tf.saved_model.load(d + '/1')  # held: its variables die with it\n"
              "    np.save(d + '/y.npy', served.serve(np.load(d + '/x.npy')).numpy())\n")
    forkserver.run([sys.executable, "-c", script, *(str(tmp_path / name) for name in EXPORTED)],
                   check=True, env=_env(), cwd=ROOT, timeout=300)
    for name in EXPORTED:
        np.testing.assert_allclose(np.load(tmp_path / name / "y.npy"), expected[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)


@pytest.mark.parametrize("name", sorted(zoo_models.SHAPES))
def test_recalibration_covers_every_bn_with_algorithm_2(name):
    model, count = _build(name)
    batches = [zoo_models.input_batch(model, seed=s) for s in (3, 4)]
    kerasbn.recalibrate_statistics(model, batches, verbose=0)
    bns = zoo_models.bn_layers(model)
    assert len(bns) == count
    seen = {id(bn): [] for bn in bns}

    def spy(bn):
        original = type(bn).call

        def call(inputs, training=None, mask=None):
            seen[id(bn)].append(np.asarray(inputs, np.float64))
            return original(bn, inputs, training=True)
        return call

    population = {id(bn): (bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()) for bn in bns}
    for bn in bns:
        bn.call = spy(bn)
    try:
        for batch in batches:
            model(batch, training=False)
    finally:
        for bn in bns:
            del bn.call
    for bn in bns:
        inputs = seen[id(bn)]
        assert len(inputs) == len(batches), bn.name
        axes = tuple(range(inputs[0].ndim - 1))
        m = np.prod([inputs[0].shape[a] for a in axes])
        mean = np.mean([v.mean(axes) for v in inputs], axis=0)
        variance = np.mean([v.var(axes) for v in inputs], axis=0) * m / (m - 1)
        np.testing.assert_allclose(population[id(bn)][0], mean, rtol=1e-4, atol=1e-5, err_msg=bn.name)
        np.testing.assert_allclose(population[id(bn)][1], variance, rtol=1e-4, atol=1e-5, err_msg=bn.name)


def _assert_round_trip(model, count, tmp_path, **expected):
    """``model`` saved and loaded twice, with no scope open: every BN is kerasbn's again, with
    the arguments ``expected``, the same weights and the same outputs."""
    x = zoo_models.input_batch(model)
    layer_type = kerasbn.SyncBatchNormalization if expected.get("synchronized") else kerasbn.BatchNormalization
    current = model
    for round_trip in ("first", "second"):
        current.save(tmp_path / f"{round_trip}.keras")
        loaded = keras.saving.load_model(tmp_path / f"{round_trip}.keras")
        bns = zoo_models.bn_layers(loaded)
        assert [type(bn) for bn in bns] == [layer_type] * count, round_trip
        for name, value in expected.items():
            assert {getattr(bn, name) for bn in bns} == {value}, (round_trip, name)
        assert len(loaded.weights) == len(model.weights)
        for a, b in zip(loaded.weights, model.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
        for training in (False, True):
            np.testing.assert_allclose(loaded(x, training=training), model(x, training=training),
                                       rtol=1e-6, atol=1e-6)
        current = loaded
    return loaded


@pytest.mark.parametrize("name", sorted(ALL))
def test_converted_models_load_back_converted_with_no_scope(name, tmp_path):
    model, count = _build(name)
    converted = kerasbn.convert_sync_batchnorm(model, momentum=0.9)
    loaded = _assert_round_trip(converted, count, tmp_path, synchronized=True, momentum=0.9)
    # Converting the loaded model again takes the new arguments, not the recorded ones.
    again = kerasbn.convert_sync_batchnorm(loaded, sync_group_size=2)
    assert {bn.sync_group_size for bn in zoo_models.bn_layers(again)} == {2}


@pytest.mark.parametrize("name", ["custom_layer", "nested_model"] + sorted(zoo_models.hub_backbones()))
def test_models_built_in_the_scope_load_back_as_built(name, tmp_path):
    keras.utils.set_random_seed(0)
    with kerasbn.batch_norm_scope(synchronized=True, momentum=0.8,
                                  gamma_regularizer=keras.regularizers.L2(1e-4)):
        model, count = ALL[name]()
    model = zoo_models.trained(model)
    loaded = _assert_round_trip(model, count, tmp_path, synchronized=True, momentum=0.8)
    assert all(isinstance(bn.gamma_regularizer, keras.regularizers.L2) for bn in zoo_models.bn_layers(loaded))


def test_a_marked_layer_is_still_its_own_class():
    with kerasbn.batch_norm_scope(synchronized=True):
        block = zoo_models.ResidualBlock(4, name="block")
        block.build((None, 6, 6, 4))
    plain = zoo_models.ResidualBlock(4)
    assert isinstance(block, zoo_models.ResidualBlock)
    assert type(block).__name__ == "ResidualBlock" and type(plain) is zoo_models.ResidualBlock
    assert keras.saving.serialize_keras_object(block)["registered_name"] == "kerasbn>InBatchNormScope"
    assert keras.saving.serialize_keras_object(plain)["registered_name"] == "kerasbn_tests>ResidualBlock"


def test_a_scope_builds_kerasbn_layers_everywhere_and_only_inside_it():
    with kerasbn.batch_norm_scope(momentum=0.5):
        model, count = zoo_models.nested_model()
        own = zoo_models.OwnBatchNorm()
        from keras.src.layers.normalization.batch_normalization import (
            BatchNormalization as imported,
        )
        direct = imported()
    bns = zoo_models.bn_layers(model)
    assert [type(bn) for bn in bns] == [kerasbn.BatchNormalization] * count
    assert all(bn.momentum == 0.5 and not bn.unbiased_variance and not bn.synchronized for bn in bns)
    assert type(own) is zoo_models.OwnBatchNorm  # subclasses keep their class
    assert type(direct) is kerasbn.BatchNormalization  # the class itself, however imported
    assert type(keras.layers.BatchNormalization()) is keras.layers.BatchNormalization
    assert not kerasbn.BatchNormalization().synchronized
    with kerasbn.batch_norm_scope(synchronized=True, sync_group_size=2):
        ours = kerasbn.BatchNormalization(momentum=0.8)
        inner = keras.layers.BatchNormalization()
    assert ours.synchronized and ours.sync_group_size == 2 and ours.momentum == 0.8
    assert type(inner) is kerasbn.SyncBatchNormalization and inner.sync_group_size == 2


def test_a_scope_patches_nothing_but_keras_bn_constructor_and_is_its_threads_own():
    import threading

    layer_new, kerasbn_init = keras.layers.Layer.__dict__.get("__new__"), kerasbn.BatchNormalization.__init__
    built_elsewhere = {}
    with kerasbn.batch_norm_scope(synchronized=True):
        assert keras.layers.Layer.__dict__.get("__new__") is layer_new  # no hook on every layer
        assert kerasbn.BatchNormalization.__init__ is kerasbn_init  # kerasbn reads the scope itself
        assert "__new__" in keras.layers.BatchNormalization.__dict__  # the one constructor intercepted
        other = threading.Thread(target=lambda: built_elsewhere.update(bn=keras.layers.BatchNormalization(),
                                                                        ours=kerasbn.BatchNormalization()))
        other.start()
        other.join()
        here = keras.layers.BatchNormalization()
    assert type(here) is kerasbn.SyncBatchNormalization
    assert type(built_elsewhere["bn"]) is keras.layers.BatchNormalization  # another thread: no scope
    assert not built_elsewhere["ours"].synchronized
    assert "__new__" not in keras.layers.BatchNormalization.__dict__  # restored when the last scope closes


def test_a_model_built_in_the_scope_computes_what_the_keras_one_does():
    keras.utils.set_random_seed(0)
    reference, _ = zoo_models.custom_layer()
    keras.utils.set_random_seed(0)
    with kerasbn.batch_norm_scope():
        ours, _ = zoo_models.custom_layer()
    for a, b in zip(ours.weights, reference.weights, strict=True):
        a.assign(b)
    x = zoo_models.input_batch(reference)
    for training in (True, False):
        np.testing.assert_allclose(ours(x, training=training), reference(x, training=training),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(zoo_models.bn_layers(ours)[0].moving_variance.numpy(),
                               zoo_models.bn_layers(reference)[0].moving_variance.numpy(), rtol=1e-5)


def test_scope_arguments_are_checked():
    with pytest.raises(TypeError, match="unknown BatchNormalization argument.*'momentun'"):
        with kerasbn.batch_norm_scope(momentun=0.9):
            pass
    with pytest.raises(ValueError, match="momentum"):
        with kerasbn.batch_norm_scope(momentum=1.5):
            pass
    with pytest.raises(ValueError, match="sync_group_size.*synchronized=True"):
        with kerasbn.batch_norm_scope(sync_group_size=2):
            pass
    with pytest.raises(TypeError, match="synchronized"):
        with kerasbn.batch_norm_scope(synchronized="yes"):
            pass
    assert type(keras.layers.BatchNormalization()) is keras.layers.BatchNormalization


def test_folding_a_converted_model_keeps_the_record(tmp_path):
    """BN inside a custom layer cannot fold: the folded copy keeps it synchronized, saved and loaded."""
    model, _ = _build("custom_layer")
    converted = kerasbn.convert_sync_batchnorm(model)
    folded = kerasbn.fold_batch_norm(converted)
    folded.save(tmp_path / "folded.keras")
    loaded = keras.saving.load_model(tmp_path / "folded.keras")
    bns = zoo_models.bn_layers(loaded)
    assert [type(bn) for bn in bns] == [kerasbn.SyncBatchNormalization] * 3  # the block's three
    x = zoo_models.input_batch(model)
    np.testing.assert_allclose(loaded(x), converted(x), rtol=1e-5, atol=1e-5)
