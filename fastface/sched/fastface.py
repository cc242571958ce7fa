"""The FastFace LR scheduler (Gong et al., arXiv 2404.11118): O(1) EMA/Haar plateau detection.

Per accepted (finite) batch loss L_t, t = 0, 1, 2, ...:

- t = 0: only stored (E_0 = L_0); no slope, no decision.
- t = 1: S_1 = alpha * (L_0 - L_1), the reference code's seed (the first EMA drop D_1 itself,
  not alpha*beta*(...)). We also set S_0 := S_1, which makes the recurrence below equal,
  from t = 2 on, to the two-stage form E -> D = E_{t-1} - E_t -> S = EMA_beta(D) seeded with
  E_0 = L_0 and S_1 = D_1 (fastface.sched.baselines.ema_haar_slopes; tested).
- t >= 2: S_t = w1*S_{t-1} - w2*S_{t-2} + w3*(L_{t-1} - L_t),
  w1 = (1-alpha)+(1-beta), w2 = (1-alpha)(1-beta), w3 = alpha*beta.

Decision after each S_t (t >= max(1, warmup_steps)), with patience T = ceil(tau * total_steps):

- if the count reached T on the previous step: count = 0 and, for the first max_halvings
  times, halvings += 1 and factor /= delta (the reference applies the decision at the start of
  the next step, and that step opens a fresh patience window);
- else if S_t < lambd: count += 1 (so it stops at T);
- else: count = 0.

So a constant loss halves at t = T+1, 2(T+1), ...: exactly every T+1 steps, max_halvings times.
Non-finite losses leave the state untouched and are counted. The LR of every param group is
base_lr * factor * min(1, (t_next + 1) / warmup_steps), t_next being the number of accepted
losses so far (linear warmup; not in the paper; no decisions during it).

Two modes with the same maths:
- on-device (the loss is a tensor): the state is a float64 tensor on the loss's device,
  updated by one fused op per step (fastface.ops.sched_step), which also writes the group
  LRs into a float32 tensor that the optimiser reads: param_groups[i]["lr"] is a 0-d view
  of it. Nothing is read back to the host; get_last_lr() reads it lazily, when called.
- host (the loss is a float): the same maths in plain Python floats (python_update), which is
  also the test oracle for every backend of the op.

Use in a training loop (the optimiser must be built with fused=True, or capturable=True for
Adam/AdamW on CUDA: the other code paths turn a tensor lr into a Python number, a host sync):

    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4, fused=True)
    sched = FastFaceScheduler(opt, total_steps=epochs * steps_per_epoch)
    for x, y in loader:
        loss = criterion(model(x), y)   # under DDP: the all-reduced mean, so all ranks decide alike
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step(loss)                # one fused op on loss.device, no host read
        if log_now:
            print(sched.get_last_lr())  # the only host read, when the log asks
"""
from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Any, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from fastface.ops.sched import (ACCEPTED, COUNT, FACTOR, HALVINGS, NONFINITE, PREV_LOSS, S1, S2, STATE_FIELDS,
                                STATE_SIZE, SchedParams, fresh_state, sched_step)

Loss = Union[Tensor, float, int]

# The dtype of the LR tensors handed to the optimiser: CUDA fused optimisers (SGD, Adam,
# AdamW) read a tensor lr through a float pointer, so it must be float32.
LR_DTYPE = torch.float32
_STATE_DICT_VERSION = 1


def python_update(st: list[float], loss: float, p: SchedParams) -> None:
    """One scheduler step on a plain-float state list, in place (same rounding as the op)."""
    if not math.isfinite(loss):
        st[NONFINITE] += 1.0
        return
    n = st[ACCEPTED]
    if n > 0.0:
        if n == 1.0:
            s = p.alpha * (st[PREV_LOSS] - loss)
            st[S2] = s
        else:
            s = (p.w1 * st[S1] - p.w2 * st[S2]) + p.w3 * (st[PREV_LOSS] - loss)
            st[S2] = st[S1]
        st[S1] = s
        if n < p.warmup_steps:
            st[COUNT] = 0.0
        elif st[COUNT] >= p.patience:
            st[COUNT] = 0.0
            if st[HALVINGS] < p.max_halvings:
                st[HALVINGS] += 1.0
                st[FACTOR] = st[FACTOR] / p.delta
        elif s < p.lambd:
            st[COUNT] += 1.0
        else:
            st[COUNT] = 0.0
    st[PREV_LOSS] = loss
    st[ACCEPTED] = n + 1.0


