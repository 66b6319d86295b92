"""Run by `make package-check` in a fresh virtualenv holding only the built wheel and its dependencies.

Not collected by pytest (no test_ prefix): it must import the installed kerasbn, not the checkout.
"""

import importlib.util
import pathlib
import sys

import keras
import numpy as np

import kerasbn

installed = pathlib.Path(kerasbn.__file__).resolve()
assert "site-packages" in installed.parts, f"kerasbn imported from {installed}, not from the wheel"
x = np.random.RandomState(0).normal(3.0, 2.0, (64, 5)).astype("float32")
layer = kerasbn.BatchNormalization(momentum=None)
y = keras.ops.convert_to_numpy(layer(x, training=True))
np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
np.testing.assert_allclose(layer.moving_mean.numpy(), x.mean(0), rtol=1e-5)
np.testing.assert_allclose(layer.moving_variance.numpy(), x.var(0, ddof=1), rtol=1e-4)
try:
    import recipes  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("the wheel installed a top-level `recipes` package")
backend = keras.backend.backend()
if backend in ("jax", "torch"):  # kerasbn[jax] and kerasbn[torch] install no TensorFlow; nothing imported one
    assert importlib.util.find_spec("tensorflow") is None, f"kerasbn[{backend}] installed TensorFlow"
    assert "tensorflow" not in sys.modules
print(f"kerasbn {kerasbn.__version__} from the wheel on {backend}: one layer trained and checked")
