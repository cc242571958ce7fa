"""Small shared helpers: atomic file writes."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call write(f) on a temp file in path's directory, fsync, then rename over path.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Atomically replace path's contents with text."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Atomically replace path's contents with data."""
    atomic_write(path, lambda f: f.write(data), mode="wb")
