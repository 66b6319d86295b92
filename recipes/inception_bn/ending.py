"""How a run ends: every reason, its exit status and its one line, in one place.

Exit statuses of the recipe (docs/recipes.md, "Exit statuses and orchestrators"):

- 0 (:data:`DONE`): trained, tested, exported.
- 2 (:data:`REFUSED`): a usage or data error, or a diverged run: rerunning the same command fails
  the same way.
- 130 (:data:`INTERRUPTED`): stopped by SIGTERM/SIGINT, the step reached saved (a third signal
  exits with 130 unsaved).
- 138 (:data:`RETRYABLE`): a peer was lost, or no step completed for ``--stall-timeout`` seconds:
  rerunning every worker resumes from the checkpoint the state file names (Kubeflow's
  "retryable" code).
- 1: anything else (a bug): the traceback is printed.

In the main thread an early end is an exception, :class:`RunEnded`, whose subclass says why;
:func:`main` turns it into its line and status. Threads that must end the process while the main
thread is inside a long TensorFlow call - the signal thread's forced exit, the stall watchdog - and
a lost peer (TensorFlow's shut-down would wait on the cluster) call :func:`end_process`: the only
place that ends the process without returning.
"""

from __future__ import annotations

import os
import sys

DONE, REFUSED, INTERRUPTED, RETRYABLE = 0, 2, 130, 138


class RunEnded(Exception):
    """The run ends before it is done; ``str(self)`` is the line that says why and what is kept."""

    status = 1
    prefix = ""

    def line(self) -> str:
        return f"{self.prefix}{self}"


class Refused(RunEnded):
    """A problem the user can fix (bad flags or data, a diverged run): one line, status 2."""

    status = REFUSED
    prefix = "error: "


class Interrupted(RunEnded):
    """SIGINT or SIGTERM stopped training; the message says what was kept."""

    status = INTERRUPTED

    def line(self) -> str:
        return f"\n{self}; rerun the same command to resume"


class PeerLost(RunEnded):
    """Another worker of the cluster is gone; the message says what the rerun resumes from."""

    status = RETRYABLE


def main(run) -> int:
    """``run()``'s status: 0 when it returns, its :class:`RunEnded`'s status and line otherwise."""
    try:
        run()
    except PeerLost as lost:
        end_process(lost.status, lost.line())
    except RunEnded as ended:
        print(ended.line(), file=sys.stderr)
        return ended.status
    return DONE


def end_process(status: int, line: str, stream=None) -> None:
    """Prints ``line`` (to ``stream``, standard error by default) and ends the process now, with
    ``status``, from any thread."""
    stream = sys.stderr if stream is None else stream
    try:
        sys.stdout.flush()
        stream.write(line + "\n")
        stream.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(status)
