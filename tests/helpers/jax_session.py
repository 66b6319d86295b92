"""The JAX session (tests/jax) as a background process of the TensorFlow session.

Keras fixes its backend per process, so the JAX tests run in a pytest session of their own. Under
pytest-xdist the controller starts it when the run begins (:func:`start`), beside the TensorFlow
workers: its work fills the cores while they wait on their own subprocesses, instead of holding a
worker for a minute. tests/library/test_jax_backend.py then waits for it (on the file its exit
status is written to, not on the clock) and reports its result; run without xdist, or when the
controller did not start it, that test runs it itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIRECTORY = "KERASBN_JAX_SESSION_DIR"
COMMAND = [sys.executable, "-m", "pytest", "tests/jax", "-n", "0", "-q", "-p", "no:cacheprovider",
           "--durations=8"]

NICENESS = 10

_process: subprocess.Popen | None = None


def _environment() -> dict:
    # The TensorFlow fork server's socket stays: the JAX tests' TensorFlow side (serving an export,
    # loading a file) forks from it instead of importing TensorFlow again.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(KERAS_BACKEND="jax", PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop(DIRECTORY, None)
    return env


def wanted(config) -> bool:
    """Whether this run (pytest's ``config``) runs tests/library/test_jax_backend.py whole: its paths
    include it and nothing deselects tests (-k, -m, --deselect); otherwise the test, if selected, runs
    the session itself."""
    option = config.option
    if getattr(option, "keyword", "") or getattr(option, "markexpr", "") or getattr(option, "deselect", None):
        return False
    if not config.args:
        return True
    target = (ROOT / "tests" / "library" / "test_jax_backend.py").resolve()
    for arg in config.args:
        path = Path(arg.split("::")[0])
        path = (path if path.is_absolute() else Path.cwd() / path).resolve()
        if path == target or path in target.parents:
            return True
    return False


def start(directory: Path) -> None:
    """Starts the session in the background; its output goes to ``directory/output``, its exit
    status to ``directory/status`` when it ends."""
    global _process
    directory.mkdir(parents=True, exist_ok=True)
    script = ("import subprocess, sys; out = open(sys.argv[1] + '/output', 'w'); "
              "code = subprocess.call(sys.argv[2:], stdout=out, stderr=subprocess.STDOUT); out.close(); "
              "open(sys.argv[1] + '/status.tmp', 'w').write(str(code)); "
              "__import__('os').replace(sys.argv[1] + '/status.tmp', sys.argv[1] + '/status')")
    # At a lower priority: the TensorFlow workers' longest tests (the critical path) keep their
    # cores, and the JAX session takes what they leave while they wait on their subprocesses.
    _process = subprocess.Popen([sys.executable, "-c", script, str(directory), *COMMAND], cwd=ROOT,
                                env=_environment(), start_new_session=True,
                                preexec_fn=lambda: os.nice(NICENESS))
    os.environ[DIRECTORY] = str(directory)


def stop() -> None:
    """Ends the background session if it is still running (the run ended without waiting for it)."""
    if _process is not None and _process.poll() is None:
        os.killpg(_process.pid, 15)


def result(tmp_path: Path, timeout: float = 1800) -> tuple[int, str]:
    """``(exit status, output)`` of the session: the background one's, or one run now."""
    directory = os.environ.get(DIRECTORY)
    if not directory:
        done = subprocess.run(COMMAND, capture_output=True, text=True, cwd=ROOT, env=_environment(),
                              timeout=timeout)
        return done.returncode, done.stdout + done.stderr
    status = Path(directory) / "status"
    waited = 0.0
    while not status.exists():  # the file the session's wrapper writes when it ends
        if waited > timeout:
            raise TimeoutError(f"the JAX session did not end within {timeout} s: {directory}")
        time.sleep(0.5)
        waited += 0.5
    return int(status.read_text()), (Path(directory) / "output").read_text()

