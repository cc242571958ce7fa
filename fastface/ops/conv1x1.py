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
for the forward its expanding convs below 28 x 28); below 28 x 28 the rest run as GEMMs over the pixels
(`conv1x1_gemm_forward` / `conv1x1_gemm_backward`: torch.mm, MKL's sgemm, on the channels_last rows, no
copies), which beat ATen's oneDNN convolution there (`conv1x1_gemm_pays`); larger wide maps stay oneDNN's.
`conv1x1_routes` says which a map takes. `conv1x1_backward_reference` and F.conv2d are the plain PyTorch
definitions the kernels and the GEMM forms are tested against.
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


def conv1x1_gemm_forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv2d(x, weight) (1x1, groups 1, no bias) of a channels_last x as one GEMM over its pixels (torch.mm: MKL's
    sgemm in the CPU wheel); channels_last out, a view of the GEMM's rows."""
    n, c, h, w = x.shape
    z = torch.mm(x.permute(0, 2, 3, 1).reshape(n * h * w, c), weight.reshape(weight.shape[0], c).t())
    return z.view(n, h, w, weight.shape[0]).permute(0, 3, 1, 2)


def conv1x1_gemm_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          output_mask: tuple[bool, bool] = (True, True)) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight) of conv2d(x, weight) (1x1, groups 1) as two GEMMs over the pixels: grad_out W and
    grad_out^T x (torch.mm; grad_x channels_last); masked-off outputs are empty tensors."""
    n, c, h, w = x.shape
    cout = weight.shape[0]
    g = grad_out.permute(0, 2, 3, 1).reshape(n * h * w, cout)  # (a view when grad_out is channels_last)
    gx = (torch.mm(g, weight.reshape(cout, c)).view(n, h, w, c).permute(0, 3, 1, 2) if output_mask[0]
          else x.new_empty((0,)))
    gw = (torch.mm(g.t(), x.permute(0, 2, 3, 1).reshape(n * h * w, c)).view(weight.shape) if output_mask[1]
          else weight.new_empty((0,)))
    return gx, gw


def conv1x1_forward_pays(x: torch.Tensor, cout: int) -> bool:
    """Whether the C++ forward beat oneDNN's and the GEMM on this channels_last float32 input here: maps of at least
    28 x 28 with at most 32 channels on one side (the face model's 56 x 56 and 28 x 28 layers: 1.45-2.16x oneDNN),
    where oneDNN's small-channel GEMMs are memory-bound, and the expanding convs (cout >= cin) on maps of 7 x 7 up to
    27 x 27 (32->192 at 14 x 14: 0.76 ms vs the GEMM's 1.11; 96->576 at 7 x 7: 1.52 vs 1.70); the projections there
    run faster as the GEMM (bench/test_bench_conv1x1.py, bench/results/conv1x1_cpu.json)."""
    side = min(x.shape[2], x.shape[3])
    return (side >= 28 and min(x.shape[1], cout) <= 32) or (7 <= side < 28 and cout >= x.shape[1])


def conv1x1_backward_pays(x: torch.Tensor, cout: int) -> bool:
    """Whether the one-pass C++ backward beat oneDNN's and the GEMMs here: maps of at least 14 x 14 with at most 32
    channels on one side (1.91-2.41x oneDNN at 56 x 56, 1.94-2.28x at 28 x 28, 1.32-1.75x at 14 x 14, and faster than
    the GEMMs there; bench/test_bench_conv1x1.py, bench/results/conv1x1_cpu.json)."""
    return min(x.shape[2], x.shape[3]) >= 14 and min(x.shape[1], cout) <= 32


def conv1x1_gemm_pays(x: torch.Tensor) -> bool:
    """Whether the GEMM form (conv1x1_gemm_forward / _backward) beat oneDNN's convolution on this channels_last
    float32 input where the C++ kernels do not pay: maps under 28 x 28 (the face model's 14 x 14, 7 x 7 and 4 x 4
    layers; backward 1.07-1.61x oneDNN's, e.g. 960->320 at 4 x 4: 4.2 vs 5.7 ms; forward 0.95-1.55x), where ATen's
    oneDNN path pays a fixed cost per call (~0.3 ms a primitive at batch 2) and its backward runs grad_x and
    grad_weight as two primitives (bench/test_bench_conv1x1.py, bench/results/conv1x1_cpu.json)."""
    return min(x.shape[2], x.shape[3]) < 28


ROUTES = ("fastface", "gemm", "aten")


def _forward_by(route: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if route == "fastface":
        return conv1x1_forward(x, weight)
    return conv1x1_gemm_forward(x, weight) if route == "gemm" else F.conv2d(x, weight)


class Conv1x1Function(torch.autograd.Function):
    """(x, weight, forward_route, backward_route) -> conv2d(x, weight), 1x1, groups 1, no bias; each route one of
    ROUTES: "fastface" (the C++ conv1x1_forward / one-pass conv1x1_backward), "gemm" (conv1x1_gemm_forward /
    conv1x1_gemm_backward, channels_last x) or "aten" (oneDNN's); see conv1x1 for where each is used."""

    @staticmethod
    def forward(ctx, x, weight, forward_route, backward_route):
        for r in (forward_route, backward_route):
            if r not in ROUTES:
                raise ValueError(f"conv1x1 route {r!r} is not one of {ROUTES}")
        ctx.save_for_backward(x, weight)
        ctx.backward_route = backward_route
        return _forward_by(forward_route, x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if not any(mask):
            return None, None, None, None
        if ctx.backward_route == "fastface":
            gx, gw = conv1x1_backward(grad_out, x, weight, None, None, mask)
        elif ctx.backward_route == "gemm":
            gx, gw = conv1x1_gemm_backward(grad_out, x, weight, mask)
        else:
            gx, gw = conv1x1_backward_reference(grad_out, x, weight, None, None, mask)
        return gx if mask[0] else None, gw if mask[1] else None, None, None


def conv1x1_routes(x: torch.Tensor, cout: int) -> tuple[str, str]:
    """(forward route, backward route) that conv1x1 takes for a channels_last float32 x under autograd: "fastface"
    where conv1x1_forward_pays / conv1x1_backward_pays, else "gemm" where conv1x1_gemm_pays, else "aten"."""
    gemm = "gemm" if conv1x1_gemm_pays(x) else "aten"
    return (("fastface" if conv1x1_forward_pays(x, cout) else gemm),
            ("fastface" if conv1x1_backward_pays(x, cout) else gemm))


def conv1x1(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv2d(x, weight) for a groups-1 1x1 conv without bias in training: through Conv1x1Function on the routes of
    conv1x1_routes (channels_last float32 CPU input under autograd) unless both are oneDNN's, else F.conv2d."""
    if (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and is_channels_last(x)
            and x.dtype == torch.float32 and not conv1x1_problems(x, weight)):
        routes = conv1x1_routes(x, weight.shape[0])
        if routes != ("aten", "aten"):
            return Conv1x1Function.apply(x, weight, *routes)
    return F.conv2d(x, weight)
