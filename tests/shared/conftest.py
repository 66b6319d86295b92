"""Tests every backend shares: each backend's session (``make test``) collects this folder and runs it
on its own backend; they carry the ``every_backend`` marker (``-m every_backend`` selects them)."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/shared/" in str(item.path):
            item.add_marker(pytest.mark.every_backend)
