"""PyTorch's kernels: element-wise statistics that autograd differentiates, ``torch.distributed``'s
collectives.

Under ``torch.distributed`` (one process per device, the model wrapped in
``DistributedDataParallel`` as Keras' torch guide does) each rank runs its own call on its
share of the batch, as a ``tf.distribute`` replica does. A synchronized layer then merges the
ranks' ``(count, mean, M2)`` triples, as PyTorch's ``SyncBatchNorm`` merges its
``(mean, invstd, count)``: one all-gather of a ``(3, C)`` table forward, on every rank of the
group (``sync_group_size`` ranks at a time, or all). The all-gather is an autograd function
(:class:`_AllGather`): backward, one all-reduce sums every rank's gradient with respect to the
gathered table, and each rank keeps its own triple's row, so the input gradients equal one
process's on the concatenated batch (the optimizer's all-reduce, DDP's, then averages the weights'
gradients). Unequal and empty shares are
exact (an empty share's triple has count 0). Every rank merges the same table, so every rank
takes the same branch of the non-finite guard and holds the same moving statistics.

Without a process group, or with ``synchronized=False``, each process normalizes its own batch,
by PyTorch's own batch-norm kernel where it applies (``fused=None``, float32, no mask, ghost
batches or renorm: ``torch.native_batch_norm``, the kernel of ``torch.nn.BatchNorm2d``, with its
backward, on the input shifted as the element-wise sums shift it; 0.4x the element-wise ops' time,
measured in benchmarks.md); ``fused=False`` keeps the element-wise shifted sums.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist

from kerasbn.kernels import Request
from kerasbn.kernels.portable import (
    SAMPLE_VALUES,
    block_moments,
    eager_population_pass,
    normalize_blocks,
)
from kerasbn.statistics import Moments, merge_moments

__all__ = ["compiled", "TorchPlan", "training_plan", "local_statistics", "merge", "normalize", "normalize_one_pass",
           "population_scope", "population_pass", "merges_every_rank", "export_refusal"]


@dataclasses.dataclass(frozen=True)
class TorchPlan:
    """``blocks``: ghost batches normalized separately (1: the whole batch); ``group``: the
    process group whose ranks' statistics are merged (None: this process's own); ``one_pass``:
    PyTorch's batch-norm kernel computes the statistics and the output in one call."""

    blocks: int = 1
    group: object = None
    one_pass: bool = False


def _world():
    """This process's default process group's size (1 without ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


# Subgroups of ``sync_group_size`` consecutive ranks, made once per default group: every rank
# makes every subgroup (torch.distributed.new_subgroups), in the same order, at its first call.
_SUBGROUPS: dict = {}


def _process_group(group_size: int | None, world: int):
    if group_size is None or group_size == world:
        return dist.group.WORLD
    key = (id(dist.group.WORLD), group_size)
    if key not in _SUBGROUPS:
        _SUBGROUPS[key] = dist.new_subgroups(group_size)[0]
    return _SUBGROUPS[key]


def training_plan(request: Request, inputs, mask) -> TorchPlan:
    if request.fused:
        raise ValueError(
            "fused=True asks for TensorFlow's fused batch-norm kernels, which Keras' torch backend "
            "does not have; use fused=None.")
    if request.axis_name is not None:
        raise ValueError(
            f"`axis_name`={request.axis_name!r} names a JAX mapped axis (shard_map, pmap); on torch, "
            "ranks of torch.distributed synchronize with synchronized=True.")
    if request.virtual_batch_size:
        batch = inputs.shape[0]
        if batch % request.virtual_batch_size:
            raise ValueError(f"`virtual_batch_size`={request.virtual_batch_size} must divide the "
                             f"batch size; received a batch of {batch}.")
        return TorchPlan(blocks=batch // request.virtual_batch_size)
    world = _world()
    if not request.synchronized or world == 1:
        return TorchPlan(one_pass=_native_kernel_applies(request, inputs, mask))
    group_size = request.sync_group_size or world
    if world % group_size:
        raise ValueError(
            f"sync_group_size={group_size} must divide the number of torch.distributed ranks "
            f"({world}); use a divisor of {world} or None for all ranks.")
    return TorchPlan(group=_process_group(request.sync_group_size, world))


def _native_kernel_applies(request: Request, inputs, mask) -> bool:
    """PyTorch's kernel normalizes a float32 batch whole, with biased statistics over at least two
    values per channel; ``fused=False`` asks for the element-wise ops, renorm for the statistics
    before the normalization."""
    if request.fused is not None or request.renorm or mask is not None:
        return False
    x = torch.as_tensor(inputs)
    return x.dtype == torch.float32 and x.ndim >= 2 and x.numel() >= 2 * x.shape[request.channel_axis]


def local_statistics(x, channel_axis: int, mask, plan: TorchPlan) -> Moments:
    """This rank's ``(count, mean, m2)``, each ``(C,)`` (``(G, C)`` for ghost batches)."""
    values = x.numel() // max(x.shape[channel_axis], 1)
    if mask is None and plan.blocks == 1 and values > 0:
        return _shifted_moments(x, channel_axis, values)
    moments = block_moments(x, channel_axis, mask, plan.blocks)
    if plan.blocks == 1:
        return Moments(*(t[0] for t in moments))
    return moments


