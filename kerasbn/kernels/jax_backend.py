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
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import keras
from jax.sharding import NamedSharding, PartitionSpec

from kerasbn.kernels import Plan
from kerasbn.statistics import Moments, merge_moments, variance_from_moments

__all__ = ["training_plan", "local_statistics", "merge", "normalize", "normalize_one_pass",
           "normalize_inference"]

# The shift that keeps the one-pass sums precise comes from at least this many values per
# channel of each block's first examples (one example of a feature map; 16 rows of (N, C)).
SAMPLE_VALUES = 16


class DataParallelDevices:
    """The devices of ``keras.distribution``'s batch axis: ``count``, JAX ``mesh``, ``axis``."""

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


def training_plan(layer, inputs, mask) -> Plan:
    if layer.fused:
        raise ValueError(
            "fused=True asks for TensorFlow's fused batch-norm kernels, which Keras' JAX backend "
            "does not have (XLA fuses kerasbn's element-wise ops there); use fused=None.")
    batch = inputs.shape[0]
    if layer.virtual_batch_size:
        if batch % layer.virtual_batch_size:
            raise ValueError(f"`virtual_batch_size`={layer.virtual_batch_size} must divide the "
                             f"batch size; received a batch of {batch}.")
        ghosts = batch // layer.virtual_batch_size
        return Plan(virtual_batch_size=layer.virtual_batch_size, blocks=ghosts, groups=ghosts)
    if layer.axis_name is not None:
        return Plan(synchronized=True, axis_name=layer.axis_name)
    found = DataParallelDevices()
    devices = found.count
    if devices == 1 or layer._positive_axis == 0:  # axis 0: each example is a channel, on its device
        return Plan()
    if batch % devices:
        raise ValueError(
            f"{type(layer).__name__} under keras.distribution splits the batch over {devices} "
            f"devices; received a batch of {batch}, which {devices} does not divide.")
    if not layer.synchronized:
        return Plan(blocks=devices, groups=devices, devices=found)
    group_size = layer.sync_group_size or devices
    if devices % group_size:
        raise ValueError(
            f"sync_group_size={group_size} must divide the number of devices of the batch axis "
            f"({devices}); use a divisor of {devices} or None for all devices.")
    return Plan(synchronized=True, group_size=layer.sync_group_size, blocks=devices,
                groups=devices // group_size, devices=found)


def _blocks(x, mask, blocks: int):
    """``x`` (and the mask) viewed as ``(blocks, B / blocks, ...)``."""
    shape = (blocks, x.shape[0] // blocks) + tuple(x.shape[1:])
    if mask is not None:
        mask = jnp.broadcast_to(mask, (x.shape[0],) + tuple(mask.shape[1:]))
        mask = jnp.reshape(mask, (blocks, x.shape[0] // blocks) + tuple(mask.shape[1:]))
    return jnp.reshape(x, shape), mask


def local_statistics(x, channel_axis: int, mask, plan: Plan) -> Moments:
    """Each block's ``(count, mean, m2)``, each ``(blocks, C)``; differentiable in ``x``."""
    xb, mask = _blocks(jnp.asarray(x, jnp.float32), mask, plan.blocks)
    if plan.devices is not None:
        xb = plan.devices.pin(xb)
    axis = channel_axis + 1
    axes = tuple(a for a in range(xb.ndim) if a not in (0, axis))
    moments = _moments(xb, axes, axis) if mask is None else _masked_moments(xb, axes, mask)
    channels = x.shape[channel_axis]
    return Moments(*(jnp.reshape(t, (plan.blocks, channels)) for t in moments))


def _moments(xb, axes, axis):
    """One pass over shifted data: ``sum(x - s)`` and ``sum((x - s)^2)`` with ``s`` a sample's
    mean, so nothing cancels when a channel's mean is large against its spread."""
    values = math.prod(xb.shape[a] for a in axes)
    stat_shape = tuple(1 if a in axes else d for a, d in enumerate(xb.shape))
    if values == 0:
        zeros = jnp.zeros(stat_shape, jnp.float32)
        return zeros, zeros, zeros
    per_example = math.prod(xb.shape[2:]) // max(xb.shape[axis], 1)
    examples = max(1, -(-SAMPLE_VALUES // max(per_example, 1)))
    shift = jax.lax.stop_gradient(jnp.mean(xb[:, :examples], axes, keepdims=True))
    shifted = xb - shift
    s1 = jnp.sum(shifted, axes, keepdims=True)
    s2 = jnp.sum(jnp.square(shifted), axes, keepdims=True)
    shifted_mean = s1 / values
    m2 = jnp.maximum(s2 - s1 * shifted_mean, 0.0)
    count = jnp.full(stat_shape, float(values), jnp.float32)
    return count, shift + shifted_mean, m2


def _masked_moments(xb, axes, mask):
    """Two passes over the kept positions (padded ones may hold inf or NaN: never read)."""
    broadcast_factor = math.prod(xb.shape[a] // max(mask.shape[a], 1) for a in axes)
    count = jnp.sum(mask, axes, keepdims=True, dtype=jnp.float32) * broadcast_factor
    safe_count = jnp.maximum(count, 1.0)
    first = jnp.sum(jnp.where(mask, xb, 0.0), axes, keepdims=True) / safe_count
    centred = jnp.where(mask, xb - first, 0.0)
    correction = jax.lax.stop_gradient(jnp.sum(centred, axes, keepdims=True) / safe_count)
    m2 = jnp.maximum(jnp.sum(jnp.square(centred), axes, keepdims=True)
                     - count * jnp.square(correction), 0.0)
    mean = first + correction
    return jnp.broadcast_to(count, mean.shape), mean, m2


def merge(statistics: Moments, plan: Plan) -> Moments:
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


def normalize(x, channel_axis, statistics, gamma, beta, epsilon, mask, plan: Plan):
    """``gamma * (x - mean) / sqrt(variance + epsilon) + beta`` per group, float32."""
    count, mean, m2 = statistics
    scale = gamma * jax.lax.rsqrt(variance_from_moments(count, m2) + epsilon)
    x = jnp.asarray(x, jnp.float32)
    if mean.ndim == 1 and scale.ndim == 1 and beta.ndim == 1:
        return _affine(x, channel_axis, mean, scale, beta)
    groups = max(t.shape[0] for t in (mean, scale, beta) if t.ndim == 2)
    xb, _ = _blocks(x, None, groups)
    if plan.devices is not None and groups == plan.blocks:
        xb = plan.devices.pin(xb)
    axis = channel_axis + 1
    shape = [1] * xb.ndim
    shape[axis] = x.shape[channel_axis]

    def per_group(t):
        return jnp.reshape(t, [t.shape[0] if t.ndim == 2 else 1] + shape[1:])

    y = (xb - per_group(mean)) * per_group(scale) + per_group(beta)
    return jnp.reshape(y, x.shape)


def _affine(x, channel_axis, mean, scale, beta):
    if channel_axis != x.ndim - 1:
        shape = [1] * x.ndim
        shape[channel_axis] = -1
        mean, scale, beta = (jnp.reshape(t, shape) for t in (mean, scale, beta))
    return (x - mean) * scale + beta


def normalize_one_pass(x, channel_axis, gamma, beta, epsilon):
    raise NotImplementedError("JAX plans never ask for TensorFlow's one-pass kernel.")


def normalize_inference(x, channel_axis, mean, variance, gamma, beta, epsilon):
    """``gamma * (x - mean) / sqrt(variance + epsilon) + beta`` in float32, centred first."""
    mean, variance = (jnp.asarray(keras.ops.convert_to_tensor(t)) for t in (mean, variance))
    scale = jax.lax.rsqrt(variance + epsilon)
    if gamma is not None:
        scale = scale * gamma
    beta = jnp.zeros_like(mean) if beta is None else beta
    return _affine(jnp.asarray(x, jnp.float32), channel_axis, mean, scale, beta)
