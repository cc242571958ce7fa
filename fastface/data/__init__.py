"""fastface.data: synthetic RGB-D faces, RecordIO / folder / .bin formats, torch and DALI loaders.

Heavy modules (torch, DALI, OpenCV) load on first use; ``dali_status`` only looks for DALI.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

_LAZY = {
    "DataConfig": "fastface.data.loader",
    "make_loader": "fastface.data.loader",
    "FaceLoader": "fastface.data.loader",
    "DataError": "fastface.data.errors",
    "RecordReader": "fastface.data.recordio",
    "RecordWriter": "fastface.data.recordio",
    "RecordIOError": "fastface.data.recordio",
    "FaceRecordWriter": "fastface.data.recordio",
    "IRHeader": "fastface.data.recordio",
    "convert_depth": "fastface.data.recordio",
    "read_bin": "fastface.data.verification",
    "write_bin": "fastface.data.verification",
    "load_pairs": "fastface.data.verification",
    "SynthConfig": "fastface.data.synth",
    "generate": "fastface.data.synth",
    "preset": "fastface.data.synth",
    "open_source": "fastface.data.sources",
}


def dali_status() -> tuple[bool, str | None]:
    """(usable, why not): whether NVIDIA DALI imports here (without it the torch backend is used)."""
    try:
        if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
            return False, "nvidia-dali is not installed (pip install 'fastface[dali]'); the torch DataLoader backend is used"
        importlib.import_module("nvidia.dali")
    except Exception as e:  # a broken install must not take fastface.info down with it
        return False, f"nvidia.dali fails to import ({type(e).__name__}: {e}); the torch DataLoader backend is used"
    return True, None


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastface.data' has no attribute {name!r}")


__all__ = [*_LAZY, "dali_status"]
