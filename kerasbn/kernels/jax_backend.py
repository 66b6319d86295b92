"""JAX's kernels: element-wise statistics and normalization that XLA fuses, and JAX's distribution.

Under ``keras.distribution.DataParallel`` a jitted step sees the *global* batch, sharded
over the mesh's batch axis, and XLA's SPMD partitioner turns every reduction over it into
a cross-device one. Which devices' values each statistic covers is therefore decided
here, by shape: the batch is viewed as ``(N, B / N, ...)`` blocks, one per device
(pinned to them by a sharding constraint), and each block's ``(count, mean, M2)`` is
computed where the block lives, with no collective. Then, as the layer's arguments say:

- ``synchronized=True``: one all-gather of the ``(N, 3, C)`` table, merged on every device
  (:func:`kerasbn.statistics.merge_moments`): the global batch's statistics.
- ``sync_group_size=k``: the same table merged within consecutive groups of ``k`` devices.
- ``synchronized=False``: each block keeps its own statistics: each device's share, as a
  ``tf.distribute`` replica would compute it.

Normalization runs per group on the same view. Gradients are JAX's own through the
statistics (exact: the statistics are differentiable functions of the input), so the
backward pass needs no hand-written formula; XLA derives its collectives from the
forward ones. Inside ``shard_map``/``pmap`` (code that maps ``stateless_call`` over
devices itself) the layer's ``axis_name`` names the axis whose triples are all-gathered.

Called eagerly (outside any trace), the statistics, their merge and the normalization each run
as one compiled function per shape (:func:`compiled`, which the layer also applies to its guard and
moving averages, and to inference): op by op, JAX compiles every primitive of every new shape on
its own, which made a layer's first eager training call on new channels compile 16 functions
(0.6 s; now 5, 0.25 s). Inside a trace (``model.fit``, ``jax.jit``, ``shard_map``) the ops are
traced as they come, into the caller's compiled step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import inspect

import jax
import jax.numpy as jnp
import keras
from jax.sharding import NamedSharding, PartitionSpec

from kerasbn.kernels import Request
from kerasbn.kernels.portable import block_moments, eager_population_pass, normalize_blocks
from kerasbn.statistics import Moments, merge_moments

__all__ = ["JaxPlan", "compiled", "training_plan", "local_statistics", "merge", "normalize", "normalize_one_pass",
           "population_scope", "population_pass", "merges_every_rank", "export_refusal"]


@dataclasses.dataclass(frozen=True)
class JaxPlan:
    """blocks: the per-device (or per-ghost-batch) blocks the statistics are first computed on.
    groups: how many groups are normalized with their own statistics after the merge (1: one
    set; fewer groups than blocks: the blocks' statistics are merged within each group).
    axis_name: the mapped axis to merge over. devices: the ``keras.distribution`` devices the
    blocks are pinned to, found once per call (None when the blocks are not devices)."""

    blocks: int = 1
    groups: int = 1
    axis_name: str | None = None
    devices: object = None
    one_pass = False


class DataParallelDevices:
    """The devices of ``keras.distribution``'s batch axis: ``count``, JAX ``mesh``, ``axis``.
    Equal when they name the same devices (a plan holding them is a compiled function's key)."""

    def __init__(self):
        distribution = keras.distribution.distribution()
        axis = getattr(distribution, "batch_dim_name", None)
        self.count, self.mesh, self.axis = 1, None, None
        if distribution is None or axis is None:
            return
        device_mesh = distribution.device_mesh
        if axis not in device_mesh.axis_names:
            return
        self.count = int(device_mesh.shape[list(device_mesh.axis_names).index(axis)])
        self.axis = axis
        if self.count > 1:
            self.mesh = backend_mesh(device_mesh)

    def _key(self):
        return self.count, self.mesh, self.axis

    def __eq__(self, other):
        return isinstance(other, DataParallelDevices) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def pin(self, x, replicated: bool = False):
        """``x`` constrained to one leading-axis block per device (or replicated on all)."""
        if self.mesh is None:
            return x
        spec = PartitionSpec() if replicated else PartitionSpec(self.axis)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def backend_mesh(device_mesh):
    """JAX's mesh of a ``keras.distribution.DeviceMesh`` (on every Keras the floor allows)."""
    mesh = getattr(device_mesh, "backend_mesh", None)  # Keras >= 3.9
    if mesh is not None:
        return mesh
    from keras.src.backend.jax import distribution_lib

    convert = getattr(distribution_lib, "_to_backend_mesh", None) or distribution_lib._to_jax_mesh
    return convert(device_mesh)


def training_plan(request: Request, inputs, mask) -> JaxPlan:
    if request.fused:
        raise ValueError(
            "fused=True asks for TensorFlow's fused batch-norm kernels, which Keras' JAX backend "
            "does not have (XLA fuses kerasbn's element-wise ops there); use fused=None.")
    batch = inputs.shape[0]
    if request.virtual_batch_size:
        if batch % request.virtual_batch_size:
            raise ValueError(f"`virtual_batch_size`={request.virtual_batch_size} must divide the "
                             f"batch size; received a batch of {batch}.")
        ghosts = batch // request.virtual_batch_size
        return JaxPlan(blocks=ghosts, groups=ghosts)
    if request.axis_name is not None:
        return JaxPlan(axis_name=request.axis_name)
    found = DataParallelDevices()
    devices = found.count
    if devices == 1 or request.channel_axis == 0:  # axis 0: each example is a channel, on its device
        return JaxPlan()
    if batch % devices:
        raise ValueError(
            f"BatchNormalization under keras.distribution splits the batch over {devices} "
            f"devices; received a batch of {batch}, which {devices} does not divide.")
    if not request.synchronized:
        return JaxPlan(blocks=devices, groups=devices, devices=found)
    group_size = request.sync_group_size or devices
    if devices % group_size:
        raise ValueError(
            f"sync_group_size={group_size} must divide the number of devices of the batch axis "
            f"({devices}); use a divisor of {devices} or None for all devices.")
    return JaxPlan(blocks=devices, groups=devices // group_size, devices=found)


@functools.cache  # one wrapper per function: the layer asks at every training call
def compiled(function):
    """``function`` of arrays and numbers (positional) and settings (keyword-only: the channel axis,
    the plan) run as one compiled function per shape when called outside a trace, and traced
    op by op into the caller's function inside one."""
    keyword_only = [p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]
    jitted = jax.jit(function, static_argnames=keyword_only)

    @functools.wraps(function)
    def run(*arrays, **settings):
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(arrays)):
            return function(*arrays, **settings)
        return jitted(*arrays, **settings)
    return run


@compiled
def _local_statistics(x, mask, *, channel_axis: int, plan: JaxPlan) -> Moments:
    pin = None if plan.devices is None else plan.devices.pin
    return block_moments(x, channel_axis, mask, plan.blocks, pin)


def local_statistics(x, channel_axis: int, mask, plan: JaxPlan) -> Moments:
    """Each block's ``(count, mean, m2)``, each ``(blocks, C)``; differentiable in ``x``."""
    return _local_statistics(x, mask, channel_axis=channel_axis, plan=plan)


@compiled
def _merge(statistics, *, plan: JaxPlan) -> Moments:
    """``(blocks, C)`` triples merged into each group's: ``(C,)`` for one group, else ``(G, C)``."""
    table = jnp.stack(statistics, 1)  # (blocks, 3, C)
    if plan.axis_name is not None:
        # Every mapped device's triple (one all-gather), merged on each.
        table = jnp.reshape(jax.lax.all_gather(table, plan.axis_name, tiled=True), (1, -1) + table.shape[1:])
    else:
        if plan.groups != plan.blocks:
            # Devices' triples merged: one all-gather makes the table whole on every device,
            # the merge is then local. (Unmerged, each device keeps its own: the guard and
            # the moving averages reduce them, and normalizing needs nothing from others.)
            table = plan.devices.pin(table, replicated=True)
        table = jnp.reshape(table, (plan.groups, plan.blocks // plan.groups) + table.shape[1:])
    merged = merge_moments(table[:, :, 0], table[:, :, 1], table[:, :, 2], axis=1)
    if merged.mean.shape[0] == 1:
        return Moments(*(t[0] for t in merged))
    return merged


def merge(statistics: Moments, plan: JaxPlan) -> Moments:
    """``(blocks, C)`` triples merged into each group's: ``(C,)`` for one group, else ``(G, C)``."""
    return Moments(*_merge(tuple(statistics), plan=plan))


@compiled
def _normalize(x, statistics, gamma, beta, epsilon, *, channel_axis: int, plan: JaxPlan):
    # Per-device groups stay on their devices.
    pin = plan.devices.pin if plan.devices is not None and plan.groups == plan.blocks else None
    return normalize_blocks(x, channel_axis, Moments(*statistics), gamma, beta, epsilon, pin)


def normalize(x, channel_axis, statistics, gamma, beta, epsilon, mask, plan: JaxPlan):
    """``gamma * (x - mean) / sqrt(variance + epsilon) + beta`` per group, float32."""
    return _normalize(x, tuple(statistics), gamma, beta, epsilon, channel_axis=channel_axis, plan=plan)


def normalize_one_pass(x, channel_axis, gamma, beta, epsilon):
    raise NotImplementedError("JAX plans never ask for TensorFlow's one-pass kernel.")


def population_scope(model):
    return contextlib.nullcontext()


# Under keras.distribution each device's share is what an unsynchronized layer averages.
population_pass = eager_population_pass


def merges_every_rank() -> bool:
    return False


def export_refusal() -> str | None:
    if importlib.util.find_spec("tensorflow") is None:
        return ("writes a TensorFlow SavedModel, which needs TensorFlow installed on every backend "
                "(Keras' JAX export converts through it): pip install tensorflow.")
    return None
