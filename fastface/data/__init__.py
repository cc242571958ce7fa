"""Data: synthetic RGB-D faces, RecordIO / folder / .bin formats, DALI and torch loaders."""
from __future__ import annotations

import importlib.util


def dali_status() -> tuple[bool, str | None]:
    """(usable, why not): DALI is an optional extra; without it the torch loader is used."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return False, "nvidia-dali is not installed (pip install fastface[dali]); the torch DataLoader backend is used"
    return True, None
