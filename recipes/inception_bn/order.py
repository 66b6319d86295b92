"""The training stream's order as a function of position: one run, however it is split or stopped.

Global step ``s`` trains on stream positions ``[s*B, (s+1)*B)``, ``B`` the global batch.
Position ``p`` is example ``perm_e(p mod N)`` of epoch ``e = p // N``, where ``perm_e`` is a
seeded pseudo-random permutation of the ``N`` training examples (TensorFlow's stateless
``RandomIndexShuffle``, keyed by the seed and the epoch): every example once per epoch, and the
whole epoch shuffled - a uniform permutation, where a shuffle buffer mixes only neighbours.
Every augmentation draw is a hash of the seed, the position and the draw's name, not the
state of a random generator. So the batch of step ``s`` depends on nothing but ``s``:

- a resumed run continues the stream where the stopped one was (only the step is needed);
- replica ``g`` of ``R`` takes positions ``s*B + g*B/R + [0, B/R)`` and reads only those: the
  global batch holds the same examples, with the same augmentation, on any number of replicas
  and workers, and a run stopped on one replica count resumes on another with the same ``B``.

What the positions mean - the seed, the dataset size and the global batch - is written in the run
directory (``stream.json``); a resume that would give them another meaning is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import tensorflow as tf

from kerasbn._files import atomic_write
from recipes.inception_bn.run_files import RunFiles

# Names of the independent per-position draws (the hash's third key).
FACTORS, CROP_WINDOW, CROP_BOX, FILE_RECORDS = 4, 5, 6, 7

_MASK32 = 0xFFFFFFFF


def check_pipelines(partitions: int, pipelines: int) -> None:
    """Each input pipeline reads whole partitions: ValueError unless ``pipelines`` divides ``partitions``."""
    if partitions % pipelines:
        raise ValueError(f"the training files are read in {partitions} partitions, which {pipelines} input "
                         f"pipelines (workers) cannot share; pass --partitions with a multiple of {pipelines} "
                         "that divides the global batch, in a new --run-dir")


class StreamMismatch(ValueError):
    """A resume would read another stream than the one the run was trained on."""


@dataclasses.dataclass(frozen=True)
class Stream:
    """What a stream position means: the seed, the examples per epoch and the global batch."""

    seed: int
    examples: int
    global_batch: int
    partitions: int | None = None  # sources read from files (partitions.py)

    def check_resume(self, run_dir, resuming: bool, record: bool) -> None:
        """When ``resuming``, checks this is the stream recorded in ``run_dir``; StreamMismatch naming
        what differs if not. With ``record`` (the chief), writes it there."""
        path = RunFiles(Path(run_dir)).stream
        if resuming and path.exists():
            recorded = Stream(**json.loads(path.read_text()))
            differences = [f"{name} {getattr(recorded, name)} (now {getattr(self, name)})"
                           for name in ("global_batch", "examples", "seed", "partitions")
                           if getattr(recorded, name) != getattr(self, name)]
            if differences:
                raise StreamMismatch(
                    f"{path.parent} was trained on another stream: {', '.join(differences)}; resume with the "
                    "same global batch (--batch-size x replicas), dataset, --seed and --partitions, or use a new --run-dir")
        if record:
            atomic_write(path, json.dumps(dataclasses.asdict(self)))


class DataOrder:
    """The one owner of a run's training order: it decides the partitions ImageNet's files are read
    in, checks that every input pipeline can read them, checks and records the stream a resume
    must continue, and gives each pipeline - local, or a tf.data service job - its start. The rest
    of the recipe only asks it.

    Args:
        source: the ``data.Source``.
        seed: the run's ``--seed``.
        global_batch: examples per step over all replicas.
        replicas: replicas in sync.
        pipelines: local input pipelines (one per worker).
        partitions_requested: ``--partitions`` (None: the source's default).

    Raises:
        ValueError: the partitions cannot be shared by the pipelines.
    """

    def __init__(self, source, seed: int, global_batch: int, replicas: int, pipelines: int):
        self.source, self.seed, self.replicas = source, seed, replicas
        self.partitions = None
        if source.partitions_for is not None:  # read from files: K canonical partitions
            self.partitions = source.partitions_for(global_batch)
            check_pipelines(self.partitions, pipelines)
        self.stream = Stream(seed, source.train_examples, global_batch, self.partitions)

    def check_resume(self, run_dir, resuming: bool, record: bool) -> None:
        """StreamMismatch unless a resume continues the stream recorded in ``run_dir``; the chief records it."""
        self.stream.check_resume(run_dir, resuming, record)

    def training_input(self, input_context, distortion: float, start_step: int, data_service=None, run_dir=None):
        """This worker's training batches from ``start_step``: its own pipeline, or (``data_service``,
        an address) one tf.data service job that every trainer shares."""
        per_replica = input_context.get_per_replica_batch_size(self.stream.global_batch)
        if data_service is None:
            return self.local_input(input_context, per_replica, distortion, start_step)
        from recipes.inception_bn import data_service as service

        # One pipeline for every trainer: the same stream positions from the same step, dealt to the
        # trainers in the order they ask (dynamic sharding; not reproducible).
        dataset = self.service_input(per_replica, distortion, start_step)
        return service.distribute(dataset, data_service, service.job_name(run_dir, start_step))

    def local_input(self, input_context, per_replica: int, distortion: float, start_step: int):
        """This worker's pipeline: its replicas' shares of every global batch from ``start_step``."""
        return self.source.train(per_replica, distortion, self.seed, input_context, start_step,
                                 partitions=self.partitions)

    def service_input(self, per_replica: int, distortion: float, start_step: int):
        """The one pipeline a tf.data service job runs for every trainer: a stream of per-replica
        batches, so global step ``s`` starts at its batch ``s * replicas``."""
        return self.source.train(per_replica, distortion, self.seed, None, start_step * self.replicas,
                                 partitions=self.partitions)


def _mix32(x):
    """A 32-bit integer hash (the "lowbias32" finaliser) in int64 arithmetic that cannot overflow."""
    shift, xor, mask = tf.bitwise.right_shift, tf.bitwise.bitwise_xor, tf.bitwise.bitwise_and
    x = mask(xor(shift(x, 16), x) * 0x45D9F3B, _MASK32)
    x = mask(xor(shift(x, 16), x) * 0x45D9F3B, _MASK32)
    return xor(shift(x, 16), x)


def position_hash(seed: int, positions, draw: int, count: int = 1):
    """``(n, count)`` int64 hashes in [0, 2**32), a pure function of ``(seed, position, draw, column)``."""
    xor, mask = tf.bitwise.bitwise_xor, tf.bitwise.bitwise_and
    positions = tf.cast(positions, tf.int64)
    key = _mix32(tf.constant(((seed & _MASK32) ^ (draw * 0x9E3779B9)) & _MASK32, tf.int64))
    h = _mix32(xor(key, mask(positions, _MASK32)))
    h = _mix32(xor(h, tf.bitwise.right_shift(positions, 32) + ((seed >> 32) & _MASK32)))
    columns = mask(tf.range(count, dtype=tf.int64) * 0x85EBCA6B, _MASK32)
    return _mix32(xor(h[:, None], columns[None, :]))


def position_uniform(seed: int, positions, draw: int, count: int = 1):
    """``(n, count)`` float32 uniforms in [0, 1), a pure function of ``(seed, position, draw, column)``."""
    return tf.cast(tf.bitwise.right_shift(position_hash(seed, positions, draw, count), 8), tf.float32) / float(1 << 24)


def example_ids(seed: int, examples: int, positions):
    """The training example at each stream position: epoch ``p // N``'s permutation, at ``p % N``."""
    positions = tf.cast(positions, tf.int64)
    epochs = positions // examples
    keys = tf.stack([tf.fill(tf.shape(positions), tf.constant(seed, tf.int64)), epochs,
                     tf.zeros_like(positions)], axis=1)
    return tf.raw_ops.RandomIndexShuffle(index=positions % examples, seed=keys,
                                         max_index=tf.fill(tf.shape(positions), tf.constant(examples - 1, tf.int64)),
                                         rounds=4)


