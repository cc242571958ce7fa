"""Depthwise 3 x 3 conv for training on the CPU, optionally behind a BN + ReLU6 that is never stored.

    dwconv_forward(x, weight, stride, padding, mean=None, scale=None, beta=None) -> z
    dwconv_forward_stats(x, weight, stride, padding, mean=None, scale=None, beta=None, eps=1e-5)
        -> (z, z_mean, z_invstd)               (and the batch statistics of z, from the registers)
    dwconv_backward(grad_out, x, weight, stride, padding, mean=None, scale=None, beta=None, sums=False)
        -> (grad_a, grad_weight, bn_sums)
    bn_stats(x, eps) -> (mean, invstd)        (bn_act's statistics pass alone; its reference: bn_act.bn_stats_reference)
    bn_act_backward_sums(grad_y, x, gamma, beta, mean, invstd, sums, relu6) -> (grad_x, grad_gamma, grad_beta)

x: N x C x H x W; weight: C x 1 x 3 x 3; padding 1, stride 1 or 2, no bias, no dilation. With
mean, scale and beta (C each) the conv's input is a = relu6((x - mean) * scale + beta) (bn_act's
formula), applied on the fly: the forward activates each input row as it buffers it, the backward
recomputes a for grad_weight, and its first output is the gradient w.r.t. a. Without them a = x.
With sums=True the first output is g = grad_a behind the ReLU6 mask (the gradient w.r.t. the BN's
output, before the activation) and the same pass also reduces the BN backward's per-channel sums
(float64 2 x C: sum(g), sum(g * (x - mean))): bn_act_backward_sums finishes that BN backward in one
pass instead of bn_act_backward's two, and fastface.ops.expand_dwconv folds it into the 1x1 conv's
backward with no pass of its own.
dwconv_forward_stats also reduces the batch statistics of z (mean, invstd for a training BN on it, as
bn_stats computes them: float sums about a per-task shift in registers, float64 across rows, tasks merged
in order) as it writes z, so that BN's statistics need no pass over z of their own.
The backward pairs every grad_out vector it loads for grad_a with the input pixel it meets for
grad_weight, so grad_out and x are read once (oneDNN's backward reads them in two passes).
channels_last is the kernels' fast layout; grad_weight's per-task partials are merged in a fixed
order (results do not depend on the thread count).

Two autograd functions use them in the fused training path (fastface.models.mobilenetv2):

- `DwConvFunction`: a depthwise conv; the C++ forward and the one-pass backward where
  `dwconv_forward_pays` / `dwconv_backward_pays` (measured faster), else ATen's (oneDNN).
- `BNActDwConvFunction`: an inverted-residual block's expand BN (batch statistics) + ReLU6 +
  depthwise conv, (e, gamma, beta, weight) -> (z, mean, invstd). The activation between them (the
  block's largest tensor) is never written: bn_stats, then dwconv_forward with the BN as its
  prologue; backward = dwconv_backward with the prologue and sums, then bn_act_backward_sums. e is
  read twice forward (statistics, conv) and twice backward (conv gradients + sums, BN gradient).

`DwBNActFunction` puts a depthwise stage (any of the two above, or ExpandDwConvFunction) under the
training BN + ReLU6 that follows it in a block: the stage's conv with dwconv_forward_stats, then
bn_act_apply (one pass over z instead of bn_act's two); backward = bn_act_backward, then the stage's.

The references below define the semantics the kernels are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastface._ext import has_op
from fastface.ops._common import like_input, none_if_undefined, stats_outputs
from fastface.ops.bn_act import bn_act_reference, bn_stats_reference

OP_FWD = "fastface::dwconv_forward"
OP_BWD = "fastface::dwconv_backward"
OP_STATS = "fastface::bn_stats"
OP_BN_SUMS = "fastface::bn_act_backward_sums"
OP_FWD_STATS = "fastface::dwconv_forward_stats"


def _c(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None, None]


def _activated(x: torch.Tensor, mean: torch.Tensor | None, scale: torch.Tensor | None,
               beta: torch.Tensor | None) -> torch.Tensor:
    return x if scale is None else F.relu6((x - _c(mean)) * _c(scale) + _c(beta))


def dwconv_forward_stats_reference(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                                   mean: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                                   beta: torch.Tensor | None = None,
                                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch: dwconv_forward_reference's z and its batch mean, 1 / sqrt(biased variance + eps) per channel."""
    z = dwconv_forward_reference(x, weight, stride, padding, mean, scale, beta)
    return (z, *bn_stats_reference(z, eps))


