"""Triton kernels (installed as fastface.kernels). Importing this package never imports triton."""
from __future__ import annotations

import importlib.util


def triton_available() -> tuple[bool, str]:
    """(True, "") if triton can be imported, else (False, why)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install fastface[triton])"
    return True, ""