def _shifted_moments(x, channel_axis: int, values: int) -> Moments:
    """The common case in torch's own ops: the shifted one-pass sums of
    :func:`kerasbn.kernels.portable.block_moments` without ``keras.ops``' per-call dispatch (eager
    torch pays it on every op: about half of a small layer's time, measured in benchmarks.md)."""
    axes = [a for a in range(x.ndim) if a != channel_axis]
    x = x.float()
    shift = _sample_shift(x, axes, values)
    shifted = x - shift
    s1 = shifted.sum(dim=axes)
    s2 = shifted.square().sum(dim=axes)
    shifted_mean = s1 / values
    m2 = torch.clamp(s2 - s1 * shifted_mean, min=0.0)
    mean = shift.reshape(-1) + shifted_mean
    return Moments(torch.full_like(mean, float(values)), mean, m2)


def _sample_shift(x, axes, values: int):
    """Each channel's mean over the first examples (at least :data:`SAMPLE_VALUES` values), kept
    in ``x``'s rank and out of the gradient: subtracted first, it keeps float32 sums exact when a
    channel's mean is large against its spread."""
    per_example = values // max(x.shape[0], 1)
    examples = max(1, -(-SAMPLE_VALUES // max(per_example, 1)))
    return x[:examples].float().mean(dim=axes, keepdim=True).detach()


def merge(statistics: Moments, plan: TorchPlan) -> Moments:
    """The statistics of this rank's group: every rank's triple, all-gathered, merged."""
    if plan.group is None:
        return statistics
    table = _AllGather.apply(torch.stack(tuple(statistics)), plan.group)  # (ranks, 3, C)
    return merge_moments(table[:, 0], table[:, 1], table[:, 2])


class _AllGather(torch.autograd.Function):
    """Every rank's ``(3, C)`` table, stacked; backward, the gradients of all ranks' uses of the
    stack summed (one all-reduce) and this rank's row returned. Every rank of the group runs both
    (an empty share's table still depends on its input: kerasbn.kernels.portable)."""

    @staticmethod
    def forward(ctx, table, group):
        ctx.group = group
        parts = [torch.empty_like(table) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, table.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def normalize(x, channel_axis, statistics, gamma, beta, epsilon, mask, plan: TorchPlan):
    """``x`` normalized with ``statistics`` (per ghost batch if ``(G, C)``); autograd's gradient."""
    count, mean, m2 = statistics
    if mean.ndim == 1 and gamma.ndim == 1 and beta.ndim == 1:
        # Centred, then one fused multiply-add: two passes over x instead of three.
        shape = [1] * x.ndim
        shape[channel_axis] = -1
        scale = gamma * torch.rsqrt(m2 / torch.clamp(count, min=1.0) + epsilon)
        return torch.addcmul(beta.view(shape), x.float() - mean.view(shape), scale.view(shape))
    return normalize_blocks(x, channel_axis, statistics, gamma, beta, epsilon)


def normalize_one_pass(x, channel_axis, gamma, beta, epsilon):
    """``(y, statistics)`` by ``torch.native_batch_norm`` (channels moved to dimension 1, a view
    for Keras' channels-last activations of torch's channels-first convolutions). The kernel sums
    in float32 and loses the variance when a channel's mean is large against its spread (55x too
    large at mean 1e4, spread 1, 200k values a channel, measured): it normalizes the input shifted
    by the first examples' per-channel mean (:data:`SAMPLE_VALUES` values; normalization does not
    see a shift), which keeps it exact to the data's rounding for one more pass."""
    channels_first = torch.as_tensor(x).movedim(channel_axis, 1)
    reduced = [d for d in range(channels_first.ndim) if d != 1]
    values = channels_first.numel() // channels_first.shape[1]
    shift = _sample_shift(channels_first, reduced, values)
    y, shifted_mean, inverse_stddev = torch.native_batch_norm(
        channels_first - shift, torch.as_tensor(gamma), torch.as_tensor(beta), None, None, True, 0.0, epsilon)
    variance = torch.clamp(inverse_stddev.detach().reciprocal().square() - epsilon, min=0.0)
    mean = shift.reshape(-1) + shifted_mean.detach()
    statistics = Moments(torch.full_like(mean, float(values)), mean, variance * values)
    return y.movedim(1, channel_axis), statistics


def population_scope(model):
    return contextlib.nullcontext()


def population_pass(model, data):
    """Eager inference passes, without autograd's graph (nothing is differentiated)."""
    step, batches = eager_population_pass(model, data)

    def without_autograd(batch):
        with torch.no_grad():
            return step(batch)
    return without_autograd, batches


def compiled(function):
    """``function`` as it is: PyTorch's eager ops are kernel calls: nothing compiles per shape."""
    return function


def merges_every_rank() -> bool:
    """Under torch.distributed every rank's batches count: each step's batches are merged over the
    ranks (so every rank passes the same number of batches) and every rank ends with the same
    statistics."""
    return _world() > 1


def export_refusal() -> str | None:
    # Keras' SavedModel export on torch goes through torch.export, which fails even on a Dense-BN
    # model (Keras 3.15, torch 2.13); the .keras file carries everything instead.
    return ("writes a TensorFlow SavedModel, which Keras' torch backend cannot export. Save the model "
            "(model.save('model.keras')) and export it under KERAS_BACKEND=tensorflow: "
            "kerasbn.export_for_serving(keras.saving.load_model('model.keras'), path) - the file loads "
            "there with the same outputs.")
