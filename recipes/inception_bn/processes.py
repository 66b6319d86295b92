"""The training processes a command runs (``compare``, ``reproduce``, the demo): several at a time,
stopped together whoever asks, one command per run directory.

A stop request - Ctrl-C, ``kill PID`` or a scheduler signalling the command alone, the terminal closing
- reaches every run under way once: each saves and exits 130, nothing more starts, the command exits
130 and rerunning it resumes. A second command on the same run directory is refused in one line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recipes.inception_bn import ending

# A run stopped by Ctrl-C or SIGTERM: it saved and exited 130 (killed by the signal if it came early).
INTERRUPTED = (ending.INTERRUPTED, -signal.SIGINT, -signal.SIGTERM)


class RunInterrupted(ending.Interrupted):
    """A run was stopped by a signal: nothing more starts, and the command exits 130."""


def in_parallel(function, items, jobs: int) -> list:
    """``[function(item) for item in items]``, ``jobs`` at a time. Once one raises (a run
    interrupted) or Ctrl-C reaches this process, no further item starts; those under way end
    (``RUNS`` forwarded the signal to them) and the exception is raised."""
    halt = threading.Event()

    def guarded(item):
        if halt.is_set():
            return None
        try:
            return function(item)
        except BaseException:
            halt.set()
            raise

    pool = ThreadPoolExecutor(jobs)
    try:
        return list(pool.map(guarded, items))
    except BaseException:
        halt.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def start_process(command, **kwargs):
    """A training process, in a session of its own: the stop signals this command receives reach it
    once, forwarded by ``RUNS`` (a terminal's Ctrl-C would otherwise reach it twice)."""
    return subprocess.Popen(command, start_new_session=True, **kwargs)


class Runs:
    """The training processes under way, so that a stop request reaches them whoever sent it: Ctrl-C,
    ``kill PID`` or a scheduler signalling this process alone, or the terminal closing. Each run then
    saves and exits 130, nothing more starts, and the command exits 130; rerunning it resumes."""

    # SIGHUP (the terminal closed) asks a run to stop as SIGTERM does: train.py saves on SIGTERM.
    FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}

    def __init__(self):
        self._lock = threading.RLock()  # a second signal may arrive while the first one's handler holds it
        self._running: set = set()
        self.stopped_by: str | None = None

    def run(self, name: str, command, **kwargs) -> int:
        """``command``'s exit status, or RunInterrupted if a stop was requested before it started."""
        with self._lock:
            if self.stopped_by:
                raise RunInterrupted(f"{name} was not started ({self.stopped_by})")
            proc = start_process(command, **kwargs)
            self._running.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._running.discard(proc)

    def stop(self, signum: int) -> None:
        with self._lock:
            self.stopped_by = signal.Signals(signum).name
            running = list(self._running)
            for proc in running:
                proc.send_signal(self.FORWARDED[signum])
        if not running:  # between runs: stop here, as the runs would
            raise RunInterrupted(f"stopped by {self.stopped_by}")

    @contextlib.contextmanager
    def forwarding_stop_signals(self):
        """While in this block, this process's stop signals go to the runs (main thread only: where
        Python runs signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, lambda s, _: self.stop(s)) for signum in self.FORWARDED}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.stopped_by = None


RUNS = Runs()


class RunDirBusy(ending.Refused):
    """Another command is training into the same run directory: one line, status 2."""


@contextlib.contextmanager
def holding(run_dir: Path):
    """This command alone trains into ``run_dir`` while in this block: a second one (another terminal,
    a resubmitted job) would train the same runs twice into the same files. The lock is the kernel's
    (``flock``): it ends with the process, however that ends."""
    import fcntl

    with open(run_dir / ".command.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise RunDirBusy(f"another command (pid {holder}) is training in {run_dir}; "
                             "wait for it to end or stop it, then rerun") from None
        except OSError:  # a filesystem without locks (some network mounts): run unguarded, as before
            yield
            return
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def exclusively(run_dir: Path, work):
    """``work()``'s result, with this command alone on ``run_dir`` (:func:`holding`) and its stop
    signals going to the runs (``RUNS``). An early end is an :class:`ending.RunEnded` (the directory
    busy, the runs stopped; Ctrl-C before the signals were taken over too), for the command's
    ``main`` to turn into its line and status."""
    try:
        with holding(run_dir), RUNS.forwarding_stop_signals():
            return work()
    except KeyboardInterrupt:
        raise RunInterrupted("interrupted") from None
