"""Work-arounds for Keras bugs that stop kerasbn's users, applied on request.

``model.fit`` under ``tf.distribute.MultiWorkerMirroredStrategy`` fails in
Keras 3 (keras-team/keras#20585, open since Keras 3.0): before training,
``TensorFlowTrainer._maybe_symbolic_build`` takes one batch to learn the
input shapes and calls ``strategy.reduce("MEAN", batch)`` on it eagerly,
which the collective strategy cannot do ("Attempt to convert a value
(PerReplica...) to a Tensor"). Only the shapes and dtypes matter there, so
the first local replica's batch serves as well. Then every training step
reduces its logged metrics with ``strategy.reduce("MEAN", v, axis=0)``,
which fails on the scalar metrics ("Invalid reduction dimension 0 for input
with 0 dimensions"); scalars are reduced with ``axis=None``.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from kerasbn.backend import require_tensorflow_backend

_PATCHED = "_kerasbn_multi_worker_fix"


def patch_keras_multi_worker_fit() -> bool:
    """Makes ``model.fit`` work under MultiWorkerMirroredStrategy in Keras 3.

    Idempotent. Returns True when the patch is (now) in place, False when
    this Keras has no such method (nothing to fix).
    """
    require_tensorflow_backend("patch_keras_multi_worker_fit")
    try:
        from keras.src.backend.tensorflow import trainer as trainer_module
        from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
    except ImportError:
        return False
    original = getattr(TensorFlowTrainer, "_maybe_symbolic_build", None)
    if original is None:
        return False
    if getattr(original, _PATCHED, False):
        return True

    @functools.wraps(original)
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = getattr(self, "_distribute_strategy", None)
        if iterator is None or not isinstance(
            strategy, tf.distribute.MultiWorkerMirroredStrategy
        ):
            return original(self, iterator=iterator, data_batch=data_batch)
        # Keras yields (step, iterator) before 3.11 and (begin, end, iterator) after.
        for *_, it in iterator:
            batch = next(it)
            data_batch = tf.nest.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v,
                batch,
            )
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    original_reduce = trainer_module.reduce_per_replica

    @functools.wraps(original_reduce)
    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("mean", "auto") or not isinstance(
            strategy, tf.distribute.MultiWorkerMirroredStrategy
        ):
            return original_reduce(values, strategy, reduction)

        def reduce_mean(v):
            if not isinstance(v, tf.distribute.DistributedValues):
                return v
            rank = strategy.experimental_local_results(v)[0].shape.rank
            return strategy.reduce("MEAN", v, axis=0 if rank else None)

        return tf.nest.map_structure(reduce_mean, values)

    setattr(_maybe_symbolic_build, _PATCHED, True)
    TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer_module.reduce_per_replica = reduce_per_replica
    return True
