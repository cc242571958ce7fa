"""One step of the FastFace LR scheduler as a fused op on the loss's device.

`sched_step(state, lrs, loss, base_lrs, *SchedParams.args())` updates the float64 state
vector in place from one batch loss and writes base_lrs * factor * warmup into `lrs`, without
reading anything back to the host. Backends: CUDA kernel, Triton, C++ CPU, and the pure
PyTorch reference below, which defines the semantics; csrc/sched_step.h holds the same maths
for C++/CUDA, and fastface.sched.fastface has it in plain Python floats (the test oracle).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from fastface._ext import has_op
from fastface.ops.dispatch import FusedOp

# Layout of the state vector; mirrors enum Field in csrc/sched_step.h.
STATE_FIELDS = ("prev_loss", "s1", "s2", "count", "halvings", "factor", "nonfinite", "accepted")
STATE_SIZE = len(STATE_FIELDS)
PREV_LOSS, S1, S2, COUNT, HALVINGS, FACTOR, NONFINITE, ACCEPTED = range(STATE_SIZE)
# Scalar arguments of the op, in schema order (csrc/ops.cpp).
_SCHEMA_ORDER = ("w1", "w2", "w3", "alpha", "lambd", "patience", "delta", "max_halvings", "warmup_steps")


@dataclass(frozen=True)
class SchedParams:
    """The op's scalar arguments, in schema order (coefficients precomputed once, in Python)."""

    w1: float
    w2: float
    w3: float
    alpha: float
    lambd: float
    patience: int
    delta: float
    max_halvings: int
    warmup_steps: int

    def __post_init__(self) -> None:
        # args() spells the schema order out (astuple deep-copies: too slow for a per-step call).
        assert [f.name for f in fields(self)] == list(_SCHEMA_ORDER)

    @classmethod
    def from_hparams(cls, alpha: float, beta: float, lambd: float, patience: int, delta: float,
                     max_halvings: int, warmup_steps: int) -> "SchedParams":
        """omega_1 = (1-a)+(1-b), omega_2 = (1-a)(1-b), omega_3 = a*b, as in the notes."""
        alpha, beta = float(alpha), float(beta)
        # Computed once here and passed to every backend, so all of them use identical doubles.
        return cls(w1=(1.0 - alpha) + (1.0 - beta), w2=(1.0 - alpha) * (1.0 - beta), w3=alpha * beta, alpha=alpha,
                   lambd=float(lambd), patience=int(patience), delta=float(delta), max_halvings=int(max_halvings),
                   warmup_steps=int(warmup_steps))

    def args(self) -> tuple:
        """The scalars in the order of the op schema."""
        return (self.w1, self.w2, self.w3, self.alpha, self.lambd, self.patience, self.delta, self.max_halvings,
                self.warmup_steps)


def fresh_state() -> list[float]:
    """The state before any loss: factor 1, everything else 0."""
    st = [0.0] * STATE_SIZE
    st[FACTOR] = 1.0
    return st


def sched_step_reference(state: torch.Tensor, lrs: torch.Tensor, loss: torch.Tensor, base_lrs: torch.Tensor,
                         w1: float, w2: float, w3: float, alpha: float, lambd: float, patience: int, delta: float,
                         max_halvings: int, warmup_steps: int) -> None:
    """Plain PyTorch, branch-free (torch.where), in place, no host read: the semantics of the op."""
    L = loss.detach().reshape(()).to(torch.float64)
    prev, s1, s2, count, halv, factor, nonfin, acc = state.unbind()
    finite = torch.isfinite(L)
    diff = prev - L
    # Same association and rounding as csrc/sched_step.h: (w1*s1 - w2*s2) + w3*(prev - L).
    s_seed = alpha * diff
    s_rec = (w1 * s1 - w2 * s2) + w3 * diff
    first = acc == 1
    s = torch.where(first, s_seed, s_rec)
    new_s2 = torch.where(first, s_seed, s1)
    hold = acc < warmup_steps
    fire = (count >= patience) & ~hold
    halve = fire & (halv < max_halvings)
    zero = torch.zeros_like(count)
    new_count = torch.where(hold | fire, zero, torch.where(s < lambd, count + 1, zero))
    upd = finite & (acc > 0)
    new = torch.stack([
        torch.where(finite, L, prev),
        torch.where(upd, s, s1),
        torch.where(upd, new_s2, s2),
        torch.where(upd, new_count, count),
        torch.where(upd & halve, halv + 1, halv),
        torch.where(upd & halve, factor / delta, factor),
        torch.where(finite, nonfin, nonfin + 1),
        torch.where(finite, acc + 1, acc),
    ])
    state.copy_(new)
    lrs.copy_(base_lrs * lr_scale_reference(new, warmup_steps))


