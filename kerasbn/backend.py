"""kerasbn runs on Keras' TensorFlow backend only; any other backend is named at first use."""

from __future__ import annotations

import keras


class BackendError(RuntimeError):
    """kerasbn was used with a Keras backend other than TensorFlow."""


def require_tensorflow_backend(what: str) -> None:
    """Raises :class:`BackendError` unless Keras runs on TensorFlow.

    Checked at first use (a layer's construction, a tool's call), not at import, so a
    program that imports kerasbn without using it runs on any backend.
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise BackendError(
            f"{what} needs Keras' TensorFlow backend; Keras is running on {backend!r}. kerasbn runs "
            "TensorFlow's kernels and tf.distribute: set KERAS_BACKEND=tensorflow (or "
            '"backend": "tensorflow" in ~/.keras/keras.json) before Keras is imported.')
