"""File-system helpers the tools and the recipes share: a writable-directory probe, whole-file writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def ensure_writable_directory(path: Path) -> None:
    """Creates ``path`` (and its parents) if needed and proves a file can be written in it.

    Raises ``OSError`` with the system's reason, before any long work that would end by failing to save.
    """
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


def atomic_write(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole or keeps what it held: a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)
