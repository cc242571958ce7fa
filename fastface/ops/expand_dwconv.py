"""An inverted-residual block's expand stage for training on the CPU, its BN folded into the 1x1 conv's algebra.

    ExpandDwConvFunction.apply(x, w_expand, groups, gamma, beta, w_dw, stride, eps) -> (z, mean, invstd)
        e = conv1x1(x, w_expand, groups)       (no bias; fastface.ops.conv1x1's kernel where it pays, else ATen's)
        z = dwconv3x3(relu6(batch_norm(e)), w_dw, stride)   (padding 1; the activation never stored)
        mean, invstd: the batch statistics of e (not differentiable; running statistics are the caller's)

e is linear in x (e = x W^T per pixel, per group), so the BN's batch moments of e follow from x's:
mean_e = W mean_x and var_e = diag(W cov_x W^T), from x's Cin x Cin covariance in float64 instead of
a pass over e (Cout = 6 Cin channels in MobileNetV2). The BN backward is, per channel,
ge = scale g - b - k e with g the gradient behind the ReLU6 mask (dwconv_backward with sums returns
it and the sums that give b and k), and again e = x W^T, so

    grad_x = conv1x1_backward_input(g, diag(scale) W) - x (W^T diag(k) W) - b^T W
    grad_W = diag(scale) (g^T x) - b (sum_p x)^T - diag(k) W (x^T x)

fastface.ops.conv1x1's backward runs on g (both gradients in one pass over it, grad_x's correction folded
in; with groups > 1 ATen's conv backward, then grouped_linear_sub), and the corrections are Cin x Cin
products: ge, the size of e, is never written or read (BNActDwConvFunction writes and reads it once more in each direction, and reads
e once more for the statistics). Exact algebra; rounding differs from the plain modules' at the
float32 level (the statistics come from float64 moments of x, not from the rounded e).

`expand_dwconv_reference` is the plain PyTorch definition the function is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastface._ext import has_op
from fastface.ops._common import is_channels_last, like_input, none_if_undefined
from fastface.ops.bn_act import bn_act_reference
from fastface.ops.conv1x1 import conv1x1_forward, conv1x1_forward_pays, conv1x1_problems
from fastface.ops.dwconv_train import dwconv_kernel_problems, run_stage


def expand_dwconv_reference(x: torch.Tensor, w_expand: torch.Tensor, groups: int, gamma: torch.Tensor,
                            beta: torch.Tensor, w_dw: torch.Tensor, stride: int,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch: conv2d(relu6(batch_norm(conv2d(x, w_expand, groups))), w_dw, groups=C), batch mean, invstd."""
    e = F.conv2d(x, w_expand, None, 1, 0, 1, groups)
    a, mean, invstd = bn_act_reference(e, gamma, beta, None, eps, True)
    return F.conv2d(a, w_dw, None, stride, 1, 1, e.shape[1]), mean, invstd


def expand_dwconv_problems(x: torch.Tensor, w_expand: torch.Tensor, groups: int, w_dw: torch.Tensor,
                           stride: int) -> list[str]:
    """Why ExpandDwConvFunction cannot take these arguments (an empty list: it can)."""
    why = []
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        why.append(f"x must be a channels_last N x C x H x W tensor, got shape {tuple(x.shape)}")
        return why
    cin, cout = x.shape[1], w_expand.shape[0]
    if (w_expand.dim() != 4 or w_expand.shape[2:] != (1, 1) or groups < 1 or cin % groups or cout % groups
            or w_expand.shape[1] * groups != cin):
        why.append(f"w_expand must be a 1x1 conv weight for {cin} input channels in {groups} groups, "
                   f"got shape {tuple(w_expand.shape)}")
    if w_expand.dtype != x.dtype:
        why.append(f"w_expand is {w_expand.dtype}, x is {x.dtype}")
    # The depthwise kernels' conditions on e (cout channels, x's map): a one-pixel stand-in carries its dtype.
    why += dwconv_kernel_problems(x.new_empty((1, cout, 1, 1)), w_dw, stride, 1)
    return why


