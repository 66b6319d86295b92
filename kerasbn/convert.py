"""Swapping the batch-normalization layers of an existing Keras model."""

from __future__ import annotations

import keras

from kerasbn.batch_normalization import BatchNormalization, SyncBatchNormalization

# Arguments both layers share; everything else in Keras' config is base-layer state.
_SHARED_ARGUMENTS = (
    "axis", "momentum", "epsilon", "center", "scale", "beta_initializer",
    "gamma_initializer", "moving_mean_initializer", "moving_variance_initializer",
    "beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint",
    "renorm", "renorm_clipping", "renorm_momentum", "name", "trainable", "dtype",
)


def is_batch_normalization(layer) -> bool:
    return isinstance(layer, (keras.layers.BatchNormalization, BatchNormalization))


def sync_config(layer, sync_group_size=None, **overrides) -> dict:
    """The SyncBatchNormalization config equivalent to ``layer``'s."""
    config = layer.get_config()
    if isinstance(layer, BatchNormalization):
        config = dict(config)
    else:
        config = {k: config[k] for k in _SHARED_ARGUMENTS if k in config}
        if isinstance(config.get("axis"), (list, tuple)):
            if len(config["axis"]) != 1:
                raise ValueError(
                    f"Layer {layer.name!r} normalizes over several axes "
                    f"{config['axis']}; kerasbn supports one channel axis."
                )
            config["axis"] = config["axis"][0]
        if not config.get("renorm"):
            config.pop("renorm_clipping", None)
        # Keras averages the biased variance; keep the model's behaviour.
        config["unbiased_variance"] = False
    config.pop("synchronized", None)
    config.pop("fused", None)
    config["sync_group_size"] = sync_group_size
    config.update(overrides)
    return config


def _copy_weights(source, target) -> None:
    if not is_batch_normalization(source):
        target.set_weights(source.get_weights())
        return
    by_name = {w.name: w for w in source.weights}
    for weight in target.weights:
        if weight.name in by_name:
            weight.assign(by_name[weight.name])
        # Weights only kerasbn has (num_batches) keep their initial value.


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
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model; received {type(model).__name__}.")
    if not isinstance(model, (keras.Sequential,)) and not hasattr(model, "_nodes_by_depth"):
        raise ValueError(
            "convert_sync_batchnorm needs a functional or Sequential model; "
            f"{type(model).__name__} is a subclassed model: construct it with "
            "kerasbn.SyncBatchNormalization layers instead."
        )
    pairs = []

    def clone(layer):
        if is_batch_normalization(layer):
            new = SyncBatchNormalization.from_config(sync_config(layer, sync_group_size, **overrides))
        else:
            new = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    converted = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for source, target in pairs:
        _copy_weights(source, target)
    return converted