def lr_scale_reference(state: torch.Tensor, warmup_steps: int) -> torch.Tensor:
    """factor x linear warmup min(1, (accepted + 1) / warmup_steps), as a 0-d tensor."""
    if warmup_steps <= 0:
        return state[FACTOR]
    return state[FACTOR] * torch.clamp((state[ACCEPTED] + 1.0) / warmup_steps, max=1.0)


def _arg_problems(state, lrs, loss, base_lrs, w1, w2, w3, alpha, lambd, patience, delta, max_halvings,
                  warmup_steps) -> list[str]:
    why = []
    if not (state.dtype == torch.float64 and state.dim() == 1 and state.numel() == STATE_SIZE
            and state.is_contiguous()):
        why.append(f"state must be a contiguous float64 vector of {STATE_SIZE}, got {state.dtype} "
                   f"{tuple(state.shape)}")
    if not (lrs.dim() == 1 and lrs.is_contiguous() and lrs.dtype in (torch.float32, torch.float64)):
        why.append(f"lrs must be a contiguous float32/float64 vector, got {lrs.dtype} {tuple(lrs.shape)}")
    if not (base_lrs.dtype == torch.float64 and base_lrs.dim() == 1 and base_lrs.numel() == lrs.numel()
            and base_lrs.is_contiguous()):
        why.append(f"base_lrs must be a contiguous float64 vector as long as lrs, got {base_lrs.dtype} "
                   f"{tuple(base_lrs.shape)}")
    if loss.numel() != 1 or not loss.is_floating_point():
        why.append(f"loss must be a single floating-point value, got {loss.dtype} {tuple(loss.shape)}")
    devices = {t.device for t in (state, lrs, loss, base_lrs)}
    if len(devices) != 1:
        why.append(f"tensors on several devices: {sorted(map(str, devices))}")
    if not (patience >= 1 and delta > 0 and max_halvings >= 0 and warmup_steps >= 0):
        why.append(f"need patience >= 1, delta > 0, max_halvings >= 0, warmup_steps >= 0; got {patience}, {delta}, "
                   f"{max_halvings}, {warmup_steps}")
    return why


def _ext_problems() -> list[str]:
    if has_op("fastface_sched_step"):
        return []
    from fastface._ext import EXT_ERROR

    return [f"extension does not provide fastface_sched_step ({EXT_ERROR or 'built without it'})"]


def _cpp_reasons(state, lrs, loss, *rest) -> list[str]:
    why = _ext_problems() + _arg_problems(state, lrs, loss, *rest)
    if state.device.type != "cpu":
        why.append(f"tensor on {state.device}, not CPU")
    return why


def _cuda_reasons(state, lrs, loss, *rest) -> list[str]:
    why = _ext_problems() + _arg_problems(state, lrs, loss, *rest)
    if not state.is_cuda:
        why.append(f"tensor on {state.device}, not CUDA")
    else:
        from fastface.info import build_info

        if "cuda" not in build_info().get("backends", []):
            why.append("extension built without CUDA")
    return why


def _triton_reasons(state, lrs, loss, *rest) -> list[str]:
    from fastface.kernels import triton_available

    ok, why_not = triton_available()
    why = [] if ok else [why_not]
    why += _arg_problems(state, lrs, loss, *rest)
    if not state.is_cuda:
        if not (os.environ.get("TRITON_INTERPRET") == "1" and state.device.type == "cpu"):
            why.append(f"tensor on {state.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)")
        elif loss.dtype == torch.bfloat16:
            why.append("bfloat16 loss under the Triton interpreter (numpy has no bfloat16)")
    return why


def _reference_reasons(*args) -> list[str]:
    return _arg_problems(*args)


if has_op("fastface_sched_step"):

    @torch.library.register_fake("fastface::fastface_sched_step")
    def _sched_step_fake(state, lrs, loss, base_lrs, w1, w2, w3, alpha, lambd, patience, delta, max_halvings,
                         warmup_steps):
        return None


sched_step = FusedOp("fastface_sched_step")
sched_step.__doc__ = ("One FastFace scheduler step in place: sched_step(state, lrs, loss, base_lrs, w1, w2, w3, alpha, "
                      "lambd, patience, delta, max_halvings, warmup_steps).")


@sched_step.register("cuda", _cuda_reasons)
@sched_step.register("cpp", _cpp_reasons)
def _sched_step_ext(state, lrs, loss, base_lrs, *scalars) -> None:
    torch.ops.fastface.fastface_sched_step.default(state, lrs, loss, base_lrs, *scalars)


@sched_step.register("triton", _triton_reasons)
def _sched_step_triton(state, lrs, loss, base_lrs, *scalars) -> None:
    from fastface.kernels.sched import sched_step_triton

    sched_step_triton(state, lrs, loss, base_lrs, *scalars)


sched_step.register("reference", _reference_reasons)(sched_step_reference)