def pipeline_split(input_context=None):
    """``(pipelines, pipeline, replicas)``: this input pipeline's place (one pipeline, one replica
    when ``input_context`` is None)."""
    if input_context is None:
        return 1, 0, 1
    return input_context.num_input_pipelines, input_context.input_pipeline_id, input_context.num_replicas_in_sync


def pipeline_positions(per_replica: int, start_step: int, input_context=None):
    """This input pipeline's elements from ``start_step`` on: each a vector of its replica's
    ``per_replica`` positions.

    Pipeline ``w`` of ``W`` feeds replicas ``w*R/W .. (w+1)*R/W - 1`` (tf.distribute's order: a
    worker's consecutive elements go to its replicas in turn), one element per replica per step.
    """
    pipelines, pipeline, replicas = pipeline_split(input_context)
    if replicas % pipelines:
        raise ValueError(f"{replicas} replicas do not split over {pipelines} input pipelines")
    local = replicas // pipelines
    global_batch = per_replica * replicas

    def positions(element):
        step = start_step + element // local
        slot = pipeline * local + element % local
        return step * global_batch + slot * per_replica + tf.range(per_replica, dtype=tf.int64)

    return tf.data.Dataset.range(tf.int64.max).map(tf.autograph.experimental.do_not_convert(positions))


def batches_by_position(batch_at, per_replica: int, start_step: int, input_context=None):
    """``batch_at(positions)`` for each of this pipeline's elements (``pipeline_positions``), prefetched.

    ``batch_at`` is traced as written, not through AutoGraph: it is straight-line TensorFlow, and
    AutoGraph's conversion of it and everything it calls cost every run's start ~0.3 s of CPU.
    """
    return (pipeline_positions(per_replica, start_step, input_context)
            .map(tf.autograph.experimental.do_not_convert(batch_at), num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))
