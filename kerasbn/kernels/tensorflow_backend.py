"""TensorFlow's kernels: the fused batch-norm kernels where they apply, ``tf.distribute``'s collectives.

Under a ``tf.distribute`` strategy each replica runs its own call on its share of the
batch; a synchronized layer merges the replicas' triples with one all-reduce forward
(:mod:`kerasbn.kernels.tf_cross_replica`) and one backward (:mod:`kerasbn.kernels.tf_normalize`).
"""

from __future__ import annotations

import tensorflow as tf

from kerasbn.kernels import Plan
from kerasbn.kernels import tf_cross_replica as cross_replica
from kerasbn.kernels import tf_fused as fused
from kerasbn.kernels.tf_moments import fused_statistics, local_moments, split_ghost_batches
from kerasbn.kernels.tf_normalize import normalize_inference, normalize_with_batch_statistics
from kerasbn.statistics import Moments, merge_moments

__all__ = ["training_plan", "local_statistics", "merge", "normalize", "normalize_one_pass",
           "normalize_inference"]

# Below this many values per call, fused=None keeps to the element-wise path.
FUSED_MIN_ELEMENTS = 2**17


def training_plan(layer, inputs, mask) -> Plan:
    """Which kernels run, and what is merged across replicas: decided once per call."""
    if layer.axis_name is not None:
        raise ValueError(
            f"`axis_name`={layer.axis_name!r} names a JAX mapped axis (shard_map, pmap); on "
            "TensorFlow, replicas of a tf.distribute strategy synchronize with synchronized=True.")
    replicas = cross_replica.num_replicas_in_sync()
    synchronized = layer.synchronized and replicas > 1
    if synchronized:
        cross_replica.check_group_size(layer.sync_group_size, replicas)
    use_fused = _use_fused(layer, inputs)
    # The one-pass kernel computes the local statistics and normalizes with them at once;
    # merged statistics, masked statistics and renorm's corrections must exist before
    # anything is normalized.
    one_pass = use_fused and not (synchronized or mask is not None or layer.renorm)
    return Plan(one_pass=one_pass, fused=use_fused and not one_pass,
                virtual_batch_size=layer.virtual_batch_size, synchronized=synchronized,
                group_size=layer.sync_group_size)


def _use_fused(layer, inputs) -> bool:
    if layer.fused is False or layer.virtual_batch_size:
        return False
    if not fused.fusable(inputs.dtype, inputs.shape.rank, layer._positive_axis):
        if layer.fused:
            raise TypeError(
                f"fused=True needs float16, bfloat16 or float32 inputs; received {inputs.dtype.name}.")
        return False
    # fused=None: on small inputs the kernels' fixed cost loses against element-wise ops
    # (measured in benchmarks/bench_layer.py).
    return not (layer.fused is None and inputs.shape.is_fully_defined()
                and inputs.shape.num_elements() < FUSED_MIN_ELEMENTS)


def local_statistics(x, channel_axis: int, mask, plan: Plan) -> Moments:
    """This replica's ``(count, mean, m2)``, each ``(C,)`` (``(G, C)`` for ghost batches).

    No gradient flows through them: :func:`normalize`'s backward pass accounts for them.
    """
    channels = x.shape[channel_axis]
    x = tf.stop_gradient(x)
    if plan.virtual_batch_size:
        x, mask = split_ghost_batches(x, mask, plan.virtual_batch_size)
        axes = [a for a in range(x.shape.rank) if a not in (0, channel_axis + 1)]
        return Moments(*(tf.reshape(t, [-1, channels]) for t in local_moments(x, axes, mask)))
    if plan.fused and mask is None:
        return fused_statistics(x, channel_axis)[0]
    axes = [a for a in range(x.shape.rank) if a != channel_axis]
    return Moments(*(tf.reshape(t, [channels]) for t in local_moments(x, axes, mask)))


def merge(statistics: Moments, plan: Plan) -> Moments:
    """The statistics of this replica's group: one all-reduce gathers every replica's triple."""
    if not plan.synchronized:
        return statistics
    table = cross_replica.group_table(tf.stack(statistics), plan.group_size)
    return merge_moments(table[:, 0], table[:, 1], table[:, 2])


def normalize(x, channel_axis, statistics, gamma, beta, epsilon, mask, plan: Plan):
    """``x`` normalized with ``statistics``; its gradient is the paper's, merged like them."""
    return normalize_with_batch_statistics(
        x, channel_axis, statistics, gamma, beta, epsilon, mask=mask,
        virtual_batch_size=plan.virtual_batch_size, fused_kernels=plan.fused,
        synchronized=plan.synchronized, group_size=plan.group_size)


def normalize_one_pass(x, channel_axis, gamma, beta, epsilon):
    """``(y, statistics)`` from one fused kernel call (and one gradient call backward)."""
    statistics, y = fused_statistics(x, channel_axis, affine=(gamma, beta, epsilon))
    return y, statistics
