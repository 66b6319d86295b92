"""A lost or hung machine ends the run on every worker: one line, the retryable exit status 138
(``recipes/inception_bn/ending.py`` defines every status).

A lost peer: TensorFlow's coordination service notices a dead or frozen worker (its heartbeat,
about 10 s) and aborts the collectives every survivor is waiting in; the error surfaces in the
training, evaluation or save call, and :func:`lost_peer` tells it from the program's own errors.

A hung run: a worker alive but making no progress (an input that never delivers, a stuck
filesystem, a frozen peer the heartbeat does not catch) keeps every collective waiting forever.
TensorFlow's per-collective timeout (``CommunicationOptions(timeout_seconds=...)``) is documented
for debugging only - a timer thread per collective - and would not cover a single worker's input
anyway, so :class:`StallWatchdog` watches the loop's progress from a thread instead: a clock read
per training loop and per evaluation batch, nothing inside the step.
"""

from __future__ import annotations

import datetime
import faulthandler
import re
import threading
import time
import traceback
from pathlib import Path

from recipes.inception_bn import ending
from recipes.inception_bn.run_files import RunFiles

DEFAULT_STALL_TIMEOUT = 600.0  # seconds; PyTorch's default NCCL collective timeout is the same 10 min

# The errors TensorFlow raises in a survivor when a peer is gone: the coordination service's
# heartbeat, an aborted collective, a closed socket. Others (a bad record, out of memory, a bug)
# are this worker's own and keep their traceback.
_LOST_PEER_CLASSES = ("UnavailableError", "AbortedError", "CancelledError", "DeadlineExceededError")
_LOST_PEER_WORDS = re.compile(r"collective|coordination|heartbeat|socket|connect|peer|task.*(crash|fail)|"
                              r"barrier|unavailable", re.IGNORECASE)
