"""Embedding heads: GDC (MobileFaceNet), average pooling, and an ImageNet-style classifier."""
from __future__ import annotations

import torch
from torch import nn

from fastface.arch import HeadSpec


class GDCHead(nn.Module):
    """Global depthwise conv (kernel = feature map size) + BN -> linear -> BN1d embedding."""

    def __init__(self, channels: int, size: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.gdc = nn.Conv2d(channels, channels, size, groups=channels, bias=False)
        self.gdc_bn = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gdc_bn(self.gdc(x)).flatten(1)
        return self.bn(self.fc(self.dropout(x)))


class PoolHead(nn.Module):
    """Global average pool -> linear -> BN1d embedding."""

    def __init__(self, channels: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(self.dropout(x.mean((2, 3)))))


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> linear with bias (torchvision's MobileNetV2 classifier)."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x.mean((2, 3))))


def make_head(spec: HeadSpec, channels: int, size: int) -> nn.Module:
    """The head module a HeadSpec describes, on `channels` x size x size features."""
    if spec.kind == "gdc":
        return GDCHead(channels, size, spec.dim, spec.dropout)
    if spec.kind == "pool":
        return PoolHead(channels, spec.dim, spec.dropout)
    return ClassifierHead(channels, spec.dim, spec.dropout)
