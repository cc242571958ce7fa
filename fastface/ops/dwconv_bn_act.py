"""Training path of the depthwise stage: depthwise k x k conv -> BatchNorm (batch statistics) -> ReLU6.

    dwconv_bn_act(x, weight, gamma, beta, stride, eps, relu6) -> (y, mean, invstd)
    dwconv_bn_act_backward(grad_y, x, weight, gamma, beta, mean, invstd, stride, relu6)
        -> (grad_x, grad_weight, grad_gamma, grad_beta)

x: N x C x H x W; weight: C x k x k (odd k, padding k // 2); gamma, beta: C. `mean` and `invstd`
are the batch mean and 1 / sqrt(biased variance + eps) of the conv output z, per channel;
y = relu6(gamma * (z - mean) * invstd + beta). The running statistics are the caller's to update
(unbiased variance, as nn.BatchNorm2d does). Split branches concatenated along C run as one call:
every channel is independent.

The references below define the semantics every backend is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