def channel_moments_reference(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: per-channel mean (float64, C) and biased within-group covariance (float64, groups x ci x ci)
    of x over every dim but 1 (channel_moments)."""
    x2 = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    mean = x2.mean(1)
    xc = (x2 - mean[:, None]).view(groups, x.shape[1] // groups, -1)
    return mean, torch.bmm(xc, xc.transpose(1, 2)) / x2.shape[1]


def grouped_linear_sub_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: y - x A - c over the channel dim, A block-diagonal from a (groups x ci x ci) (grouped_linear_sub)."""
    groups = a.shape[0]
    if x.dim() == 4:  # a 1x1 grouped conv whose weight row j of group k is column j of a[k]
        return y - F.conv2d(x, a.transpose(1, 2).reshape(-1, a.shape[1], 1, 1), c, groups=groups)
    xa = torch.bmm(x.view(x.shape[0], groups, -1).transpose(0, 1), a)  # groups x N x ci
    return y - xa.transpose(0, 1).reshape(x.shape) - c


def expand_dwconv_kernel_problems(x: torch.Tensor) -> list[str]:
    """Why the C++ helpers cannot take x (an empty list: they can); the function then uses the references."""
    why = []
    if not (has_op("channel_moments") and has_op("grouped_linear_sub")):
        why.append("the fastface C++ extension (channel_moments, grouped_linear_sub) is not loaded")
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        why.append(f"x is {x.dtype} on {x.device}: the helpers take float32/float64 CPU tensors")
    return why


if has_op("channel_moments") and has_op("grouped_linear_sub"):

    @torch.library.register_fake("fastface::channel_moments")
    def _channel_moments_fake(x, groups):
        ci = x.shape[1] // groups
        return x.new_empty((x.shape[1],), dtype=torch.float64), x.new_empty((groups, ci, ci), dtype=torch.float64)

    @torch.library.register_fake("fastface::grouped_linear_sub")
    def _grouped_linear_sub_fake(y, x, a, c):
        return like_input(x.new_empty(x.shape), y)


def _moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not expand_dwconv_kernel_problems(x):
        return torch.ops.fastface.channel_moments(x, groups)
    return channel_moments_reference(x, groups)


def _linear_sub(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    if not expand_dwconv_kernel_problems(x):
        return torch.ops.fastface.grouped_linear_sub(y, x, a, c)
    return grouped_linear_sub_reference(y, x, a, c)


class ExpandDwConvFunction(torch.autograd.Function):
    """(x, w_expand, groups, gamma, beta, w_dw, stride, eps) -> (z, mean, invstd); see the module docstring. Needs the
    C++ depthwise kernels and a channels_last float input (expand_dwconv_problems)."""

    @staticmethod
    def run(x, w_expand, groups, gamma, beta, w_dw, stride, eps, z_eps=None):
        """(outputs, saved tensors, attributes) of the forward, for forward and dwconv_train.DwBNActFunction; with
        z_eps, z's batch mean and invstd follow z in the outputs (dwconv_forward_stats)."""
        if groups == 1 and is_channels_last(x) and conv1x1_forward_pays(x, w_expand.shape[0]):
            e = conv1x1_forward(x, w_expand)
        else:
            e = F.conv2d(x, w_expand, None, 1, 0, 1, groups)
        mx, cov = _moments(x, groups)
        cout, ci = w_expand.shape[0], x.shape[1] // groups
        w3 = w_expand.detach().double().view(groups, cout // groups, ci)
        mean_d = torch.bmm(w3, mx.view(groups, ci, 1)).reshape(cout)
        wc = torch.bmm(w3, cov)  # W cov, per group: var_e = diag(W cov W^T); the backward's W x^T x needs it too
        var = (wc * w3).sum(2).reshape(cout).clamp_min_(0)
        mean = mean_d.to(x.dtype)
        invstd = torch.rsqrt(var.add_(eps)).to(x.dtype)
        scale = invstd * gamma
        if z_eps is None:
            zs = (torch.ops.fastface.dwconv_forward(e, w_dw, stride, 1, mean, scale, beta),)
        else:
            zs = torch.ops.fastface.dwconv_forward_stats(e, w_dw, stride, 1, mean, scale, beta, z_eps)
        saved = (x, w_expand, e, gamma, beta, w_dw, mean, invstd, scale, mx, mean_d, wc)
        return (*zs, mean, invstd), saved, (groups, stride)

    @staticmethod
    def grads(saved, attrs, needs, grad_z):
        """The inputs' gradients."""
        x, w_expand, e, gamma, beta, w_dw, mean, invstd, scale, mx, mean_d, wc = saved
        groups, stride = attrs
        g, gw_dw, sums = torch.ops.fastface.dwconv_backward(grad_z, e, w_dw, stride, 1, mean, scale, beta, True)
        p = e.numel() // e.shape[1]
        cout, cin = w_expand.shape[0], x.shape[1]
        co, ci = cout // groups, cin // groups
        # The BN backward, ge = scale g - b - k e, in closed form from the sums (float64).
        s1, s2 = sums[0], sums[1]
        inv_d = invstd.double()
        sc_d = gamma.detach().double() * inv_d
        k = sc_d * inv_d.square() * s2 / p
        b = sc_d * s1 / p - k * mean.double()
        w3 = w_expand.detach().double().view(groups, co, ci)
        k3, b3 = k.view(groups, co, 1), b.view(groups, co, 1)
        w_scaled = w_expand.detach() * scale.detach()[:, None, None, None]
        if needs[0]:
            a = torch.bmm((w3 * k3).transpose(1, 2), w3).to(x.dtype)  # W^T diag(k) W
            c = torch.bmm(b3.transpose(1, 2), w3).reshape(cin).to(x.dtype)  # b^T W
        if groups == 1 and not conv1x1_problems(x, w_scaled):
            # One pass over g for both gradients, the correction folded into grad_x's (conv1x1_backward): that also
            # saves grouped_linear_sub's pass, so it is taken wherever it serves, not only where conv1x1_backward_pays.
            gx, gw = torch.ops.fastface.conv1x1_backward(g, x, w_scaled, a.view(cin, cin) if needs[0] else None,
                                                         c if needs[0] else None, [needs[0], needs[1]])
            gx, gw = (gx if needs[0] else None), (gw if needs[1] else None)
        else:
            gx, gw, _ = torch.ops.aten.convolution_backward(g, x, w_scaled, None, [1, 1], [0, 0], [1, 1], False,
                                                            [0, 0], groups, [needs[0], needs[1], False])
            if gx is not None:
                gx = _linear_sub(gx, x, a, c)
        if gw is not None:
            # b (sum_p x)^T + diag(k) W x^T x, with x^T x = p (cov + mean mean^T) and W mean = mean_e.
            corr = ((b3 + k3 * mean_d.view(groups, co, 1)) * mx.view(groups, 1, ci) + k3 * wc).mul_(p)
            gw = torch.addcmul(corr.neg_(), sc_d.view(groups, co, 1), gw.double().view(groups, co, ci))
            gw = gw.reshape(w_expand.shape).to(w_expand.dtype)
        return gx, gw, None, (s2 * inv_d).to(gamma.dtype), s1.to(beta.dtype), gw_dw, None, None

    @staticmethod
    def forward(ctx, x, w_expand, groups, gamma, beta, w_dw, stride, eps):
        return run_stage(ctx, ExpandDwConvFunction, x, w_expand, groups, gamma, beta, w_dw, stride, eps)

    @staticmethod
    @none_if_undefined
    def backward(ctx, grad_z, _grad_mean, _grad_invstd):
        return ExpandDwConvFunction.grads(ctx.saved_tensors, ctx.attrs, ctx.needs_input_grad, grad_z)


def expand_dwconv_pays(x: torch.Tensor) -> bool:
    """Whether ExpandDwConvFunction beat the 1x1 conv + BNActDwConvFunction on this (channels_last, float32) input
    here: maps of at least 28 x 28 (the face model's 16 -> 96 layer at 56 x 56: 1.16-1.17x forward + backward at
    2 threads, its 24 -> 144 layers at 28 x 28: 1.04-1.07x; 0.91-1.02x at 14 x 14 and 0.6-0.8x at 7 x 7 and 4 x 4,
    where the Cin^2 work of the moments and the correction outgrows the passes saved over e; two runs of
    bench/test_bench_dwconv_train.py::test_expand_dwconv, bench/results/dwconv_train_cpu.json)."""
    return min(x.shape[2], x.shape[3]) >= 28
