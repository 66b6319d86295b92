"""Every Python block of the README runs as written, so an example that stops working fails the suite.

A block runs verbatim (``exec``) in a fresh directory, after a stand-in for what its text leaves to the
reader (``build_model``, ``keras_model``, ``dataset``, ``x``); each test then checks what the block
claims to produce.
"""

import re

import keras
import numpy as np
import pytest

import kerasbn
from tests.helpers.distributed import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _block(first_line):
    (block,) = [b for b in BLOCKS if b.splitlines()[0].startswith(first_line)]
    return block


def _small_model(bn):
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, use_bias=False), bn(),
                             keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])


def _data(n=32):
    rng = np.random.RandomState(0)
    return rng.normal(1, 2, (n, 8, 8, 3)).astype("float32"), rng.randint(0, 3, n)


def _run(block, namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def test_every_python_block_is_tested():
    # The fourth, "# KERAS_BACKEND=jax", runs in the JAX session (tests/jax/test_readme.py).
    assert len(BLOCKS) == 4, "a new README block needs its test here"


def test_quick_start(tmp_path, monkeypatch):
    ns = _run(_block("import keras, kerasbn"), {}, tmp_path, monkeypatch)
    assert isinstance(ns["model"].layers[1], kerasbn.BatchNormalization)
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.layers[1]) is kerasbn.BatchNormalization


def test_synchronized_bn(tmp_path, monkeypatch):
    import tensorflow as tf

    keras_hub = pytest.importorskip("keras_hub", reason="the block builds a keras-hub backbone (kerasbn[hub])")
    x, y = _data()
    keras_model = _small_model(keras.layers.BatchNormalization)
    ns = {"tf": tf, "keras": keras, "kerasbn": kerasbn, "keras_hub": keras_hub,
          "build_model": lambda: _small_model(kerasbn.SyncBatchNormalization), "keras_model": keras_model,
          "dataset": tf.data.Dataset.from_tensor_slices((x, y)).batch(8)}
    ns = _run(_block("strategy = tf.distribute.MirroredStrategy()"), ns, tmp_path, monkeypatch)
    assert type(ns["model"].layers[1]) is kerasbn.SyncBatchNormalization
    assert ns["model"].optimizer.iterations.numpy() == 4  # fit ran its 4 batches
    bns = [layer for layer in ns["backbone"]._flatten_layers() if hasattr(layer, "moving_mean")]
    assert bns and all(type(bn) is kerasbn.SyncBatchNormalization for bn in bns)


def test_after_training(tmp_path, monkeypatch):
    import tensorflow as tf

    x, y = _data()
    model = _small_model(kerasbn.BatchNormalization)
    model(x, training=True)
    ns = {"tf": tf, "kerasbn": kerasbn, "model": model, "x": x,
          "train_dataset": tf.data.Dataset.from_tensor_slices(x).batch(8).repeat()}
    ns = _run(_block("# Algorithm 2"), ns, tmp_path, monkeypatch)
    # Recalibrated: the moving mean is the mean of the batches' means (Algorithm 2, equal batches).
    z = np.asarray(model.layers[0](x), np.float64)
    np.testing.assert_allclose(model.layers[1].moving_mean.numpy(), z.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ns["folded"](x), model(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ns["y"], model(x), rtol=1e-4, atol=1e-5)
