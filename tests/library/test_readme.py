"""Every Python block of the README and of docs/design.md runs as written, so an example that stops
working fails the suite.

A block runs verbatim (``exec``) in a fresh directory, after a stand-in for what its text leaves to the
reader (``build_model``, ``model``, ``dataset``, ``strategy``, ``x``); each test then checks what the block
claims to produce.
"""

import re

import keras
import numpy as np
import pytest

import kerasbn
from tests.helpers.distributed import ROOT

DOCUMENTS = ("README.md", "docs/design.md")
BLOCKS = {name: re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(), re.S) for name in DOCUMENTS}


def _block(first_line, document="README.md"):
    (block,) = [b for b in BLOCKS[document] if b.splitlines()[0].startswith(first_line)]
    return block


def _small_model(bn):
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, use_bias=False), bn(),
                             keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])


def _data(n=32, shape=(8, 8, 3), classes=3):
    rng = np.random.RandomState(0)
    return rng.normal(1, 2, (n, *shape)).astype("float32"), rng.randint(0, classes, n)


def _run(block, namespace, tmp_path, monkeypatch, document="README.md"):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, document, "exec"), namespace)
    return namespace


def test_every_python_block_is_tested():
    # README's second, "# KERAS_BACKEND=jax", runs in the JAX session (tests/jax/test_readme.py).
    counts = {name: len(blocks) for name, blocks in BLOCKS.items()}
    assert counts == {"README.md": 2, "docs/design.md": 2}, "a new Python block needs its test here"


def test_quick_start(tmp_path, monkeypatch):
    import tensorflow as tf

    x, y = _data(16, (32, 32, 3), 10)
    converted = []

    def convert_and_record(model, **kwargs):  # the converted model's weights before fit trains them
        synced = convert_sync_batchnorm(model, **kwargs)
        converted.append([w.numpy() for w in synced.weights])
        return synced

    convert_sync_batchnorm = kerasbn.convert_sync_batchnorm
    monkeypatch.setattr(kerasbn, "convert_sync_batchnorm", convert_and_record)
    # "every local device": the two logical CPUs tests/conftest.py configured. In this process other
    # tests' strategies may have used TensorFlow's collective instance keys already (a second strategy
    # restarts them: "Shape mismatch in the collective instance"), so it reduces through one device, as
    # test_other_models.py's in-process strategy does; test_sync.py covers the collectives in fresh processes.
    strategies, mirrored = [], tf.distribute.MirroredStrategy

    def every_local_device():
        strategies.append(mirrored(
            ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()))
        return strategies[-1]

    monkeypatch.setattr(tf.distribute, "MirroredStrategy", lambda: every_local_device())
    ns = _run(_block("import keras, kerasbn"), {"dataset": tf.data.Dataset.from_tensor_slices((x, y)).batch(4)},
              tmp_path, monkeypatch)
    model, synced = ns["model"], ns["synced"]
    # The layer swapped in: kerasbn's, with Keras' weights and weight names.
    assert type(model.layers[1]) is kerasbn.BatchNormalization
    reference = keras.layers.BatchNormalization()
    reference.build((None, 30, 30, 64))
    assert [w.name for w in model.layers[1].weights] == [w.name for w in reference.weights]
    # Converted: synchronized, every weight kept (the original's, untrained), then trained under the strategy.
    assert type(synced.layers[1]) is kerasbn.SyncBatchNormalization
    (kept,) = converted
    for before, original in zip(kept, model.weights, strict=True):
        np.testing.assert_array_equal(before, original.numpy())
    assert synced.optimizer.iterations.numpy() == 4  # fit ran its 4 batches
    (strategy,) = strategies  # over 2 replicas: each BN variable mirrored twice
    assert len(strategy.experimental_local_results(synced.layers[1].moving_mean.value)) == 2
    # Saved and loaded: synchronized again, with the trained weights.
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.layers[1]) is kerasbn.SyncBatchNormalization
    for saved, trained in zip(loaded.weights, synced.weights, strict=True):
        np.testing.assert_array_equal(saved.numpy(), trained.numpy())


def test_batch_norm_scope(tmp_path, monkeypatch):
    import tensorflow as tf

    keras_hub = pytest.importorskip("keras_hub", reason="the block builds a keras-hub backbone (kerasbn[hub])")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    ns = {"kerasbn": kerasbn, "keras_hub": keras_hub, "strategy": strategy}
    block = _block("with strategy.scope(), kerasbn.batch_norm_scope", "docs/design.md")
    ns = _run(block, ns, tmp_path, monkeypatch, "docs/design.md")
    bns = [layer for layer in ns["backbone"]._flatten_layers() if hasattr(layer, "moving_mean")]
    assert bns and all(type(bn) is kerasbn.SyncBatchNormalization for bn in bns)
    # Built under the strategy: the BN's variables are mirrored over its 2 replicas.
    assert all(len(strategy.experimental_local_results(bn.moving_mean.value)) == 2 for bn in bns)


def test_after_training(tmp_path, monkeypatch):
    import tensorflow as tf

    x, y = _data()
    model = _small_model(kerasbn.BatchNormalization)
    model(x, training=True)
    ns = {"tf": tf, "kerasbn": kerasbn, "model": model, "x": x,
          "train_dataset": tf.data.Dataset.from_tensor_slices(x).batch(8).repeat()}
    ns = _run(_block("# Algorithm 2", "docs/design.md"), ns, tmp_path, monkeypatch, "docs/design.md")
    # Recalibrated: the moving mean is the mean of the batches' means (Algorithm 2, equal batches).
    z = np.asarray(model.layers[0](x), np.float64)
    np.testing.assert_allclose(model.layers[1].moving_mean.numpy(), z.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ns["folded"](x), model(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ns["y"], model(x), rtol=1e-4, atol=1e-5)