def dwconv_forward_reference(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                             mean: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                             beta: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: conv2d(a, weight, groups=C) with a = relu6((x - mean) * scale + beta), or x."""
    return F.conv2d(_activated(x, mean, scale, beta), weight, None, stride, padding, 1, x.shape[1])


def dwconv_backward_reference(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int,
                              padding: int, mean: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                              beta: torch.Tensor | None = None,
                              sums: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch: ATen's convolution backward of conv2d(a, weight, groups=C) w.r.t. a and weight; with sums,
    g = grad_a where 0 < (x - mean) * scale + beta < 6 (else 0) in place of grad_a, and sum(g), sum(g * (x - mean))
    per channel in float64."""
    a = _activated(x, mean, scale, beta)
    ga, gw, _ = torch.ops.aten.convolution_backward(grad_out, a, weight, None, [stride] * 2, [padding] * 2, [1, 1],
                                                    False, [0, 0], x.shape[1], [True, True, False])
    bn = torch.empty((0, x.shape[1]), dtype=torch.float64)
    if sums:
        pre = (x - _c(mean)) * _c(scale) + _c(beta)
        ga = torch.where((pre > 0) & (pre < 6), ga, torch.zeros_like(ga))
        g = ga.double()
        bn = torch.stack([g.sum((0, 2, 3)), (g * (x.double() - _c(mean.double()))).sum((0, 2, 3))])
    return ga, gw, bn


def bn_act_dwconv_reference(e: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, weight: torch.Tensor,
                            stride: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch: conv2d(relu6(batch_norm(e)), weight, groups=C), with the batch mean and invstd."""
    a, mean, invstd = bn_act_reference(e, gamma, beta, None, eps, True)
    return F.conv2d(a, weight, None, stride, 1, 1, e.shape[1]), mean, invstd


_OPS = ("dwconv_forward", "dwconv_forward_stats", "dwconv_backward", "bn_stats", "bn_act_backward_sums",
        "bn_act_apply")


def dwconv_kernel_problems(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> list[str]:
    """Why the C++ kernels cannot take these arguments (an empty list: they can)."""
    why = []
    if not all(has_op(op) for op in _OPS):
        why.append("the fastface C++ extension is not loaded")
    if x.device.type != "cpu":
        why.append(f"x is on {x.device}, the kernels are CPU-only")
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        why.append(f"dtypes {x.dtype}/{weight.dtype}: the kernels serve float32 and float64, alike")
    if x.dim() != 4 or tuple(weight.shape) != (x.shape[1], 1, 3, 3):
        why.append(f"needs a C x 1 x 3 x 3 depthwise weight for x of shape {tuple(x.shape)}, "
                   f"got {tuple(weight.shape)}")
    if stride not in (1, 2) or padding != 1:
        why.append(f"serves stride 1 or 2 with padding 1, got stride {stride}, padding {padding}")
    return why


if all(has_op(op) for op in _OPS):

    @torch.library.register_fake(OP_FWD)
    def _dwconv_forward_fake(x, weight, stride, padding, mean=None, scale=None, beta=None):
        oh, ow = (x.shape[2] + 2 * padding - 3) // stride + 1, (x.shape[3] + 2 * padding - 3) // stride + 1
        return like_input(x.new_empty((x.shape[0], x.shape[1], oh, ow)), x)

    @torch.library.register_fake(OP_BWD)
    def _dwconv_backward_fake(grad_out, x, weight, stride, padding, mean=None, scale=None, beta=None, sums=False):
        bn = x.new_empty((2 if sums else 0, x.shape[1]), dtype=torch.float64)
        return like_input(x.new_empty(x.shape), x), weight.new_empty(weight.shape), bn

    @torch.library.register_fake(OP_BN_SUMS)
    def _bn_act_backward_sums_fake(grad_y, x, gamma, beta, mean, invstd, sums, relu6):
        return like_input(x.new_empty(x.shape), x), gamma.new_empty(gamma.shape), beta.new_empty(beta.shape)

    @torch.library.register_fake(OP_FWD_STATS)
    def _dwconv_forward_stats_fake(x, weight, stride, padding, mean=None, scale=None, beta=None, eps=1e-5):
        z = _dwconv_forward_fake(x, weight, stride, padding)
        return z, x.new_empty((x.shape[1],)), x.new_empty((x.shape[1],))

    @torch.library.register_fake(OP_STATS)
    def _bn_stats_fake(x, eps):
        return x.new_empty((x.shape[1],)), x.new_empty((x.shape[1],))


def dwconv_backward_pays(x: torch.Tensor, stride: int) -> bool:
    """Whether the one-pass backward beat oneDNN's on this (channels_last, float32) input here: maps of at least
    4 x 4, either stride (the face model's layers at 2 threads, bench/test_bench_dwconv_train.py: 1.8-2.9x on
    those, 1.6-1.7x on its 4 x 4 x 960 maps over three runs since the backward sweeps one channel vector at a time;
    smaller maps not measured, left to oneDNN)."""
    return min(x.shape[2], x.shape[3]) >= 4


def dwconv_forward_pays(x: torch.Tensor, stride: int) -> bool:
    """Whether the C++ forward (no prologue) beat oneDNN's here: stride 1 on maps of at least 28 x 28 (1.1-1.6x on
    the face model's 56 x 56 x 32 and 28 x 28 x 144 layers; 0.6-0.7x on its stride-2 ones, ~1x on smaller maps;
    ad-hoc runs of the forward alone, 2 threads)."""
    return stride == 1 and min(x.shape[2], x.shape[3]) >= 28


def bn_act_dwconv_pays(e: torch.Tensor, stride: int) -> bool:
    """Whether BNActDwConvFunction beat bn_act + the depthwise conv on this (channels_last, float32) input here:
    inputs of at least 4 x 4, either stride (1.3-2.1x on the face model's 7 x 7 to 56 x 56 inputs, 1.09-1.12x on
    its 4 x 4 x 960 ones, three runs of bench/test_bench_dwconv_train.py, bench/results/dwconv_train_cpu.json,
    bn_act_dwconv; 0.8-0.96x there before the backward swept one channel vector at a time; smaller maps not
    measured)."""
    return min(e.shape[2], e.shape[3]) >= 4


def run_stage(ctx, stage: type, *inputs):
    """A depthwise stage's autograd forward from its `run`: saves what its `grads` reads, marks the statistics
    after z non-differentiable; z alone when the stage has no statistics."""
    outs, saved, ctx.attrs = stage.run(*inputs)
    ctx.save_for_backward(*saved)
    stats_outputs(ctx, *outs[1:])
    return outs if len(outs) > 1 else outs[0]


class DwConvFunction(torch.autograd.Function):
    """Depthwise conv2d (no bias, no dilation): the C++ kernels where they serve the arguments and pay
    (dwconv_forward_pays, dwconv_backward_pays), else ATen's (oneDNN) forward and backward."""

    @staticmethod
    def run(x, weight, stride, padding, z_eps=None):
        """(outputs, saved tensors, attributes) of the forward, for forward and DwBNActFunction; with z_eps, the
        outputs are z and its batch mean and invstd (dwconv_forward_stats: the C++ forward whether or not it pays)."""
        if z_eps is not None:
            outs = torch.ops.fastface.dwconv_forward_stats(x, weight, stride, padding, None, None, None, z_eps)
        elif not dwconv_kernel_problems(x, weight, stride, padding) and dwconv_forward_pays(x, stride):
            outs = (torch.ops.fastface.dwconv_forward(x, weight, stride, padding),)
        else:
            outs = (F.conv2d(x, weight, None, stride, padding, 1, x.shape[1]),)
        return outs, (x, weight), (stride, padding)

    @staticmethod
    def grads(saved, attrs, needs, grad_out):
        """The inputs' gradients (the C++ backward where it serves and pays, else ATen's)."""
        x, weight = saved
        s, p = attrs
        if not dwconv_kernel_problems(x, weight, s, p) and dwconv_backward_pays(x, s):
            gx, gw, _ = torch.ops.fastface.dwconv_backward(grad_out, x, weight, s, p)
        else:
            mask = [needs[0], needs[1], False]
            gx, gw, _ = torch.ops.aten.convolution_backward(grad_out, x, weight, None, [s, s], [p, p], [1, 1], False,
                                                            [0, 0], x.shape[1], mask)
        return (gx if needs[0] else None), (gw if needs[1] else None), None, None

    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        return run_stage(ctx, DwConvFunction, x, weight, stride, padding)

    @staticmethod
    @none_if_undefined
    def backward(ctx, grad_out):
        return DwConvFunction.grads(ctx.saved_tensors, ctx.attrs, ctx.needs_input_grad, grad_out)


class BNActDwConvFunction(torch.autograd.Function):
    """(e, gamma, beta, weight, stride, eps) -> (z, mean, invstd): z = dwconv3x3(relu6(batch_norm(e))), padding 1,
    the activation never stored. Needs the C++ kernels (see dwconv_kernel_problems); mean and invstd (the batch
    statistics of e) are not differentiable; the running statistics are the caller's to update."""

    @staticmethod
    def run(e, gamma, beta, weight, stride, eps, z_eps=None):
        """(outputs, saved tensors, attributes) of the forward, for forward and DwBNActFunction; with z_eps, z's
        batch mean and invstd follow z in the outputs (dwconv_forward_stats)."""
        mean, invstd = torch.ops.fastface.bn_stats(e, eps)
        scale = invstd * gamma
        if z_eps is None:
            zs = (torch.ops.fastface.dwconv_forward(e, weight, stride, 1, mean, scale, beta),)
        else:
            zs = torch.ops.fastface.dwconv_forward_stats(e, weight, stride, 1, mean, scale, beta, z_eps)
        return (*zs, mean, invstd), (e, gamma, beta, weight, mean, invstd, scale), stride

    @staticmethod
    def grads(saved, attrs, needs, grad_z):
        """The inputs' gradients."""
        e, gamma, beta, weight, mean, invstd, scale = saved
        ga, gw, sums = torch.ops.fastface.dwconv_backward(grad_z, e, weight, attrs, 1, mean, scale, beta, True)
        ge, gg, gb = torch.ops.fastface.bn_act_backward_sums(ga, e, gamma, beta, mean, invstd, sums, True)
        return ge, gg, gb, gw, None, None

    @staticmethod
    def forward(ctx, e, gamma, beta, weight, stride, eps):
        return run_stage(ctx, BNActDwConvFunction, e, gamma, beta, weight, stride, eps)

    @staticmethod
    @none_if_undefined
    def backward(ctx, grad_z, _grad_mean, _grad_invstd):
        return BNActDwConvFunction.grads(ctx.saved_tensors, ctx.attrs, ctx.needs_input_grad, grad_z)


def dw_bn_act_problems(x: torch.Tensor, weight: torch.Tensor, stride: int) -> list[str]:
    """Why DwBNActFunction cannot put a BN + ReLU6 under a depthwise stage whose conv input is x (an empty list: it
    can): its forward needs the C++ kernels (dwconv_kernel_problems) on a channels_last input."""
    why = dwconv_kernel_problems(x, weight, stride, 1)
    if not x.is_contiguous(memory_format=torch.channels_last):
        why.append("the stage's input is not channels_last")
    return why


class DwBNActFunction(torch.autograd.Function):
    """(stage, gamma, beta, eps, *inputs) -> (y, mean, invstd, *the stage's statistics): y = relu6(BN(z)) in
    training (batch statistics), z = stage(*inputs)[0] with stage DwConvFunction, BNActDwConvFunction or
    fastface.ops.expand_dwconv.ExpandDwConvFunction. The stage's conv reduces z's statistics as it writes z
    (dwconv_forward_stats), so the BN is one pass over z (bn_act_apply), not bn_act's two; backward =
    bn_act_backward, then the stage's. mean, invstd (of z) and the stage's statistics are not differentiable;
    running statistics are the caller's. Needs the C++ kernels (dw_bn_act_problems on the stage's conv input)."""

    @staticmethod
    def forward(ctx, stage, gamma, beta, eps, *inputs):
        outs, saved, ctx.attrs = stage.run(*inputs, z_eps=eps)
        z, mean, invstd = outs[:3]
        y = torch.ops.fastface.bn_act_apply(z, gamma, beta, mean, invstd, True)
        ctx.stage, ctx.nsaved = stage, len(saved)
        ctx.save_for_backward(*saved, z, gamma, beta, mean, invstd)
        stats_outputs(ctx, mean, invstd, *outs[3:])
        return (y, mean, invstd, *outs[3:])

    @staticmethod
    @none_if_undefined
    def backward(ctx, grad_y, *_grad_stats):
        tensors = ctx.saved_tensors
        saved, (z, gamma, beta, mean, invstd) = tensors[:ctx.nsaved], tensors[ctx.nsaved:]
        gz, gg, gb, _ = torch.ops.fastface.bn_act_backward(grad_y, z, gamma, beta, mean, invstd, None, True)
        grads = ctx.stage.grads(saved, ctx.attrs, ctx.needs_input_grad[4:], gz)
        return (None, gg, gb, None, *grads)
