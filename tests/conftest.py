import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# make test runs three sessions, and their processes, on as few as two cores: OpenMP threads
# (PyTorch's) that spin while they wait burn the cores the other processes need. Passive waiting,
# measured on 2 cores with the three sessions side by side: the PyTorch session 68 -> 43 s of CPU,
# the TensorFlow one 305 -> 288 s, the whole 258 -> 235 s. Set before any test imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


def pytest_configure(config):
    """In a process that runs tests: two logical CPU devices, set before TensorFlow initializes
    its devices (the 2-replica tests that need no process of their own run here; the default
    strategy and eager ops stay on /cpu:0).

    pytest-xdist's controller runs none: it imports no TensorFlow and starts the tests' fork
    server before its workers, which share it (TensorFlow's import paid once, not per worker).

    The JAX and PyTorch sessions (``make test`` starts all three side by side) import no
    TensorFlow here: their devices are their own (tests/jax/conftest.py, tests/torch)."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return  # the JAX and PyTorch sessions import no TensorFlow here
    if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
        from tests.helpers import forkserver

        forkserver.share()
        return
    import keras  # noqa: F401  (after TensorFlow: the tensorflow backend)
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends under the default float32 policy."""
    import keras

    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


def pytest_collection_modifyitems(items):
    """Slow tests first, dealt one by one to the workers as they free (the scheduling in
    pyproject.toml), and the many quick tests fill in behind them, instead of one long test
    starting last. Among the slow ones, those that keep one core busy come before those that
    keep every core busy (``slow(cores=2)``: several processes at once), so the longest test
    (fake ImageNet, first) runs beside the first kind: beside the second it gets a fraction of a
    core and becomes the suite's critical path."""
    def order(item):
        slow = item.get_closest_marker("slow")
        return (0, slow.kwargs.get("cores", 1)) if slow else (1, 0)

    items.sort(key=order)


@pytest.fixture
def tiny_variant(monkeypatch):
    """The recipe's variant table with ``tiny`` (tests/helpers/tiny_train.py) in it, for this test only."""
    from recipes.inception_bn import variants
    from tests.helpers.tiny_train import TINY

    monkeypatch.setitem(variants.VARIANTS, "tiny", TINY)
    return TINY
