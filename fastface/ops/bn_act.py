"""Training-mode BatchNorm (batch statistics) + optional residual add + optional ReLU6.

    bn_act(x, gamma, beta, residual, eps, relu6) -> (y, mean, invstd)
        y = act((x - mean) * invstd * gamma + beta [+ residual])
    bn_act_backward(grad_y, x, gamma, beta, mean, invstd, residual, relu6)
        -> (grad_x, grad_gamma, grad_beta, grad_residual_masked)
    bn_act_apply(x, gamma, beta, mean, invstd, relu6) -> y   (the statistics given: one pass)

x: N x C x H x W (or N x C); gamma, beta: C; residual: None or x's shape. `mean` and `invstd` are
the batch mean and 1 / sqrt(biased variance + eps) per channel (statistics over every dim but 1),
as F.batch_norm computes them in training; the running statistics are the caller's to update
(unbiased variance, as nn.BatchNorm2d does). The backward recomputes the ReLU6 mask from x (and
the residual) instead of saving y. Its fourth output is the residual's gradient when relu6 and a
residual are given (grad_y behind the mask), else an empty tensor: the residual's gradient is
then grad_y itself (the autograd wrappers return it without a copy).

    bn_add_act(x, gamma, beta, r, r_gamma, r_beta, eps, relu6) -> (y, mean, invstd, r_mean, r_invstd)
        y = act(BN_x(x) + BN_r(r)): two inputs, each through its own training BN, summed (the split
        model's add merge of its stems); neither BN's output is stored, forward or backward

`bn_act(...)` dispatches C++ CPU -> reference (there is no CUDA or Triton kernel: on a GPU the
reference runs, i.e. ATen's batch norm, which cuDNN/inductor already serve well) and returns y
with autograd through `BNActFunction`. mean and invstd are not differentiable.
`torch.ops.fastface.bn_act` itself is differentiable too (registered autograd: the backward op).

Its outputs come from PyTorch's CPU allocator; the trainer runs its steps under
fastface.ops.cpu_cache, so large ones are reused rather than page-faulted in every step.

The references below define the semantics every backend is tested against.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastface._ext import has_op
from fastface.ops._common import like_input, none_if_undefined, stats_outputs
from fastface.ops.ir_block import MemoFusedOp, extension_reasons

OP = "fastface::bn_act"
OP_BWD = "fastface::bn_act_backward"


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _c(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def bn_stats_reference(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: the batch mean and 1 / sqrt(biased variance + eps) over every dim but 1 (bn_stats)."""
    var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
    return mean, torch.rsqrt(var + eps)


def bn_act_apply_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor,
                           invstd: torch.Tensor, relu6: bool) -> torch.Tensor:
    """Plain PyTorch: act((x - mean) * (invstd * gamma) + beta) with the statistics given (bn_act_apply)."""
    y = (x - _c(mean, x)) * _c(invstd * gamma, x) + _c(beta, x)
    return F.relu6(y) if relu6 else y


def bn_act_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, residual: torch.Tensor | None,
                     eps: float, relu6: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch: F.batch_norm in training (batch statistics), + residual, ReLU6."""
    mean, invstd = bn_stats_reference(x, eps)
    y = F.batch_norm(x, None, None, gamma, beta, True, 0.0, eps)
    if residual is not None:
        y = y + residual
    return (F.relu6(y) if relu6 else y), mean, invstd


def bn_act_backward_reference(grad_y: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                              mean: torch.Tensor, invstd: torch.Tensor, residual: torch.Tensor | None,
                              relu6: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. (x, gamma, beta) and the masked residual gradient: the BN backward in closed form."""
    xhat = (x - _c(mean, x)) * _c(invstd, x)
    g = grad_y
    if relu6:
        pre = (x - _c(mean, x)) * _c(invstd * gamma, x) + _c(beta, x)
        if residual is not None:
            pre = pre + residual
        g = torch.where((pre > 0) & (pre < 6), grad_y, torch.zeros_like(grad_y))
    dims = _reduce_dims(x)
    count = x.numel() // x.shape[1]
    grad_beta = g.sum(dim=dims)
    grad_gamma = (g * xhat).sum(dim=dims)
    grad_x = _c(gamma * invstd, x) * (g - _c(grad_beta / count, x) - xhat * _c(grad_gamma / count, x))
    grad_res = g if (relu6 and residual is not None) else x.new_empty((0,))
    return grad_x, grad_gamma, grad_beta, grad_res


