"""Swapping the batch-normalization layers of an existing Keras model."""

from __future__ import annotations

from kerasbn import model_walk
from kerasbn.backend import require_tensorflow_backend
from kerasbn.batch_normalization import BatchNormalization, SyncBatchNormalization

# Arguments both layers share; everything else in Keras' config is base-layer state.
_SHARED_ARGUMENTS = (
    "axis", "momentum", "epsilon", "center", "scale", "beta_initializer",
    "gamma_initializer", "moving_mean_initializer", "moving_variance_initializer",
    "beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint",
    "renorm", "renorm_clipping", "renorm_momentum", "synchronized", "name", "trainable",
    "dtype",
)


def kerasbn_config(layer, **overrides) -> dict:
    """The :class:`kerasbn.BatchNormalization` config equivalent to ``layer``'s.

    From Keras' own layer, it keeps Keras' biased moving variance
    (``unbiased_variance=False``); ``overrides`` are applied last.
    """
    config = dict(layer.get_config())
    if not isinstance(layer, BatchNormalization):
        config = {k: config[k] for k in _SHARED_ARGUMENTS if k in config}
        if not config.get("renorm"):
            config.pop("renorm_clipping", None)
        config["unbiased_variance"] = False
    config.update(overrides)
    return config


def convert_sync_batchnorm(model, sync_group_size: int | None = None, **overrides):
    """A copy of ``model`` whose BN layers are all synchronized kerasbn layers.

    Every ``keras.layers.BatchNormalization`` and ``kerasbn.BatchNormalization``
    in ``model`` -- Sequential or functional, nested models included -- is
    replaced by a :class:`kerasbn.SyncBatchNormalization` with the same
    arguments, weights and moving statistics; every other layer is cloned
    with its weights. The original model is not modified. Layers converted
    from Keras' own keep Keras' biased moving variance
    (``unbiased_variance=False``) unless overridden.

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
    """
    tool = "convert_sync_batchnorm"
    require_tensorflow_backend(tool)
    model_walk.check_model(model, tool)
    model_walk.require_graph_model(
        model, tool, ": construct it with kerasbn.SyncBatchNormalization layers instead")

    def make_layer(layer):
        if not model_walk.is_batch_normalization(layer):
            return model_walk.clone_layer(layer)
        config = kerasbn_config(layer, sync_group_size=sync_group_size, **overrides)
        for argument in ("synchronized", "fused"):
            config.pop(argument, None)
        return SyncBatchNormalization.from_config(config)

    return model_walk.clone_model(model, make_layer)
