"""Training path of the depthwise stage: depthwise k x k conv -> BatchNorm (batch statistics) -> ReLU6.

    dwconv_bn_act(x, weight, gamma, beta, stride, eps, relu6) -> (y, mean, invstd)
    dwconv_bn_act_backward(grad_y, x, weight, gamma, beta, mean, invstd, stride, relu6)
        -> (grad_x, grad_weight, grad_gamma, grad_beta)

x: N x C x H x W; weight: C x k x k (odd k, padding k // 2); gamma, beta: C. `mean` and `invstd`
are the batch mean and 1 / sqrt(biased variance + eps) of the conv output z, per channel;
y = relu6(gamma * (z - mean) * invstd + beta). The running statistics are the caller's to update
(unbiased variance, as nn.BatchNorm2d does). Split branches concatenated along C run as one call:
every channel is independent.

`dwconv_bn_act(...)` dispatches CUDA -> Triton -> C++ CPU -> reference and returns y with
autograd through `DwConvBNActFunction`: its backward runs the same backend family as the forward
and recomputes the conv from x (nothing but the inputs, mean and invstd is saved). mean and
invstd are not differentiable. `torch.ops.fastface.dwconv_bn_act` itself is differentiable too
(registered autograd: the backward op).

The references below define the semantics every backend is tested against.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastface._ext import has_op
from fastface.ops._common import like_input, none_if_undefined, stats_outputs
from fastface.ops.ir_block import MemoFusedOp, extension_reasons, triton_kernel_reasons

OP = "fastface::dwconv_bn_act"
OP_BWD = "fastface::dwconv_bn_act_backward"


def dwconv_bn_act_reference(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                            stride: int, eps: float, relu6: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch: conv2d(groups=C), batch statistics over (N, H, W), affine, ReLU6."""
    k = weight.shape[-1]
    z = F.conv2d(x, weight[:, None], None, stride=stride, padding=k // 2, groups=x.shape[1])
    mean = z.mean(dim=(0, 2, 3))
    var = z.var(dim=(0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + eps)
    y = (z - mean[None, :, None, None]) * (invstd * gamma)[None, :, None, None] + beta[None, :, None, None]
    return (F.relu6(y) if relu6 else y), mean, invstd


def dwconv_bn_act_backward_reference(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor,
                                     beta: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, stride: int,
                                     relu6: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. (x, weight, gamma, beta): the batch-norm backward in closed form, conv recomputed."""
    k = weight.shape[-1]
    with torch.enable_grad():
        xs, ws = x.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        z = F.conv2d(xs, ws[:, None], None, stride=stride, padding=k // 2, groups=xs.shape[1])
    c = lambda v: v[None, :, None, None]  # noqa: E731
    zhat = (z.detach() - c(mean)) * c(invstd)
    g = grad_y
    if relu6:
        pre = zhat * c(gamma) + c(beta)
        g = torch.where((pre > 0) & (pre < 6), grad_y, torch.zeros_like(grad_y))
    count = z.shape[0] * z.shape[2] * z.shape[3]
    grad_beta = g.sum(dim=(0, 2, 3))
    grad_gamma = (g * zhat).sum(dim=(0, 2, 3))
    dz = c(gamma * invstd) * (g - c(grad_beta / count) - zhat * c(grad_gamma / count))
    grad_x, grad_w = torch.autograd.grad(z, (xs, ws), dz)
    return grad_x, grad_w, grad_gamma, grad_beta


def dwconv_bn_act_out_shape(x: torch.Tensor, weight: torch.Tensor, stride: int) -> tuple[int, int, int, int]:
    """N x C x OH x OW of y."""
    k = weight.shape[-1]
    p = k // 2
    return (x.shape[0], x.shape[1], (x.shape[2] + 2 * p - k) // stride + 1, (x.shape[3] + 2 * p - k) // stride + 1)


def dwconv_bn_act_problems(x, weight, gamma, beta, stride, eps, relu6) -> list[str]:
    """What is wrong with these arguments (an empty list: nothing); every backend checks these."""
    if x.dim() != 4:
        return [f"x must be N x C x H x W, got shape {tuple(x.shape)}"]
    c = x.shape[1]
    why = []
    if weight.dim() != 3 or weight.shape[0] != c or weight.shape[1] != weight.shape[2] or weight.shape[1] % 2 == 0:
        why.append(f"weight must be C x k x k with C = {c} and odd k, got {tuple(weight.shape)}")
    if tuple(gamma.shape) != (c,) or tuple(beta.shape) != (c,):
        why.append(f"gamma and beta must be ({c},), got {tuple(gamma.shape)} and {tuple(beta.shape)}")
    if not isinstance(stride, int) or stride < 1:
        why.append(f"stride must be an integer >= 1, got {stride!r}")
    if not eps >= 0:
        why.append(f"eps must be >= 0, got {eps!r}")
    if not why:
        n, _, oh, ow = dwconv_bn_act_out_shape(x, weight, stride)
        if n * oh * ow < 1:
            why.append(f"batch statistics need at least one output element, got x of shape {tuple(x.shape)}")
    tensors = (x, weight, gamma, beta)
    if len({t.dtype for t in tensors}) != 1:
        why.append(f"dtypes differ: {sorted({str(t.dtype) for t in tensors})}")
    if len({t.device for t in tensors}) != 1:
        why.append(f"tensors on several devices: {sorted({str(t.device) for t in tensors})}")
    return why


if has_op("dwconv_bn_act"):

    @torch.library.register_fake(OP)
    def _dwconv_bn_act_fake(x, weight, gamma, beta, stride, eps, relu6):
        y = like_input(x.new_empty(dwconv_bn_act_out_shape(x, weight, stride)), x)
        return y, x.new_empty((x.shape[1],)), x.new_empty((x.shape[1],))

    @torch.library.register_fake(OP_BWD)
    def _dwconv_bn_act_backward_fake(grad_y, x, weight, gamma, beta, mean, invstd, stride, relu6):
        gx = like_input(x.new_empty(x.shape), x)
        return gx, weight.new_empty(weight.shape), gamma.new_empty(gamma.shape), beta.new_empty(beta.shape)

    def _setup_context(ctx, inputs, output):
        x, weight, gamma, beta, stride, _eps, relu6 = inputs
        _y, mean, invstd = output
        ctx.save_for_backward(x, weight, gamma, beta, mean, invstd)
        ctx.stride, ctx.relu6 = stride, relu6
        stats_outputs(ctx, mean, invstd)

    @none_if_undefined
    def _op_backward(ctx, grad_y, _grad_mean, _grad_invstd):
        x, weight, gamma, beta, mean, invstd = ctx.saved_tensors
        grads = torch.ops.fastface.dwconv_bn_act_backward(grad_y, x, weight, gamma, beta, mean, invstd, ctx.stride,
                                                          ctx.relu6)
        return (*grads, None, None, None)

    torch.library.register_autograd(OP, _op_backward, setup_context=_setup_context)


# ---- backends -----------------------------------------------------------------------------

_FAST_DTYPES = {"cpp": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def _ext_reasons(key: str, device_type: str):
    dtypes = _FAST_DTYPES[device_type.replace("cpu", "cpp")]

    def reasons(x, *rest) -> list[str]:
        why = dwconv_bn_act_problems(x, *rest) + extension_reasons("dwconv_bn_act", (OP, OP_BWD), key, device_type,
                                                                   dtypes, x)
        if device_type == "cuda":
            # csrc/cuda/dwconv_bn_act.cu instantiates k in {3, 5} and strides 1 and 2 only.
            weight, stride = rest[0], rest[3]
            if weight.shape[-1] not in (3, 5):
                why.append(f"kernel size {weight.shape[-1]} (CUDA kernel: 3 or 5)")
            if stride not in (1, 2):
                why.append(f"stride {stride} (CUDA kernel: 1 or 2)")
        return why

    return reasons


def _triton_reasons(x, *rest) -> list[str]:
    return triton_kernel_reasons(dwconv_bn_act_problems(x, *rest), x, "dwconv_bn_act")


def _ext_forward(x, weight, gamma, beta, stride, eps, relu6):
    return torch.ops.fastface.dwconv_bn_act.default(x, weight, gamma, beta, stride, eps, relu6)


def _ext_backward(grad_y, x, weight, gamma, beta, mean, invstd, stride, relu6):
    return torch.ops.fastface.dwconv_bn_act_backward.default(grad_y, x, weight, gamma, beta, mean, invstd, stride,
                                                             relu6)


def _triton_forward(x, weight, gamma, beta, stride, eps, relu6):
    from fastface.kernels.dwconv_bn_act import forward

    return forward(x, weight, gamma, beta, stride, eps, relu6)


def _triton_backward(grad_y, x, weight, gamma, beta, mean, invstd, stride, relu6):
    from fastface.kernels.dwconv_bn_act import backward

    return backward(grad_y, x, weight, gamma, beta, mean, invstd, stride, relu6)


_FORWARD: dict[str, Callable[..., Any]] = {
    "cuda": _ext_forward, "cpp": _ext_forward, "triton": _triton_forward, "reference": dwconv_bn_act_reference}
_BACKWARD: dict[str, Callable[..., Any]] = {
    "cuda": _ext_backward, "cpp": _ext_backward, "triton": _triton_backward,
    "reference": dwconv_bn_act_backward_reference}
_REASONS: dict[str, Callable[..., list[str]]] = {
    "cuda": _ext_reasons("CUDA", "cuda"), "cpp": _ext_reasons("CPU", "cpu"), "triton": _triton_reasons,
    "reference": dwconv_bn_act_problems}


class DwConvBNActFunction(torch.autograd.Function):
    """Autograd for dwconv_bn_act on one backend: saves x, weight, gamma, beta, mean, invstd only."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, stride, eps, relu6, backend):
        y, mean, invstd = _FORWARD[backend](x, weight, gamma, beta, stride, eps, relu6)
        ctx.save_for_backward(x, weight, gamma, beta, mean, invstd)
        ctx.stride, ctx.relu6, ctx.backend = stride, relu6, backend
        stats_outputs(ctx, mean, invstd)
        return y, mean, invstd

    @staticmethod
    @none_if_undefined
    def backward(ctx, grad_y, _grad_mean, _grad_invstd):
        x, weight, gamma, beta, mean, invstd = ctx.saved_tensors
        gx, gw, gg, gb = _BACKWARD[ctx.backend](grad_y, x, weight, gamma, beta, mean, invstd, ctx.stride, ctx.relu6)
        return gx, gw, gg, gb, None, None, None, None


def _autograd_impl(backend: str) -> Callable[..., Any]:
    def run(x, weight, gamma, beta, stride, eps, relu6):
        return DwConvBNActFunction.apply(x, weight, gamma, beta, stride, eps, relu6, backend)

    run.__name__ = f"dwconv_bn_act_{backend}"
    return run


dwconv_bn_act = MemoFusedOp("dwconv_bn_act")
dwconv_bn_act.__doc__ = ("Depthwise conv -> BN (batch statistics) -> ReLU6 with autograd: dwconv_bn_act(x, weight, "
                         "gamma, beta, stride, eps, relu6) -> (y, mean, invstd).")
dwconv_bn_act_backward = MemoFusedOp("dwconv_bn_act_backward")
dwconv_bn_act_backward.__doc__ = ("Gradients of dwconv_bn_act: dwconv_bn_act_backward(grad_y, x, weight, gamma, beta, "
                                  "mean, invstd, stride, relu6) -> (grad_x, grad_weight, grad_gamma, grad_beta).")


def _backward_reasons(reasons: Callable[..., list[str]]) -> Callable[..., list[str]]:
    def check(grad_y, x, weight, gamma, beta, mean, invstd, stride, relu6) -> list[str]:
        why = reasons(x, weight, gamma, beta, stride, 0.0, relu6)
        if not why and tuple(grad_y.shape) != dwconv_bn_act_out_shape(x, weight, stride):
            why.append(f"grad_y must be {dwconv_bn_act_out_shape(x, weight, stride)}, got {tuple(grad_y.shape)}")
        if any(t.dtype != x.dtype or t.device != x.device for t in (grad_y, mean, invstd)):
            why.append("grad_y, mean and invstd must match x's dtype and device")
        return why

    return check


for _b in ("cuda", "triton", "cpp", "reference"):
    dwconv_bn_act.register(_b, _REASONS[_b])(_autograd_impl(_b))
    dwconv_bn_act_backward.register(_b, _backward_reasons(_REASONS[_b]))(_BACKWARD[_b])
del _b
