"""A 1x1 convolution (groups 1, no bias) for training on the CPU, with a one-pass backward.

    conv1x1_forward(x, weight) -> conv2d(x, weight)
    conv1x1_backward(grad_out, x, weight, a=None, c=None, output_mask=(True, True)) -> (grad_x, grad_weight)
        grad_x      = grad_out W - x a - c per pixel (W: weight as Cout x Cin; a: Cin x Cin and c: Cin
                      optional: fastface.ops.expand_dwconv's BN correction, folded in so that its
                      grouped_linear_sub pass over x is not needed)
        grad_weight = grad_out^T x summed over every pixel (weight's shape)
    Masked-off outputs are empty tensors.

ATen's (oneDNN's) convolution backward runs grad_x and grad_weight as two primitives, each reading
grad_out from memory; the C++ kernel walks the pixels once in L1-sized blocks and computes both from
each block while it is there (grad_weight per task in the input dtype, tasks summed in order in
float64: results do not depend on the thread count). Both kernels prefetch the next block as they go
(their column-block walk defeats the hardware prefetchers) and write large outputs with non-temporal
stores. channels_last is the fast layout.

`Conv1x1Function` puts them under autograd, each where `conv1x1_forward_pays` / `conv1x1_backward_pays`
(measured faster: the face model's large maps, where oneDNN's small-channel GEMMs are memory-bound, and
for the forward its 7 x 7 maps), else ATen's convolution.
`conv1x1_backward_reference` and F.conv2d are the plain PyTorch definitions the kernels are tested
against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastface._ext import has_op
from fastface.ops._common import is_channels_last

OP_FWD = "fastface::conv1x1_forward"
OP_BWD = "fastface::conv1x1_backward"


def conv1x1_backward_reference(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               a: torch.Tensor | None = None, c: torch.Tensor | None = None,
                               output_mask: tuple[bool, bool] = (True, True)) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: ATen's convolution_backward, then grad_x - x a - c."""
    gx, gw, _ = torch.ops.aten.convolution_backward(grad_out, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0],
                                                    1, [output_mask[0], output_mask[1], False])
    if output_mask[0]:
        if a is not None:
            gx = gx - F.conv2d(x, a.t().reshape(a.shape[1], a.shape[0], 1, 1))
        if c is not None:
            gx = gx - c.view(1, -1, 1, 1)
    else:
        gx = x.new_empty((0,))
    return gx, gw if output_mask[1] else weight.new_empty((0,))


def conv1x1_problems(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    """Why the C++ backward cannot take this conv (an empty list: it can)."""
    why = []
    if not (has_op("conv1x1_forward") and has_op("conv1x1_backward")):
        why.append("the fastface C++ extension (conv1x1_forward, conv1x1_backward) is not loaded")
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        why.append(f"x is {x.dtype} on {x.device}: the kernel takes float32/float64 CPU tensors")
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[2:] != (1, 1) or weight.shape[1] != x.shape[1]:
        why.append(f"weight {tuple(weight.shape)} on x {tuple(x.shape)} is not a groups-1 1x1 conv")
    elif weight.dtype != x.dtype or weight.device != x.device:
        why.append(f"weight is {weight.dtype} on {weight.device}, x {x.dtype} on {x.device}")
    return why


if has_op("conv1x1_forward") and has_op("conv1x1_backward"):

    @torch.library.register_fake(OP_FWD)
    def _conv1x1_forward_fake(x, weight):
        z = x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))
        return z.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else z

    @torch.library.register_fake(OP_BWD)
    def _conv1x1_backward_fake(grad_out, x, weight, a=None, c=None, output_mask=(True, True)):
        gx = torch.empty_like(x, memory_format=torch.channels_last if is_channels_last(x)
                              else torch.contiguous_format) if output_mask[0] else x.new_empty((0,))
        gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] \
            else weight.new_empty((0,))
        return gx, gw


