"""The split model's two branch stems in training: each a 3x3 conv (padding 1, no bias) over its modality's
channels of one input, then its own training BatchNorm; summed, then ReLU6 (or none).

    stems_bn_add_act(x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, stride, eps, relu6)
        -> (y, mean_a, invstd_a, mean_b, invstd_b)
        y = act(BN_a(conv(x[:, :ca], w_a)) + BN_b(conv(x[:, ca:], w_b)))   (ca = w_a.shape[1])
    stems_bn_add_act_backward(grad_y, x, w_a, gamma_a, beta_a, mean_a, invstd_a, w_b, gamma_b, beta_b, mean_b,
                              invstd_b, stride, relu6)
        -> (grad_w_a, grad_gamma_a, grad_beta_a, grad_w_b, grad_gamma_b, grad_beta_b)

This is the "add" merge at split = 1 (fastface.arch): x is the network's input batch (N x (ca + cb) x H x W,
any layout), so it gets no gradient; y is channels_last. mean and invstd are each BN's batch mean and
1 / sqrt(biased variance + eps), as F.batch_norm computes them in training; the running statistics are the
caller's to update. The C++ CPU kernel stores neither conv output: it recomputes them from the few input
channels (9 * cin multiply-adds an output value) in each of its passes, forward and backward, instead of
writing and re-reading the network's two largest maps (csrc/cpu/stems_bn_add_act.cpp). There is no CUDA or
Triton kernel: on a GPU the reference runs (cuDNN's convs and batch norm).

The references below define the semantics every backend is tested against.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastface._ext import has_op
from fastface.ops._common import none_if_undefined, stats_outputs
from fastface.ops.bn_act import bn_act_backward_reference, bn_act_reference
from fastface.ops.ir_block import MemoFusedOp, extension_reasons

OP = "fastface::stems_bn_add_act"
OP_BWD = "fastface::stems_bn_add_act_backward"


def _convs(x: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    ca = w_a.shape[1]
    return F.conv2d(x[:, :ca], w_a, None, stride, 1), F.conv2d(x[:, ca:], w_b, None, stride, 1)


def stems_bn_add_act_reference(x: torch.Tensor, w_a: torch.Tensor, gamma_a: torch.Tensor, beta_a: torch.Tensor,
                               w_b: torch.Tensor, gamma_b: torch.Tensor, beta_b: torch.Tensor, stride: int,
                               eps: float, relu6: bool) -> tuple[torch.Tensor, ...]:
    """Plain PyTorch: the two convs, act(F.batch_norm(z_a) + F.batch_norm(z_b)) in training, both (mean, invstd)."""
    z_a, z_b = _convs(x, w_a, w_b, stride)
    y_b, mean_b, invstd_b = bn_act_reference(z_b, gamma_b, beta_b, None, eps, False)
    y, mean_a, invstd_a = bn_act_reference(z_a, gamma_a, beta_a, y_b, eps, relu6)
    return y.contiguous(memory_format=torch.channels_last), mean_a, invstd_a, mean_b, invstd_b


def stems_bn_add_act_backward_reference(grad_y: torch.Tensor, x: torch.Tensor, w_a: torch.Tensor,
                                        gamma_a: torch.Tensor, beta_a: torch.Tensor, mean_a: torch.Tensor,
                                        invstd_a: torch.Tensor, w_b: torch.Tensor, gamma_b: torch.Tensor,
                                        beta_b: torch.Tensor, mean_b: torch.Tensor, invstd_b: torch.Tensor,
                                        stride: int, relu6: bool) -> tuple[torch.Tensor, ...]:
    """Gradients w.r.t. (w_a, gamma_a, beta_a, w_b, gamma_b, beta_b): bn_act's closed form on one masked g per
    branch, then each conv's weight gradient."""
    z_a, z_b = _convs(x, w_a, w_b, stride)
    c = (1, -1, 1, 1)
    y_b = (z_b - mean_b.view(c)) * (invstd_b * gamma_b).view(c) + beta_b.view(c)
    gz_a, gg_a, gb_a, g = bn_act_backward_reference(grad_y, z_a, gamma_a, beta_a, mean_a, invstd_a, y_b, relu6)
    if not relu6:
        g = grad_y
    gz_b, gg_b, gb_b, _ = bn_act_backward_reference(g, z_b, gamma_b, beta_b, mean_b, invstd_b, None, False)
    ca = w_a.shape[1]
    gw_a = torch.nn.grad.conv2d_weight(x[:, :ca], w_a.shape, gz_a, stride, 1)
    gw_b = torch.nn.grad.conv2d_weight(x[:, ca:], w_b.shape, gz_b, stride, 1)
    return gw_a, gg_a, gb_a, gw_b, gg_b, gb_b


def stems_bn_add_act_problems(x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, stride, eps, relu6) -> list[str]:
    """What is wrong with these arguments (an empty list: nothing)."""
    why = []
    if x.dim() != 4:
        return [f"x must be N x C x H x W, got shape {tuple(x.shape)}"]
    for name, w in (("w_a", w_a), ("w_b", w_b)):
        if w.dim() != 4 or tuple(w.shape[2:]) != (3, 3):
            why.append(f"{name} must be C x cin x 3 x 3, got {tuple(w.shape)}")
    if why:
        return why
    if w_a.shape[0] != w_b.shape[0]:
        why.append(f"the stems' output channels differ ({w_a.shape[0]} and {w_b.shape[0]})")
    if w_a.shape[1] + w_b.shape[1] != x.shape[1]:
        why.append(f"the stems' input channels ({w_a.shape[1]} + {w_b.shape[1]}) must add up to x's {x.shape[1]}")
    for name, t in (("gamma_a", gamma_a), ("beta_a", beta_a), ("gamma_b", gamma_b), ("beta_b", beta_b)):
        if tuple(t.shape) != (w_a.shape[0],):
            why.append(f"{name} must have {w_a.shape[0]} entries, got shape {tuple(t.shape)}")
    if len({t.dtype for t in (x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b)}) != 1:
        why.append("x, the weights and the BN parameters must share one dtype")
    if int(stride) < 1:
        why.append(f"stride must be >= 1, got {stride}")
    if eps < 0:
        why.append(f"eps must be >= 0, got {eps}")
    if x.numel() == 0:
        why.append(f"empty input {tuple(x.shape)}")
    return why


