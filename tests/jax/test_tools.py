"""The tools on Keras' JAX backend: conversion, scope, folding, recalibration, export, and a
``.keras`` file that crosses backends.

The backend-neutral tests of tests/library run here again, on JAX, as they are (imported:
pytest collects them in this module); TensorFlow's own parts of those files (strategies,
its fork server) stay in the TensorFlow session. Then what only JAX has.
"""

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import jax
import keras
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import kerasbn
from kerasbn.kernels.jax_backend import backend_mesh
from tests.helpers import forkserver, zoo_models
from tests.helpers.backend_neutral import *  # noqa: F403  (the library's tests, collected here on JAX)

ROOT = Path(__file__).resolve().parents[2]


def _env(backend):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(KERAS_BACKEND=backend, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    return env


def test_recalibration_under_data_parallel_averages_each_devices_share():
    devices = keras.distribution.list_devices("cpu")
    distribution = keras.distribution.DataParallel(devices=devices)
    rng = np.random.RandomState(0)
    offsets = np.repeat(np.arange(len(devices), dtype="float32"), 4)[:, None] * 5.0
    batches = [(rng.normal(size=(4 * len(devices), 3)) * (1 + offsets) + offsets).astype("float32")
               for _ in range(3)]
    with distribution.scope():
        synced, local = (keras.Sequential([keras.Input((3,)), kerasbn.BatchNormalization(synchronized=s)])
                         for s in (True, False))
        for model in (synced, local):
            kerasbn.recalibrate_statistics(model, batches, verbose=0)
    shares = [share for b in batches for share in np.split(b.astype(np.float64), len(devices))]
    np.testing.assert_allclose(local.layers[0].moving_mean, np.mean([s.mean(0) for s in shares], 0),
                               rtol=1e-5)
    np.testing.assert_allclose(local.layers[0].moving_variance,
                               np.mean([s.var(0, ddof=1) for s in shares], 0), rtol=1e-5)
    np.testing.assert_allclose(synced.layers[0].moving_variance,
                               np.mean([b.astype(np.float64).var(0, ddof=1) for b in batches], 0),
                               rtol=1e-5)


def test_recalibration_leaves_kerasbn_layers_unpatched():
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNormalization()])
    kerasbn.recalibrate_statistics(model, [np.ones((4, 3), "float32")], verbose=0)
    assert "call" not in vars(model.layers[0])


TENSORFLOW_SIDE = """
import sys, numpy as np, keras, kerasbn, tensorflow as tf
from tests.helpers import zoo_models  # registers the custom layers
d = sys.argv[1]
x = np.load(d + "/x.npy")
served = tf.saved_model.load(d + "/export/1")
np.save(d + "/served.npy", served.serve(x).numpy())
loaded = keras.saving.load_model(d + "/from_jax.keras")
np.save(d + "/tf_outputs.npy", np.stack([np.asarray(loaded(x, training=t)) for t in (False, True)]))
print(sorted({type(l).__name__ for l in loaded._flatten_layers() if "BatchNorm" in type(l).__name__}))
model, _ = zoo_models.custom_layer()
model = kerasbn.convert_sync_batchnorm(zoo_models.trained(model, seed=5), momentum=0.5)
model.save(d + "/from_tf.keras")
np.save(d + "/tf_model_outputs.npy", np.stack([np.asarray(model(x, training=t)) for t in (False, True)]))
"""


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed")
def test_export_and_a_keras_file_cross_to_tensorflow_and_back(tmp_path):
    """A model converted and trained on JAX: exported (Keras' JAX export) and served by
    TensorFlow with its outputs; its .keras file loads converted on TensorFlow with its outputs;
    a file converted and saved there loads here with its own. One TensorFlow process does its side."""
    model, _ = zoo_models.custom_layer()
    model = kerasbn.convert_sync_batchnorm(zoo_models.trained(model), momentum=0.8)
    x = zoo_models.input_batch(model)
    np.save(tmp_path / "x.npy", x)
    model.save(tmp_path / "from_jax.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the BN layers inside the custom layer do not fold
        kerasbn.export_for_serving(model, tmp_path / "export" / "1")
    result = forkserver.run([sys.executable, "-c", TENSORFLOW_SIDE, str(tmp_path)], env=_env("tensorflow"),
                            cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "served.npy"), np.asarray(model(x)), rtol=1e-4, atol=1e-5)
    assert result.stdout.strip().splitlines()[-1] == "['SyncBatchNormalization']"
    on_tf = np.load(tmp_path / "tf_outputs.npy")
    for i, training in enumerate((False, True)):
        np.testing.assert_allclose(on_tf[i], np.asarray(model(x, training=training)), rtol=1e-4, atol=1e-5)
    from_tf = keras.saving.load_model(tmp_path / "from_tf.keras")
    bns = [layer for layer in from_tf._flatten_layers() if isinstance(layer, keras.layers.Layer)
           and "BatchNorm" in type(layer).__name__]
    assert bns and all(isinstance(bn, kerasbn.SyncBatchNormalization) and bn.momentum == 0.5 for bn in bns)
    expected = np.load(tmp_path / "tf_model_outputs.npy")
    for i, training in enumerate((False, True)):
        np.testing.assert_allclose(np.asarray(from_tf(x, training=training)), expected[i], rtol=1e-4, atol=1e-5)


def test_a_sharded_model_converts_under_data_parallel():
    distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu"))
    model, count = zoo_models.custom_layer()
    with distribution.scope():
        converted = kerasbn.convert_sync_batchnorm(model)
        x = jax.device_put(zoo_models.input_batch(converted),
                           NamedSharding(backend_mesh(distribution.device_mesh), PartitionSpec("batch")))
        y = converted(x, training=True)
    assert y.shape[0] == x.shape[0]
    assert sum(isinstance(layer, kerasbn.SyncBatchNormalization) for layer in converted._flatten_layers()) == count