def conv1x1_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor | None = None,
                     c: torch.Tensor | None = None,
                     output_mask: tuple[bool, bool] = (True, True)) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight) of conv2d(x, weight) (1x1, groups 1) given grad_out, grad_x less x a + c: the C++
    kernel where it serves the arguments, else the reference."""
    if not conv1x1_problems(x, weight):
        return torch.ops.fastface.conv1x1_backward(grad_out, x, weight, a, c, list(output_mask))
    return conv1x1_backward_reference(grad_out, x, weight, a, c, output_mask)


def conv1x1_forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv2d(x, weight) (1x1, groups 1, no bias): the C++ kernel where it serves the arguments, else F.conv2d."""
    if not conv1x1_problems(x, weight):
        return torch.ops.fastface.conv1x1_forward(x, weight)
    return F.conv2d(x, weight)


def conv1x1_forward_pays(x: torch.Tensor, cout: int) -> bool:
    """Whether the C++ forward beat oneDNN's on this channels_last float32 input here: maps of at least 28 x 28
    with at most 32 channels on one side (the face model's 56 x 56 and 28 x 28 layers: 1.22-1.89x), where oneDNN's
    small-channel GEMMs are memory-bound, and maps of 7 x 7 up to 27 x 27 (its 14 x 14 layers 1.30-1.88x, its
    7 x 7 layers, 64..576 channels, 1.04-1.44x); 0.93-1.06x at 4 x 4, left to oneDNN (bench/test_bench_conv1x1.py,
    bench/results/conv1x1_cpu.json; the 14 x 14 layers ran at 0.65-0.9x before the kernel's tasks were balanced
    over the threads)."""
    side = min(x.shape[2], x.shape[3])
    return (side >= 28 and min(x.shape[1], cout) <= 32) or 7 <= side < 28


def conv1x1_backward_pays(x: torch.Tensor, cout: int) -> bool:
    """Whether the one-pass C++ backward beat oneDNN's here: maps of at least 14 x 14 with at most 32 channels on one
    side (1.32-1.5x at 56 x 56, 1.23-1.42x at 28 x 28, 1.07-1.32x at 14 x 14); with both sides wide (the 7 x 7 and
    4 x 4 layers, 64..1280 channels) oneDNN's GEMMs run at ~180 GFLOP/s and this one at 0.88-1.18x of them
    (bench/test_bench_conv1x1.py, bench/results/conv1x1_cpu.json)."""
    return min(x.shape[2], x.shape[3]) >= 14 and min(x.shape[1], cout) <= 32


class Conv1x1Function(torch.autograd.Function):
    """(x, weight, kernel_forward, kernel_backward) -> conv2d(x, weight), 1x1, groups 1, no bias: the C++ forward
    (conv1x1_forward) if kernel_forward else oneDNN's, the one-pass C++ backward (conv1x1_backward) if
    kernel_backward else oneDNN's; see conv1x1 for where each is used."""

    @staticmethod
    def forward(ctx, x, weight, kernel_forward, kernel_backward):
        ctx.save_for_backward(x, weight)
        ctx.kernel_backward = kernel_backward
        return conv1x1_forward(x, weight) if kernel_forward else F.conv2d(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if not any(mask):
            return None, None, None, None
        if ctx.kernel_backward:
            gx, gw = conv1x1_backward(grad_out, x, weight, None, None, mask)
        else:
            gx, gw = conv1x1_backward_reference(grad_out, x, weight, None, None, mask)
        return gx if mask[0] else None, gw if mask[1] else None, None, None


def conv1x1(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv2d(x, weight) for a groups-1 1x1 conv without bias in training: through Conv1x1Function where a C++ kernel
    serves and pays (channels_last float32 CPU input under autograd; the forward where conv1x1_forward_pays, the
    backward where conv1x1_backward_pays), else F.conv2d."""
    if (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and is_channels_last(x)
            and x.dtype == torch.float32 and not conv1x1_problems(x, weight)):
        fwd, bwd = conv1x1_forward_pays(x, weight.shape[0]), conv1x1_backward_pays(x, weight.shape[0])
        if fwd or bwd:
            return Conv1x1Function.apply(x, weight, fwd, bwd)
    return F.conv2d(x, weight)