def python_lr_scale(st: list[float], p: SchedParams) -> float:
    """factor x linear warmup, the multiplier of every base LR for the next optimiser step."""
    warm = 1.0
    if p.warmup_steps > 0:
        warm = min((st[ACCEPTED] + 1.0) / p.warmup_steps, 1.0)
    return st[FACTOR] * warm


def rescale_to_run(alpha: float, beta: float, lambd: float, total_steps: int,
                   reference_steps: int) -> tuple[float, float, float]:
    """(alpha, beta, lambd) for a run of total_steps, from values meant for a run of reference_steps.

    The detector's time scales are 1/alpha and 1/beta steps (the two EMAs) and T = tau*total_steps
    (the patience); lambd is a loss drop per step. The reference defaults (alpha = beta = 1e-3,
    lambd = 5e-5) belong to the paper's 5-epoch MS1MV3 runs (~25,000 steps at a global batch of
    1024). Keeping every time scale the same fraction of the run multiplies alpha, beta and lambd
    by reference_steps / total_steps (alpha and beta capped at 1): a plateau then means "at this
    rate the loss would fall by less than lambd * reference_steps over the whole run".
    """
    if int(total_steps) < 1 or int(reference_steps) < 1:
        raise ValueError(f"rescale_to_run: total_steps and reference_steps must be >= 1, got {total_steps}, "
                         f"{reference_steps}")
    k = int(reference_steps) / int(total_steps)
    return min(1.0, float(alpha) * k), min(1.0, float(beta) * k), float(lambd) * k


def patience_steps(tau: float, total_steps: int) -> int:
    """T = ceil(tau * total_steps), at least 1; tau read as the decimal it prints as (0.05*60 -> 3)."""
    return max(1, math.ceil(Fraction(repr(float(tau))) * int(total_steps)))


