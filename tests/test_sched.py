"""FastFaceScheduler: known answers, modes, resume, warmup, non-finite losses, no host sync."""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _sched_helpers import loss_stream
from fastface._ext import has_op
from fastface.ops import use_backend
from fastface.sched import FastFaceScheduler, patience_steps, rescale_to_run

BASE_LR = 0.02


@pytest.fixture(autouse=True)
def _cpu_op_backend():
    """Device mode on CPU runs the C++ op, as training on a CPU does.

    conftest sets TRITON_INTERPRET=1, which would otherwise route every CPU step through the
    Triton interpreter (~3 ms a step instead of ~10 us); that backend is checked against the
    C++ one in test_sched_op.py. Tests that name a backend override this inside their block.
    """
    with use_backend("cpp" if has_op("fastface_sched_step") else "reference"):
        yield


def make(total_steps=100, groups=(BASE_LR,), fused=True, momentum=0.9, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    params = list(model.parameters())
    chunks = [params[i::len(groups)] for i in range(len(groups))]
    opt = torch.optim.SGD([{"params": c, "lr": lr} for c, lr in zip(chunks, groups)], lr=groups[0],
                          momentum=momentum, weight_decay=5e-4, fused=fused)
    return model, opt, FastFaceScheduler(opt, total_steps, **kw)


def as_loss(x, mode):
    return torch.tensor(x, dtype=torch.float32) if mode == "device" else x


def run(sched, losses, mode):
    """Feed losses; the LR (of group 0) after each step."""
    out = []
    for L in losses:
        sched.optimizer._opt_called = True  # these tests drive the scheduler alone
        sched.step(as_loss(L, mode))
        out.append(sched.get_last_lr()[0])
    return out


def drops(lrs):
    """Indices t (0-based, = the loss L_t) after which the LR changed."""
    prev = [BASE_LR] + lrs[:-1]  # (device LRs are float32: compare up to that rounding)
    return [t for t, (a, b) in enumerate(zip(prev, lrs)) if not math.isclose(a, b, rel_tol=1e-6)]


@pytest.mark.parametrize("mode", ["device", "host"])
def test_constant_loss_halves_every_T_plus_1_steps_eight_times(mode):
    _, _, sched = make(total_steps=100)  # T = ceil(0.05 * 100) = 5
    T = sched.patience
    assert T == 5
    lrs = run(sched, [3.0] * 200, mode)
    assert drops(lrs) == [k * (T + 1) for k in range(1, 9)]
    for k in range(1, 9):
        assert lrs[k * (T + 1)] == pytest.approx(BASE_LR / 2**k, rel=1e-6)
    assert lrs[-1] == pytest.approx(BASE_LR / 256, rel=1e-6)  # the lr0/256 floor: no 9th halving
    assert sched.stats()["halvings"] == 8.0


@pytest.mark.parametrize("mode", ["device", "host"])
@pytest.mark.parametrize("slope,noise", [(0.01, 0.0), (1e-3, 0.0), (0.01, 0.05)])
def test_falling_loss_never_halves(mode, slope, noise):
    _, _, sched = make(total_steps=10_000)  # T = 500
    g = torch.Generator().manual_seed(1)
    losses = (8.0 - slope * torch.arange(10_000, dtype=torch.float64)
              + noise * torch.randn(10_000, generator=g, dtype=torch.float64)).tolist()
    for L in losses:
        sched.optimizer._opt_called = True
        sched.step(as_loss(L, mode))
    st = sched.stats()
    assert sched.backend == (None if mode == "host" else "cpp" if has_op("fastface_sched_step") else "reference")
    assert st["halvings"] == 0.0 and sched.get_last_lr()[0] == pytest.approx(BASE_LR)
    assert st["s1"] == pytest.approx(slope, rel=0.05)  # the smoothed drop tracks the true slope


def test_patience_rounds_up_exactly():
    assert patience_steps(0.05, 60) == 3  # 0.05 * 60 = 3.0000000000000004 in floating point
    assert patience_steps(0.05, 61) == 4
    assert patience_steps(0.05, 1) == 1
    assert patience_steps(1e-9, 10) == 1


def test_device_and_host_modes_agree_on_random_stream():
    losses = loss_stream(5_000, 4)
    _, _, dev = make(total_steps=1_000, groups=(0.02, 0.005), delta=1.5, max_halvings=50, warmup_steps=30)
    _, _, host = make(total_steps=1_000, groups=(0.02, 0.005), delta=1.5, max_halvings=50, warmup_steps=30)
    for L in losses:
        dev.optimizer._opt_called = host.optimizer._opt_called = True
        dev.step(torch.tensor(L, dtype=torch.float32))
        host.step(L)
        want = torch.tensor(host.get_last_lr(), dtype=torch.float32).tolist()
        assert dev.get_last_lr() == want
    assert dev.stats() == host.stats()
    assert dev.stats()["halvings"] > 3 and dev.stats()["nonfinite"] > 10


def test_every_group_scaled_by_the_same_factor():
    _, opt, sched = make(total_steps=40, groups=(0.1, 0.03, 0.007))
    run(sched, [1.0] * 30, "device")
    factor = sched.stats()["factor"]
    assert factor < 1.0
    for group, base in zip(opt.param_groups, (0.1, 0.03, 0.007)):
        assert float(group["lr"]) == pytest.approx(base * factor, rel=1e-6)


@pytest.mark.parametrize("mode", ["device", "host"])
def test_nonfinite_loss_is_ignored_and_counted(mode):
    _, _, sched = make(total_steps=100)
    run(sched, [5.0, 4.0, 3.9, 3.8], mode)
    before = sched.stats()
    lr_before = sched.get_last_lr()
    run(sched, [float("nan"), float("inf"), float("-inf")], mode)
    after = sched.stats()
    assert after.pop("nonfinite") == before.pop("nonfinite") + 3
    assert after == before and sched.get_last_lr() == lr_before


@pytest.mark.parametrize("mode", ["device", "host"])
def test_linear_warmup_then_detection(mode):
    W = 10
    _, _, sched = make(total_steps=100, warmup_steps=W)  # T = 5
    assert sched.get_last_lr()[0] == pytest.approx(BASE_LR / W, rel=1e-6)  # the first step runs at lr/W
    lrs = run(sched, [2.0] * 60, mode)
    for t in range(W - 1):
        assert lrs[t] == pytest.approx(BASE_LR * (t + 2) / W, rel=1e-6)
    assert lrs[W - 2] == pytest.approx(BASE_LR, rel=1e-6)
    # No counting during warmup; decisions start with loss L_W, so the first halving is at L_{W+T}.
    assert drops(lrs)[W - 1:] == [W + 5, W + 11, W + 17, W + 23, W + 29, W + 35, W + 41, W + 47]


def _snapshot(model, opt, sched):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _train(model, opt, sched, losses_for_sched, xs, mode):
    """Real optimiser steps; the scheduler sees the given loss stream (so decisions happen)."""
    lrs = []
    for x, L in zip(xs, losses_for_sched):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step(as_loss(L, mode))
        lrs.append(sched.get_last_lr())
    return lrs


@pytest.mark.parametrize("mode", ["device", "host"])
def test_state_dict_round_trip_mid_run_continues_identically(mode):
    # (CPU fused SGD costs ~2 ms a step here, so the run is short and T small: T = 5.)
    losses = loss_stream(400, 8)
    xs = torch.randn(400, 4, 6, generator=torch.Generator().manual_seed(3))
    kw = dict(total_steps=100, groups=(0.02, 0.01), alpha=0.05, beta=0.05, lambd=1e-3, delta=1.5, max_halvings=1000)
    model, opt, sched = make(**kw)
    _train(model, opt, sched, losses[:200], xs[:200], mode)
    snap = _snapshot(model, opt, sched)
    if mode == "device":
        assert snap["sched"]["on_device"] and isinstance(snap["sched"]["state"], torch.Tensor)
    halvings_at_snapshot = sched.stats()["halvings"]
    rest = _train(model, opt, sched, losses[200:], xs[200:], mode)

    model2, opt2, sched2 = make(**{**kw, "delta": 3.0})  # hyperparameters come back from the state_dict
    model2.load_state_dict(snap["model"])
    opt2.load_state_dict(snap["opt"])
    sched2.load_state_dict(snap["sched"])
    assert sched2.delta == 1.5
    rest2 = _train(model2, opt2, sched2, losses[200:], xs[200:], mode)
    assert rest2 == rest
    assert sched2.stats() == sched.stats()
    assert sched.stats()["halvings"] >= halvings_at_snapshot + 2  # decisions after the resume point were tested
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    if mode == "device":  # the optimiser reads its LR from the scheduler's tensor again
        assert all(g["lr"]._base is sched2.lr_tensor() for g in opt2.param_groups)


def test_the_optimiser_uses_the_scheduled_lr():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=0.5, fused=True)
    sched = FastFaceScheduler(opt, total_steps=20)  # T = 1: halves every 2 steps on a flat loss
    for _ in range(5):  # losses L_0..L_4: halvings at L_2 and L_4
        opt.zero_grad()
        w.sum().backward()
        opt.step()
        sched.step(torch.tensor(1.0))
    lr_now = sched.get_last_lr()[0]
    assert lr_now == 0.125
    before = w.detach().clone()
    opt.zero_grad()
    w.sum().backward()
    opt.step()
    assert torch.equal(w.detach(), before - lr_now)  # grad is 1: the step moved by exactly the lr


