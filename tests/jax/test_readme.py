"""The README's JAX block runs as written, on JAX (tests/library/test_readme.py runs the others)."""

import keras
import numpy as np

import kerasbn
from tests.library.test_readme import _block, _data, _run, _small_model

DEVICES, BATCH = 4, 8
MOMENTUM = 0.99  # the layer's default, which the block's model keeps


def _convolved(x, kernel):
    """A 3x3 'valid' convolution without bias, in float64 numpy: what the BN layer sees."""
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), (3, 3), axis=(1, 2))
    return np.einsum("nijkab,abkc->nijc", windows, np.asarray(kernel, np.float64))


def _moving_statistics(z, per_device=False):
    """The moving mean and unbiased variance after one update per batch of ``z`` (in order), from the
    global batch's statistics - or, per_device, from the mean of each device's own (what an
    unsynchronized layer would average)."""
    channels = z.shape[-1]
    mean, variance = np.zeros(channels), np.ones(channels)
    for start in range(0, len(z), BATCH):
        shares = z[start:start + BATCH].reshape(1 if not per_device else DEVICES, -1, channels)
        mean = MOMENTUM * mean + (1 - MOMENTUM) * shares.mean(1).mean(0)
        variance = MOMENTUM * variance + (1 - MOMENTUM) * shares.var(1, ddof=1).mean(0)
    return mean, variance


def test_data_parallel_block(tmp_path, monkeypatch):
    keras.utils.set_random_seed(0)  # the convolution's kernel: the last check below depends on it
    x, y = _data()
    # Each device's share of a batch (2 consecutive examples of 8) is off-centre by its own amount, so the
    # global batch's variance is far from the mean of the devices' own variances.
    x = x + 3.0 * (np.arange(len(x)) % BATCH // (BATCH // DEVICES)).astype("float32")[:, None, None, None]

    def build_model():
        model = _small_model(kerasbn.SyncBatchNormalization)
        model.layers[0].trainable = False  # BN's input stays conv(x): its statistics have a numpy reference
        return model

    ns = {"keras": keras, "kerasbn": kerasbn, "build_model": build_model, "dataset": (x, y)}
    block = _block("# KERAS_BACKEND=jax").replace(
        "model.fit(dataset)", f"model.fit(*dataset, batch_size={BATCH}, shuffle=False, verbose=0)")
    assert block.count("model.fit(") == 1
    try:
        ns = _run(block, ns, tmp_path, monkeypatch)
        distribution = keras.distribution.distribution()
        assert isinstance(distribution, keras.distribution.DataParallel)
        assert len(distribution.device_mesh.devices.ravel()) == DEVICES
    finally:
        keras.distribution.set_distribution(None)
    model = ns["model"]
    bn = model.layers[1]
    assert type(bn) is kerasbn.SyncBatchNormalization
    assert int(model.optimizer.iterations.numpy()) == len(x) // BATCH  # fit ran its 4 batches
    # Synchronized over the 4 devices: the moving statistics took one update per batch (momentum 0.99)
    # towards that global batch's mean and unbiased variance, computed here in float64 from the batches.
    z = _convolved(x, model.layers[0].kernel.numpy())
    mean, variance = _moving_statistics(z)
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), variance, rtol=1e-5)
    # The check tells the global batch from the devices' own shares: per-device statistics would be far off
    # (on the channels the devices' offsets reach; a channel whose kernel cancels them cannot tell).
    _, per_device_variance = _moving_statistics(z, per_device=True)
    relative = np.abs(per_device_variance - variance) / variance
    assert relative.max() > 0.1 and np.sum(relative > 1e-2) >= 2, relative