class FastFaceScheduler(LRScheduler):
    """Halve the LR when the smoothed loss drop stays below lambd for T steps; call step(loss) per iteration."""

    def __init__(self, optimizer: Optimizer, total_steps: int, alpha: float = 1e-3, beta: float = 1e-3,
                 lambd: float = 5e-5, tau: float = 0.05, delta: float = 2.0, max_halvings: int = 8,
                 warmup_steps: int = 0) -> None:
        if int(total_steps) < 1:
            raise ValueError(f"FastFaceScheduler: total_steps must be >= 1, got {total_steps}")
        for name, v in (("alpha", alpha), ("beta", beta)):
            if not 0.0 < float(v) <= 1.0:
                raise ValueError(f"FastFaceScheduler: {name} must be in (0, 1], got {v}")
        if not float(tau) > 0.0:
            raise ValueError(f"FastFaceScheduler: tau must be > 0, got {tau}")
        if not float(delta) > 0.0:
            raise ValueError(f"FastFaceScheduler: delta must be > 0, got {delta}")
        if int(max_halvings) < 0 or int(warmup_steps) < 0:
            raise ValueError(f"FastFaceScheduler: max_halvings and warmup_steps must be >= 0, got {max_halvings}, "
                             f"{warmup_steps}")
        self.total_steps = int(total_steps)
        self.alpha, self.beta, self.lambd = float(alpha), float(beta), float(lambd)
        self.tau, self.delta = float(tau), float(delta)
        self.max_halvings, self.warmup_steps = int(max_halvings), int(warmup_steps)
        self.patience = patience_steps(self.tau, self.total_steps)
        self.params = SchedParams.from_hparams(self.alpha, self.beta, self.lambd, self.patience, self.delta,
                                               self.max_halvings, self.warmup_steps)
        self._host: list[float] = fresh_state()
        self._state: Tensor | None = None  # the on-device state, once a tensor loss was seen
        self._lrs: Tensor | None = None
        self._lr_views: list[Tensor] = []
        self._base_t: Tensor | None = None
        self._impl: Any = None
        self.backend: str | None = None  # which backend of fastface.ops.sched_step runs the device steps
        self._warned_sync = False
        super().__init__(optimizer)  # writes the initial LRs through step() in initial mode

    # -- LRScheduler API -------------------------------------------------------------------

    def step(self, loss: Loss | None = None) -> None:  # type: ignore[override]
        """Feed one batch loss (0-d tensor: on-device mode, no host sync; float: host mode)."""
        if self._is_initial:
            # LRScheduler.__init__ calls step() once, before any loss: set the starting LRs.
            self.base_lrs = [float(b) for b in self.base_lrs]  # a tensor initial_lr is read once, here
            self._step_count = 1
            self.last_epoch = 0
            self._write_host_lrs()
            return
        if loss is None:
            raise TypeError("FastFaceScheduler.step(loss): the batch loss is required (a 0-d tensor or a float)")
        if self._step_count == 1 and not getattr(self.optimizer, "_opt_called", False):
            warnings.warn("FastFaceScheduler.step() was called before optimizer.step(): call it after, once per "
                          "iteration, with that iteration's loss", UserWarning, stacklevel=2)
        self._step_count += 1
        self.last_epoch += 1
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"FastFaceScheduler.step: loss must hold one value, got shape {tuple(loss.shape)}")
            self._device_step(loss.detach())
        elif self._state is not None:
            # Already on a device: a float loss is filled there (an async fill, not a copy).
            self._device_step(torch.full((), float(loss), dtype=torch.float64, device=self._state.device))
        else:
            python_update(self._host, float(loss), self.params)
            self._write_host_lrs()

    def get_lr(self) -> list[float]:
        """The LRs for the next optimiser step (reads the device state if there is one: a sync)."""
        return self.get_last_lr()

    def get_last_lr(self) -> list[float]:
        """Current LR of each param group as floats; in on-device mode this is the one host read."""
        if self._lrs is None:
            return self._host_lrs()
        return self._lrs.tolist()

    @property
    def _last_lr(self) -> list[float]:  # read by some torch utilities; lazy like get_last_lr
        return self.get_last_lr()

    @_last_lr.setter
    def _last_lr(self, value: Any) -> None:
        pass  # the LRs live in the optimiser / the device tensor; nothing to cache

    def lr_tensor(self) -> Tensor | None:
        """The device tensor of group LRs (float32, one per group), or None in host mode; no sync."""
        return self._lrs

    def state_tensor(self) -> Tensor | None:
        """The float64 device state (fields: fastface.ops.sched.STATE_FIELDS), or None in host mode; no sync."""
        return self._state

    def stats(self) -> dict[str, float]:
        """The scheduler state as floats (slope s1, count, halvings, factor, ...); syncs if on device."""
        vals = self._host if self._state is None else self._state.tolist()
        return dict(zip(STATE_FIELDS, vals))

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to make the same decisions (the device state included)."""
        state = self._state.clone() if self._state is not None else torch.tensor(self._host, dtype=torch.float64)
        return {
            "version": _STATE_DICT_VERSION,
            "total_steps": self.total_steps, "alpha": self.alpha, "beta": self.beta, "lambd": self.lambd,
            "tau": self.tau, "delta": self.delta, "max_halvings": self.max_halvings,
            "warmup_steps": self.warmup_steps, "patience": self.patience,
            "base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch, "_step_count": self._step_count,
            "on_device": self._state is not None, "state": state,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from state_dict(); the device state is kept on (or moved to) the device in use."""
        sd = dict(state_dict)
        if sd.get("version") != _STATE_DICT_VERSION:
            raise ValueError(f"FastFaceScheduler.load_state_dict: unknown state_dict version {sd.get('version')!r} "
                             f"(expected {_STATE_DICT_VERSION})")
        state = sd["state"]
        if not (isinstance(state, Tensor) and state.dtype == torch.float64 and state.shape == (STATE_SIZE,)):
            raise ValueError(f"FastFaceScheduler.load_state_dict: 'state' must be a float64 tensor of {STATE_SIZE}, "
                             f"got {state!r}")
        if len(sd["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(f"FastFaceScheduler.load_state_dict: {len(sd['base_lrs'])} base LRs saved but the "
                             f"optimizer has {len(self.optimizer.param_groups)} param groups")
        self.total_steps, self.tau = int(sd["total_steps"]), float(sd["tau"])
        self.alpha, self.beta, self.lambd = float(sd["alpha"]), float(sd["beta"]), float(sd["lambd"])
        self.delta, self.max_halvings = float(sd["delta"]), int(sd["max_halvings"])
        self.warmup_steps, self.patience = int(sd["warmup_steps"]), int(sd["patience"])
        self.params = SchedParams.from_hparams(self.alpha, self.beta, self.lambd, self.patience, self.delta,
                                               self.max_halvings, self.warmup_steps)
        self.base_lrs = [float(b) for b in sd["base_lrs"]]
        self.last_epoch, self._step_count = int(sd["last_epoch"]), int(sd["_step_count"])
        self._host = [float(v) for v in state.tolist()]
        if self._state is not None:
            self._bind(self._state.device)  # stay on the device in use
        elif sd["on_device"]:
            self._bind(state.device)
        else:
            self._write_host_lrs()

    # -- internals ------------------------------------------------------------------------

    def _host_lrs(self) -> list[float]:
        scale = python_lr_scale(self._host, self.params)
        return [b * scale for b in self.base_lrs]

    def _write_host_lrs(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self._host_lrs(), strict=True):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _device_step(self, loss: Tensor) -> None:
        if self._state is None:
            self._bind(loss.device, loss)
        elif loss.device != self._state.device:
            self._host = self._state.tolist()  # one-off move (e.g. a checkpoint loaded on CPU)
            self._bind(loss.device, loss)
        groups = self.optimizer.param_groups
        if len(groups) != len(self._lr_views):
            raise RuntimeError(f"FastFaceScheduler: the optimizer now has {len(groups)} param groups, the scheduler "
                               f"was built for {len(self._lr_views)}; create the scheduler after add_param_group")
        for group, view in zip(groups, self._lr_views):
            if group["lr"] is not view:  # e.g. optimizer.load_state_dict replaced it
                group["lr"] = view
        self._impl(self._state, self._lrs, loss, self._base_t, *self.params.args())

    def _bind(self, device: torch.device, loss: Tensor | None = None) -> None:
        """Move the state to `device` and make every param group read its LR from a tensor there."""
        self._state = torch.tensor(self._host, dtype=torch.float64, device=device)
        self._base_t = torch.tensor(self.base_lrs, dtype=torch.float64, device=device)
        self._lrs = torch.tensor(self._host_lrs(), dtype=LR_DTYPE, device=device)
        self._lr_views = list(self._lrs.unbind())
        for group, view in zip(self.optimizer.param_groups, self._lr_views, strict=True):
            group["lr"] = view
        # The backend is chosen once per binding (FASTFACE_BACKEND / use_backend apply here), not per step.
        probe = loss if loss is not None else torch.zeros((), dtype=torch.float64, device=device)
        self.backend = sched_step.select(self._state, self._lrs, probe, self._base_t, *self.params.args())
        self._impl = sched_step.impls[self.backend][0]
        if not self._warned_sync and not all(g.get("fused") or g.get("capturable") for g in self.optimizer.param_groups):
            self._warned_sync = True
            warnings.warn(f"FastFaceScheduler: {type(self.optimizer).__name__} was not built with fused=True (or "
                          "capturable=True), so it reads the tensor lr back to the host (.item()) on every step; "
                          "build it with fused=True for a sync-free step", UserWarning, stacklevel=3)
