"""Per-step overhead of the FastFace scheduler forms at growing history lengths.

Forms: the fused op (C++ on CPU here; the CUDA kernel on a GPU), FastFaceScheduler.step on a
tensor (the op plus the Python around it), the plain-Python float recurrence, and the paper's
naive O(m) moving-window Haar detector with its window m equal to the history length. Each O(1)
form really runs through the whole history (one stream, advanced from 10^3 to 10^6 steps); the
naive detector's window is filled directly, since stepping it 10^6 times would cost O(m^2).

Run: pytest bench/test_bench_sched.py --benchmark-only   (ratios printed, JSON in bench/results/)
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastface._ext import has_op
from fastface.ops.sched import SchedParams, fresh_state
from fastface.sched import FastFaceScheduler, NaiveHaarDetector, python_update

HISTORY = [10**3, 10**4, 10**5, 10**6]
FORMS = ["op", "scheduler_tensor", "python_float", "naive_window"]
RESULTS_DIR = Path(__file__).parent / "results"
PARAMS = SchedParams.from_hparams(1e-3, 1e-3, 5e-5, 500, 2.0, 8, 0)
_N = HISTORY[-1] + 200_000
_LOSSES = (10.0 * np.exp(-np.arange(_N) / 2e5) + np.random.default_rng(0).normal(0, 0.05, _N)).astype(np.float32)
_RESULTS: dict[str, dict[int, float]] = {f: {} for f in FORMS}


class _Stream:
    """One O(1) form, advanced step by step through the shared loss stream."""

    def __init__(self, form: str):
        self.form, self.pos = form, 0
        self.losses_t = torch.from_numpy(_LOSSES)
        self.losses_f = _LOSSES.astype(np.float64).tolist()
        if form == "op":
            self.state = torch.tensor(fresh_state(), dtype=torch.float64)
            self.lrs = torch.zeros(2, dtype=torch.float32)
            self.base = torch.tensor([0.02, 0.01], dtype=torch.float64)
            self.args = PARAMS.args()
        elif form == "scheduler_tensor":
            params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
            opt = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.01}], lr=0.02, fused=True)
            opt._opt_called = True
            self.sched = FastFaceScheduler(opt, total_steps=10_000)
        else:
            self.state_f = fresh_state()

    def run(self, n: int) -> None:
        """n more scheduler steps."""
        i0, i1 = self.pos, self.pos + n
        if self.form == "op":
            f, st, lrs, base, args, lt = (torch.ops.fastface.fastface_sched_step.default, self.state, self.lrs, self.base,
                                          self.args, self.losses_t)
            for i in range(i0, i1):
                f(st, lrs, lt[i], base, *args)
        elif self.form == "scheduler_tensor":
            step, lt = self.sched.step, self.losses_t
            for i in range(i0, i1):
                step(lt[i])
        else:
            st, lf = self.state_f, self.losses_f
            for i in range(i0, i1):
                python_update(st, lf[i], PARAMS)
        self.pos = i1


_streams: dict[str, _Stream] = {}


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    rows = {f: {str(h): _RESULTS[f][h] * 1e6 for h in HISTORY if h in _RESULTS[f]} for f in FORMS}
    if not any(rows.values()):
        return
    ratios = {}
    for h in HISTORY:
        naive, op, py = _RESULTS["naive_window"].get(h), _RESULTS["op"].get(h), _RESULTS["python_float"].get(h)
        if naive and op:
            ratios[f"naive/op@{h}"] = naive / op
        if naive and py:
            ratios[f"naive/python@{h}"] = naive / py
    for f in ("op", "scheduler_tensor", "python_float", "naive_window"):
        r = _RESULTS[f]
        if HISTORY[0] in r and HISTORY[-1] in r:
            ratios[f"{f}: 1e6/1e3"] = r[HISTORY[-1]] / r[HISTORY[0]]
    out = {
        "what": "per-step scheduler overhead, microseconds (median over rounds)",
        "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "per_step_us": rows, "ratios": ratios,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "sched_overhead.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, path)
    lines = ["", "FastFace scheduler, per-step overhead (us):",
             f"{'form':<18}" + "".join(f"{h:>12}" for h in HISTORY)]
    for f in FORMS:
        lines.append(f"{f:<18}" + "".join(f"{rows[f].get(str(h), float('nan')):>12.2f}" for h in HISTORY))
    lines += [f"  {k}: {v:.2f}" for k, v in ratios.items()] + [f"  saved {path}"]
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():  # shown even without -s
        print("\n".join(lines), flush=True)


def _record(benchmark, form: str, h: int, steps_per_round: int) -> None:
    if benchmark.stats is not None:  # None under --benchmark-disable
        _RESULTS[form][h] = benchmark.stats.stats.median / steps_per_round


@pytest.mark.parametrize("h", HISTORY)
@pytest.mark.parametrize("form", ["op", "scheduler_tensor", "python_float"])
def test_o1_step_overhead(benchmark, form, h):
    if form != "python_float" and not has_op("fastface_sched_step"):
        pytest.skip("fastface._C without fastface_sched_step")
    stream = _streams.setdefault(form, _Stream(form))
    if stream.pos < h:
        stream.run(h - stream.pos)  # the history: every step really taken
    k = 1000
    benchmark.pedantic(stream.run, args=(k,), rounds=15, iterations=1, warmup_rounds=1)
    _record(benchmark, form, h, k)


@pytest.mark.parametrize("h", HISTORY)
def test_naive_window_step_overhead(benchmark, h):
    det = NaiveHaarDetector(m=h, patience=500)
    det._buf[:] = _LOSSES[:h]  # a full window of h losses, as if h steps had been taken
    det._seen = h
    losses = _LOSSES[h: h + 10_000].astype(np.float64).tolist()
    k = max(5, min(1000, 10**7 // (h * 10)))
    it = iter(losses)

    def run():
        for _ in range(k):
            det.step(next(it))

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    _record(benchmark, "naive_window", h, k)
