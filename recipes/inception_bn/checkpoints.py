"""Checkpoints of a training run: periodic saves, resume, and saving on preemption.

One process (with or without MirroredStrategy): SIGTERM or Ctrl-C becomes a
KeyboardInterrupt between training loops, and the step reached is saved.
Several workers (MultiWorkerMirroredStrategy): TensorFlow's coordination
service owns SIGTERM, and a save needs every worker, so
``tf.distribute.experimental.PreemptionCheckpointHandler`` takes the signal:
when any worker gets it, all workers agree on the next loop boundary, save
that same step and stop (:class:`Preempted`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class Preempted(Exception):
    """Every worker saved the same step after one of them was told to stop."""


class Checkpoints:
    def __init__(self, checkpoint, run_dir: Path, strategy, is_chief: bool, task_index: int):
        import tensorflow as tf

        self.directory = run_dir / "checkpoints"
        self._is_chief = is_chief
        # The other workers must save too (the save reads distributed variables), into a
        # private directory removed afterwards.
        self._write_dir = self.directory if is_chief else Path(tempfile.mkdtemp(prefix=f"worker{task_index}-"))
        self._manager = tf.train.CheckpointManager(checkpoint, str(self._write_dir), max_to_keep=3)
        self.latest = tf.train.latest_checkpoint(str(self.directory))
        if self.latest:
            checkpoint.restore(self.latest).assert_existing_objects_matched()
        self._preemption = None
        self._preempted_at = None
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            def stop():
                step = self._preempted_at
                self.close()
                raise Preempted(f"preempted at step {step}; saved {self.directory / f'ckpt-{step}'}")

            # It restores the same latest checkpoint on every worker, so their counts of training
            # loops agree, and writes the preemption checkpoint into the shared directory.
            self._preemption = tf.distribute.experimental.PreemptionCheckpointHandler(
                strategy.cluster_resolver, checkpoint, str(self.directory),
                tf.distribute.experimental.TerminationConfig(exit_fn=stop))

    def save(self, step: int) -> None:
        self._manager.save(checkpoint_number=step)

    def after_loop(self, step: int) -> None:
        """At a training-loop boundary: with several workers, save and stop here if preempted."""
        if self._preemption is not None:
            self._preempted_at = step
            self._preemption.save_checkpoint_if_preempted(checkpoint_number=step)

    def save_on_interrupt(self, step: int, start_step: int) -> str:
        """SIGTERM or Ctrl-C in one process: saves ``step`` (the steps completed); says what was kept."""
        if self._preemption is not None:
            # Ctrl-C on one of several workers (the handler owns SIGTERM): a save needs every worker.
            return f"interrupted at step {step}; the last checkpoint is in {self.directory}"
        if step > start_step and self._manager.latest_checkpoint != os.path.join(self._write_dir, f"ckpt-{step}"):
            self.save(step)
        if self._manager.latest_checkpoint is None:  # stopped before the first step of a new run
            return f"interrupted at step {step}; nothing to save yet"
        return f"interrupted at step {step}; saved {self._manager.latest_checkpoint}"

    def close(self) -> None:
        import tensorflow as tf

        if not self._is_chief:
            tf.io.gfile.rmtree(str(self._write_dir))
