"""Margin losses of face recognition: CombinedMarginLoss (ArcFace / CosFace / combined) and
Partial FC (class centres sharded across ranks, sampled negatives, distributed softmax).

Conventions follow insightface's arcface_torch: logits are cosines between L2-normalised
embeddings and class centres, computed in float32 even under autocast; the target logit
becomes cos(m1*theta + m2) - m3, all logits are scaled by s.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class CombinedMarginLoss(nn.Module):
    """Turns cosine logits into margin logits: target cos(m1*theta + m2) - m3, all scaled by s.

    ArcFace: m1=1, m2=0.5, m3=0; CosFace: m1=1, m2=0, m3=0.4. For ArcFace, where theta + m2
    would pass pi the target falls back to cos(theta) - m2*sin(m2) (insightface's threshold
    handling) so the logit keeps decreasing in theta; `easy_margin` applies the margin only
    where cos(theta) > 0. Labels of -1 mark rows whose class lives on another rank.
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 easy_margin: bool = False):
        super().__init__()
        if s <= 0 or m1 <= 0 or m2 < 0 or m3 < 0:
            raise ValueError(f"CombinedMarginLoss: need s > 0, m1 > 0, m2 >= 0, m3 >= 0; got s={s}, m1={m1}, "
                             f"m2={m2}, m3={m3}")
        self.s, self.m1, self.m2, self.m3, self.easy_margin = s, m1, m2, m3, easy_margin
        self.cos_m, self.sin_m = math.cos(m2), math.sin(m2)
        self.th = math.cos(math.pi - m2)
        self.mm = math.sin(math.pi - m2) * m2

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        """Margin applied to target cosines (differentiable everywhere it is used)."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos - self.m3
        if self.m1 == 1.0:
            sin = torch.sqrt((1.0 - cos * cos).clamp_min(1e-12))
            phi = cos * self.cos_m - sin * self.sin_m
            if self.easy_margin:
                phi = torch.where(cos > 0, phi, cos)
            else:
                phi = torch.where(cos > self.th, phi, cos - self.mm)
            return phi - self.m3
        theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
        ang = self.m1 * theta + self.m2
        return torch.where(ang < math.pi, torch.cos(ang), cos - self.mm) - self.m3

    def forward(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled margin logits from cosine logits (N x C) and labels (N; -1: not on this rank)."""
        # gather/scatter with a validity mask: no data-dependent shapes, so no host sync.
        valid = (labels != -1).unsqueeze(1)
        idx = labels.clamp_min(0).unsqueeze(1)
        t = cos.gather(1, idx)
        out = cos.scatter(1, idx, torch.where(valid, self.target_logit(t), t))
        return out * self.s

    def extra_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, easy_margin={self.easy_margin}"


def arcface(s: float = 64.0, m: float = 0.5) -> CombinedMarginLoss:
    """ArcFace margin (additive angular)."""
    return CombinedMarginLoss(s, 1.0, m, 0.0)


def cosface(s: float = 64.0, m: float = 0.4) -> CombinedMarginLoss:
    """CosFace margin (additive cosine)."""
    return CombinedMarginLoss(s, 1.0, 0.0, m)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """all_gather with a gradient: each rank's loss covers the global batch on its class
    shard, so the embedding gradient is the sum over ranks; it is scaled by the world size
    because DDP then averages the backbone gradients (as insightface does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.world, ctx.n = rank, world, x.shape[0]
        if world == 1:
            return x.clone()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if ctx.world == 1:
            return grad
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n] * ctx.world


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank (same shapes on all ranks), differentiably."""
    return _AllGather.apply(x)


def _all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _DistCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy over classes sharded across ranks (max and sum all-reduced).

    Rows whose label is -1 on this rank contribute their softmax mass but no target."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _, world = _world()
        m = logits.max(1, keepdim=True)[0]
        if world > 1:
            dist.all_reduce(m, dist.ReduceOp.MAX)
        p = (logits - m).exp()
        denom = p.sum(1, keepdim=True)
        if world > 1:
            dist.all_reduce(denom)
        p = p / denom
        valid = (labels != -1).unsqueeze(1).to(p.dtype)
        idx = labels.clamp_min(0).unsqueeze(1)
        # Log-space target (not log of a clamped probability): exact even when s = 64 makes
        # the target probability underflow early in training.
        target = (logits.gather(1, idx) - m) * valid
        if world > 1:
            dist.all_reduce(target)
        ctx.save_for_backward(p, idx, valid)
        return (denom.log() - target).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, idx, valid = ctx.saved_tensors
        g = p.scatter_add(1, idx, -valid)
        # grad stays a tensor: no host sync in the backward pass.
        return g * (grad / p.shape[0]), None


