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
