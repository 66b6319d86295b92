"""Writing a trained BN network as a SavedModel for serving."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kerasbn.folding import fold_batch_norm


def export_for_serving(model, path: str | os.PathLike, fold: bool = True):
    """Writes ``model``'s inference function as a SavedModel with a ``serve`` endpoint.

    Args:
        model: a built Keras model.
        path: the SavedModel directory to write (created; must not be a file).
        fold: fold BN layers into their producers first
            (:func:`kerasbn.fold_batch_norm`): same outputs, fewer ops.

    Returns:
        The model that was exported (the folded copy when ``fold``).

    Reload anywhere TensorFlow runs, without kerasbn or Keras:
    ``tf.saved_model.load(path).serve(x)``; the ``serving_default``
    signature serves TF Serving.

    Raises:
        OSError: ``path`` cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OSError(f"export_for_serving: {path} exists and is not a directory.")
    parent = path.parent if not path.exists() else path
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise OSError(f"export_for_serving: cannot write to {path}: {error.strerror or error}") from None
    served = fold_batch_norm(model) if fold else model
    served.export(str(path), format="tf_saved_model", verbose=False)
    return served



