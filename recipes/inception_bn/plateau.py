"""When a run has stopped improving: the stopping rule of ``--plateau-window``, and the evaluation
it chooses. Pure functions of the history's ``(step, validation accuracy)`` rows, shared by
``train`` (to stop) and ``reproduce`` (to report), and tested on recorded curves.

The rule: an evaluation *improves* when its accuracy beats the best so far by more than
``min_delta``; a run stops at the first evaluation that comes ``window`` or more steps after the
last improvement. The run's *chosen* evaluation is the one with the highest validation accuracy
(the earliest, on a tie) up to where it stopped: its weights are the ones tested.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

DEFAULT_MIN_DELTA = 0.002


def stopping_step(steps: Sequence[int], accuracies: Sequence[float], window: int,
                  min_delta: float = DEFAULT_MIN_DELTA) -> int | None:
    """The step of the evaluation at which the rule stops the run, or None while it goes on."""
    if window < 1:
        raise ValueError(f"the plateau window must be at least 1 step, got {window}")
    best, improved_at = None, None
    for step, accuracy in zip(steps, accuracies, strict=True):
        if best is None or accuracy > best + min_delta:
            best, improved_at = accuracy, step
        elif step - improved_at >= window:
            return step
    return None


def chosen(steps: Sequence[int], accuracies: Sequence[float]) -> tuple[int, float]:
    """``(step, accuracy)`` of the best evaluation, the earliest of equals."""
    if not steps:
        raise ValueError("no evaluation to choose from")
    index = max(range(len(steps)), key=lambda i: (accuracies[i], -i))
    return int(steps[index]), float(accuracies[index])


def from_history(rows) -> tuple[list[int], list[float]]:
    """The steps and validation (evaluation) accuracies of ``history.csv``'s rows."""
    return [int(row["step"]) for row in rows], [float(row["eval_accuracy"]) for row in rows]


@dataclasses.dataclass(frozen=True)
class Rule:
    """A run's ``--plateau-window`` and ``--plateau-min-delta``; no window: it never stops early."""
    window: int | None
    min_delta: float = DEFAULT_MIN_DELTA

    def stopping_step(self, history) -> int | None:
        """The evaluation of ``history.csv``'s rows at which the run stopped improving, or None."""
        if self.window is None:
            return None
        return stopping_step(*from_history(history), self.window, self.min_delta)
