"""File-system checks the tools and the recipes share."""

from __future__ import annotations

import tempfile
from pathlib import Path


def ensure_writable_directory(path: Path) -> None:
    """Creates ``path`` (and its parents) if needed and proves a file can be written in it.

    Raises ``OSError`` with the system's reason, before any long work that would end by failing to save.
    """
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass
