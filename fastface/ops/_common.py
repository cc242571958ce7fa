"""Small helpers shared by the op entry points."""
from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """The layout rule every fastface kernel follows for its output (ambiguous shapes: NCHW)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def like_input(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y in x's memory layout (channels_last stays channels_last)."""
    return y.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else y.contiguous()