def bn_act_problems(x, gamma, beta, residual, eps, relu6) -> list[str]:
    """What is wrong with these arguments (an empty list: nothing); every backend checks these."""
    if x.dim() not in (2, 4):
        return [f"x must be N x C x H x W or N x C, got shape {tuple(x.shape)}"]
    c = x.shape[1]
    why = []
    if tuple(gamma.shape) != (c,) or tuple(beta.shape) != (c,):
        why.append(f"gamma and beta must be ({c},), got {tuple(gamma.shape)} and {tuple(beta.shape)}")
    if residual is not None and residual.shape != x.shape:
        why.append(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if not eps >= 0:
        why.append(f"eps must be >= 0, got {eps!r}")
    if c < 1 or x.numel() // max(c, 1) < 1:
        why.append(f"batch statistics need at least one element per channel, got x of shape {tuple(x.shape)}")
    tensors = [t for t in (x, gamma, beta, residual) if t is not None]
    if len({t.dtype for t in tensors}) != 1:
        why.append(f"dtypes differ: {sorted({str(t.dtype) for t in tensors})}")
    if len({t.device for t in tensors}) != 1:
        why.append(f"tensors on several devices: {sorted({str(t.device) for t in tensors})}")
    return why


if has_op("bn_act_apply"):

    @torch.library.register_fake("fastface::bn_act_apply")
    def _bn_act_apply_fake(x, gamma, beta, mean, invstd, relu6):
        return like_input(x.new_empty(x.shape), x)


if has_op("bn_act"):

    @torch.library.register_fake(OP)
    def _bn_act_fake(x, gamma, beta, residual, eps, relu6):
        return like_input(x.new_empty(x.shape), x), x.new_empty((x.shape[1],)), x.new_empty((x.shape[1],))

    @torch.library.register_fake(OP_BWD)
    def _bn_act_backward_fake(grad_y, x, gamma, beta, mean, invstd, residual, relu6):
        gres = like_input(x.new_empty(x.shape), x) if (relu6 and residual is not None) else x.new_empty((0,))
        return like_input(x.new_empty(x.shape), x), gamma.new_empty(gamma.shape), beta.new_empty(beta.shape), gres

    def _setup_context(ctx, inputs, output):
        x, gamma, beta, residual, _eps, relu6 = inputs
        _y, mean, invstd = output
        ctx.has_res, ctx.relu6 = residual is not None, relu6
        ctx.save_for_backward(x, gamma, beta, mean, invstd, residual if (relu6 and residual is not None) else None)
        stats_outputs(ctx, mean, invstd)

    @none_if_undefined
    def _op_backward(ctx, grad_y, _grad_mean, _grad_invstd):
        x, gamma, beta, mean, invstd, residual = ctx.saved_tensors
        gx, gg, gb, gr = torch.ops.fastface.bn_act_backward(grad_y, x, gamma, beta, mean, invstd, residual, ctx.relu6)
        if not ctx.has_res:
            gr = None
        elif not ctx.relu6:
            gr = grad_y
        return gx, gg, gb, gr, None, None

    torch.library.register_autograd(OP, _op_backward, setup_context=_setup_context)


# ---- backends -----------------------------------------------------------------------------


def _cpp_reasons(x, gamma, beta, residual, eps, relu6) -> list[str]:
    return bn_act_problems(x, gamma, beta, residual, eps, relu6) + extension_reasons(
        "bn_act", (OP, OP_BWD), "CPU", "cpu", (torch.float32, torch.float64), x)


def _ext_forward(x, gamma, beta, residual, eps, relu6):
    return torch.ops.fastface.bn_act.default(x, gamma, beta, residual, eps, relu6)


def _ext_backward(grad_y, x, gamma, beta, mean, invstd, residual, relu6):
    return torch.ops.fastface.bn_act_backward.default(grad_y, x, gamma, beta, mean, invstd, residual, relu6)


_FORWARD: dict[str, Callable[..., Any]] = {"cpp": _ext_forward, "reference": bn_act_reference}
_BACKWARD: dict[str, Callable[..., Any]] = {"cpp": _ext_backward, "reference": bn_act_backward_reference}
_REASONS: dict[str, Callable[..., list[str]]] = {"cpp": _cpp_reasons, "reference": bn_act_problems}


class BNActFunction(torch.autograd.Function):
    """Autograd for bn_act on one backend: saves x, gamma, beta, mean, invstd (and the residual
    only when ReLU6 follows the add: the mask needs it)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, residual, eps, relu6, backend):
        y, mean, invstd = _FORWARD[backend](x, gamma, beta, residual, eps, relu6)
        masked_res = relu6 and residual is not None
        ctx.save_for_backward(x, gamma, beta, mean, invstd, residual if masked_res else None)
        ctx.relu6, ctx.has_res, ctx.backend = relu6, residual is not None, backend
        stats_outputs(ctx, mean, invstd)
        return y, mean, invstd

    @staticmethod
    @none_if_undefined
    def backward(ctx, grad_y, _grad_mean, _grad_invstd):
        x, gamma, beta, mean, invstd, residual = ctx.saved_tensors
        gx, gg, gb, gr = _BACKWARD[ctx.backend](grad_y, x, gamma, beta, mean, invstd, residual, ctx.relu6)
        if not ctx.has_res:
            gr = None
        elif not ctx.relu6:
            gr = grad_y  # y = bn(x) + residual: the residual's gradient is grad_y itself
        return gx, gg, gb, gr, None, None, None


def _autograd_impl(backend: str) -> Callable[..., Any]:
    def run(x, gamma, beta, residual, eps, relu6):
        return BNActFunction.apply(x, gamma, beta, residual, eps, relu6, backend)

    run.__name__ = f"bn_act_{backend}"
    return run


bn_act = MemoFusedOp("bn_act")
bn_act.__doc__ = ("Training-mode BN + optional residual + optional ReLU6 with autograd: bn_act(x, gamma, beta, "
                  "residual, eps, relu6) -> (y, mean, invstd).")
bn_act_backward = MemoFusedOp("bn_act_backward")
bn_act_backward.__doc__ = ("Gradients of bn_act: bn_act_backward(grad_y, x, gamma, beta, mean, invstd, residual, "
                           "relu6) -> (grad_x, grad_gamma, grad_beta, grad_residual_masked).")


def _backward_reasons(reasons: Callable[..., list[str]]) -> Callable[..., list[str]]:
    def check(grad_y, x, gamma, beta, mean, invstd, residual, relu6) -> list[str]:
        why = reasons(x, gamma, beta, residual, 0.0, relu6)
        if grad_y.shape != x.shape:
            why.append(f"grad_y must have x's shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
        if any(t.dtype != x.dtype or t.device != x.device for t in (grad_y, mean, invstd)):
            why.append("grad_y, mean and invstd must match x's dtype and device")
        return why

    return check


for _b in ("cpp", "reference"):
    bn_act.register(_b, _REASONS[_b])(_autograd_impl(_b))
    bn_act_backward.register(_b, _backward_reasons(_REASONS[_b]))(_BACKWARD[_b])
del _b


# ---- two BNs summed: act(BN_x(x) + BN_r(r)) ---------------------------------------------------

OP_ADD = "fastface::bn_add_act"
OP_ADD_BWD = "fastface::bn_add_act_backward"


def bn_add_act_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, r: torch.Tensor,
                         r_gamma: torch.Tensor, r_beta: torch.Tensor, eps: float, relu6: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch: act(F.batch_norm(x) + F.batch_norm(r)) in training, and both BNs' (mean, invstd)."""
    yr, r_mean, r_invstd = bn_act_reference(r, r_gamma, r_beta, None, eps, False)
    y, mean, invstd = bn_act_reference(x, gamma, beta, yr, eps, relu6)
    return y, mean, invstd, r_mean, r_invstd


def bn_add_act_backward_reference(grad_y: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                                  mean: torch.Tensor, invstd: torch.Tensor, r: torch.Tensor, r_gamma: torch.Tensor,
                                  r_beta: torch.Tensor, r_mean: torch.Tensor, r_invstd: torch.Tensor, relu6: bool
                                  ) -> tuple[torch.Tensor, ...]:
    """Gradients w.r.t. (x, gamma, beta, r, r_gamma, r_beta): bn_act's closed form twice, on one masked g."""
    yr = (r - _c(r_mean, r)) * _c(r_invstd * r_gamma, r) + _c(r_beta, r)
    gx, gg, gb, g = bn_act_backward_reference(grad_y, x, gamma, beta, mean, invstd, yr, relu6)
    if not relu6:
        g = grad_y
    gr, grg, grb, _ = bn_act_backward_reference(g, r, r_gamma, r_beta, r_mean, r_invstd, None, False)
    return gx, gg, gb, gr, grg, grb


def bn_add_act_problems(x, gamma, beta, r, r_gamma, r_beta, eps, relu6) -> list[str]:
    """What is wrong with these arguments (an empty list: nothing)."""
    why = bn_act_problems(x, gamma, beta, r, eps, relu6)
    why += [f"r's BN: {w}" for w in bn_act_problems(r, r_gamma, r_beta, None, eps, relu6) if "residual" not in w]
    return list(dict.fromkeys(why))


if has_op("bn_add_act"):

    @torch.library.register_fake(OP_ADD)
    def _bn_add_act_fake(x, gamma, beta, r, r_gamma, r_beta, eps, relu6):
        c = x.shape[1]
        return (like_input(x.new_empty(x.shape), x), x.new_empty((c,)), x.new_empty((c,)), x.new_empty((c,)),
                x.new_empty((c,)))

    @torch.library.register_fake(OP_ADD_BWD)
    def _bn_add_act_backward_fake(grad_y, x, gamma, beta, mean, invstd, r, r_gamma, r_beta, r_mean, r_invstd, relu6):
        return (like_input(x.new_empty(x.shape), x), gamma.new_empty(gamma.shape), beta.new_empty(beta.shape),
                like_input(r.new_empty(r.shape), r), r_gamma.new_empty(r_gamma.shape), r_beta.new_empty(r_beta.shape))

    def _add_setup_context(ctx, inputs, output):
        x, gamma, beta, r, r_gamma, r_beta, _eps, relu6 = inputs
        _y, mean, invstd, r_mean, r_invstd = output
        ctx.relu6 = relu6
        ctx.save_for_backward(x, gamma, beta, mean, invstd, r, r_gamma, r_beta, r_mean, r_invstd)
        stats_outputs(ctx, mean, invstd, r_mean, r_invstd)

    @none_if_undefined
    def _add_op_backward(ctx, grad_y, *_grad_stats):
        return (*torch.ops.fastface.bn_add_act_backward(grad_y, *ctx.saved_tensors, ctx.relu6), None, None)

    torch.library.register_autograd(OP_ADD, _add_op_backward, setup_context=_add_setup_context)


def _add_cpp_reasons(x, gamma, beta, r, r_gamma, r_beta, eps, relu6) -> list[str]:
    return bn_add_act_problems(x, gamma, beta, r, r_gamma, r_beta, eps, relu6) + extension_reasons(
        "bn_add_act", (OP_ADD, OP_ADD_BWD), "CPU", "cpu", (torch.float32, torch.float64), x)


_ADD_FORWARD: dict[str, Callable[..., Any]] = {
    "cpp": lambda *a: torch.ops.fastface.bn_add_act.default(*a), "reference": bn_add_act_reference}
_ADD_BACKWARD: dict[str, Callable[..., Any]] = {
    "cpp": lambda *a: torch.ops.fastface.bn_add_act_backward.default(*a), "reference": bn_add_act_backward_reference}


class BNAddActFunction(torch.autograd.Function):
    """Autograd for bn_add_act on one backend: saves both inputs, their BN parameters and statistics
    (neither BN's output is stored)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, r, r_gamma, r_beta, eps, relu6, backend):
        out = _ADD_FORWARD[backend](x, gamma, beta, r, r_gamma, r_beta, eps, relu6)
        _y, mean, invstd, r_mean, r_invstd = out
        ctx.save_for_backward(x, gamma, beta, mean, invstd, r, r_gamma, r_beta, r_mean, r_invstd)
        ctx.relu6, ctx.backend = relu6, backend
        stats_outputs(ctx, mean, invstd, r_mean, r_invstd)
        return out

    @staticmethod
    @none_if_undefined
    def backward(ctx, grad_y, *_grad_stats):
        return (*_ADD_BACKWARD[ctx.backend](grad_y, *ctx.saved_tensors, ctx.relu6), None, None, None)


def _add_autograd_impl(backend: str) -> Callable[..., Any]:
    def run(x, gamma, beta, r, r_gamma, r_beta, eps, relu6):
        return BNAddActFunction.apply(x, gamma, beta, r, r_gamma, r_beta, eps, relu6, backend)

    run.__name__ = f"bn_add_act_{backend}"
    return run


bn_add_act = MemoFusedOp("bn_add_act")
bn_add_act.__doc__ = ("act(BN_x(x) + BN_r(r)) in training with autograd: bn_add_act(x, gamma, beta, r, r_gamma, "
                      "r_beta, eps, relu6) -> (y, mean, invstd, r_mean, r_invstd).")
bn_add_act.register("cpp", _add_cpp_reasons)(_add_autograd_impl("cpp"))
bn_add_act.register("reference", bn_add_act_problems)(_add_autograd_impl("reference"))
