"""Each backend's kernels behind one typed contract (:class:`Kernels`); :func:`current` picks them.

A training call of :class:`kerasbn.BatchNormalization` is one plan on every backend::

    plan = kernels.training_plan(request, inputs, mask)             # request: the layer's settings
    statistics = kernels.local_statistics(inputs, axis, mask, plan)  # this device's (count, mean, M2)
    statistics = kernels.merge(statistics, plan)                     # across devices, if synchronized
    gamma, beta, averages = kernels.compiled(updated_averages)(statistics, ...)  # the guard, the averages
    y = kernels.normalize(inputs, axis, statistics, gamma, beta, epsilon, mask, plan)

``plan.one_pass`` (TensorFlow's fused kernel, local layer) computes the statistics and the
output in one call instead: ``y, statistics = kernels.normalize_one_pass(...)``. Each backend's
plan is its own type; the layer reads only ``one_pass``. Inference is written once, in
``keras.ops`` (:func:`kerasbn.kernels.portable.normalize_inference`), and runs on every backend,
the inference-only ones included. The merge of triples, the guard against non-finite batches and
the moving averages are :mod:`kerasbn.statistics`, shared.

A backend is one module implementing :class:`Kernels`, named in :data:`TRAINING_MODULES`. Modules
are imported when first used: on JAX or PyTorch, TensorFlow is never imported.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import keras

from kerasbn.backend import require_backend
from kerasbn.statistics import Moments

TRAINING_MODULES = {
    "tensorflow": "kerasbn.kernels.tensorflow_backend",
    "jax": "kerasbn.kernels.jax_backend",
    "torch": "kerasbn.kernels.torch_backend",
}


@dataclasses.dataclass(frozen=True)
class Request:
    """What a training call asks of its backend: the layer's settings that decide the plan.

    channel_axis: the inputs' channel axis, non-negative.
    fused: the layer's ``fused`` (True, False, or None: the backend decides).
    virtual_batch_size: ghost batches' size, or None.
    synchronized: merge the statistics across devices (replicas, ranks, JAX devices).
    sync_group_size: devices per synchronized group; None means all.
    axis_name: JAX's mapped axis (``shard_map``/``pmap``) to merge over, or None.
    renorm: Batch Renormalization (its corrections need the statistics before normalizing).
    """

    channel_axis: int
    fused: bool | None = None
    virtual_batch_size: int | None = None
    synchronized: bool = False
    sync_group_size: int | None = None
    axis_name: str | None = None
    renorm: bool = False


class Plan(Protocol):
    """How one training call computes and merges its statistics; each backend's own type."""

    one_pass: bool


@runtime_checkable
class Kernels(Protocol):
    """The contract every backend module implements (a module satisfies it structurally)."""

    def training_plan(self, request: Request, inputs: Any, mask: Any) -> Plan:
        """Decides the kernels and the merge once per call; ValueError/TypeError for settings
        this backend cannot run."""

    def local_statistics(self, x: Any, channel_axis: int, mask: Any, plan: Plan) -> Moments:
        """This device's ``(count, mean, m2)``: ``(C,)`` each, or ``(G, C)`` for groups."""

    def merge(self, statistics: Moments, plan: Plan) -> Moments:
        """The statistics of this device's group (the input itself when not synchronized)."""

    def normalize(self, x: Any, channel_axis: int, statistics: Moments, gamma: Any, beta: Any,
                  epsilon: float, mask: Any, plan: Plan) -> Any:
        """``gamma * (x - mean) / sqrt(var + epsilon) + beta``, float32, with the gradient of
        one process on the group's whole batch."""

    def normalize_one_pass(self, x: Any, channel_axis: int, gamma: Any, beta: Any,
                           epsilon: float) -> tuple[Any, Moments]:
        """``(y, statistics)`` in one call, where ``plan.one_pass`` asks for it."""

    def compiled(self, function: Callable) -> Callable:
        """``function`` (arrays positional, hashable settings keyword-only) as this backend runs
        it best: JAX compiles it once per shape and settings when it is called eagerly (op by op,
        every primitive would compile on its own); the others run it as it is."""

    # What the tools need of a backend (kerasbn.population, kerasbn.serving).
    def population_scope(self, model: Any) -> AbstractContextManager:
        """Where variables used beside ``model`` are created (its ``tf.distribute`` strategy's scope)."""

    def population_pass(self, model: Any, data: Iterable) -> tuple[Callable[[Any], Any], Iterable]:
        """``(step, batches)``: ``step(batch)`` runs ``model`` in inference mode on one of ``batches``
        (``data`` as this backend iterates it: distributed over a strategy's replicas, as numpy)."""

    def merges_every_rank(self) -> bool:
        """Whether this process is one of several whose batches a recalibration merges (each step's
        batches over every process: torch.distributed)."""

    def export_refusal(self) -> str | None:
        """Why a TensorFlow SavedModel cannot be exported from this backend (what to do), or None."""


def compiled(function: Callable) -> Callable:
    """:meth:`Kernels.compiled` of Keras' current backend: ``function`` as it is on the
    inference-only backends, which have no kernels module."""
    return function if keras.backend.backend() not in TRAINING_MODULES else current().compiled(function)


def current(what: str = "kerasbn") -> Kernels:
    """The training kernels of Keras' current backend; :class:`kerasbn.backend.BackendError` for a
    backend kerasbn cannot train on (naming those it can)."""
    backend = require_backend(what)
    if backend not in _LOADED:  # imported once: the layer asks at every training call
        _LOADED[backend] = importlib.import_module(TRAINING_MODULES[backend])
    return _LOADED[backend]


_LOADED: dict = {}
