"""The layer's contract on every backend (the session's: TensorFlow, JAX or PyTorch), against float64
ground truth and Keras' own layer. Collected by each backend's session (``make test``)."""

import re
from pathlib import Path

import keras
import numpy as np
import pytest

import kerasbn
from tests.helpers import reference
from tests.helpers.autodiff import train_call

RNG = np.random.RandomState(0)
EPS = 1e-3


def _data(shape, mean=3.0, spread=2.0, seed=0):
    return np.random.RandomState(seed).normal(mean, spread, shape).astype("float32")


def _numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


# fused=None: the backend's own kernel where it applies (TensorFlow's fused batch norm, PyTorch's
# native_batch_norm); fused=False: the element-wise shifted sums.
@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("shape,axis", [((64, 3), -1), ((8, 5, 5, 4), 1), ((4, 3, 5, 6), -1),
                                        ((3, 4, 2, 5, 2), 2)])
def test_algorithms_1_and_2_against_float64(shape, axis, fused):
    x, dy = _data(shape), _data(shape, 0.0, 1.0, seed=1)
    layer = kerasbn.BatchNormalization(axis=axis, momentum=0.75, gamma_initializer="random_normal",
                                       beta_initializer="random_normal", fused=fused)
    layer.build(shape)
    gamma, beta = (np.asarray(w.numpy(), np.float64) for w in (layer.gamma, layer.beta))
    y, dx, dweights = train_call(layer, x, dy)
    ref_y, mean, variance = reference.bn_forward(x, axis, gamma, beta, EPS)
    ref_dx, ref_dgamma, ref_dbeta = reference.bn_backward(x, dy, axis, gamma, EPS)
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(dweights[0], ref_dgamma, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(dweights[1], ref_dbeta, rtol=1e-4, atol=1e-3)
    m = x.size // x.shape[axis]
    moving_mean, moving_variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    np.testing.assert_allclose(moving_mean, 0.25 * mean, rtol=1e-5, atol=1e-6)
    # Algorithm 2: the unbiased m / (m - 1) variance, averaged from the initial 1.
    np.testing.assert_allclose(moving_variance, 0.75 + 0.25 * variance * m / (m - 1), rtol=1e-5)


def test_inference_and_trainable_false_use_the_moving_statistics():
    x = _data((16, 4))
    layer = kerasbn.BatchNormalization(moving_mean_initializer="ones",
                                       moving_variance_initializer=keras.initializers.Constant(4.0))
    expected = (x - 1.0) / np.sqrt(4.0 + EPS)
    np.testing.assert_allclose(_numpy(layer(x, training=False)), expected, rtol=1e-5)
    layer.trainable = False
    np.testing.assert_allclose(_numpy(layer(x, training=True)), expected, rtol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), 1.0)


@pytest.mark.parametrize("shape,axis", [((32, 5), -1), ((4, 3, 3, 6), -1), ((4, 6, 3, 3), 1)])
def test_gradient_and_statistics_match_keras_when_variance_is_biased(shape, axis):
    x, dy = _data(shape), _data(shape, 0.0, 1.0, seed=2)
    ours = kerasbn.BatchNormalization(axis=axis, unbiased_variance=False, momentum=0.5)
    theirs = keras.layers.BatchNormalization(axis=axis, momentum=0.5)
    ours_y, ours_dx, ours_dweights = train_call(ours, x, dy)
    keras_y, keras_dx, keras_dweights = train_call(theirs, x, dy)
    np.testing.assert_allclose(ours_y, keras_y, rtol=1e-4, atol=1e-4)
    for a, b in zip([ours_dx] + ours_dweights, [keras_dx] + keras_dweights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    for a, b in zip(ours.non_trainable_weights, theirs.non_trainable_weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert [w.path.split("/")[-1] for w in ours.weights] == [w.path.split("/")[-1] for w in theirs.weights]


def test_momentum_none_is_the_exact_population_average():
    batches = [_data((16, 3), seed=s) + s for s in range(4)]
    layer = kerasbn.BatchNormalization(momentum=None)
    for x in batches:
        layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(), np.mean([b.mean(0) for b in batches], 0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               np.mean([b.var(0, ddof=1) for b in batches], 0), rtol=1e-5)
    assert float(layer.num_batches.numpy()) == 4


def test_ghost_batches_normalize_each_group():
    x = _data((8, 3, 3, 4)) + np.arange(8)[:, None, None, None].astype("float32")
    layer = kerasbn.BatchNormalization(virtual_batch_size=2, momentum=0.0)
    y = _numpy(layer(x, training=True))
    for g in range(4):
        part = x[2 * g:2 * g + 2]
        ref, _, _ = reference.bn_forward(part, -1, 1.0, 0.0, EPS)
        np.testing.assert_allclose(y[2 * g:2 * g + 2], ref, rtol=1e-4, atol=1e-4)
    ghosts = x.reshape(4, -1, 4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ghosts.mean(1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), ghosts.var(1, ddof=1).mean(0), rtol=1e-5)


def test_mask_leaves_positions_out_even_when_they_hold_inf():
    x = _data((4, 6, 3))
    mask = np.ones((4, 6), bool)
    mask[:, 4:] = False
    x[:, 5] = np.inf
    layer = kerasbn.BatchNormalization(momentum=0.0)
    y = _numpy(layer(x, training=True, mask=mask))
    kept = x[:, :4].reshape(-1, 3)
    np.testing.assert_allclose(layer.moving_mean.numpy(), kept.mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), kept.var(0, ddof=1), rtol=1e-5)
    assert np.isfinite(y[:, :4]).all()


def test_batch_renormalization_matches_keras():
    if not reference.keras_has_renorm():
        pytest.skip("Keras' own layer has renorm from Keras 3.14 on")
    arguments = dict(renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.5, "dmax": 0.3},
                     renorm_momentum=0.8, momentum=0.7)
    ours = kerasbn.BatchNormalization(unbiased_variance=False, **arguments)
    theirs = keras.layers.BatchNormalization(**arguments)
    for step in range(3):
        x = _data((32, 4), mean=step, seed=step)
        np.testing.assert_allclose(_numpy(ours(x, training=True)), _numpy(theirs(x, training=True)),
                                   rtol=1e-4, atol=1e-4)
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5, err_msg=a.path)


