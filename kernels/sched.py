"""FastFace LR scheduler step as a Triton kernel (one program, scalar code).

Same maths and rounding as csrc/sched_step.h. Two Triton specifics keep it exact: float
scalars passed to a Triton kernel are specialised as fp32, so every hyperparameter travels in a
float64 tensor instead; and the launch disables FMA contraction (enable_fp_fusion=False).
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

# Index of each hyperparameter in the float64 vector handed to the kernel.
_HP_FIELDS = ("w1", "w2", "w3", "alpha", "lambd", "patience", "delta", "max_halvings", "warmup_steps", "dbl_max")
_hp_cache: dict[tuple, torch.Tensor] = {}


@triton.jit
def _sched_step_kernel(state_ptr, lrs_ptr, loss_ptr, base_ptr, hp_ptr, groups, BLOCK_G: tl.constexpr):
    w1 = tl.load(hp_ptr + 0)
    w2 = tl.load(hp_ptr + 1)
    w3 = tl.load(hp_ptr + 2)
    alpha = tl.load(hp_ptr + 3)
    lambd = tl.load(hp_ptr + 4)
    patience = tl.load(hp_ptr + 5)
    delta = tl.load(hp_ptr + 6)
    max_halvings = tl.load(hp_ptr + 7)
    warmup = tl.load(hp_ptr + 8)
    dbl_max = tl.load(hp_ptr + 9)

    loss = tl.load(loss_ptr).to(tl.float64)
    prev = tl.load(state_ptr + 0)
    s1 = tl.load(state_ptr + 1)
    s2 = tl.load(state_ptr + 2)
    count = tl.load(state_ptr + 3)
    halv = tl.load(state_ptr + 4)
    factor = tl.load(state_ptr + 5)
    nonfin = tl.load(state_ptr + 6)
    acc = tl.load(state_ptr + 7)

    finite = (loss <= dbl_max) & (loss >= -dbl_max)  # false for NaN and +-inf
    diff = prev - loss
    s_seed = alpha * diff
    s_rec = (w1 * s1 - w2 * s2) + w3 * diff
    first = acc == 1.0
    s = tl.where(first, s_seed, s_rec)
    new_s2 = tl.where(first, s_seed, s1)
    hold = acc < warmup
    fire = (count >= patience) & (acc >= warmup)
    halve = fire & (halv < max_halvings)
    new_count = tl.where(hold | fire, 0.0, tl.where(s < lambd, count + 1.0, 0.0))
    upd = finite & (acc > 0.0)
    do_halve = upd & halve

    prev = tl.where(finite, loss, prev)
    s1_out = tl.where(upd, s, s1)
    s2_out = tl.where(upd, new_s2, s2)
    count = tl.where(upd, new_count, count)
    halv = tl.where(do_halve, halv + 1.0, halv)
    factor = tl.where(do_halve, factor / delta, factor)
    nonfin = tl.where(finite, nonfin, nonfin + 1.0)
    acc = tl.where(finite, acc + 1.0, acc)

    tl.store(state_ptr + 0, prev)
    tl.store(state_ptr + 1, s1_out)
    tl.store(state_ptr + 2, s2_out)
    tl.store(state_ptr + 3, count)
    tl.store(state_ptr + 4, halv)
    tl.store(state_ptr + 5, factor)
    tl.store(state_ptr + 6, nonfin)
    tl.store(state_ptr + 7, acc)

    # warmup > 0 guards the division; the where discards the warmup == 0 lane.
    ramp = (acc + 1.0) / tl.maximum(warmup, 1.0)
    warm = tl.where(warmup > 0.0, tl.minimum(ramp, 1.0), 1.0)
    scale = factor * warm
    offs = tl.arange(0, BLOCK_G)
    mask = offs < groups
    base = tl.load(base_ptr + offs, mask=mask, other=0.0)
    tl.store(lrs_ptr + offs, (base * scale).to(lrs_ptr.dtype.element_ty), mask=mask)


def _hp_tensor(values: tuple, device: torch.device) -> torch.Tensor:
    # Cached per (values, device): building it every step would be a host-to-device copy per step.
    key = (values, str(device))
    hp = _hp_cache.get(key)
    if hp is None:
        hp = torch.tensor([float(v) for v in values] + [sys.float_info.max], dtype=torch.float64, device=device)
        _hp_cache[key] = hp
    return hp


def sched_step_triton(state: torch.Tensor, lrs: torch.Tensor, loss: torch.Tensor, base_lrs: torch.Tensor, w1: float,
                      w2: float, w3: float, alpha: float, lambd: float, patience: int, delta: float,
                      max_halvings: int, warmup_steps: int) -> None:
    """Launch one scheduler step on state/lrs in place (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    hp = _hp_tensor((w1, w2, w3, alpha, lambd, patience, delta, max_halvings, warmup_steps), state.device)
    groups = lrs.numel()
    block = max(1, triton.next_power_of_2(groups))
    _sched_step_kernel[(1,)](state, lrs, loss.reshape(()), base_lrs, hp, groups, BLOCK_G=block, num_warps=1,
                             enable_fp_fusion=False)
