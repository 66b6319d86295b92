"""The run's record of training: the history (one row per evaluation; ``RunFiles.history``),
written whole by ``train``, read by ``compare`` and ``reproduce``."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from kerasbn._files import atomic_write

HISTORY_FIELDS = ("step", "epoch", "learning_rate", "train_loss", "train_accuracy",
                  "eval_loss", "eval_accuracy", "eval_top5", "images_per_second", "wall_seconds")


def read_history(path: Path, up_to_step: int | None = None) -> list[dict]:
    """The rows of ``path`` (none if it does not exist), those up to ``up_to_step`` if given."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if up_to_step is not None:
        rows = [row for row in rows if int(row["step"]) <= up_to_step]
    return rows


def write_history(path: Path, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, HISTORY_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())