# 200k values a channel: where float32 kernels summing x and x^2 lose the variance (TensorFlow's
# oneDNN and PyTorch's native_batch_norm, 55x too large at mean 1e4, unless the input is shifted).
@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("shape", [(64, 8, 8, 4), (256, 28, 28, 2)])
@pytest.mark.parametrize("mean", [1e4, 1e5])
def test_precision_at_a_large_channel_mean(mean, shape, fused):
    x = _data(shape, mean=mean, spread=1.0)
    layer = kerasbn.BatchNormalization(momentum=0.0, fused=fused)
    y, _, _ = train_call(layer, x, np.ones_like(x))
    exact = x.astype(np.float64).reshape(-1, shape[-1])
    np.testing.assert_allclose(layer.moving_variance.numpy(), exact.var(0, ddof=1), rtol=2e-3)
    np.testing.assert_allclose(y.reshape(-1, shape[-1]).std(0), 1.0, rtol=2e-3)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_keeps_float32_statistics_and_does_not_overflow(policy):
    keras.config.set_dtype_policy(policy)
    layer = kerasbn.BatchNormalization(momentum=0.0)
    x = _data((16, 4, 4, 3), mean=300.0, spread=50.0)  # float16 squares overflow
    y = layer(keras.ops.cast(x, layer.compute_dtype), training=True)
    assert keras.backend.standardize_dtype(y.dtype) == layer.compute_dtype
    assert all(w.dtype == "float32" for w in layer.non_trainable_weights)
    exact = x.astype(np.float64).reshape(-1, 3)
    np.testing.assert_allclose(layer.moving_variance.numpy(), exact.var(0, ddof=1), rtol=2e-2)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("arguments", [{}, {"momentum": None}, {"virtual_batch_size": 4},
                                       {"renorm": True}], ids=["ema", "cumulative", "ghost", "renorm"])
def test_a_non_finite_batch_leaves_the_moving_statistics(bad, arguments):
    x1, x2 = _data((8, 3, 3, 4)), _data((8, 3, 3, 4), -1.0, 3.0, seed=3)
    poisoned = x1.copy()
    poisoned.flat[77] = bad
    layer, twin = (kerasbn.BatchNormalization(**arguments) for _ in range(2))
    for x in (x1, poisoned, x2):
        layer(x, training=True)
    for x in (x1, x2):
        twin(x, training=True)
    for a, b in zip(layer.non_trainable_weights, twin.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_backend_specific_arguments_are_clear_errors():
    if keras.backend.backend() != "tensorflow":
        with pytest.raises(ValueError, match="fused=True asks for TensorFlow's fused"):
            kerasbn.BatchNormalization(fused=True)(np.ones((4, 2), "float32"), training=True)
    with pytest.raises(ValueError, match="`axis_name`.*needs synchronized=True"):
        kerasbn.BatchNormalization(axis_name="batch")
    with pytest.raises(TypeError, match="`axis_name` must be a str"):
        kerasbn.SyncBatchNormalization(axis_name=3)
    with pytest.raises(ValueError, match="`virtual_batch_size`=3 must divide"):
        kerasbn.BatchNormalization(virtual_batch_size=3)(np.ones((4, 2), "float32"), training=True)


KERAS_TEST = (Path(keras.__file__).parent / "src" / "layers" / "normalization"
              / "batch_normalization_test.py")


@pytest.mark.skipif(not KERAS_TEST.exists(), reason="this Keras ships no BN test file")
@pytest.mark.skipif(keras.backend.backend() == "tensorflow",
                    reason="TensorFlow's session runs it in a process of its own (tests/library/test_keras_parity.py)")
def test_keras_batch_normalization_test_file_passes_whole(tmp_path, capsys):
    """The harness of tests/library/test_keras_parity.py, run in this session's process (its
    backend): a nested pytest session over the patched copy of the installed Keras' test file."""
    from tests.library.test_keras_parity import PREAMBLE

    patched, replaced = re.subn(r"\blayers\.BatchNormalization\b", "KerasbnBatchNormalization",
                                KERAS_TEST.read_text())
    assert replaced >= 10
    test_file = tmp_path / "test_keras_bn_with_kerasbn.py"
    test_file.write_text(PREAMBLE + patched)
    status = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-W", "ignore",
                          "--rootdir", str(tmp_path), "--confcutdir", str(tmp_path), str(test_file)])
    summary = capsys.readouterr().out.strip().splitlines()
    assert status == 0, f"Keras' BN tests on kerasbn ({keras.backend.backend()}): {summary[-1] if summary else status}\n" + "\n".join(summary[-80:])
    passed = re.search(r"\b(\d+) passed\b", summary[-1]) if summary else None
    assert passed and int(passed.group(1)) >= 20 and "failed" not in summary[-1], summary[-3:]
