"""Bad arguments and inputs raise ValueError/TypeError naming what was expected - on every backend
(each backend's session runs this file), and bad input leaves the moving statistics as they were."""

import keras
import numpy as np
import pytest

import kerasbn

CONSTRUCTOR_ERRORS = [
    (dict(axis=1.5), TypeError, "axis"),
    (dict(axis="last"), TypeError, "axis"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(momentum="fast"), TypeError, "momentum"),
    (dict(epsilon=0.0), ValueError, "epsilon"),
    (dict(epsilon=-1e-3), ValueError, "epsilon"),
    (dict(virtual_batch_size=0), ValueError, "virtual_batch_size"),
    (dict(virtual_batch_size=2.5), TypeError, "virtual_batch_size"),
    (dict(renorm=True, renorm_clipping={"rmax": 1, "bogus": 2}), ValueError, "bogus"),
    (dict(renorm=True, renorm_clipping={"rmin": 3.0, "rmax": 1.0}), ValueError, "rmax should be greater than rmin"),
    (dict(renorm=True, renorm_clipping={"dmax": -1.0}), ValueError, "dmax"),
    (dict(renorm_clipping={"rmax": 2.0}), ValueError, "renorm=True"),
    (dict(renorm=True, renorm_momentum=1.5), ValueError, "renorm_momentum"),
    (dict(synchronized=True, sync_group_size=0), ValueError, "sync_group_size"),
    (dict(sync_group_size=2), ValueError, "synchronized=True"),
    (dict(virtual_batch_size=2, renorm=True), ValueError, "virtual_batch_size"),
    (dict(virtual_batch_size=2, synchronized=True), ValueError, "virtual_batch_size"),
    (dict(fused="yes"), TypeError, "fused"),
    (dict(fused=True, virtual_batch_size=2), ValueError, "fused"),
    (dict(bogus_argument=1), (TypeError, ValueError), "bogus_argument"),
]


@pytest.mark.parametrize("kwargs,error,message", CONSTRUCTOR_ERRORS)
def test_constructor_rejects(kwargs, error, message):
    with pytest.raises(error, match=message):
        kerasbn.BatchNormalization(**kwargs)


def test_sync_alias_cannot_be_unsynchronized():
    with pytest.raises(ValueError, match="always synchronized"):
        kerasbn.SyncBatchNormalization(synchronized=False)


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_axis_out_of_range_for_rank(axis):
    with pytest.raises(ValueError, match=r"`axis`.*out of range"):
        kerasbn.BatchNormalization(axis=axis)(np.zeros((4, 3), "float32"))


def test_unknown_channel_dimension():
    with pytest.raises(ValueError, match="channel dimension"):
        kerasbn.BatchNormalization()(keras.Input((None, None)))


def test_rank_one_input():
    with pytest.raises(ValueError, match="rank >= 2"):
        kerasbn.BatchNormalization().build((4,))


def test_an_integer_layer_is_refused_before_any_weight_exists():
    layer = kerasbn.BatchNormalization(dtype="int32")
    with pytest.raises(TypeError, match="floating-point `dtype`"):
        layer(np.zeros((4, 3), "int32"), training=True)
    assert not layer.weights


def test_integer_input():
    with pytest.raises(TypeError, match="floating-point inputs"):
        kerasbn.BatchNormalization()(np.zeros((4, 3), "int32"), training=True)


def test_mask_of_the_wrong_rank():
    layer = kerasbn.BatchNormalization()
    with pytest.raises(ValueError, match="mask"):
        layer(np.zeros((4, 5, 3), "float32"), training=True, mask=np.ones((4, 5, 3), bool))


def test_fused_true_with_middle_axis():
    with pytest.raises(ValueError, match="fused=True"):
        kerasbn.BatchNormalization(axis=2, fused=True).build((4, 5, 6, 7))


def test_bad_input_leaves_moving_statistics_untouched():
    layer = kerasbn.BatchNormalization(virtual_batch_size=3)
    layer(np.ones((6, 2), "float32"), training=True)
    before = layer.moving_mean.numpy().copy()
    with pytest.raises(ValueError):
        layer(np.ones((8, 2), "float32"), training=True)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), before)
