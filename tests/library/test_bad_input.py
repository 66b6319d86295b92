"""Backends kerasbn cannot train on: a trained model predicts there and training is one clear error.
(Bad arguments and inputs on every backend: tests/shared/test_bad_input.py.)"""

import keras
import numpy as np
import pytest

import kerasbn

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
