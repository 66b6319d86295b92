"""Finding and replacing the batch-normalization layers of a Keras model.

Shared by :func:`kerasbn.convert_sync_batchnorm`, :func:`kerasbn.fold_batch_norm`
and :func:`kerasbn.recalibrate_statistics`.
"""

from __future__ import annotations

import warnings

import keras

from kerasbn.batch_normalization import BatchNormalization


def is_batch_normalization(layer) -> bool:
    """Keras' BatchNormalization or kerasbn's (and their subclasses)."""
    return isinstance(layer, (keras.layers.BatchNormalization, BatchNormalization))


def check_model(model, tool: str) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(f"{tool}: `model` must be a keras.Model; received {type(model).__name__}.")


def batch_norm_layers(model) -> list:
    """Every BN layer in ``model``, nested models included, in model order."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if is_batch_normalization(layer)]


def warn_no_batch_norm(model, tool: str):
    """Warns that ``tool`` leaves ``model`` unchanged, and returns it."""
    warnings.warn(f"{tool}: model {model.name!r} has no batch-normalization layer; "
                  "returning it unchanged.", stacklevel=3)
    return model


def is_graph_model(model) -> bool:
    """Functional or Sequential: a graph of layers that can be rebuilt (a subclassed model's is code)."""
    return isinstance(model, keras.Sequential) or hasattr(model, "_nodes_by_depth")


def require_graph_model(model, tool: str, hint: str = "") -> None:
    """Cloning needs a functional or Sequential model (subclassed models have no graph)."""
    if not is_graph_model(model):
        raise ValueError(f"{tool} needs a functional or Sequential model; "
                         f"{type(model).__name__} is a subclassed model{hint}.")


def copy_weights(source, target) -> None:
    """``source``'s weights into ``target``, matched by name for BN layers.

    A BN target may have weights its source lacks (kerasbn's ``num_batches``);
    they keep their initial value.
    """
    if not is_batch_normalization(source):
        target.set_weights(source.get_weights())
        return
    by_name = {w.name: w for w in source.weights}
    for weight in target.weights:
        if weight.name in by_name:
            weight.assign(by_name[weight.name])


def clone_model(model, make_layer, set_weights=copy_weights):
    """A copy of ``model`` (nested models too) with each layer made by ``make_layer(layer)``.

    Then ``set_weights(source, new)`` fills every new layer's weights.
    """
    pairs = []

    def clone(layer):
        new = make_layer(layer)
        pairs.append((layer, new))
        return new

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for source, new in pairs:
        set_weights(source, new)
    return copy


def clone_layer(layer):
    return layer.__class__.from_config(layer.get_config())
