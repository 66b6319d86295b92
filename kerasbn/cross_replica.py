"""Merging per-replica batch statistics across a ``tf.distribute`` strategy.

One collective per layer per forward pass: each replica writes its own
``(count, mean, M2)`` into its row of an otherwise-zero ``(replicas, 3, C)``
table and the table is summed across replicas. A SUM all-reduce of a table
where each replica fills only its row is an all-gather in a single
collective; its gradient is one more all-reduce, so forward plus backward
costs two collectives per replica (an ``all_gather`` costs three, Keras'
``E[x^2] - E[x]^2`` path five). The rows are then merged with
:func:`kerasbn.moments.merge_moments`, stably and exactly for unequal (and
empty) per-replica batches.
"""

from __future__ import annotations

import tensorflow as tf

from kerasbn.moments import merge_moments


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


def global_moments(
    count: tf.Tensor,
    mean: tf.Tensor,
    m2: tf.Tensor,
    group_size: int | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Merges this replica's per-channel ``(count, mean, m2)`` with its group's.

    Args:
        count, mean, m2: float32 tensors of shape ``(C,)`` for this replica.
        group_size: replicas that share statistics: consecutive groups
            ``0..k-1, k..2k-1, ...``; None means all replicas.

    Returns:
        The merged ``(count, mean, m2)``, each ``(C,)``. Outside a strategy or
        with one replica (per group) the input is returned and no collective
        is issued.
    """
    replicas = num_replicas_in_sync()
    group_size = check_group_size(group_size, replicas)
    if replicas == 1 or group_size == 1:
        return count, mean, m2

    table = _group_table(tf.stack([count, mean, m2]), group_size)  # (k, 3, C)
    return merge_moments(table[:, 0], table[:, 1], table[:, 2], axis=0)


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
    return tf.reduce_sum(_group_table(values, group_size), 0)


def _group_table(packed: tf.Tensor, group_size: int) -> tf.Tensor:
    """The rows ``packed`` of every replica in this replica's group.

    Each replica writes its row into an otherwise-zero (replicas, ...) table
    that one SUM all-reduce completes: an all-gather in a single collective
    whose gradient is a single all-reduce.
    """
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync
    replica_id = context.replica_id_in_sync_group
    own_row = tf.one_hot(replica_id, replicas, dtype=packed.dtype)
    own_row = tf.reshape(own_row, [replicas] + [1] * packed.shape.rank)
    table = context.all_reduce(tf.distribute.ReduceOp.SUM, own_row * packed[None])
    if group_size < replicas:
        groups = tf.reshape(table, [replicas // group_size, group_size] + packed.shape.as_list())
        table = tf.gather(groups, replica_id // group_size)
    return table
