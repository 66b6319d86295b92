"""Finding and replacing the batch-normalization layers of a Keras model.

Shared by :func:`kerasbn.convert_sync_batchnorm`, :func:`kerasbn.fold_batch_norm`
and :func:`kerasbn.recalibrate_statistics`.
"""

from __future__ import annotations

import warnings

import keras

from kerasbn.batch_normalization import BatchNormalization
from kerasbn.construction import unmarked_class


def is_batch_normalization(layer) -> bool:
    """Keras' BatchNormalization or kerasbn's (and their subclasses)."""
    return isinstance(layer, (keras.layers.BatchNormalization, BatchNormalization))


def check_model(model, tool: str) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(f"{tool}: `model` must be a keras.Model; received {type(model).__name__}.")


def batch_norm_layers(model) -> list:
    """Every BN layer ``model`` tracks, in model order.

    Graph nodes, nested models, and BN inside custom layers (held in
    attributes, lists or dicts): whatever Keras tracks for the layer's
    weights. This walk decides what every tool covers.
    """
    return [layer for layer in model._flatten_layers(include_self=False)
            if is_batch_normalization(layer)]


def batch_norm_paths(model) -> list:
    """``(path, bn)`` for every BN of :func:`batch_norm_layers`; path names its owners, e.g.
    ``"block_3/bn"``."""
    found = []

    def walk(layer, prefix):
        for sub in layer._flatten_layers(include_self=False, recursive=False):
            path = f"{prefix}{sub.name}"
            if is_batch_normalization(sub):
                found.append((path, sub))
            walk(sub, path + "/")

    walk(model, "")
    return found


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


def sublayers(layer) -> list:
    """``layer`` and every layer it tracks (attributes, lists, dicts, nested models), in order."""
    return list(layer._flatten_layers(include_self=True, recursive=True))


def _own_weights(layer) -> list:
    """The weights ``layer`` created itself, not its sublayers'."""
    inner = {id(w) for sub in layer._flatten_layers(include_self=False, recursive=True)
             for w in sub.weights}
    return [w for w in layer.weights if id(w) not in inner]


def _copy_batch_norm_weights(source, target) -> None:
    """By name: a kerasbn target may have weights its source lacks (``num_batches``)."""
    by_name = {w.name: w for w in source.weights}
    for weight in target.weights:
        if weight.name in by_name:
            weight.assign(_copy(by_name[weight.name]))


def copy_weights(source, target) -> None:
    """``source``'s weights into its rebuilt ``target``, sublayer by sublayer.

    Graph operations that are not layers (``keras.ops.pad`` and the like)
    hold no weights. A custom layer is matched with its rebuild sublayer by
    sublayer, in tracking order, so that BN layers inside it that became
    kerasbn's take their weights by name.
    """
    if not isinstance(source, keras.layers.Layer):
        return
    sources, targets = sublayers(source), sublayers(target)
    pairs = list(zip(sources, targets, strict=False))  # the lengths are compared first below
    if len(sources) != len(targets) or any(
            unmarked_class(type(s)) is not unmarked_class(type(t))
            and not (is_batch_normalization(s) and is_batch_normalization(t))
            for s, t in pairs):
        raise ValueError(
            f"Layer {source.name!r} ({type(source).__name__}) rebuilt from its config tracks other "
            f"sublayers than the original ({[type(s).__name__ for s in sources]} vs "
            f"{[type(t).__name__ for t in targets]}); its weights cannot be matched.")
    for s, t in pairs:
        if is_batch_normalization(s):
            _copy_batch_norm_weights(s, t)
            continue
        own_source, own_target = _own_weights(s), _own_weights(t)
        if [w.shape for w in own_source] != [w.shape for w in own_target]:
            raise ValueError(f"Layer {s.name!r} rebuilt from its config has other weights than "
                             "the original; they cannot be copied.")
        for w, v in zip(own_target, own_source, strict=True):
            w.assign(_copy(v))


def _copy(variable):
    """A copy of ``variable``'s value: on JAX, assigning the variable would share its buffer,
    which Keras' jitted steps donate (the other model's weight is then deleted)."""
    return keras.ops.copy(variable.value)


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
    """A new ``layer`` from its config; a layer a ``batch_norm_scope`` marked is rebuilt by its
    own class, in whatever scope is open now (not in the one it was built in)."""
    cls = unmarked_class(type(layer))
    return cls.from_config(cls.get_config(layer))
