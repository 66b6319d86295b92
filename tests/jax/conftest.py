"""The JAX session: ``KERAS_BACKEND=jax pytest tests/jax -n 0`` (tests/library/test_jax_backend.py
starts it within ``make test``). Four XLA host devices, set before JAX initializes its backends:
keras.distribution's data parallelism runs on them as on four accelerators."""

import os

if os.environ.get("KERAS_BACKEND") != "jax":
    # A TensorFlow session collects nothing here (a backend is fixed per process).
    collect_ignore_glob = ["test_*.py"]
else:
    DEVICES = 4
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={DEVICES}").strip()


# The shared tests' largest cases run eagerly on JAX at 3-13 s each and test nothing the smaller
# ones do not: keras-hub's ResNet v2 stands for the zoo in conversion only, the conv3d and
# channels-first models for folding (TensorFlow's session runs them all).
ONLY_ON_TENSORFLOW = ("[hgnet_v2]", "[mobilenet_v3]", "[_inception_block-9]")
HUB_CONVERSION_ONLY = "test_conversion_is_complete_and_keeps_weights_and_outputs[resnet_v2]"


def pytest_collection_modifyitems(config, items):
    skipped = [item for item in items if item.nodeid.endswith(ONLY_ON_TENSORFLOW)
               or (item.nodeid.endswith("[resnet_v2]") and not item.nodeid.endswith(HUB_CONVERSION_ONLY))]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [item for item in items if item not in skipped]
