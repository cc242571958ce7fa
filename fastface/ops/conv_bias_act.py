"""Dense k x k conv + per-channel bias (folded BN) + optional ReLU6, for the folded eval path.

    conv_bias_act(x, weight, bias, stride, padding, groups, relu6)

The model's stem, its last 1x1 conv and its head's linear layer (as a 1x1 conv on a 1x1 map)
run through this op in eval, so that on the CPU the whole folded forward runs on the task
pool of the fused blocks (csrc/cpu/conv_bias_act.cpp says why). Backends: C++ CPU, then the
PyTorch reference (which is also what runs on a GPU: cuDNN's conv is already one kernel).
The output keeps x's memory layout. `pack_conv_weight` gives the weight as a view in the
C++ kernel's layout, so a cached folded weight is not re-packed on every call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastface._ext import has_op
from fastface.ops._common import like_input
from fastface.ops.ir_block import MemoFusedOp

_FAST_DTYPES = (torch.float32, torch.float64)


def conv_bias_act_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int,
                            groups: int, relu6: bool) -> torch.Tensor:
    """Plain PyTorch: conv2d + bias, then ReLU6 if asked."""
    y = F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=groups)
    return F.relu6(y) if relu6 else y


def pack_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """The same weight (shape and values) as a view of a (k, k, Cin/groups, Cout) contiguous tensor."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def conv_bias_act_problems(x, weight, bias, stride, padding, groups, relu6) -> list[str]:
    """What is wrong with these arguments (an empty list: nothing)."""
    if x.dim() != 4:
        return [f"x must be N x C x H x W, got shape {tuple(x.shape)}"]
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        return [f"weight must be Cout x Cin/groups x k x k, got {tuple(weight.shape)}"]
    why = []
    if groups < 1 or x.shape[1] % groups or weight.shape[0] % groups:
        why.append(f"{x.shape[1]} input and {weight.shape[0]} output channels are not multiples of groups={groups}")
    elif weight.shape[1] != x.shape[1] // groups:
        why.append(f"weight has {weight.shape[1]} input channels per group, x has {x.shape[1] // groups}")
    if tuple(bias.shape) != (weight.shape[0],):
        why.append(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if stride < 1 or padding < 0:
        why.append(f"stride must be >= 1 and padding >= 0, got {stride} and {padding}")
    k = weight.shape[-1]
    if x.shape[2] + 2 * padding < k or x.shape[3] + 2 * padding < k:
        why.append(f"{k}x{k} kernel larger than the {x.shape[2]}x{x.shape[3]} input padded by {padding}")
    return why


def _out_shape(x, weight, stride, padding) -> tuple[int, int, int, int]:
    k = weight.shape[-1]
    return (x.shape[0], weight.shape[0], (x.shape[2] + 2 * padding - k) // stride + 1,
            (x.shape[3] + 2 * padding - k) // stride + 1)


if has_op("conv_bias_act"):

    @torch.library.register_fake("fastface::conv_bias_act")
    def _conv_bias_act_fake(x, weight, bias, stride, padding, groups, relu6):
        return like_input(x.new_empty(_out_shape(x, weight, stride, padding)), x)

    def _setup_context(ctx, inputs, output):
        x, weight, _bias, stride, padding, groups, relu6 = inputs
        ctx.save_for_backward(x, weight, output if relu6 else None)
        ctx.conf = (stride, padding, groups, relu6)

    def _backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        stride, padding, groups, relu6 = ctx.conf
        if relu6:
            grad = grad * ((out > 0) & (out < 6)).to(grad.dtype)
        gx, gw, gb = torch.ops.aten.convolution_backward(grad, x, weight, [weight.shape[0]], [stride, stride],
                                                         [padding, padding], [1, 1], False, [0, 0], groups,
                                                         [True, True, True])
        return gx, gw, gb, None, None, None, None

    torch.library.register_autograd("fastface::conv_bias_act", _backward, setup_context=_setup_context)


def _cpp_reasons(x, weight, bias, stride, padding, groups, relu6) -> list[str]:
    why = []
    if not has_op("conv_bias_act"):
        from fastface._ext import EXT_ERROR

        why.append(f"extension not loaded ({EXT_ERROR})")
    if x.device.type != "cpu":
        why.append(f"tensor on {x.device}, not CPU")
    if x.dtype not in _FAST_DTYPES:
        why.append(f"dtype {x.dtype} (float32/float64 only)")
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        why.append("x, weight and bias dtypes differ")
    return why + conv_bias_act_problems(x, weight, bias, stride, padding, groups, relu6)


conv_bias_act = MemoFusedOp("conv_bias_act")
conv_bias_act.__doc__ = ("Dense conv + bias + optional ReLU6: conv_bias_act(x, weight, bias, stride, padding, groups, "
                         "relu6).")


@conv_bias_act.register("cpp", _cpp_reasons)
def _conv_bias_act_cpp(x, weight, bias, stride, padding, groups, relu6):
    return torch.ops.fastface.conv_bias_act(x, weight, bias, stride, padding, groups, relu6)


conv_bias_act.register("reference", lambda *a: [])(conv_bias_act_reference)
