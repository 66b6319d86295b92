"""Which Keras backends kerasbn runs on; any other is named at first use."""

from __future__ import annotations

import keras

# Backends kerasbn trains on, and those where a trained model only loads and predicts (Keras'
# numpy and OpenVINO backends have no training).
SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")
INFERENCE_BACKENDS = ("numpy", "openvino")


class BackendError(RuntimeError):
    """kerasbn (or one of its tools) was used on a Keras backend it cannot run on."""


def require_backend(what: str, backends: tuple[str, ...] = SUPPORTED_BACKENDS) -> str:
    """Returns Keras' backend, or raises :class:`BackendError` unless it is one of ``backends``.

    Checked at first use (a layer's construction, a tool's call), not at import, so a
    program that imports kerasbn without using it runs on any backend.
    """
    backend = keras.backend.backend()
    if backend not in backends:
        names = ", ".join(repr(b) for b in backends[:-1]) + (" and " if len(backends) > 1 else "") + repr(backends[-1])
        raise BackendError(
            f"{what} runs on Keras' {names} backend{'s' if len(backends) > 1 else ''}; Keras is "
            f"running on {backend!r}. Set KERAS_BACKEND={backends[0]} (or \"backend\" in "
            "~/.keras/keras.json) before Keras is imported.")
    return backend


def require_tensorflow_backend(what: str) -> None:
    """Raises :class:`BackendError` unless Keras runs on TensorFlow (tf.distribute, tf.data)."""
    require_backend(what, ("tensorflow",))
