"""Each backend's kernels behind one small interface; :func:`current` picks them.

A training call of :class:`kerasbn.BatchNormalization` is one plan on every backend::

    plan = kernels.training_plan(layer, inputs, mask)
    statistics = kernels.local_statistics(inputs, axis, mask, plan)   # this device's (count, mean, M2)
    statistics = kernels.merge(statistics, plan)                      # across devices, if synchronized
    guard, update (kerasbn.statistics, keras.ops: shared)
    y = kernels.normalize(inputs, axis, statistics, gamma, beta, epsilon, mask, plan)

``plan.one_pass`` (TensorFlow's fused kernel, local layer) computes the statistics and
the output in one call instead: ``y, statistics = kernels.normalize_one_pass(...)``.
Every backend module provides ``training_plan``, ``local_statistics``, ``merge``,
``normalize``, ``normalize_one_pass`` and ``normalize_inference``; the merge of triples,
the guard against non-finite batches and the moving averages are
:mod:`kerasbn.statistics`, shared. Backend modules are imported when first used: on
JAX, TensorFlow is never imported.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

from kerasbn.backend import require_backend

_MODULES = {"tensorflow": "kerasbn.kernels.tensorflow_backend", "jax": "kerasbn.kernels.jax_backend"}


class Plan(NamedTuple):
    """How one training call computes and merges its statistics.

    one_pass: TensorFlow's fused kernel computes statistics and output in one call.
    fused: TensorFlow's fused kernels, split (statistics, merge, normalization).
    groups: how many groups of the batch are normalized with their own statistics
        after the merge (ghost batches, or devices not synchronized); 1 means one set.
    blocks: how many per-device blocks the statistics are first computed on (JAX's
        data-parallel devices); 1 on TensorFlow, where each replica runs its own call.
    synchronized: statistics are merged across devices (replicas, or JAX devices).
    group_size: devices per synchronized group; None means all.
    axis_name: JAX's mapped axis (``shard_map``/``pmap``) to merge over.
    devices: JAX's ``keras.distribution`` devices the blocks are pinned to, found once per
        call; None when the blocks are not devices.
    """

    one_pass: bool = False
    fused: bool = False
    virtual_batch_size: int | None = None
    synchronized: bool = False
    group_size: int | None = None
    blocks: int = 1
    groups: int = 1
    axis_name: str | None = None
    devices: object = None


def current(what: str = "kerasbn"):
    """The kernels of Keras' current backend; :class:`BackendError` for one kerasbn cannot run on."""
    return importlib.import_module(_MODULES[require_backend(what)])
