"""Small helpers shared by the op entry points."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """The layout rule every fastface kernel follows for its output (ambiguous shapes: NCHW)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def like_input(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y in x's memory layout (channels_last stays channels_last)."""
    return y.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else y.contiguous()


def stats_outputs(ctx: Any, *stats: torch.Tensor) -> None:
    """Marks an autograd Function's statistics outputs (mean, invstd, ...) non-differentiable, and has autograd build
    no zero gradients for them (a training step had ~106 such torch.zeros): its backward, under none_if_undefined,
    may then be called with an undefined gradient."""
    ctx.mark_non_differentiable(*stats)
    ctx.set_materialize_grads(False)


def none_if_undefined(backward: Callable[..., Any]) -> Callable[..., Any]:
    """An autograd backward that returns no gradients when its output's gradient is undefined (None: gradients are
    not materialised, see stats_outputs; gradcheck's undefined-gradient check sends one), else backward's."""
    @functools.wraps(backward)
    def run(ctx: Any, grad: torch.Tensor | None, *rest: Any) -> Any:
        if grad is None:
            return (None,) * len(ctx.needs_input_grad)
        return backward(ctx, grad, *rest)

    return run
