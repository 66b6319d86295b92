"""Collectives across the replicas of a ``tf.distribute`` strategy, two per layer per step.

Forward: each replica writes its ``(count, mean, M2)`` into its row of an
otherwise-zero ``(replicas, 3, C)`` table and one SUM all-reduce completes it
(an all-gather in a single collective); :mod:`kerasbn.moments` merges the
rows stably and exactly for unequal (and empty) per-replica batches.
Backward: one SUM all-reduce of the per-channel sums of ``dy`` and
``dy * x_hat`` (:mod:`kerasbn.normalize`). Keras' synchronized layer issues
five.
"""

from __future__ import annotations

import tensorflow as tf


def num_replicas_in_sync() -> int:
    """Replicas that take part in the current step (1 outside a strategy)."""
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: no per-replica statistics
        return 1
    return context.num_replicas_in_sync


def check_group_size(group_size: int | None, replicas: int) -> int:
    """Returns the effective group size, or raises when it cannot be used."""
    if group_size is None:
        return replicas
    if replicas % group_size:
        raise ValueError(
            f"sync_group_size={group_size} must divide the number of replicas "
            f"in sync ({replicas}); use a divisor of {replicas} or None for "
            "all replicas."
        )
    return group_size


def group_table(packed: tf.Tensor, group_size: int | None = None) -> tf.Tensor:
    """``packed`` of every replica in this replica's group, stacked: ``(k, ...)``.

    Each replica writes its row into an otherwise-zero ``(replicas, ...)``
    table that one SUM all-reduce completes: an all-gather in a single
    collective. Outside a strategy or with groups of one, ``packed[None]``
    and no collective.
    """
    replicas = num_replicas_in_sync()
    group_size = check_group_size(group_size, replicas)
    if replicas == 1 or group_size == 1:
        return packed[None]
    context = tf.distribute.get_replica_context()
    replica_id = context.replica_id_in_sync_group
    own_row = tf.one_hot(replica_id, replicas, dtype=packed.dtype)
    own_row = tf.reshape(own_row, [replicas] + [1] * packed.shape.rank)
    table = context.all_reduce(tf.distribute.ReduceOp.SUM, own_row * packed[None])
    if group_size < replicas:
        groups = tf.reshape(table, [replicas // group_size, group_size] + packed.shape.as_list())
        table = tf.gather(groups, replica_id // group_size)
    return table


def group_sum(values: tf.Tensor, group_size: int | None = None) -> tf.Tensor:
    """Sums ``values`` over this replica's group, in one collective.

    Used by the backward pass (sums of ``dy`` and ``dy * x_hat``). Identity
    outside a strategy or with one replica.
    """
    replicas = num_replicas_in_sync()
    group_size = check_group_size(group_size, replicas)
    if replicas == 1 or group_size == 1:
        return values
    if group_size == replicas:
        context = tf.distribute.get_replica_context()
        return context.all_reduce(tf.distribute.ReduceOp.SUM, values)
    return tf.reduce_sum(group_table(values, group_size), 0)
