"""TensorFlow's kernels: the fused batch-norm kernels where they apply, ``tf.distribute``'s collectives.

Under a ``tf.distribute`` strategy each replica runs its own call on its share of the
batch; a synchronized layer merges the replicas' triples with one all-reduce forward
(:mod:`kerasbn.kernels.tf_cross_replica`) and one backward (:mod:`kerasbn.kernels.tf_normalize`).
"""

from __future__ import annotations

import contextlib
import dataclasses

import tensorflow as tf

from kerasbn.kernels import Request
from kerasbn.kernels import tf_cross_replica as cross_replica
from kerasbn.kernels import tf_fused as fused
from kerasbn.kernels.tf_moments import fused_statistics, local_moments, split_ghost_batches
from kerasbn.kernels.tf_normalize import normalize_with_batch_statistics
from kerasbn.statistics import Moments, merge_moments

__all__ = ["compiled", "TFPlan", "training_plan", "local_statistics", "merge", "normalize", "normalize_one_pass",
           "population_scope", "population_pass", "merges_every_rank", "export_refusal"]

# Below this many values per call, fused=None keeps to the element-wise path.
FUSED_MIN_ELEMENTS = 2**17


@dataclasses.dataclass(frozen=True)
class TFPlan:
    """one_pass: the fused kernel computes statistics and output in one call. fused: the fused
    kernels, split (statistics, merge, normalization). virtual_batch_size: ghost batches' size.
    synchronized: merged across replicas; group_size: replicas per group (None: all)."""

    one_pass: bool = False
    fused: bool = False
    virtual_batch_size: int | None = None
    synchronized: bool = False
    group_size: int | None = None


def training_plan(request: Request, inputs, mask) -> TFPlan:
    """Which kernels run, and what is merged across replicas: decided once per call."""
    if request.axis_name is not None:
        raise ValueError(
            f"`axis_name`={request.axis_name!r} names a JAX mapped axis (shard_map, pmap); on "
            "TensorFlow, replicas of a tf.distribute strategy synchronize with synchronized=True.")
    replicas = cross_replica.num_replicas_in_sync()
    synchronized = request.synchronized and replicas > 1
    if synchronized:
        cross_replica.check_group_size(request.sync_group_size, replicas)
    use_fused = _use_fused(request, inputs)
    # The one-pass kernel computes the local statistics and normalizes with them at once;
    # merged statistics, masked statistics and renorm's corrections must exist before
    # anything is normalized.
    one_pass = use_fused and not (synchronized or mask is not None or request.renorm)
    return TFPlan(one_pass=one_pass, fused=use_fused and not one_pass,
                  virtual_batch_size=request.virtual_batch_size, synchronized=synchronized,
                  group_size=request.sync_group_size)


def _use_fused(request: Request, inputs) -> bool:
    if request.fused is False or request.virtual_batch_size:
        return False
    if not fused.fusable(inputs.dtype, inputs.shape.rank, request.channel_axis):
        if request.fused:
            raise TypeError(
                f"fused=True needs float16, bfloat16 or float32 inputs; received {inputs.dtype.name}.")
        return False
    # fused=None: on small inputs the kernels' fixed cost loses against element-wise ops
    # (measured in benchmarks/bench_request.py).
    return not (request.fused is None and inputs.shape.is_fully_defined()
                and inputs.shape.num_elements() < FUSED_MIN_ELEMENTS)


def local_statistics(x, channel_axis: int, mask, plan: TFPlan) -> Moments:
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


def merge(statistics: Moments, plan: TFPlan) -> Moments:
    """The statistics of this replica's group: one all-reduce gathers every replica's triple."""
    if not plan.synchronized:
        return statistics
    table = cross_replica.group_table(tf.stack(statistics), plan.group_size)
    return merge_moments(table[:, 0], table[:, 1], table[:, 2])


def normalize(x, channel_axis, statistics, gamma, beta, epsilon, mask, plan: TFPlan):
    """``x`` normalized with ``statistics``; its gradient is the paper's, merged like them."""
    return normalize_with_batch_statistics(
        x, channel_axis, statistics, gamma, beta, epsilon, mask=mask,
        virtual_batch_size=plan.virtual_batch_size, fused_kernels=plan.fused,
        synchronized=plan.synchronized, group_size=plan.group_size)


def normalize_one_pass(x, channel_axis, gamma, beta, epsilon):
    """``(y, statistics)`` from one fused kernel call (and one gradient call backward)."""
    statistics, y = fused_statistics(x, channel_axis, affine=(gamma, beta, epsilon))
    return y, statistics


def _strategy(model):
    return getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()


@contextlib.contextmanager
def population_scope(model):
    """The model's ``tf.distribute`` strategy's scope (variables beside it belong there)."""
    with _strategy(model).scope():
        yield


def population_pass(model, data):
    """The model in inference mode in a ``tf.function``, batches split across the replicas of the
    model's strategy."""
    strategy = _strategy(model)
    step = tf.function(lambda x: model(x, training=False))
    if strategy.num_replicas_in_sync == 1:
        return step, data
    if isinstance(data, tf.data.Dataset):
        data = strategy.experimental_distribute_dataset(data)
    return tf.function(lambda x: strategy.run(step, (x,))), data


def compiled(function):
    """``function`` as it is: TensorFlow's eager ops are kernel calls (nothing compiles per shape), and tf.function traces
    them into the caller's graph."""
    return function


def merges_every_rank() -> bool:
    return False  # replicas and workers: the strategy splits each batch (population_pass)


def export_refusal() -> str | None:
    return None
