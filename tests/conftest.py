import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices in every test process, set before TensorFlow initializes its devices:
# the 2-replica tests that need no process of their own run here (the default strategy and
# eager ops stay on /cpu:0).
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends under the default float32 policy."""
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


def pytest_collection_modifyitems(items):
    """Slow (multi-process) tests first: dealt one by one to the workers as they free (the
    scheduling in pyproject.toml), they overlap each other and the many quick tests fill in
    behind them, instead of one long test starting last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config):
    """pytest-xdist's controller starts the tests' fork server before its workers, which share
    it: TensorFlow's import paid once, not once per worker."""
    if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
        from tests import forkserver

        forkserver.share()

