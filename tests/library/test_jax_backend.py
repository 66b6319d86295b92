"""kerasbn on Keras' JAX backend: the tests in tests/jax, run in their own pytest session.

Keras fixes its backend when it is first imported, so the JAX tests cannot share this
session's processes (TensorFlow's): one fresh interpreter runs them all with
``KERAS_BACKEND=jax``, beside this session's other tests. To run them alone:
``KERAS_BACKEND=jax .venv/bin/python -m pytest tests/jax -n 0``.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_jax_session_passes():
    pytest.importorskip("jax")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(KERAS_BACKEND="jax", PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/jax", "-n", "0", "-q", "-p", "no:cacheprovider",
         "--durations=8"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    summary = [line for line in result.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    assert result.returncode == 0, f"the JAX session failed:\n{result.stdout[-8000:]}\n{result.stderr[-2000:]}"
    assert summary and "failed" not in summary[-1] and "error" not in summary[-1], result.stdout[-3000:]
    passed = int(re.search(r"(\d+) passed", summary[-1]).group(1))
    assert passed >= 60, summary[-1]  # the session ran whole, not a collection of nothing
    print(summary[-1])