class _HostReadCounter(TorchDispatchMode):
    """Counts aten::_local_scalar_dense: every tensor-to-host scalar read (item, float(), Scalar args)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


class _MethodCounter:
    """Patches the Python-level host-read methods of torch.Tensor and counts calls."""

    NAMES = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")

    def __enter__(self):
        self.calls: dict[str, int] = {}
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for n, f in self.saved.items():
            def wrapper(*a, _n=n, _f=f, **k):
                self.calls[_n] = self.calls.get(_n, 0) + 1
                return _f(*a, **k)
            setattr(torch.Tensor, n, wrapper)
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def _train_steps(model, opt, sched, n, loss_fn):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        x = torch.randn(8, 6, generator=g)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step(loss_fn(loss))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_training_step_never_reads_the_host(backend):
    model, opt, sched = make(total_steps=20)
    with use_backend(backend):
        _train_steps(model, opt, sched, 1, lambda loss: loss)  # binds the state to the device
    assert sched.backend == backend
    with _MethodCounter() as methods, _HostReadCounter() as reads:
        _train_steps(model, opt, sched, 30, lambda loss: loss)
    assert methods.calls == {} and reads.reads == 0
    assert sched.stats()["accepted"] == 31  # ... and the scheduler did run every step
    assert all(g["lr"]._base is sched.lr_tensor() for g in opt.param_groups)


def test_host_read_counters_do_catch_reads():
    # The instruments above must see a read when there is one, else the test proves nothing.
    model, opt, sched = make(total_steps=20)
    with _MethodCounter() as methods, _HostReadCounter() as reads:
        _train_steps(model, opt, sched, 3, lambda loss: loss.item())  # host mode: one .item() a step
    assert methods.calls.get("item") == 3 and reads.reads >= 3
    # A non-fused SGD turns the tensor lr into a Python scalar in C++: invisible to the method
    # patch, caught by the dispatch counter; the scheduler warns about it.
    model, opt, sched = make(total_steps=20, fused=False)
    with pytest.warns(UserWarning, match="fused=True"):
        _train_steps(model, opt, sched, 1, lambda loss: loss)
    with _HostReadCounter() as reads:
        _train_steps(model, opt, sched, 3, lambda loss: loss)
    assert reads.reads >= 3


def test_optimizer_load_state_dict_is_rebound():
    model, opt, sched = make(total_steps=20)
    run(sched, [1.0] * 5, "device")
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # replaces the group lr tensors
    assert not any(g["lr"]._base is sched.lr_tensor() for g in opt.param_groups)
    run(sched, [1.0], "device")
    assert all(g["lr"]._base is sched.lr_tensor() for g in opt.param_groups)


def test_float_losses_after_tensor_ones_stay_on_device():
    _, _, sched = make(total_steps=100)
    ref = make(total_steps=100)[2]
    run(sched, [2.0, 1.5], "device")
    run(sched, [1.4, 1.3], "host")  # a float into a device-mode scheduler is filled on the device
    run(ref, [2.0, 1.5, 1.4, 1.3], "host")
    assert sched.state_tensor() is not None and sched.stats() == ref.stats()


def test_errors_name_the_problem():
    _, opt, sched = make()
    opt._opt_called = True
    with pytest.raises(TypeError, match="batch loss is required"):
        sched.step()
    with pytest.raises(ValueError, match="one value"):
        sched.step(torch.ones(3))
    with pytest.raises(ValueError, match="alpha must be in"):
        FastFaceScheduler(opt, 100, alpha=0.0)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        FastFaceScheduler(opt, 0)
    bad = sched.state_dict()
    bad["state"] = torch.zeros(3)
    with pytest.raises(ValueError, match="'state' must be a float64 tensor of 8"):
        sched.load_state_dict(bad)


def test_step_before_optimizer_step_warns():
    _, _, sched = make()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sched.step(torch.tensor(1.0))
    assert any("before optimizer.step()" in str(x.message) for x in w)


def test_get_last_lr_is_lazy_floats():
    _, _, sched = make(groups=(0.02, 0.01))
    run(sched, [1.0, 0.9], "device")
    lrs = sched.get_last_lr()
    assert all(isinstance(x, float) for x in lrs) and len(lrs) == 2
    assert sched.lr_tensor().dtype == torch.float32 and not math.isnan(lrs[0])


def test_rescale_to_run_keeps_time_scales_a_fraction_of_the_run():
    assert rescale_to_run(1e-3, 2e-3, 5e-5, 25_000, 25_000) == (1e-3, 2e-3, 5e-5)
    a, b, lam = rescale_to_run(1e-3, 2e-3, 5e-5, 250, 25_000)
    assert (a, b, lam) == pytest.approx((0.1, 0.2, 5e-3))
    assert rescale_to_run(0.5, 1e-3, 5e-5, 10, 25_000)[0] == 1.0  # an EMA weight cannot pass 1
    with pytest.raises(ValueError, match="must be >= 1"):
        rescale_to_run(1e-3, 1e-3, 5e-5, 0, 25_000)
    from fastface.train.config import SchedConfig
    from fastface.train.schedules import build_scheduler

    _, opt, _ = make()
    sched = build_scheduler(SchedConfig(reference_steps=25_000), opt, total_steps=500)
    assert (sched.alpha, sched.beta, sched.lambd) == pytest.approx((0.05, 0.05, 2.5e-3))
    assert sched.patience == 25  # tau is already a fraction of the run