if has_op("stems_bn_add_act"):

    def _out_hw(x: torch.Tensor, stride: int) -> tuple[int, int]:
        return (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1

    @torch.library.register_fake(OP)
    def _stems_fake(x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, stride, eps, relu6):
        c = w_a.shape[0]
        y = torch.empty((x.shape[0], c, *_out_hw(x, stride)), dtype=x.dtype, device=x.device,
                        memory_format=torch.channels_last)
        return y, *(x.new_empty((c,)) for _ in range(4))

    @torch.library.register_fake(OP_BWD)
    def _stems_backward_fake(grad_y, x, w_a, gamma_a, beta_a, mean_a, invstd_a, w_b, gamma_b, beta_b, mean_b,
                             invstd_b, stride, relu6):
        return (torch.empty_like(w_a), gamma_a.new_empty(gamma_a.shape), beta_a.new_empty(beta_a.shape),
                torch.empty_like(w_b), gamma_b.new_empty(gamma_b.shape), beta_b.new_empty(beta_b.shape))

    def _setup_context(ctx, inputs, output):
        x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, stride, _eps, relu6 = inputs
        _y, mean_a, invstd_a, mean_b, invstd_b = output
        ctx.stride, ctx.relu6 = stride, relu6
        ctx.save_for_backward(x, w_a, gamma_a, beta_a, mean_a, invstd_a, w_b, gamma_b, beta_b, mean_b, invstd_b)
        stats_outputs(ctx, mean_a, invstd_a, mean_b, invstd_b)

    @none_if_undefined
    def _op_backward(ctx, grad_y, *_grad_stats):
        if ctx.needs_input_grad[0]:
            raise RuntimeError("fastface::stems_bn_add_act: x is the network input and gets no gradient")
        grads = torch.ops.fastface.stems_bn_add_act_backward(grad_y, *ctx.saved_tensors, ctx.stride, ctx.relu6)
        return None, *grads, None, None, None

    torch.library.register_autograd(OP, _op_backward, setup_context=_setup_context)


def _cpp_reasons(x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, stride, eps, relu6) -> list[str]:
    return stems_bn_add_act_problems(x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, stride, eps, relu6) + \
        extension_reasons("stems_bn_add_act", (OP, OP_BWD), "CPU", "cpu", (torch.float32, torch.float64), x)


_FORWARD: dict[str, Callable[..., Any]] = {
    "cpp": lambda *a: torch.ops.fastface.stems_bn_add_act.default(*a), "reference": stems_bn_add_act_reference}
_BACKWARD: dict[str, Callable[..., Any]] = {
    "cpp": lambda *a: torch.ops.fastface.stems_bn_add_act_backward.default(*a),
    "reference": stems_bn_add_act_backward_reference}


class StemsBNAddActFunction(torch.autograd.Function):
    """Autograd for stems_bn_add_act on one backend: saves the input, the weights, the BN parameters and
    statistics (neither conv output is stored); x gets no gradient."""

    @staticmethod
    def forward(ctx, x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, stride, eps, relu6, backend):
        out = _FORWARD[backend](x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, stride, eps, relu6)
        _y, mean_a, invstd_a, mean_b, invstd_b = out
        ctx.save_for_backward(x, w_a, gamma_a, beta_a, mean_a, invstd_a, w_b, gamma_b, beta_b, mean_b, invstd_b)
        ctx.stride, ctx.relu6, ctx.backend = stride, relu6, backend
        stats_outputs(ctx, mean_a, invstd_a, mean_b, invstd_b)
        return out

    @staticmethod
    @none_if_undefined
    def backward(ctx, grad_y, *_grad_stats):
        grads = _BACKWARD[ctx.backend](grad_y, *ctx.saved_tensors, ctx.stride, ctx.relu6)
        return None, *grads, None, None, None, None


def _autograd_impl(backend: str) -> Callable[..., Any]:
    def run(x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, stride, eps, relu6):
        if x.requires_grad:
            raise ValueError("stems_bn_add_act: x is the network input and gets no gradient; "
                             "run the stems as convs when it needs one")
        return StemsBNAddActFunction.apply(x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, stride, eps, relu6,
                                           backend)

    run.__name__ = f"stems_bn_add_act_{backend}"
    return run


stems_bn_add_act = MemoFusedOp("stems_bn_add_act")
stems_bn_add_act.__doc__ = ("The split model's two stems (3x3 conv + training BN each) summed and activated, with "
                            "autograd for the weights and BN parameters: stems_bn_add_act(x, w_a, gamma_a, beta_a, "
                            "w_b, gamma_b, beta_b, stride, eps, relu6) -> (y, mean_a, invstd_a, mean_b, invstd_b).")
stems_bn_add_act.register("cpp", _cpp_reasons)(_autograd_impl("cpp"))
stems_bn_add_act.register("reference", stems_bn_add_act_problems)(_autograd_impl("reference"))
