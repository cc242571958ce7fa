"""Depthwise k x k conv + per-channel bias (folded BN) + optional ReLU6.

`dwconv2d` dispatches CUDA -> C++ CPU -> reference; the reference is plain PyTorch and
defines the semantics every backend is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastface._ext import has_op
from fastface.ops._common import like_input
from fastface.ops.dispatch import FusedOp

_FAST_DTYPES = (torch.float32, torch.float64)


def dwconv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int,
                       relu6: bool) -> torch.Tensor:
    """Plain PyTorch: conv2d(groups=C) + bias, then ReLU6 if asked."""
    y = F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=x.shape[1])
    return F.relu6(y) if relu6 else y


def _out_hw(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> tuple[int, int]:
    k = weight.shape[-1]
    return (x.shape[2] + 2 * padding - k) // stride + 1, (x.shape[3] + 2 * padding - k) // stride + 1


if has_op("dwconv2d"):

    @torch.library.register_fake("fastface::dwconv2d")
    def _dwconv2d_fake(x, weight, bias, stride, padding, relu6):
        oh, ow = _out_hw(x, weight, stride, padding)
        return like_input(x.new_empty((x.shape[0], x.shape[1], oh, ow)), x)

    @torch.library.register_fake("fastface::dwconv2d_backward")
    def _dwconv2d_backward_fake(grad_out, x, weight, out, stride, padding, relu6):
        gx = like_input(x.new_empty(x.shape), x)
        return gx, torch.empty_like(weight, memory_format=torch.contiguous_format), x.new_empty((x.shape[1],))

    def _setup_context(ctx, inputs, output):
        x, weight, _bias, stride, padding, relu6 = inputs
        ctx.save_for_backward(x, weight, output)
        ctx.stride, ctx.padding, ctx.relu6 = stride, padding, relu6

    def _backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        gx, gw, gb = torch.ops.fastface.dwconv2d_backward(grad, x, weight, out, ctx.stride, ctx.padding, ctx.relu6)
        return gx, gw, gb, None, None, None

    torch.library.register_autograd("fastface::dwconv2d", _backward, setup_context=_setup_context)


def _common_reasons(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> list[str]:
    why = []
    if not has_op("dwconv2d"):
        from fastface._ext import EXT_ERROR

        why.append(f"extension not loaded ({EXT_ERROR})")
    if x.dtype not in _FAST_DTYPES:
        why.append(f"dtype {x.dtype} (float32/float64 only)")
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        why.append("x, weight and bias dtypes differ")
    return why


def _cpp_reasons(x, weight, bias, stride, padding, relu6) -> list[str]:
    why = _common_reasons(x, weight, bias)
    if x.device.type != "cpu":
        why.append(f"tensor on {x.device}, not CPU")
    return why


def _cuda_reasons(x, weight, bias, stride, padding, relu6) -> list[str]:
    why = _common_reasons(x, weight, bias)
    if not x.is_cuda:
        why.append(f"tensor on {x.device}, not CUDA")
    else:
        from fastface.info import build_info

        if "cuda" not in build_info().get("backends", []):
            why.append("extension built without CUDA")
    return why


dwconv2d = FusedOp("dwconv2d")
dwconv2d.__doc__ = "Depthwise conv + bias + optional ReLU6: dwconv2d(x, weight, bias, stride, padding, relu6)."


@dwconv2d.register("cuda", _cuda_reasons)
@dwconv2d.register("cpp", _cpp_reasons)
def _dwconv2d_ext(x, weight, bias, stride, padding, relu6):
    return torch.ops.fastface.dwconv2d(x, weight, bias, stride, padding, relu6)


dwconv2d.register("reference", lambda *a: [])(dwconv2d_reference)
