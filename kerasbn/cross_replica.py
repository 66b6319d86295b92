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
    context = tf.distribute.get_replica_context()
    replicas = num_replicas_in_sync()
    group_size = check_group_size(group_size, replicas)
    if replicas == 1 or group_size == 1:
        return count, mean, m2

    packed = tf.stack([count, mean, m2])  # (3, C)
    replica_id = context.replica_id_in_sync_group
    own_row = tf.one_hot(replica_id, replicas, dtype=packed.dtype)
    table = own_row[:, None, None] * packed[None]  # (replicas, 3, C)
    table = context.all_reduce(tf.distribute.ReduceOp.SUM, table)
    if group_size < replicas:
        groups = tf.reshape(table, [replicas // group_size, group_size, 3, -1])
        table = tf.gather(groups, replica_id // group_size)
    return merge_moments(table[:, 0], table[:, 1], table[:, 2], axis=0)
