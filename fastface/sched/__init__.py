"""LR schedulers: the FastFace scheduler (O(1), state on the device) and baselines to compare it with."""
from __future__ import annotations

from fastface.sched.baselines import CosineDecay, NaiveHaarDetector, PolyWarmup, StepDecay, ema_haar_slopes
from fastface.sched.fastface import (FastFaceScheduler, patience_steps, python_lr_scale, python_update,
                                     rescale_to_run)

__all__ = [
    "FastFaceScheduler", "patience_steps", "python_update", "python_lr_scale", "rescale_to_run",
    "StepDecay", "CosineDecay", "PolyWarmup", "NaiveHaarDetector", "ema_haar_slopes",
]
