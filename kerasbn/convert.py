"""Swapping the batch-normalization layers of an existing Keras model."""

from __future__ import annotations

from kerasbn import model_walk
from kerasbn.backend import require_backend
from kerasbn.batch_normalization import BatchNormalization
from kerasbn.construction import batch_norm_scope, kerasbn_config, replacement

__all__ = ["convert_sync_batchnorm", "kerasbn_config"]


def convert_sync_batchnorm(model, sync_group_size: int | None = None, **overrides):
    """A copy of ``model`` whose BN layers are all synchronized kerasbn layers.

    Every ``keras.layers.BatchNormalization`` and ``kerasbn.BatchNormalization``
    in ``model`` -- Sequential or functional, nested models included -- is
    replaced by a :class:`kerasbn.SyncBatchNormalization` with the same
    arguments, weights and moving statistics; every other layer is cloned
    with its weights. BN layers inside custom layers (in attributes, lists
    or dicts of layers) are converted too: each custom layer is rebuilt from
    its config inside :func:`kerasbn.batch_norm_scope`, so the BN layers its
    code constructs are kerasbn's synchronized ones. Graph operations that
    are not layers (``keras.ops.pad``, ``split``, ``+``) are kept as they are.
    The original model is not modified. Layers converted from Keras' own keep
    Keras' biased moving variance (``unbiased_variance=False``) unless
    overridden.

    Conversion is complete or refused: if any BN layer the copy holds is not
    synchronized (a subclass of Keras' BN inside a custom layer, say), it
    raises naming each one and why.

    A ``.keras`` file of the copy loads back converted, with no scope to
    remember: the custom layers rebuilt here are marked, so that loading
    rebuilds them inside the same scope (docs/design.md, "Models others
    built").

    Build the copy under the strategy that will train it:

    >>> import keras, kerasbn, tensorflow as tf
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
    ...                           keras.layers.BatchNormalization()])
    >>> with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
    ...     synced = kerasbn.convert_sync_batchnorm(model)
    >>> type(synced.layers[1]).__name__
    'SyncBatchNormalization'

    Args:
        model: a built functional or Sequential Keras model.
        sync_group_size: passed to every converted layer.
        **overrides: other :class:`BatchNormalization` arguments to set on
            every converted layer (e.g. ``momentum=0.9``).

    Returns:
        The converted copy.

    Raises:
        ValueError: a subclassed model (no graph to rebuild: build it inside
            ``kerasbn.batch_norm_scope(synchronized=True)`` instead), a custom
            layer that cannot be rebuilt from its config, or BN layers that
            would stay unsynchronized.
    """
    tool = "convert_sync_batchnorm"
    require_backend(tool)
    model_walk.check_model(model, tool)
    model_walk.require_graph_model(
        model, tool, ": construct it inside kerasbn.batch_norm_scope(synchronized=True) instead")

    originals = model_walk.batch_norm_paths(model)
    overrides = dict(overrides, sync_group_size=sync_group_size)

    def make_layer(layer):
        if model_walk.is_batch_normalization(layer):
            return replacement(layer, synchronized=True, **overrides)
        try:
            return model_walk.clone_layer(layer)
        except Exception as error:
            raise ValueError(f"{tool}: layer {layer.name!r} ({type(layer).__name__}) cannot be "
                             f"rebuilt from its config: {type(error).__name__}: {error}") from error

    with batch_norm_scope(synchronized=True, **overrides):
        converted = model_walk.clone_model(model, make_layer)
    _check_complete(tool, originals, model_walk.batch_norm_paths(converted))
    return converted


def _check_complete(tool, originals, converted) -> None:
    """Raises unless every BN of the copy is kerasbn's synchronized layer, one per original."""
    left = [f"{path} ({_why_unconverted(bn)})" for path, bn in converted
            if not (isinstance(bn, BatchNormalization) and bn.synchronized)]
    if len(converted) != len(originals):
        left.append(f"the copy holds {len(converted)} BN layers where the model holds "
                    f"{len(originals)} (a custom layer builds its BN layers otherwise than its config says)")
    if left:
        raise ValueError(f"{tool}: {len(left)} of {len(originals)} BN layers would stay "
                         "unsynchronized, so nothing was converted: " + "; ".join(left))


def _why_unconverted(bn) -> str:
    return (f"its class {type(bn).__module__}.{type(bn).__qualname__} subclasses "
            "BatchNormalization; only Keras' and kerasbn's own classes are rebuilt as kerasbn's "
            "synchronized layer (make it subclass kerasbn.SyncBatchNormalization)")
