"""The JAX session: ``KERAS_BACKEND=jax pytest tests/jax tests/shared -n 0`` (``make test`` starts it
beside the TensorFlow and PyTorch sessions). Four XLA host devices, set before JAX initializes its backends:
keras.distribution's data parallelism runs on them as on four accelerators."""

import os

if os.environ.get("KERAS_BACKEND") != "jax":
    # A TensorFlow session collects nothing here (a backend is fixed per process).
    collect_ignore_glob = ["test_*.py"]
else:
    DEVICES = 4
    # XLA's CPU code generation at its lowest effort: the tests' arrays are small and their time
    # is compilation (measured: the session 83 s -> 69 s; the HLO, collectives included, is the same).
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
        " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()


# The shared tests of tests/library that tests/jax/test_tools.py collects again run here on the
# cases that exercise what JAX changes (a custom layer with BN inside, both recalibration inputs,
# a nested channels-first model to fold), and the .keras round trips on every model, keras-hub's
# backbones included (built in a scope or converted, loaded back twice: 0.5-1.7 s each here). The
# other cases of the conversion and folding tests - the backbones' outputs compared eagerly, 3-10 s
# each on JAX - test the same Keras-level code, which TensorFlow's and PyTorch's sessions run on every case.
SHARED_CASES_ON_JAX = ("[custom_layer]", "[_channels_first_and_nested-2]", "[False]", "[True]")
ROUND_TRIPS = ("test_converted_models_load_back_converted_with_no_scope",
               "test_models_built_in_the_scope_load_back_as_built")


def _left_to_tensorflow(item) -> bool:
    shared = getattr(item, "function", None) is not None and item.function.__module__.startswith("tests.library")
    return (item.nodeid.startswith("tests/jax/") and shared and hasattr(item, "callspec")
            and item.originalname not in ROUND_TRIPS and not item.nodeid.endswith(SHARED_CASES_ON_JAX))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KERAS_BACKEND") != "jax":
        return  # this hook sees the whole session's items: TensorFlow's run them all
    skipped = [item for item in items if _left_to_tensorflow(item)]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [item for item in items if item not in skipped]
