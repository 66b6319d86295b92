"""Stop requests: SIGTERM and SIGINT only ask; the training loop stops at a safe point.

A signal never raises inside the program (not in a checkpoint write, the history file,
TensorBoard or the input pipeline). Where the platform allows it, SIGINT and SIGTERM are
blocked in every thread and one thread takes them with ``sigwait``: that works while the
main thread is inside a long TensorFlow call, which a Python signal handler cannot (it
runs only when the main thread is back in Python). The request sets :attr:`StopRequest.flag`,
a variable the training loop reads between steps and all-reduces with the step's loss, so
every worker of a multi-worker run ends its loop after the same step (no other collective,
no coordination service). The same holds for one process.

- 1st signal: the request. The run saves the step reached and exits with status 130.
- 2nd: noted, nothing interrupted.
- 3rd: forced exit (status 130) without saving; it says which checkpoint the rerun resumes from.
- Before training starts and after it ends (set-up, export), one process has nothing to
  save: the first signal exits at once, saying what the rerun resumes from.
"""

from __future__ import annotations

import signal
import sys
import threading

from recipes.inception_bn import ending

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORCE_AFTER = 3
_CAN_SIGWAIT = hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigwait")


def block_stop_signals() -> None:
    """Blocks SIGINT and SIGTERM in the calling thread, and so in every thread it starts later.

    Call it before TensorFlow starts its threads (``python -m ...train`` does, first thing);
    threads started earlier still deliver the signals, to the Python handler fallback.
    """
    if _CAN_SIGWAIT:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


class StopRequest:
    """The stop request of one process; use as a context manager around the run."""

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.first_signal = None
        self.signals = 0
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.flag = None  # tf.Variable(0) once bound; 1 when a stop is requested
        self._exit_now = None  # callable: () -> message; set while an immediate exit is safe
        self._resume_from = None  # callable: () -> message for a forced exit
        self._thread = None
        self._closing = False
        self._previous_handlers = {}
        self._previous_mask = None

    # Installing ---------------------------------------------------------------------------------
    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signals belong to the main thread; nothing to install
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.getsignal(signum)
            # Fallback for threads that do not block the signals (started before
            # block_stop_signals, or no sigwait on this platform): same request, later.
            signal.signal(signum, lambda signum, frame: self._on_signal(signum))
        if _CAN_SIGWAIT:
            self._previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            self._thread = threading.Thread(target=self._wait_for_signals, name="stop-request",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._exit_now = None
        if self.requested:
            # The process is on its way out with status 130: later signals stay absorbed (a
            # restored default SIGTERM would kill it during shut-down, status -15).
            return False
        if self._thread is not None:
            self._closing = True
            signal.pthread_kill(self._thread.ident, signal.SIGTERM)  # wakes sigwait; not a request
            self._thread.join()
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        return False

    def _wait_for_signals(self):
        while True:
            signum = signal.sigwait(STOP_SIGNALS)
            if self._closing:
                return
            self._on_signal(signum)

    # The request --------------------------------------------------------------------------------
    def bind(self, variable) -> None:
        """The variable the training loop reads (int32 scalar); set now if already requested."""
        self.flag = variable
        if self.requested:
            variable.assign(1)

    def exit_now_when(self, message_fn) -> None:
        """While ``message_fn`` is set (None clears it), a request exits at once with its message."""
        with self._lock:
            self._exit_now = message_fn
            pending = message_fn is not None and self.requested
        if pending:
            self._exit(message_fn())

    def resume_message(self, message_fn) -> None:
        """What a forced exit says about resuming."""
        self._resume_from = message_fn

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def wait(self) -> str:
        """Blocks until the first request; returns its signal's name (a server's main thread,
        whose work runs in threads of its own). Waits in steps so that the Python handler
        fallback (no ``sigwait``) can run."""
        while not self._event.wait(1.0):
            pass
        return self.first_signal

    def _on_signal(self, signum):
        with self._lock:
            self.signals += 1
            count = self.signals
            exit_now = self._exit_now
        name = signal.Signals(signum).name
        if count == 1:
            self.first_signal = name
            self._event.set()
            if exit_now is not None:
                self._exit(exit_now())
            if self.flag is not None:
                self.flag.assign(1)
            if self.announce:
                _say(f"\n{name}: stopping at the next safe point, saving first; "
                     f"{FORCE_AFTER - 1} more signals force an exit without saving")
        elif count < FORCE_AFTER:
            _say(f"{name}: already stopping; {FORCE_AFTER - count} more forces an exit without saving")
        else:
            resume = self._resume_from() if self._resume_from else "the rerun resumes from the last checkpoint"
            self._exit(f"forced exit without saving; {resume}")

    @staticmethod
    def _exit(message: str):
        ending.end_process(ending.INTERRUPTED, f"\n{message}")


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def make_agreement(strategy, flag):
    """``agreed()``: whether any replica of any worker has a stop request, the same answer on all.

    One all-reduce of a scalar, outside the training and evaluation steps (which carry the
    votes in their own all-reduce): every worker must call it at the same point, which makes it
    the barrier after a stop's save.
    """
    import tensorflow as tf

    @tf.function(autograph=False)
    def votes():
        per_replica = strategy.run(lambda: tf.cast(flag.read_value(), tf.float32))
        return strategy.reduce("SUM", per_replica, axis=None)

    return lambda: float(votes()) > 0
