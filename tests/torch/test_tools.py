"""The tools on Keras' PyTorch backend: conversion, scope, folding, recalibration, and a ``.keras``
file that crosses to TensorFlow (exported and served there) and back.

The backend-neutral tests of tests/library run here again, on PyTorch, as they are (imported:
pytest collects them in this module). Then what only PyTorch has.
"""

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

import kerasbn
from tests.helpers import forkserver, zoo_models
from tests.helpers.backend_neutral import *  # noqa: F403  (the library's tests, collected here on PyTorch)

ROOT = Path(__file__).resolve().parents[2]


def test_export_names_what_to_do_on_torch(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), kerasbn.BatchNormalization()])
    with pytest.raises(kerasbn.BackendError, match="KERAS_BACKEND=tensorflow"):
        kerasbn.export_for_serving(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_model_fit_trains_kerasbn_layers_like_keras_own():
    rng = np.random.RandomState(0)
    x, y = rng.normal(50.0, 3.0, (64, 6)).astype("float32"), rng.normal(size=(64, 2)).astype("float32")
    models = []
    for bn in (kerasbn.BatchNormalization(unbiased_variance=False), keras.layers.BatchNormalization()):
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, kernel_initializer="ones"), bn,
                                  keras.layers.Dense(2, kernel_initializer="ones")])
        model.compile(keras.optimizers.SGD(0.01), "mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        models.append(model)
    for a, b in zip(models[0].weights, models[1].weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4, err_msg=a.path)


TENSORFLOW_SIDE = """
import sys, numpy as np, keras, kerasbn, tensorflow as tf, warnings
from tests.helpers import zoo_models  # registers the custom layers
d = sys.argv[1]
x = np.load(d + "/x.npy")
loaded = keras.saving.load_model(d + "/from_torch.keras")
with warnings.catch_warnings():  # first: a training call below moves the statistics
    warnings.simplefilter("ignore")
    kerasbn.export_for_serving(loaded, d + "/export/1")
served = tf.saved_model.load(d + "/export/1")  # held: its variables live as long as it does
np.save(d + "/served.npy", served.serve(x).numpy())
np.save(d + "/tf_outputs.npy", np.stack([np.asarray(loaded(x, training=t)) for t in (False, True)]))
model, _ = zoo_models.custom_layer()
model = kerasbn.convert_sync_batchnorm(zoo_models.trained(model, seed=5), momentum=0.5)
model.save(d + "/from_tf.keras")
np.save(d + "/tf_model_outputs.npy", np.stack([np.asarray(model(x, training=t)) for t in (False, True)]))
print(sorted({type(l).__name__ for l in loaded._flatten_layers() if "BatchNorm" in type(l).__name__}))
"""


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed")
def test_keras_files_cross_between_torch_and_tensorflow_and_serve_there(tmp_path):
    """A model converted and trained on PyTorch: its .keras file loads converted on TensorFlow with
    its outputs in both modes, and exports and serves there (what export_for_serving's error says);
    a file converted and saved on TensorFlow loads here converted, with its outputs."""
    model, _ = zoo_models.custom_layer()
    model = kerasbn.convert_sync_batchnorm(zoo_models.trained(model), momentum=0.8)
    x = zoo_models.input_batch(model)
    np.save(tmp_path / "x.npy", x)
    model.save(tmp_path / "from_torch.keras")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(KERAS_BACKEND="tensorflow", PYTHONPATH=str(ROOT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = forkserver.run([sys.executable, "-c", TENSORFLOW_SIDE, str(tmp_path)], env=env, cwd=ROOT,
                                timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['SyncBatchNormalization']"
    expected = [keras.ops.convert_to_numpy(model(x, training=t)) for t in (False, True)]
    on_tf = np.load(tmp_path / "tf_outputs.npy")
    for i in range(2):
        np.testing.assert_allclose(on_tf[i], expected[i], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "served.npy"), expected[0], rtol=1e-4, atol=1e-5)
    from_tf = keras.saving.load_model(tmp_path / "from_tf.keras")
    bns = zoo_models.bn_layers(from_tf)
    assert bns and all(isinstance(bn, kerasbn.SyncBatchNormalization) and bn.momentum == 0.5 for bn in bns)
    on_tf_model = np.load(tmp_path / "tf_model_outputs.npy")
    for i, training in enumerate((False, True)):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(from_tf(x, training=training)), on_tf_model[i],
                                   rtol=1e-4, atol=1e-5)
