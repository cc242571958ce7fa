"""Baseline schedules to compare FastFace against, and the reference forms of its detector.

- StepDecay, CosineDecay, PolyWarmup: closed-form LRScheduler subclasses (per iteration),
  with the same optional linear warmup as FastFaceScheduler (PolyWarmup has insightface's own).
- ema_haar_slopes: the two-stage EMA -> Haar difference -> EMA form of the FastFace slope.
- NaiveHaarDetector: the paper's O(m) moving-window Haar detector (tests and benchmarks only).
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence

import numpy as np
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def _warm(t: int, warmup_steps: int) -> float:
    # Same ramp as FastFaceScheduler: step t (0-based) runs at min(1, (t + 1) / warmup_steps).
    return 1.0 if warmup_steps <= 0 else min((t + 1.0) / warmup_steps, 1.0)


class StepDecay(LRScheduler):
    """lr = base * gamma^(number of milestones <= t), times linear warmup; MultiStepLR without warmup."""

    def __init__(self, optimizer: Optimizer, milestones: Sequence[int], gamma: float = 0.1, warmup_steps: int = 0,
                 last_epoch: int = -1) -> None:
        if list(milestones) != sorted(milestones):
            raise ValueError(f"StepDecay: milestones must be increasing, got {list(milestones)}")
        self.milestones, self.gamma, self.warmup_steps = list(milestones), float(gamma), int(warmup_steps)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """LRs at step last_epoch (closed form)."""
        t = self.last_epoch
        k = bisect.bisect_right(self.milestones, t)
        return [float(b) * self.gamma ** k * _warm(t, self.warmup_steps) for b in self.base_lrs]


class CosineDecay(LRScheduler):
    """Half-cosine from base to eta_min over total_steps (after the warmup); CosineAnnealingLR without warmup."""

    def __init__(self, optimizer: Optimizer, total_steps: int, eta_min: float = 0.0, warmup_steps: int = 0,
                 last_epoch: int = -1) -> None:
        if int(total_steps) <= int(warmup_steps):
            raise ValueError(f"CosineDecay: total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
        self.total_steps, self.eta_min, self.warmup_steps = int(total_steps), float(eta_min), int(warmup_steps)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """LRs at step last_epoch (closed form; held at eta_min after total_steps)."""
        t = self.last_epoch
        if t < self.warmup_steps:
            return [float(b) * _warm(t, self.warmup_steps) for b in self.base_lrs]
        frac = min(t - self.warmup_steps, self.total_steps - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        c = (1.0 + math.cos(math.pi * frac)) / 2.0
        return [self.eta_min + (float(b) - self.eta_min) * c for b in self.base_lrs]


class PolyWarmup(LRScheduler):
    """insightface arcface_torch PolynomialLRWarmup: base*t/W up to W, then base*(1-(t-W)/(T-W))^power."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int, power: float = 1.0,
                 last_epoch: int = -1) -> None:
        if not 0 <= int(warmup_steps) < int(total_steps):
            raise ValueError(f"PolyWarmup: need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
        self.total_steps, self.warmup_steps, self.power = int(total_steps), int(warmup_steps), float(power)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """LRs at step last_epoch, as insightface's scheduler produces them when stepped."""
        t, w, total = self.last_epoch, self.warmup_steps, self.total_steps
        if t == 0:
            # insightface's recursive get_lr leaves the group LR as set at step 0: the base LR.
            return [float(b) for b in self.base_lrs]
        if t <= w:
            return [float(b) * t / w for b in self.base_lrs]
        decay = (1.0 - (min(total, t) - w) / (total - w)) ** self.power
        return [float(b) * decay for b in self.base_lrs]


def ema_haar_slopes(losses: Sequence[float], alpha: float, beta: float) -> list[float]:
    """S_1..S_n of the two-stage form: E = EMA_alpha(L) (E_0 = L_0), D_t = E_{t-1} - E_t, S = EMA_beta(D) (S_1 = D_1)."""
    out: list[float] = []
    e = float(losses[0])
    s = 0.0
    for t in range(1, len(losses)):
        e_new = (1.0 - alpha) * e + alpha * float(losses[t])
        d = e - e_new
        s = d if t == 1 else beta * d + (1.0 - beta) * s
        out.append(s)
        e = e_new
    return out


class NaiveHaarDetector:
    """The paper's O(m) form: slope = (mean(older half) - mean(newer half)) / (m/2) over the last m losses.

    Box-averaging each half and taking their Haar difference gives the loss drop per step over
    the window; it is recomputed from the whole window at every step (O(m)), which is what the
    O(1) recurrence avoids. Same decision rule as FastFaceScheduler, applied once the window is full.
    """

    def __init__(self, m: int = 4000, lambd: float = 5e-5, patience: int = 1000, delta: float = 2.0,
                 max_halvings: int = 8) -> None:
        if m < 2 or m % 2:
            raise ValueError(f"NaiveHaarDetector: window m must be even and >= 2, got {m}")
        if patience < 1:
            raise ValueError(f"NaiveHaarDetector: patience must be >= 1, got {patience}")
        self.m, self.lambd, self.patience = int(m), float(lambd), int(patience)
        self.delta, self.max_halvings = float(delta), int(max_halvings)
        self._buf = np.zeros(self.m, dtype=np.float64)  # ring buffer of the last m losses
        self._seen = 0
        self.count = 0
        self.halvings = 0
        self.factor = 1.0
        self.slope = math.nan

    def _half_sum(self, start: int, n: int) -> float:
        # Sum of n ring entries from logical position start (0 = oldest): at most two slices.
        first = (self._seen + start) % self.m
        end = first + n
        if end <= self.m:
            return float(self._buf[first:end].sum())
        return float(self._buf[first:].sum() + self._buf[: end - self.m].sum())

    def step(self, loss: float) -> float:
        """Feed one loss; returns the LR factor for the next step (non-finite losses are ignored)."""
        loss = float(loss)
        if not math.isfinite(loss):
            return self.factor
        self._buf[self._seen % self.m] = loss
        self._seen += 1
        if self._seen < self.m:
            return self.factor
        half = self.m // 2
        # After the write, logical position 0 (the oldest) sits at index _seen % m.
        older, newer = self._half_sum(0, half), self._half_sum(half, half)
        self.slope = (older - newer) / half / half
        if self.count >= self.patience:
            self.count = 0
            if self.halvings < self.max_halvings:
                self.halvings += 1
                self.factor /= self.delta
        elif self.slope < self.lambd:
            self.count += 1
        else:
            self.count = 0
        return self.factor
