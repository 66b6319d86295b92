"""kerasbn on Keras' JAX backend: the tests in tests/jax, run in their own pytest session.

Keras fixes its backend when it is first imported, so the JAX tests cannot share this
session's processes (TensorFlow's): one fresh interpreter runs them all with
``KERAS_BACKEND=jax`` - under xdist started by the controller beside the workers
(tests/helpers/jax_session.py), otherwise by this test. To run them alone:
``KERAS_BACKEND=jax .venv/bin/python -m pytest tests/jax -n 0``.
"""

import re

import pytest

from tests.helpers import jax_session


def test_the_jax_session_passes(tmp_path):  # ordered last (tests/conftest.py): it waits for the session
    pytest.importorskip("jax")
    status, output = jax_session.result(tmp_path)
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    assert status == 0, f"the JAX session failed:\n{output[-10000:]}"
    assert summary and "failed" not in summary[-1] and "error" not in summary[-1], output[-3000:]
    passed = int(re.search(r"(\d+) passed", summary[-1]).group(1))
    assert passed >= 50, summary[-1]  # the session ran whole, not a collection of nothing
    print(summary[-1])
