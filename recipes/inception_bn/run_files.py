"""What a run keeps in its run directory, each file named here once.

``train`` writes them, ``compare`` and ``reproduce`` read them, the failure paths add their logs;
all ask a :class:`RunFiles` for the path. Only the chief writes the shared ones; every worker
writes its own error log and lost-peer marker (named by its task).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kerasbn._files import ensure_writable_directory


@dataclass(frozen=True)
class RunFiles:
    root: Path

    @classmethod
    def prepare(cls, path) -> RunFiles:
        """The run directory at ``path``, created and proven writable (``OSError`` says why not)."""
        files = cls(Path(path).expanduser())
        ensure_writable_directory(files.root)
        return files

    @property
    def settings(self) -> Path:  # the resolved flags, replicas, batch, schedule
        return self.root / "run.json"

    @property
    def history(self) -> Path:  # one row per evaluation
        return self.root / "history.csv"

    @property
    def stream(self) -> Path:  # the training stream's record, checked on resume
        return self.root / "stream.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:  # TensorBoard
        return self.root / "logs"

    @property
    def export(self) -> Path:  # the SavedModel, BN folded
        return self.root / "export"

    @property
    def diverged(self) -> Path:  # written when the loss stops being finite
        return self.root / "diverged.json"

    @property
    def best_weights(self) -> Path:  # with a validation split: the weights of the best evaluation
        return self.root / "best.weights.h5"

    @property
    def best_step(self) -> Path:
        return self.root / "best.json"

    @property
    def finished(self) -> Path:  # why and where the run ended, and the test set's accuracy
        return self.root / "finished.json"

    @property
    def recalibrated(self) -> Path:  # Algorithm 2's population statistics, measured
        return self.root / "recalibrated.json"

    @property
    def console(self) -> Path:  # what the run printed, when compare or reproduce started it
        return self.root / "train.log"

    def error_log(self, task: str) -> Path:
        return self.root / f"{task.replace(' ', '')}-errors.log"

    def lost_peer_marker(self, task: str) -> Path:
        return self.root / f"{task.replace(' ', '')}-lost-peer.txt"
