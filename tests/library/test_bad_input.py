"""Bad arguments and inputs raise ValueError/TypeError naming what was expected."""

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


def test_integer_input():
    layer = kerasbn.BatchNormalization(dtype="int32")
    with pytest.raises(TypeError, match="floating-point"):
        layer(np.zeros((4, 3), "int32"), training=True)


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


INFERENCE_BACKEND_SCRIPT = """
import sys
import keras, numpy as np
import kerasbn
assert keras.backend.backend() == {backend!r}
model = keras.saving.load_model(sys.argv[1])
data = np.load(sys.argv[2])
# OpenVINO's CPU plugin infers in bfloat16 where the CPU has it (its default precision hint).
tolerance = 1e-4 if {backend!r} == "numpy" else 3e-2
np.testing.assert_allclose(model.predict(data["x"], verbose=0), data["expected"], rtol=tolerance, atol=tolerance)
folded = kerasbn.fold_batch_norm(model)
np.testing.assert_allclose(folded.predict(data["x"], verbose=0), data["expected"], rtol=tolerance, atol=tolerance)
print("predicts")
checks = {{
    "train": lambda: model.layers[1](data["x"][:, :3], training=True),
    "convert": lambda: kerasbn.convert_sync_batchnorm(model),
    "recalibrate": lambda: kerasbn.recalibrate_statistics(model, [data["x"]]),
    "export": lambda: kerasbn.export_for_serving(model, "unused"),
}}
for name, use in checks.items():
    try:
        use()
    except kerasbn.BackendError as error:
        print(name, "->", " ".join(str(error).split()))  # Keras wraps errors raised in call()
    else:
        raise SystemExit(name + " did not fail")
"""


@pytest.mark.parametrize("backend", ["numpy", "openvino"])
def test_a_trained_model_predicts_on_an_inference_backend_where_training_is_a_clear_error(backend, tmp_path):
    import importlib.util
    import subprocess
    import sys

    import keras

    import kerasbn
    from tests.helpers.distributed import _env

    needed = ("jax", "scipy") + (("openvino",) if backend == "openvino" else ())
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:  # Keras' numpy and OpenVINO backends import jax and scipy too
        pytest.skip(f"Keras' {backend} backend needs {', '.join(missing)} (the `test` extra)")
    rng = np.random.RandomState(0)
    x = rng.normal(4.0, 3.0, (32, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), kerasbn.BatchNormalization(momentum=0.5),
                              keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    model.fit(x, rng.normal(size=(32, 2)), epochs=2, batch_size=8, verbose=0)
    model.save(tmp_path / "trained.keras")
    np.savez(tmp_path / "data.npz", x=x, expected=model.predict(x, verbose=0))
    result = subprocess.run([sys.executable, "-c", INFERENCE_BACKEND_SCRIPT.format(backend=backend),
                             str(tmp_path / "trained.keras"), str(tmp_path / "data.npz")],
                            capture_output=True, text=True, timeout=300, env=_env({"KERAS_BACKEND": backend}))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "predicts" and len(lines) == 5, lines
    for line in lines[1:]:
        assert f"Keras' 'tensorflow', 'jax' and 'torch' backends; Keras is running on {backend!r}" in line
        assert "KERAS_BACKEND=tensorflow" in line
