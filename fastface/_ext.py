"""Loads the compiled extension fastface._C once; the package works without it."""
from __future__ import annotations

import torch  # noqa: F401  (the extension links against torch: import it first)

EXT_ERROR: str | None = None
try:
    from fastface import _C  # noqa: F401
    HAS_EXT = True
except (ImportError, OSError) as e:  # not built, or built against another torch
    HAS_EXT = False
    EXT_ERROR = f"{type(e).__name__}: {e}"


def has_op(name: str) -> bool:
    """True if torch.ops.fastface.<name> exists (the extension is loaded and registers it)."""
    return HAS_EXT and hasattr(torch.ops.fastface, name)