_TASK = re.compile(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)")


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` says another worker of the cluster is gone (or unreachable)."""
    import tensorflow as tf

    if not isinstance(error, tf.errors.OpError):
        return False
    if type(error).__name__ in _LOST_PEER_CLASSES:
        return True
    return isinstance(error, (tf.errors.InternalError, tf.errors.UnknownError)) and bool(
        _LOST_PEER_WORDS.search(str(error)))


def lost_tasks(said: str, own_task: str, addresses: dict | None = None) -> list[str]:
    """The tasks other than ``own_task`` that TensorFlow's message ``said`` names, by task
    (``/job:worker/task:1``) or by address (``addresses``: ``{"host:port": "worker 1"}``)."""
    named = [f"{job} {index}" for job, index in _TASK.findall(said)]
    named += [task for address, task in (addresses or {}).items() if address in said]
    return list(dict.fromkeys(task for task in named if task != own_task))


def first_line(error: BaseException, limit: int = 200) -> str:
    """What TensorFlow says went wrong, on one line: its graph error's node trace left out."""
    text = str(getattr(error, "message", error))
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    said = [p for p in paragraphs if not p.startswith(("Graph execution error", "Detected at node", "File "))]
    core = re.sub(r"\s*\[\[\{\{node.*", "", said[-1] if said else text, flags=re.DOTALL)
    core = " ".join(" ".join(core.splitlines()[:2]).split())
    return core if len(core) <= limit else core[:limit - 3] + "..."


def error_log_path(run_dir: Path, own_task: str) -> Path:
    return RunFiles(run_dir).error_log(own_task)


def write_error_log(run_dir: Path, own_task: str, text: str) -> Path | None:
    """Appends ``text`` under a timestamp to this worker's error log in the run directory."""
    path = error_log_path(run_dir, own_task)
    try:
        with open(path, "a") as log:
            log.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {own_task}\n{text}\n")
    except OSError:
        return None
    return path


def _loss_marker(run_dir: Path, task: str) -> Path:
    return RunFiles(run_dir).lost_peer_marker(task)


def _first_losses(run_dir: Path, tasks: list[str], own_task: str, since: float | None) -> list[str]:
    """``tasks`` with each survivor that exited first (its marker written since ``since``, this
    start) replaced by the tasks it lost: with 3 workers, the first survivor to exit can stop
    heartbeating before the lost machine is declared dead, and TensorFlow then names it."""
    resolved = []
    for task in tasks:
        marker = _loss_marker(run_dir, task)
        try:
            fresh = since is not None and marker.stat().st_mtime >= since
            named = marker.read_text().strip() if fresh else ""
        except OSError:
            named = ""
        resolved += [t for t in named.split(" and ") if t and t != own_task] if named else [task]
    return list(dict.fromkeys(resolved))


def lost_peer_message(error: BaseException, run_dir: Path, own_task: str, step: int | None, resume: str,
                      addresses: dict | None = None, since: float | None = None) -> str:
    """The one line a survivor prints; the traceback goes to its error log.

    ``addresses``: the cluster's ``{"host:port": task}``; its leader (the chief, else worker 0) runs
    the coordination service, and is named when the error is that the service stopped answering (a
    frozen leader sends no error of its own). ``since``: when this worker started (``time.time()``):
    the losses other survivors recorded since then name the machine actually lost.
    """
    tasks_named = set((addresses or {}).values())
    leader = None if not tasks_named else "chief 0" if "chief 0" in tasks_named else "worker 0"
    log = write_error_log(run_dir, own_task, "".join(traceback.format_exception(error)))
    said = first_line(error, limit=10_000)  # what it says, not the node's trace (which names every task)
    tasks = _first_losses(run_dir, lost_tasks(said, own_task, addresses), own_task, since)
    if not tasks and leader and leader != own_task and "CoordinationService" in said:
        tasks = [f"{leader} (its coordination service stopped answering)"]
    if tasks:
        try:
            _loss_marker(run_dir, own_task).write_text(" and ".join(t.split(" (")[0] for t in tasks) + "\n")
        except OSError:
            pass
    who = " and ".join(tasks) if tasks else "a peer"
    where = f" at step {step}" if step is not None else ""
    return (f"lost {who} of the cluster{where} ({type(error).__name__}: {first_line(error)}); "
            f"rerun every worker's command: {resume}" + (f" (traceback in {log})" if log else ""))


class StallWatchdog:
    """Ends the process (status 138) when no progress is reported for ``timeout`` seconds.

    ``progress(waiting_for)`` marks progress and says what comes next (for the message);
    ``timeout`` 0 or None disables it. ``on_stall(line)`` exits; the default prints the line and
    ends the process with status 138 (``ending.end_process``), after writing every thread's stack
    to the error log.
    """

    def __init__(self, timeout: float | None, run_dir: Path, own_task: str, resume_fn, on_stall=None):
        self.timeout = timeout or 0
        self._run_dir, self._own_task, self._resume_fn = run_dir, own_task, resume_fn
        self._on_stall = on_stall or (lambda line: ending.end_process(ending.RETRYABLE, line))
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._waiting_for = "the run to start"
        self._done = threading.Event()
        self._thread = None

    def start(self, waiting_for: str) -> StallWatchdog:
        self.progress(waiting_for)
        if self.timeout > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
            self._thread.start()
        return self

    def progress(self, waiting_for: str) -> None:
        with self._lock:
            self._last, self._waiting_for = time.monotonic(), waiting_for

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        check_every = min(5.0, self.timeout / 4)
        while not self._done.wait(check_every):
            with self._lock:
                idle, waiting_for = time.monotonic() - self._last, self._waiting_for
            if idle >= self.timeout:
                self._on_stall(self._stalled(idle, waiting_for))
                return

    def _stalled(self, idle: float, waiting_for: str) -> str:
        log = error_log_path(self._run_dir, self._own_task)
        try:
            with open(log, "a") as out:
                out.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {self._own_task}: "
                          f"no progress for {idle:.0f} s, waiting for {waiting_for}; every thread:\n")
                out.flush()
                faulthandler.dump_traceback(out, all_threads=True)
        except OSError:
            log = None
        return (f"stalled: no progress for {idle:.0f} s (--stall-timeout {self.timeout:g}), waiting for "
                f"{waiting_for}; rerun every worker's command: {self._resume_fn()}"
                + (f" (every thread's stack in {log})" if log else ""))
