"""fastface: fast training and search of compact (RGB-D) face-recognition networks.

Importing fastface is cheap and never initialises CUDA; the C++/CUDA extension is optional
at run time (`python -m fastface.info` says what is usable).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ArchSpec": "fastface.arch",
    "BlockSpec": "fastface.arch",
    "StemSpec": "fastface.arch",
    "HeadSpec": "fastface.arch",
    "build_model": "fastface.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastface' has no attribute {name!r}")


__all__ = [*_LAZY, "__version__"]