def dist_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the global batch with classes split across ranks."""
    return _DistCrossEntropy.apply(logits, labels)


class PartialFC(nn.Module):
    """Margin-softmax classifier whose class centres are sharded across ranks (Partial FC).

    Each rank holds num_classes / world centres; embeddings and labels are all-gathered; each
    rank scores the global batch against all positive centres it holds plus sampled negatives
    (`sample_rate` of its shard), and the softmax is normalised across ranks. With one rank and
    sample_rate = 1 it is exactly the plain margin loss over a full FC layer. The centres and
    the cosine logits are float32 even under autocast.
    """

    def __init__(self, margin: CombinedMarginLoss, embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        r, w = _world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if not (0 < sample_rate <= 1):
            raise ValueError(f"PartialFC: sample_rate must be in (0, 1], got {sample_rate}")
        if num_classes < self.world_size:
            raise ValueError(f"PartialFC: {num_classes} classes cannot be sharded over {self.world_size} ranks")
        self.margin = margin
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        base, extra = divmod(num_classes, self.world_size)
        self.num_local = base + (1 if self.rank < extra else 0)
        self.class_start = base * self.rank + min(self.rank, extra)
        self.num_sample = max(1, int(sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))

    def _sample(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centres to score (all local positives + random negatives) and labels remapped to them."""
        if self.num_sample >= self.num_local:
            return torch.arange(self.num_local, device=labels.device), labels
        with torch.no_grad():
            positive = torch.unique(labels[labels != -1])
            score = torch.rand(self.num_local, device=labels.device)
            score[positive] = 2.0  # positives always survive the top-k
            k = max(self.num_sample, positive.numel())
            index = torch.topk(score, k, sorted=False)[1].sort()[0]
            remap = torch.full((self.num_local,), -1, dtype=torch.long, device=labels.device)
            remap[index] = torch.arange(index.numel(), device=labels.device)
            new_labels = torch.where(labels != -1, remap[labels.clamp_min(0)], labels)
        return index, new_labels

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of this rank's batch (embeddings N x D, labels N) as part of the global batch."""
        if embeddings.shape[0] != labels.shape[0]:
            raise ValueError(f"PartialFC: {embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
        labels = labels.long().view(-1)
        # Checked on the device: a bad label fails the step without a host sync per batch.
        torch._assert_async(((labels >= 0) & (labels < self.num_classes)).all(),
                            f"PartialFC: labels must lie in [0, {self.num_classes})")
        emb = all_gather_with_grad(embeddings)
        labels = _all_gather_nograd(labels)
        local = labels - self.class_start
        local = torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))
        index, local = self._sample(local)
        device_type = emb.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            w = self.weight if index.numel() == self.num_local else self.weight[index]
            dt = torch.promote_types(emb.dtype, torch.float32)  # fp16/bf16 -> fp32; fp64 stays
            cos = F.linear(F.normalize(emb.to(dt)), F.normalize(w.to(dt))).clamp(-1, 1)
            logits = self.margin(cos, local)
            return dist_cross_entropy(logits, local)

    def extra_repr(self) -> str:
        return (f"classes={self.num_classes} (local {self.num_local} from {self.class_start}), "
                f"sample_rate={self.sample_rate}, rank={self.rank}/{self.world_size}")


def margin_from_name(name: str, s: float = 64.0, m1: float = 1.0, m2: float | None = None,
                     m3: float | None = None) -> CombinedMarginLoss:
    """"arcface" (m2 = 0.5), "cosface" (m3 = 0.4) or "combined" (all three given)."""
    if name == "arcface":
        return CombinedMarginLoss(s, 1.0, 0.5 if m2 is None else m2, 0.0)
    if name == "cosface":
        return CombinedMarginLoss(s, 1.0, 0.0, 0.4 if m3 is None else m3)
    if name == "combined":
        return CombinedMarginLoss(s, m1, 0.0 if m2 is None else m2, 0.0 if m3 is None else m3)
    raise ValueError(f"unknown margin loss {name!r}: choose arcface, cosface or combined")
