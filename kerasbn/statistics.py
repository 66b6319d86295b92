"""Per-channel batch statistics as ``(count, mean, M2)`` triples: the part every backend shares.

Every partial result -- one device's share, one ghost batch, one worker -- is a triple
``(count, mean, M2)`` with ``M2 = sum((x - mean)^2)``. Triples merge exactly and stably
(Chan, Golub & LeVeque 1979), so synchronized BN is local BN plus one merge, on every
backend. What follows is written in ``keras.ops`` and runs on every backend alike:
the merge, the guard against non-finite batches, and the moving averages. Computing a
batch's triples and normalizing with them (input-sized work) is each backend's
(:mod:`kerasbn.kernels`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from keras import ops


class Moments(NamedTuple):
    """Per-channel ``count``, ``mean`` and ``m2`` (float32): each ``(C,)``, or ``(G, C)``
    for ``G`` groups normalized separately (ghost batches, unsynchronized devices)."""

    count: Any
    mean: Any
    m2: Any


def merge_moments(count, mean, m2, axis: int = 0) -> Moments:
    """Merges partial triples stacked along ``axis``.

    ``M2_total = sum_i M2_i + sum_i n_i (mean_i - mean_total)^2``: exact for unequal
    counts, and parts with ``n_i = 0`` contribute nothing (never NaN).
    """
    total = ops.sum(count, axis)
    merged_mean = ops.sum(count * mean, axis) / ops.maximum(total, 1.0)
    deviation = mean - ops.expand_dims(merged_mean, axis)
    merged_m2 = ops.sum(m2 + count * ops.square(deviation), axis)
    return Moments(total, merged_mean, merged_m2)


def variance_from_moments(count, m2):
    """The biased (population) variance ``M2 / n``; 0 where ``n = 0``."""
    return m2 / ops.maximum(count, 1.0)


def all_finite(statistics: Moments):
    """Scalar bool: every channel's (every group's) mean and M2 is finite.

    One ``inf`` or NaN in a batch makes its statistics non-finite; merged across
    devices, it makes them non-finite on every device of the group, so all of them
    see the same answer.
    """
    return ops.all(ops.isfinite(ops.stack([statistics.mean, statistics.m2])))


def move_average(variable, value, rate, update):
    """``variable += rate * (value - variable)`` where ``update``; elsewhere it stays. Returned."""
    moving = variable.value  # one read
    # A select, not a zero rate: 0 * NaN is NaN.
    moved = ops.where(update, moving + rate * (value - moving), moving)
    variable.assign(moved)
    return moved


def population_estimate(statistics: Moments, unbiased: bool):
    """The ``(mean, variance, valid)`` a batch contributes to the moving statistics, ``(C,)``.

    A channel is ``valid`` when it carries a variance estimate: at least two values
    with ``unbiased`` (Algorithm 2's ``m / (m - 1)``), at least one without. Groups
    (``(G, C)`` statistics) are averaged over their valid members: each is one of
    Algorithm 2's mini-batches, and a channel with no valid group is not valid.
    """
    count, mean, m2 = statistics
    if unbiased:
        valid = count > 1.0
        variance = m2 / ops.maximum(count - 1.0, 1.0)
    else:
        valid = count > 0.0
        variance = variance_from_moments(count, m2)
    if len(mean.shape) == 2:
        weights = ops.cast(valid, "float32")
        # One reduction over the groups (one collective where groups are devices).
        groups, mean_sum, variance_sum = ops.unstack(
            ops.sum(ops.stack([weights, weights * mean, weights * variance]), 1), 3)
        mean = mean_sum / ops.maximum(groups, 1.0)
        variance = variance_sum / ops.maximum(groups, 1.0)
        valid = groups > 0.0
    return mean, variance, valid
