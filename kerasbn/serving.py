"""Writing a trained BN network as a SavedModel for serving."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

from kerasbn import kernels, model_walk
from kerasbn._files import ensure_writable_directory
from kerasbn.backend import BackendError
from kerasbn.folding import fold_batch_norm, unfoldable


def export_for_serving(model, path: str | os.PathLike, fold: bool = True):
    """Writes ``model``'s inference function as a SavedModel with a ``serve`` endpoint.

    Args:
        model: a built Keras model.
        path: the SavedModel directory to write (created; must not be a file).
        fold: fold BN layers into their producers first
            (:func:`kerasbn.fold_batch_norm`): same outputs, fewer ops. What
            cannot fold is exported as it is, with a warning naming each BN
            layer left and why; a subclassed model (no graph to rebuild) is
            exported whole, unfolded, with that warning.

    Returns:
        The model that was exported (the folded copy when ``fold``).

    On JAX, Keras' export converts the model's JAX function for TensorFlow
    (TensorFlow must be installed; it is imported only here).

    Reload anywhere TensorFlow runs, without kerasbn or Keras, and keep the
    loaded object while serving: its variables live as long as it does
    (``tf.saved_model.load(path).serve(x)`` in one expression fails once it
    is collected). The ``serving_default`` signature serves TF Serving.

    >>> import os, tempfile, keras, kerasbn, tensorflow as tf
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
    ...                           kerasbn.BatchNormalization()])
    >>> path = os.path.join(tempfile.mkdtemp(), "export", "1")
    >>> _ = kerasbn.export_for_serving(model, path)
    >>> served = tf.saved_model.load(path)
    >>> served.serve(tf.ones((2, 4))).shape
    TensorShape([2, 3])

    Raises:
        OSError: ``path`` cannot be written.
    """
    tool = "export_for_serving"
    refusal = kernels.current(tool).export_refusal()
    if refusal:
        raise BackendError(f"{tool} {refusal}")
    model_walk.check_model(model, tool)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OSError(f"export_for_serving: {path} exists and is not a directory.")
    parent = path.parent if not path.exists() else path
    try:
        ensure_writable_directory(parent)
    except OSError as error:
        raise OSError(f"export_for_serving: cannot write to {path}: {error.strerror or error}") from None
    served = model
    bns = model_walk.batch_norm_layers(model)
    if fold and bns:
        if model_walk.is_graph_model(model):
            left = unfoldable(model)
            served = fold_batch_norm(model)
        else:
            left = [f"{bn.name} (in subclassed model {type(model).__name__}, which has no graph to "
                    "rebuild)" for bn in bns]
        if left:
            warnings.warn(f"{tool}: {len(left)} of {len(bns)} BN layers not folded, exported as they are: "
                          + "; ".join(left), stacklevel=2)
    # Keras 3.8 prints "Saved artifact at ..." whatever `verbose` says; a library call stays quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        served.export(str(path), format="tf_saved_model", verbose=False)
    return served



