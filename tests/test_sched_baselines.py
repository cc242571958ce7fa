"""Baseline schedules against torch's / insightface's, and the naive O(m) Haar detector."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _sched_helpers import loss_stream
from fastface.sched import CosineDecay, FastFaceScheduler, NaiveHaarDetector, PolyWarmup, StepDecay


def _opt(lrs=(0.1, 0.03)):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs], lr=lrs[0])


def _trace(sched, n):
    out = [sched.get_last_lr()]
    for _ in range(n):
        sched.optimizer.step()
        sched.step()
        out.append(sched.get_last_lr())
    return np.asarray(out)


def test_step_decay_equals_multistep_lr():
    ours = _trace(StepDecay(_opt(), milestones=[10, 25, 40], gamma=0.3), 60)
    theirs = _trace(torch.optim.lr_scheduler.MultiStepLR(_opt(), milestones=[10, 25, 40], gamma=0.3), 60)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_cosine_decay_equals_cosine_annealing_lr():
    ours = _trace(CosineDecay(_opt(), total_steps=50, eta_min=1e-4), 50)
    theirs = _trace(torch.optim.lr_scheduler.CosineAnnealingLR(_opt(), T_max=50, eta_min=1e-4), 50)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-15)  # torch's form is recursive


def test_warmup_ramp_is_the_fastface_one():
    sched = StepDecay(_opt((0.1,)), milestones=[100], warmup_steps=4)
    lrs = _trace(sched, 6)[:, 0]
    np.testing.assert_allclose(lrs, [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1])
    cos = _trace(CosineDecay(_opt((0.1,)), total_steps=14, warmup_steps=4), 14)[:, 0]
    np.testing.assert_allclose(cos[:4], [0.025, 0.05, 0.075, 0.1])
    assert cos[4] == pytest.approx(0.1) and cos[9] == pytest.approx(0.05) and cos[14] == pytest.approx(0.0)


class _InsightfacePoly(torch.optim.lr_scheduler.LRScheduler):
    """insightface arcface_torch PolynomialLRWarmup.get_lr, transcribed: the recursive form it runs."""

    def __init__(self, optimizer, warmup_iters, total_iters, power):
        self.total_iters, self.power, self.warmup_iters = total_iters, power, warmup_iters
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch == 0 or self.last_epoch > self.total_iters:
            return [group["lr"] for group in self.optimizer.param_groups]
        if self.last_epoch <= self.warmup_iters:
            return [base_lr * self.last_epoch / self.warmup_iters for base_lr in self.base_lrs]
        l, w, t = self.last_epoch, self.warmup_iters, self.total_iters
        decay_factor = ((1.0 - (l - w) / (t - w)) / (1.0 - (l - 1 - w) / (t - w))) ** self.power
        return [group["lr"] * decay_factor for group in self.optimizer.param_groups]


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_poly_warmup_matches_insightface(power):
    ours = _trace(PolyWarmup(_opt(), total_steps=100, warmup_steps=10, power=power), 120)
    theirs = _trace(_InsightfacePoly(_opt(), 10, 100, power), 120)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-14)
    assert ours[10, 0] == pytest.approx(0.1) and ours[100, 0] == 0.0 and ours[120, 0] == 0.0


def test_naive_window_slope_is_the_mean_drop_per_step():
    det = NaiveHaarDetector(m=100, patience=10**9)
    for t in range(250):
        det.step(7.0 - 0.003 * t)
    assert det.slope == pytest.approx(0.003, rel=1e-9)


def test_naive_ring_buffer_matches_direct_window():
    losses = [x for x in loss_stream(700, 2, hole_rate=0.0)]
    m = 64
    det = NaiveHaarDetector(m=m, patience=10**9)
    for i, L in enumerate(losses):
        det.step(L)
        if i + 1 >= m:
            w = np.asarray(losses[i + 1 - m: i + 1])
            want = (w[: m // 2].mean() - w[m // 2:].mean()) / (m // 2)
            assert det.slope == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_naive_detector_constant_loss_known_answer():
    det = NaiveHaarDetector(m=10, patience=4, max_halvings=3)
    factors = [det.step(1.0) for _ in range(60)]
    # First slope once the window is full (loss index 9); same rule as FastFace: every T+1 = 5.
    changes = [i for i in range(1, 60) if factors[i] != factors[i - 1]]
    assert changes == [9 + 4, 9 + 9, 9 + 14] and factors[-1] == 0.125


def test_naive_and_fastface_agree_on_a_plateau_after_a_drop():
    # Both detectors see a long linear drop then a plateau: neither halves during the drop,
    # both halve on the plateau, at different steps: the m = 400 window forgets the drop within
    # 400 steps, while with alpha = beta = 1e-3 S(x) ~ c(1 + x)e^-x (x = alpha*t) falls below
    # lambda = c/200 only after about 7400 steps.
    losses = [10.0 - 0.01 * t for t in range(3000)] + [-20.0] * 9000
    det = NaiveHaarDetector(m=400, patience=500)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    opt._opt_called = True
    ff = FastFaceScheduler(opt, total_steps=10_000)  # T = 500
    naive_first = ff_first = None
    for t, L in enumerate(losses):
        if det.step(L) < 1.0 and naive_first is None:
            naive_first = t
        ff.step(L)
        if ff.get_last_lr()[0] < 1.0 and ff_first is None:
            ff_first = t
    assert naive_first is not None and ff_first is not None
    assert 3000 + 300 + 500 < naive_first <= 3000 + 400 + 501
    assert 3000 + 7000 + 500 < ff_first < 3000 + 8000 + 500


def _expected_trace(name: str, base: float = 0.1, w: int = 4, total: int = 20) -> list[float]:
    """LR of optimiser steps 0..total by the closed forms (flat loss for FastFace: T = 1)."""
    out = []
    for k in range(total + 1):
        ramp = base * min(1.0, (k + 1) / w)
        if name == "constant":
            out.append(ramp)
        elif name == "step":
            out.append(ramp * (0.1 if k >= total // 2 else 1.0))
        elif name == "cosine":
            out.append(ramp if k < w else base * (1 + math.cos(math.pi * (k - w) / (total - w))) / 2)
        elif name == "poly":  # insightface: base at step 0, then k/w, then (1 - progress)^2
            out.append(base if k == 0 else base * k / w if k <= w else base * (1 - (k - w) / (total - w)) ** 2)
        else:  # decisions from the w-th loss on, a halving every T + 1 = 2 losses, at most 8
            out.append(ramp / 2 ** min(8, max(0, (k - w) // 2)))
    return out


@pytest.mark.parametrize("name", ["fastface", "poly", "step", "cosine", "constant"])
def test_build_scheduler_makes_the_configured_schedule(name):
    from fastface.train.config import SchedConfig
    from fastface.train.schedules import build_scheduler

    cfg = SchedConfig(name=name, warmup_steps=4, milestones=(0.5,), gamma=0.1, power=2.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, fused=True)
    sched = build_scheduler(cfg, opt, total_steps=20)
    assert isinstance(sched, FastFaceScheduler) == (name == "fastface")
    lrs = [float(opt.param_groups[0]["lr"])]
    for _ in range(20):
        opt._opt_called = True
        sched.step(torch.tensor(1.0)) if name == "fastface" else sched.step()
        lrs.append(float(opt.param_groups[0]["lr"]))
    np.testing.assert_allclose(lrs, _expected_trace(name), rtol=1e-6, atol=1e-12)
