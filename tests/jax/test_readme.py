"""The README's JAX block runs as written, on JAX (tests/library/test_readme.py runs the others)."""

import keras
import numpy as np

import kerasbn
from tests.library.test_readme import _block, _data, _run, _small_model


def test_data_parallel_block(tmp_path, monkeypatch):
    x, y = _data()
    ns = {"keras": keras, "kerasbn": kerasbn,
          "build_model": lambda: _small_model(kerasbn.SyncBatchNormalization), "dataset": (x, y)}
    block = _block("# KERAS_BACKEND=jax").replace("model.fit(dataset)", "model.fit(*dataset, batch_size=8, verbose=0)")
    assert block.count("model.fit(") == 1
    try:
        ns = _run(block, ns, tmp_path, monkeypatch)
        distribution = keras.distribution.distribution()
        assert isinstance(distribution, keras.distribution.DataParallel)
        assert len(distribution.device_mesh.devices.ravel()) == 4
    finally:
        keras.distribution.set_distribution(None)
    model = ns["model"]
    assert type(model.layers[1]) is kerasbn.SyncBatchNormalization
    assert int(model.optimizer.iterations.numpy()) == 4  # fit ran its 4 batches
    # Synchronized over the 4 devices: the moving mean moved towards the global batches' means.
    assert np.all(np.isfinite(model.layers[1].moving_mean.numpy()))
