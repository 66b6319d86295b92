"""A stream of TFRecord files read by position: fixed canonical partitions (ImageNet's training set).

TFRecords have no random access, so the training stream of a file-based source cannot gather
each position's example the way ``order.py`` does for in-memory sources. Instead (the approach of
MosaicML's StreamingDataset) the files are dealt into ``K`` *canonical partitions* - file ``i``
to partition ``i mod K`` - fixed by the dataset and the global batch, not by the machines:

- partition ``k`` is a stream of its own: epoch ``e`` of it reads its files in a seeded
  permuted order (keyed by the seed, ``e`` and ``k``), each file's records in a
  seeded permutation (keyed by the seed, ``e`` and the file): every example of the partition
  once per partition epoch, a new order each epoch;
- slot ``j`` of the global batch of step ``s`` is record ``s*B/K + j mod B/K`` of partition
  ``j div B/K`` (``K`` divides ``B``): each global batch takes ``B/K`` records from each partition.

So the global batch of step ``s`` depends on nothing but ``s``, and input pipeline ``w`` of ``W``,
whose replicas hold slots ``[w*B/W, (w+1)*B/W)``, reads only partitions ``[w*K/W, (w+1)*K/W)``:
its share of the files (``W`` divides ``K``). A resume starts each partition at its file and record
from the files' record counts (tfds' metadata), without reading what comes before.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from recipes.inception_bn import order

# Default upper bound of K: each partition holds one file in memory at a time (ImageNet's
# 1024 training files are ~140 MB each), so 16 partitions hold about as much as the 16384-record
# shuffle buffer they replace, and each global batch draws from 16 files.
DEFAULT_MAX_PARTITIONS = 16
_GRAPH_SEED = 20150211  # any constant: the record orders' graph-level seed (see partition_records)


def choose_partitions(global_batch: int, files: int, requested: int | None = None) -> int:
    """``K``: ``requested``, checked, or the largest divisor of ``global_batch`` not above
    ``min(DEFAULT_MAX_PARTITIONS, files)``. ValueError naming ``--partitions`` when it cannot work."""
    if requested is None:
        bound = min(DEFAULT_MAX_PARTITIONS, files)
        return max(k for k in range(1, bound + 1) if global_batch % k == 0)
    if requested < 1:
        raise ValueError(f"--partitions must be at least 1, got {requested}")
    if requested > files:
        raise ValueError(f"--partitions {requested} is more than the dataset's {files} training files")
    if global_batch % requested:
        raise ValueError(f"--partitions {requested} must divide the global batch {global_batch}")
    return requested


def _shuffled(seed: int, epoch, tag, count):
    """Indices ``i`` (a scalar or a vector) of a seeded permutation of ``range(count)``, keyed by
    ``(seed, epoch, tag)``."""
    def permute(i):
        i = tf.cast(i, tf.int64)
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64), tf.cast(tag, tf.int64)])
        return tf.raw_ops.RandomIndexShuffle(index=i, seed=key + tf.zeros_like(i)[..., None],
                                             max_index=tf.cast(count, tf.int64) - 1 + tf.zeros_like(i), rounds=4)
    return permute


def _file_order_tag(partition: int) -> int:
    return -1 - partition  # negative: apart from the files' record orders (0, 1, ...)


def partition_start(seed: int, counts, partition: int, record: int):
    """Where record ``record`` of partition ``partition``'s stream is: ``(file slot, offset)``,
    file slot ``e*F + i`` the ``i``-th file of epoch ``e``'s order (``F`` its files)."""
    counts = np.asarray(counts, np.int64)
    epoch, offset = divmod(int(record), int(counts.sum()))
    permute = _shuffled(seed, epoch, _file_order_tag(partition), len(counts))
    lengths = counts[permute(tf.range(len(counts))).numpy()]
    ends = np.cumsum(lengths)
    slot = int(np.searchsorted(ends, offset, side="right"))
    return epoch * len(counts) + slot, offset - int(ends[slot] - lengths[slot])


def partition_records(files, seed: int, partition: int, partitions: int, start_record: int, counts):
    """Partition ``partition``'s record stream from record ``start_record`` on, repeated."""
    own = list(range(partition, len(files), partitions))
    own_files = tf.constant([files[i] for i in own])
    own_ids = tf.constant(own, tf.int64)
    own_counts = [counts[i] for i in own]
    first_slot, first_offset = partition_start(seed, own_counts, partition, start_record)
    own_counts = tf.constant(own_counts, tf.int64)

    def read(slot):
        epoch, i = slot // len(own), slot % len(own)
        which = _shuffled(seed, epoch, _file_order_tag(partition), len(own))(i)
        # The file's records in a seeded permutation: a shuffle whose buffer holds the whole file
        # (uniform), keyed by (seed, epoch, file). Not a batch and a gather: copying ImageNet's
        # 110 KB records into one tensor cost a tenth of the pipeline's throughput. A shuffle's
        # seed pair is (graph seed, op seed): the graph seed is fixed here, so the order does not
        # depend on the process's global seed (tf.random.set_seed).
        tf.compat.v1.get_default_graph().seed = _GRAPH_SEED
        key = order.position_hash(seed, (epoch * len(files) + own_ids[which])[None], order.FILE_RECORDS)[0, 0]
        records = tf.data.TFRecordDataset(own_files[which]).shuffle(
            tf.cast(own_counts[which], tf.int64), seed=key, reshuffle_each_iteration=False)
        return records.skip(tf.where(slot == first_slot, tf.constant(first_offset, tf.int64), 0))

    return tf.data.Dataset.range(first_slot, tf.int64.max).flat_map(read)


def pipeline_records(files, counts, seed: int, partitions: int, per_replica: int, start_step: int,
                     input_context=None):
    """This input pipeline's training records from ``start_step`` on, one element each, in the
    order of its positions (``order.pipeline_positions(...).unbatch()``)."""
    pipelines, pipeline, replicas = order.pipeline_split(input_context)
    global_batch = per_replica * replicas
    if global_batch % partitions or partitions % pipelines:
        raise ValueError(f"{partitions} partitions split neither the global batch {global_batch} nor "
                         f"{pipelines} pipelines (order.DataOrder chooses them)")
    per_partition = global_batch // partitions
    own = range(pipeline * partitions // pipelines, (pipeline + 1) * partitions // pipelines)
    streams = [partition_records(files, seed, k, partitions, start_step * per_partition, counts) for k in own]
    # A step's share of this pipeline, slot after slot: per_partition records of each partition.
    share = len(own) * per_partition
    selector = tf.data.Dataset.range(tf.int64.max).map(lambda i: i % share // per_partition)
    return tf.data.Dataset.choose_from_datasets(streams, selector)
