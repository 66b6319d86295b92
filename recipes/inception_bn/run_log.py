"""What a training run tells the world: history.csv, TensorBoard scalars and the console.

Only the chief worker writes or prints; every other worker's log is silent.
"""

from __future__ import annotations

import sys
from pathlib import Path

from recipes.inception_bn.history import read_history, write_history
from recipes.inception_bn.run_files import RunFiles


class RunLog:
    def __init__(self, run_dir: Path, is_chief: bool, total_steps: int, steps_per_epoch: float,
                 quiet: bool, resumed_at: int | None):
        import keras
        import tensorflow as tf

        self.is_chief = is_chief
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.history_path = RunFiles(run_dir).history
        self.logs_dir = RunFiles(run_dir).logs
        # A fresh run starts a fresh history; a resumed one keeps the rows up to its step.
        self.history = read_history(self.history_path, up_to_step=-1 if resumed_at is None else resumed_at)
        self._writers = ({split: tf.summary.create_file_writer(str(self.logs_dir / split))
                          for split in ("train", "eval")} if is_chief else {})
        self._bar = None
        if is_chief and not quiet and sys.stdout.isatty():
            self._bar = keras.utils.Progbar(total_steps, stateful_metrics=["loss", "accuracy", "lr"])

    def say(self, *args, **kwargs) -> None:
        if self.is_chief:
            print(*args, **kwargs, flush=True)

    @property
    def last_step(self) -> int | None:
        return int(self.history[-1]["step"]) if self.history else None

    def progress(self, step: int, loss: float, accuracy: float, learning_rate: float) -> None:
        if self._bar is not None:
            self._bar.update(step, [("loss", loss), ("accuracy", accuracy), ("lr", learning_rate)])

    def record(self, step: int, learning_rate: float, evaluation: tuple[float, float, float],
               train: dict | None) -> None:
        """One history row, TensorBoard scalars and a console line for the evaluation at ``step``.

        ``train`` holds ``loss``, ``accuracy``, ``images_per_second`` and ``seconds`` since the
        last evaluation; None for an evaluation redone after a resume (train columns blank).
        """
        eval_loss, eval_top1, eval_top5 = evaluation
        train_columns = dict.fromkeys(("train_loss", "train_accuracy", "images_per_second", "wall_seconds"), "")
        if train:
            train_columns = {"train_loss": f"{train['loss']:.5f}", "train_accuracy": f"{train['accuracy']:.5f}",
                             "images_per_second": f"{train['images_per_second']:.1f}",
                             "wall_seconds": f"{train['seconds']:.2f}"}
        self.history.append({
            "step": step, "epoch": f"{step / self.steps_per_epoch:.4f}", "learning_rate": f"{learning_rate:.6g}",
            **train_columns, "eval_loss": f"{eval_loss:.5f}", "eval_accuracy": f"{eval_top1:.5f}",
            "eval_top5": f"{eval_top5:.5f}"})
        if not self.is_chief:
            return
        write_history(self.history_path, self.history)
        self._scalars(step, "train", {"learning_rate": learning_rate,
                                      **({"loss": train["loss"], "accuracy": train["accuracy"]} if train else {})})
        self._scalars(step, "eval", {"loss": eval_loss, "accuracy": eval_top1, "top5": eval_top5})
        if self._bar is not None:
            print()
        trained = f"train loss {train['loss']:.4f} acc {train['accuracy']:.4f}; " if train else ""
        speed = f"; {train['images_per_second']:.0f} images/s" if train else ""
        self.say(f"step {step}/{self.total_steps}: {trained}eval loss {eval_loss:.4f} acc {eval_top1:.4f}; "
                 f"lr {learning_rate:.3g}{speed}")

    def _scalars(self, step, split, values):
        import tensorflow as tf

        with self._writers[split].as_default(step=step):
            for key, value in values.items():
                tf.summary.scalar(key, value)
        self._writers[split].flush()
