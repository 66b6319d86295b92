"""Exact population statistics after training (the paper's Algorithm 2).

The moving averages lag the weights: they mix statistics of many past
versions of the network. ``recalibrate_statistics`` runs the trained, frozen
network over training batches with every BN layer normalizing by its batch
statistics (as in training) and sets each layer's population statistics to

    E[x] = mean over batches of mu_B,   Var[x] = m/(m-1) * mean over batches of var_B

exactly (known as "precise BN"). Other layers (dropout) run in inference mode.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import tensorflow as tf

from kerasbn import cross_replica
from kerasbn.batch_normalization import BatchNormalization
from kerasbn.convert import is_batch_normalization
from kerasbn.moments import local_moments, variance_from_moments


class _Accumulator:
    """Sums of batch means and unbiased variances for one BN layer."""

    def __init__(self, layer):
        self.layer = layer
        channels = layer.moving_mean.shape[0]
        # SUM aggregation: under a strategy each replica adds its own batch
        # (or, synchronized, the same global batch) and one count; the
        # ratio of sums is the average over batches either way.
        with tf.init_scope():
            make = lambda: tf.Variable(  # noqa: E731
                tf.zeros([channels]), trainable=False,
                aggregation=tf.VariableAggregation.SUM,
                synchronization=tf.VariableSynchronization.ON_READ)
            self.mean_sum, self.variance_sum, self.batches = make(), make(), make()

    def add(self, inputs, mask):
        layer = self.layer
        x = tf.cast(inputs, tf.float32)
        rank = x.shape.rank
        axis = layer.axis % rank if isinstance(layer.axis, int) else layer.axis[0] % rank
        if mask is not None:
            mask = tf.expand_dims(tf.cast(mask, tf.bool), axis if isinstance(layer, BatchNormalization) else -1)
        ghost = getattr(layer, "virtual_batch_size", None)
        if ghost:
            x, mask, axis = layer._split_ghost_batches(x, mask)
            rank += 1
        axes = [a for a in range(rank) if a != axis and not (ghost and a == 0)]
        count, mean, m2 = local_moments(x, axes, mask)
        channels = x.shape[axis]
        count, mean, m2 = (tf.reshape(t, [-1, channels]) for t in (count, mean, m2))
        if getattr(layer, "synchronized", False) and not ghost:
            count, mean, m2 = cross_replica.global_moments(
                count[0], mean[0], m2[0], getattr(layer, "sync_group_size", None))
            count, mean, m2 = count[None], mean[None], m2[None]
        variance = variance_from_moments(count, m2) * count / tf.maximum(count - 1.0, 1.0)
        valid = tf.cast(count > 1.0, tf.float32)  # a single value has no variance
        self.mean_sum.assign_add(tf.reduce_sum(valid * mean, 0))
        self.variance_sum.assign_add(tf.reduce_sum(valid * variance, 0))
        self.batches.assign_add(tf.reduce_sum(valid, 0))


def _bn_layers(model):
    return [layer for layer in model._flatten_layers(include_self=False)
            if is_batch_normalization(layer)]


def _first_input(batch):
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def recalibrate_statistics(model, data, steps: int | None = None, verbose: int | str = "auto"):
    """Re-estimates every BN layer's population statistics exactly (Algorithm 2).

    Args:
        model: a built Keras model holding Keras' or kerasbn's BN layers
            (nested models included). Its weights are not changed; only the
            BN layers' ``moving_mean`` and ``moving_variance``.
        data: a ``tf.data.Dataset`` or an iterable of batches: inputs, or
            ``(inputs, targets[, weights])`` tuples (targets are ignored).
            Use training data with training-time preprocessing and the
            training batch size: each batch is one of Algorithm 2's B.
        steps: batches to use; None means all of ``data``.
        verbose: 1 shows a progress bar, 0 none, "auto" shows one when
            ``steps`` is large.

    Returns:
        ``model``, updated in place. Each layer's momentum, settings and other
        state (renorm statistics, ``num_batches``) are restored.

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
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model; received {type(model).__name__}.")
    if steps is not None and (not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"`steps` must be a positive int or None; received steps={steps!r}.")
    layers = _bn_layers(model)
    if not layers:
        warnings.warn(f"recalibrate_statistics: model {model.name!r} has no batch-normalization "
                      "layer; returning it unchanged.", stacklevel=2)
        return model
    strategy = tf.distribute.get_strategy()
    if hasattr(model, "distribute_strategy"):
        strategy = model.distribute_strategy
    with strategy.scope():
        accumulators = [_Accumulator(layer) for layer in layers]
    saved_state = [[w.numpy() for w in layer.non_trainable_weights] for layer in layers]

    def recording_call(layer, accumulator, original):
        def call(inputs, training=None, mask=None):
            accumulator.add(inputs, mask)
            return original(inputs, training=True, mask=mask)
        return call

    for layer, accumulator in zip(layers, accumulators):
        layer.call = recording_call(layer, accumulator, layer.call)
    try:
        step = tf.function(lambda x: model(x, training=False))
        distributed = strategy.num_replicas_in_sync > 1
        if distributed:
            if isinstance(data, tf.data.Dataset):
                data = strategy.experimental_distribute_dataset(data)
            run = lambda x: strategy.run(step, (x,))  # noqa: E731
            run = tf.function(run)
        else:
            run = step
        if verbose == "auto":
            verbose = 1 if steps is None or steps >= 50 else 0
        progress = keras.utils.Progbar(steps, unit_name="batch") if verbose else None
        seen = 0
        for batch in data:
            if steps is not None and seen >= steps:
                break
            run(_first_input(batch))
            seen += 1
            if progress:
                progress.update(seen)
        if seen == 0:
            raise ValueError("recalibrate_statistics: `data` yielded no batches.")
    finally:
        for layer, state in zip(layers, saved_state):
            del layer.call
            for weight, value in zip(layer.non_trainable_weights, state):
                weight.assign(value)
    for layer, accumulator in zip(layers, accumulators):
        batches = accumulator.batches.read_value().numpy()
        if not np.all(batches > 0):
            warnings.warn(f"recalibrate_statistics: layer {layer.name!r} saw no batch with two "
                          "or more values per channel; its statistics are unchanged.",
                          stacklevel=2)
            continue
        mean = accumulator.mean_sum.read_value().numpy() / batches
        variance = accumulator.variance_sum.read_value().numpy() / batches
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(variance)
        if getattr(layer, "renorm", False) and hasattr(layer, "moving_stddev"):
            # Keras' renorm layer derives moving_variance from moving_stddev.
            layer.moving_stddev.assign(np.sqrt(variance + layer.epsilon))
    return model



