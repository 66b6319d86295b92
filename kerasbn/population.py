"""Exact population statistics after training (the paper's Algorithm 2).

The moving averages lag the weights: they mix statistics of many past
versions of the network. ``recalibrate_statistics`` runs the trained, frozen
network over training batches with every BN layer normalizing by its batch
statistics (as in training) and sets each layer's population statistics to

    E[x] = mean over batches of mu_B,   Var[x] = m/(m-1) * mean over batches of var_B

exactly (known as "precise BN"). Other layers (dropout) run in inference mode.

Each BN layer's statistics are gathered by a *population twin*: a kerasbn
layer with the same configuration and weights (Keras' own layers get a
kerasbn twin) set to ``momentum=None`` (the cumulative average) and
``unbiased_variance=True``, so that the layer's own statistics code does the
work, as PyTorch's ``torch.optim.swa_utils.update_bn`` runs the model. While the run
lasts, each BN layer's ``call`` - Keras' and kerasbn's alike, on the instance only - is
its twin's (:func:`_calls_by_twins`), and is restored after: the layers know nothing of
it. The model's layers and settings are never changed, only their moving statistics.

On TensorFlow the run is a ``tf.function`` (batches split across the replicas of the
model's strategy); on JAX and PyTorch, a loop of eager calls (under ``keras.distribution``,
each device's share is what an unsynchronized layer averages; under ``torch.distributed``,
every rank's batches count - each step's batches merged over the ranks, so every rank passes
the same number of batches - and every rank ends with the same statistics).
"""

from __future__ import annotations

import contextlib
import warnings

import keras
import numpy as np

from kerasbn import kernels, model_walk
from kerasbn.batch_normalization import BatchNormalization
from kerasbn.construction import kerasbn_config


def _population_twin(layer, every_rank: bool):
    """A built kerasbn layer that averages ``layer``'s batch statistics exactly (over every
    process's batches when ``every_rank``: each step's batches merged over the processes)."""
    config = kerasbn_config(layer, momentum=None, unbiased_variance=True, renorm=False,
                            trainable=True, name=f"{layer.name}_population")
    if every_rank:
        config.update(synchronized=True, sync_group_size=None)
    config.pop("renorm_clipping", None)
    twin_class = type(layer) if isinstance(layer, BatchNormalization) else BatchNormalization
    twin = twin_class.from_config(config)
    shape = [None] * layer.input_spec.ndim
    shape[layer.axis] = layer.moving_mean.shape[0]
    twin.build(tuple(shape))
    for name in ("gamma", "beta"):
        if getattr(layer, name, None) is not None:
            getattr(twin, name).assign(keras.ops.copy(getattr(layer, name).value))
    return twin


def _first_input(batch):
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def recalibrate_statistics(model, data, steps: int | None = None, verbose: int | str = "auto"):
    """Re-estimates every BN layer's population statistics exactly (Algorithm 2).

    Args:
        model: a built Keras model holding Keras' or kerasbn's BN layers
            (nested models included). Its weights are not changed; only the
            BN layers' ``moving_mean`` and ``moving_variance`` (and Keras'
            renorm ``moving_stddev``, derived from them).
        data: a ``tf.data.Dataset`` or an iterable of batches: inputs, or
            ``(inputs, targets[, weights])`` tuples (targets are ignored).
            Use training data with training-time preprocessing and the
            training batch size: each batch is one of Algorithm 2's B.
        steps: batches to use; None means all of ``data``.
        verbose: 1 shows a progress bar, 0 none, "auto" shows one when
            ``steps`` is large.

    Returns:
        ``model``, updated in place.

    Under a distribution strategy (the model built in its scope), batches
    are split across replicas; synchronized layers then average global-batch
    statistics, unsynchronized layers per-replica ones.

    Example:

    >>> import numpy as np, keras, kerasbn
    >>> model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNormalization()])
    >>> data = [np.random.RandomState(i).normal(5, 2, (32, 3)).astype("float32")
    ...         for i in range(4)]
    >>> model = kerasbn.recalibrate_statistics(model, data, verbose=0)
    >>> bool(np.all(np.abs(model.layers[0].moving_mean.numpy() - 5) < 1))
    True
    """
    tool = "recalibrate_statistics"
    backend = kernels.current(tool)
    model_walk.check_model(model, tool)
    if steps is not None and (not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"`steps` must be a positive int or None; received steps={steps!r}.")
    layers = model_walk.batch_norm_layers(model)
    if not layers:
        return model_walk.warn_no_batch_norm(model, tool)
    with backend.population_scope(model):  # where the twins' variables belong (a strategy's scope)
        twins = [_population_twin(layer, backend.merges_every_rank()) for layer in layers]
    step, batches = backend.population_pass(model, data)
    with _calls_by_twins(layers, twins):
        seen = _loop(step, batches, steps, verbose)
    if seen == 0:
        raise ValueError("recalibrate_statistics: `data` yielded no batches.")
    for layer, twin in zip(layers, twins, strict=True):
        if float(twin.num_batches.numpy()) == 0:
            warnings.warn(f"recalibrate_statistics: layer {layer.name!r} saw no batch with two "
                          "or more values per channel; its statistics are unchanged.",
                          stacklevel=2)
            continue
        variance = twin.moving_variance.numpy()
        layer.moving_mean.assign(twin.moving_mean.numpy())
        layer.moving_variance.assign(variance)
        if getattr(layer, "renorm", False):
            # Renorm layers (Keras' and kerasbn's) derive moving_variance from moving_stddev.
            layer.moving_stddev.assign(np.sqrt(variance + layer.epsilon))
    return model


@contextlib.contextmanager
def _calls_by_twins(layers, twins):
    """Within the block, each BN layer's ``call`` is its twin's in training mode (an instance
    attribute over the class's method, deleted after: the layer's own ``call`` is back)."""
    def twin_call(twin):
        def call(inputs, training=None, mask=None):
            return twin(inputs, training=True, mask=mask)
        return call

    pairs = list(zip(layers, twins, strict=True))
    for layer, twin in pairs:
        layer.call = twin_call(twin)
    try:
        yield
    finally:
        for layer, _ in pairs:
            del layer.call


def _progress(steps, verbose):
    if verbose == "auto":
        verbose = 1 if steps is None or steps >= 50 else 0
    return keras.utils.Progbar(steps, unit_name="batch") if verbose else None


def _loop(run, data, steps, verbose) -> int:
    progress = _progress(steps, verbose)
    seen = 0
    for batch in data:
        if steps is not None and seen >= steps:
            break
        run(_first_input(batch))
        seen += 1
        if progress:
            progress.update(seen)
    return seen
