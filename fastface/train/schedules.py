"""The LR schedule a SchedConfig names, built for an optimiser and a run length."""
from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from fastface.train.config import SchedConfig


def build_scheduler(cfg: SchedConfig, optimizer: Optimizer, total_steps: int) -> LRScheduler:
    """FastFace (stepped with the loss, on device) or a baseline (stepped without arguments)."""
    from fastface.sched import CosineDecay, FastFaceScheduler, PolyWarmup, StepDecay, rescale_to_run

    if cfg.name == "fastface":
        alpha, beta, lambd = cfg.alpha, cfg.beta, cfg.lambd
        if cfg.reference_steps:
            alpha, beta, lambd = rescale_to_run(alpha, beta, lambd, total_steps, cfg.reference_steps)
        s = FastFaceScheduler(optimizer, total_steps, alpha=alpha, beta=beta, lambd=lambd, tau=cfg.tau,
                              delta=cfg.delta, max_halvings=cfg.max_halvings, warmup_steps=cfg.warmup_steps)
        s.takes_loss = True
        return s
    if cfg.name == "poly":
        return PolyWarmup(optimizer, total_steps, cfg.warmup_steps, power=cfg.power)
    if cfg.name == "step":
        milestones = [max(1, int(round(f * total_steps))) for f in cfg.milestones]
        return StepDecay(optimizer, milestones, gamma=cfg.gamma, warmup_steps=cfg.warmup_steps)
    if cfg.name == "cosine":
        return CosineDecay(optimizer, total_steps, eta_min=cfg.min_lr, warmup_steps=cfg.warmup_steps)
    w = max(0, cfg.warmup_steps)
    return LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / w) if w else 1.0)
