"""Checkpoints of a training run: periodic saves, resume, and the save when a stop is requested.

A stop request (:mod:`recipes.inception_bn.stopping`) never interrupts a save: the loop
ends after the step every worker agreed on, every worker saves that step (a save reads
distributed variables, so all take part), and the message names the checkpoint that the
state file on disk names, read back after the save.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from recipes.inception_bn.run_files import RunFiles


class Checkpoints:
    def __init__(self, checkpoint, run_dir: Path, is_chief: bool, task_index: int, barrier=None):
        import tensorflow as tf

        self.directory = RunFiles(run_dir).checkpoints
        self._is_chief = is_chief
        # The other workers must save too (the save reads distributed variables), into a
        # private directory removed afterwards.
        self._write_dir = self.directory if is_chief else Path(tempfile.mkdtemp(prefix=f"worker{task_index}-"))
        self._manager = tf.train.CheckpointManager(checkpoint, str(self._write_dir), max_to_keep=3)
        # Every worker passes the barrier only once all reached it: after it, the chief's save is on disk.
        self._barrier = barrier
        self.latest = tf.train.latest_checkpoint(str(self.directory))
        if self.latest:
            checkpoint.restore(self.latest).assert_existing_objects_matched()
        self.saved_step = _step_of(self.latest)
        if is_chief and self.latest:
            remove_unfinished_saves(self.directory, self.saved_step)

    def save(self, step: int) -> None:
        self._manager.save(checkpoint_number=step)
        self.saved_step = step  # nothing interrupts a save: this is what the state file names

    def on_disk(self) -> str | None:
        """The checkpoint the state file in the run directory names (what a rerun resumes from)."""
        import tensorflow as tf

        return tf.train.latest_checkpoint(str(self.directory))

    def resume_message(self) -> str:
        return resume_message(self.directory)

    def save_for_stop(self, step: int) -> str:
        """Saves ``step`` unless it is saved already; says what the state file on disk names."""
        if step > 0 and step != self.saved_step:
            self.save(step)
        if self._barrier is not None:
            self._barrier()
        latest = self.on_disk()
        if latest is not None and _step_of(latest) == step:
            return f"interrupted at step {step}; saved {latest}"
        return f"interrupted at step {step}; nothing new to save; {self.resume_message()}"

    def close(self) -> None:
        import tensorflow as tf

        if not self._is_chief:
            tf.io.gfile.rmtree(str(self._write_dir))


def remove_unfinished_saves(directory: Path, latest_step: int) -> None:
    """Removes the files of saves past ``latest_step`` (the step the state file names): a save cut
    short (SIGKILL, a forced exit) leaves files the state file never named, which look like a later
    checkpoint until that step is saved again."""
    import shutil

    for path in Path(directory).glob("ckpt-*"):
        step = path.name[len("ckpt-"):].split(".", 1)[0].split("_", 1)[0]
        if not (step.isdigit() and int(step) > latest_step):
            continue
        if path.is_dir():  # the save's temporary directory
            shutil.rmtree(path)
        else:
            path.unlink()


def resume_message(directory) -> str:
    """What a rerun resumes from: the checkpoint the state file in ``directory`` names, if any."""
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(directory))
    return f"the rerun resumes from {latest}" if latest else "nothing saved yet: the rerun starts afresh"


def _step_of(path: str | None) -> int | None:
    return None if path is None else int(path.rsplit("-", 1)[1])
