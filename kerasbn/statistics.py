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


def moved(average, value, rate, update):
    """``average + rate * (value - average)`` where ``update``; elsewhere ``average`` as it was."""
    # A select, not a zero rate: 0 * NaN is NaN.
    return ops.where(update, average + rate * (value - average), average)


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


class Averages(NamedTuple):
    """A layer's averaged statistics as values: the moving mean and variance, the count of
    ``momentum=None``, and Batch Renormalization's; None where the layer keeps none."""

    moving_mean: Any
    moving_variance: Any
    num_batches: Any = None
    moving_stddev: Any = None
    renorm_mean: Any = None
    renorm_stddev: Any = None


def updated_averages(statistics: Moments, gamma, beta, averages: Averages, momentum, epsilon,
                     renorm_momentum, renorm_clipping: tuple, *, unbiased: bool):
    """``(gamma, beta, averages)`` after a training batch with ``statistics``: a pure function of
    values (the layer assigns the averages), so a backend can compile it once per shape. The
    numbers (``momentum``, ``epsilon``, ...) are arguments, not settings: layers that differ only
    in them share one compiled function.

    The averages move by ``1 - momentum`` (``momentum=None``: the cumulative average,
    ``moving += (batch - moving) / (n + 1)``). A channel moves when it carries a variance
    estimate: at least two values with ``unbiased``, at least one without; ghost batches (``(G, C)``
    statistics) are averaged. A batch whose statistics are not all finite (an ``inf`` or NaN
    anywhere in the layer's input, an overflowed float16 activation) moves nothing, not even the
    count: one select keeps every average. With Batch Renormalization (Ioffe, 2017, as Keras
    computes it) ``(r, d)`` fold into the returned gamma and beta, ``renorm_clipping`` is
    ``(rmin, rmax, dmax)`` (None for no bound), and the variance is averaged as a standard
    deviation. Nothing flows back through the statistics here: they are read as values (autograd
    on torch then records none of these small ops).
    """
    statistics = Moments(*(ops.stop_gradient(t) for t in statistics))
    finite = all_finite(statistics)
    renorm_mean = renorm_stddev = None
    if averages.renorm_mean is not None:
        gamma, beta, renorm_mean, renorm_stddev = _renormalized(
            statistics, gamma, beta, finite, averages, epsilon, renorm_momentum, renorm_clipping)
    mean, variance, valid = population_estimate(statistics, unbiased)
    update = valid & finite
    num_batches = averages.num_batches
    if momentum is None:
        counted = ops.cast(ops.any(update), "float32")
        num_batches = num_batches + counted
        rate = counted / ops.maximum(num_batches, 1.0)
    else:
        rate = 1.0 - momentum
    moving_mean = moved(averages.moving_mean, mean, rate, update)
    moving_stddev = None
    if averages.moving_stddev is not None:
        moving_stddev = moved(averages.moving_stddev, ops.sqrt(variance + epsilon), rate, update)
        moving_variance = ops.relu(ops.square(moving_stddev) - epsilon)
    else:
        moving_variance = moved(averages.moving_variance, variance, rate, update)
    return gamma, beta, Averages(moving_mean, moving_variance, num_batches, moving_stddev, renorm_mean,
                                 renorm_stddev)


def _renormalized(statistics, gamma, beta, finite, averages, epsilon, renorm_momentum, renorm_clipping):
    count, mean, m2 = statistics
    stddev = ops.sqrt(variance_from_moments(count, m2) + epsilon)
    renorm_stddev = ops.maximum(averages.renorm_stddev, epsilon ** 0.5)
    r = stddev / renorm_stddev
    d = (mean - averages.renorm_mean) / renorm_stddev
    rmin, rmax, dmax = renorm_clipping
    if rmin is not None:
        r = ops.maximum(r, rmin)
    if rmax is not None:
        r = ops.minimum(r, rmax)
    if dmax is not None:
        d = ops.clip(d, -dmax, dmax)
    r, d = ops.stop_gradient(r), ops.stop_gradient(d)
    update = (count > 0.0) & finite
    if len(mean.shape) == 2:  # groups (devices with their own statistics): averaged
        mean, stddev, update = ops.mean(mean, 0), ops.mean(stddev, 0), ops.all(update, 0)
    rate = 1.0 - renorm_momentum
    # gamma * (x_hat * r + d) + beta = x_hat * (gamma r) + (gamma d + beta)
    return (gamma * r, gamma * d + beta, moved(averages.renorm_mean, mean, rate, update),
            moved(averages.renorm_stddev, stddev, rate, update))
