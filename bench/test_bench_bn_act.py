"""Training BN + ReLU6 on the CPU: fastface.ops.bn_act vs ATen, forward + backward, side by side.

The maps are the face model's (batch 64, channels_last, fp32): the largest (26-77 MB, where
bn_act streams its outputs and prefetches) and two that fit the last-level cache. Providers:

- aten      F.batch_norm (training) -> F.hardtanh(0, 6), autograd backward: what the plain modules run
- fastface  torch.ops.fastface.bn_act and bn_act_backward (the trainer's eager CPU path)

Each round runs every provider once per map (forward, then backward from a fixed gradient),
round-robin, inside fastface.ops.cpu_cache (as the trainer runs, so neither pays page faults);
a time is the median over ROUNDS rounds. Results: bench/results/bn_act_cpu.json.

test_bn_add_act_forward_backward: the split stems' add merge, relu6(BN(z1) + BN(z2)), on the stem maps:
ATen's modules, two chained bn_act calls, fastface.ops.bn_add_act (bench/results/bn_add_act_cpu.json).

    pytest bench/test_bench_bn_act.py --benchmark-only -q -s
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from _results import save_result

THREADS = int(os.environ.get("BENCH_THREADS", 2))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 15))
SHAPES = [(64, 96, 56, 56), (64, 144, 28, 28), (64, 32, 56, 56), (64, 192, 14, 14), (64, 576, 7, 7)]
EPS = 1e-5


def _inputs(shape):
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(shape, generator=g).contiguous(memory_format=cl) * 2 + 1
    gamma, beta = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g) * 0.1
    gy = torch.randn(shape, generator=g).contiguous(memory_format=cl)
    return x, gamma, beta, gy


def _aten(x, gamma, beta, gy):
    xr, gr, br = (t.detach().requires_grad_() for t in (x, gamma, beta))
    y = F.hardtanh(F.batch_norm(xr, None, None, gr, br, True, 0.0, EPS), 0.0, 6.0)
    torch.autograd.grad(y, (xr, gr, br), gy)


def _fastface(x, gamma, beta, gy):
    _, mean, invstd = torch.ops.fastface.bn_act(x, gamma, beta, None, EPS, True)
    torch.ops.fastface.bn_act_backward(gy, x, gamma, beta, mean, invstd, None, True)


PROVIDERS = {"aten": _aten, "fastface": _fastface}


@pytest.fixture(scope="module")
def maps():
    from fastface._ext import HAS_EXT

    if not HAS_EXT:
        pytest.skip("fastface._C not built")
    torch.set_num_threads(THREADS)
    return {"x".join(map(str, s)): _inputs(s) for s in SHAPES}


def test_bn_act_forward_backward(benchmark, maps):
    """Median ms per forward + backward of each provider per map; fastface's speed-up over ATen."""
    from fastface.ops import cpu_cache

    times = {m: {p: [] for p in PROVIDERS} for m in maps}

    def one_round() -> None:
        for m, args in maps.items():
            for p, fn in PROVIDERS.items():
                t0 = time.perf_counter()
                fn(*args)
                times[m][p].append(time.perf_counter() - t0)

    with cpu_cache():
        for args in maps.values():  # warm-up: oneDNN primitives, the cache's blocks
            for fn in PROVIDERS.values():
                fn(*args)
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    ms = {m: {p: statistics.median(v) * 1e3 for p, v in d.items()} for m, d in times.items()}
    speedup = {m: d["aten"] / d["fastface"] for m, d in ms.items()}
    path = save_result("bn_act_cpu.json", {
        "what": "median ms per training BN + ReLU6 forward + backward, channels_last fp32; speedup = aten / fastface",
        "rounds": ROUNDS, "ms": ms, "speedup": speedup})
    print(f"\nBN + ReLU6 forward + backward, median ms over {ROUNDS} rounds, {torch.get_num_threads()} threads:")
    for m, d in ms.items():
        print(f"  {m:<16} aten {d['aten']:8.2f}   fastface {d['fastface']:8.2f}   x{speedup[m]:.2f}")
    print(f"  saved {path}")


# ---- the split stems' add merge: act(BN_1(z_1) + BN_2(z_2)) -------------------------------------

STEM = (64, 32, 56, 56)  # the face model's stems (split 1, add merge)


def _merge_aten(z1, z2, g1, b1, g2, b2, gy):
    ins = [t.detach().requires_grad_() for t in (z1, z2, g1, b1, g2, b2)]
    y = F.batch_norm(ins[0], None, None, ins[2], ins[3], True, 0.0, EPS)
    y = F.hardtanh(y + F.batch_norm(ins[1], None, None, ins[4], ins[5], True, 0.0, EPS), 0.0, 6.0)
    torch.autograd.grad(y, ins, gy)


def _merge_chain(z1, z2, g1, b1, g2, b2, gy):
    f = torch.ops.fastface
    y1, m1, i1 = f.bn_act(z1, g1, b1, None, EPS, False)
    _, m2, i2 = f.bn_act(z2, g2, b2, y1, EPS, True)
    _, _, _, g = f.bn_act_backward(gy, z2, g2, b2, m2, i2, y1, True)
    f.bn_act_backward(g, z1, g1, b1, m1, i1, None, False)


def _merge_fastface(z1, z2, g1, b1, g2, b2, gy):
    f = torch.ops.fastface
    _, m2, i2, m1, i1 = f.bn_add_act(z2, g2, b2, z1, g1, b1, EPS, True)
    f.bn_add_act_backward(gy, z2, g2, b2, m2, i2, z1, g1, b1, m1, i1, True)


MERGE_PROVIDERS = {"aten": _merge_aten, "chain": _merge_chain, "fastface": _merge_fastface}


def test_bn_add_act_forward_backward(benchmark, maps):
    """Median ms per forward + backward of the stems' merge: ATen's modules, two chained bn_act calls (the
    trainer's path before bn_add_act), bn_add_act. Results: bench/results/bn_add_act_cpu.json."""
    from fastface.ops import cpu_cache

    z1, g1, b1, gy = _inputs(STEM)
    g = torch.Generator().manual_seed(1)
    z2 = (torch.randn(STEM, generator=g) * 0.5 - 2).contiguous(memory_format=torch.channels_last)
    g2, b2 = torch.rand(STEM[1], generator=g) + 0.5, torch.randn(STEM[1], generator=g) * 0.1
    args = (z1, z2, g1, b1, g2, b2, gy)
    times = {p: [] for p in MERGE_PROVIDERS}

    def one_round() -> None:
        for p, fn in MERGE_PROVIDERS.items():
            t0 = time.perf_counter()
            fn(*args)
            times[p].append(time.perf_counter() - t0)

    with cpu_cache():
        for fn in MERGE_PROVIDERS.values():
            fn(*args)
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    ms = {p: statistics.median(v) * 1e3 for p, v in times.items()}
    speedup = {"fastface_vs_chain": ms["chain"] / ms["fastface"], "fastface_vs_aten": ms["aten"] / ms["fastface"]}
    path = save_result("bn_add_act_cpu.json", {
        "what": f"median ms per forward + backward of relu6(BN(z1) + BN(z2)) on two {'x'.join(map(str, STEM))} "
                "channels_last fp32 maps", "ms": ms, "speedup": speedup, "rounds": ROUNDS}, env="BENCH_OUT_MERGE")
    print(f"\nstems' add merge forward + backward, median ms over {ROUNDS} rounds, {torch.get_num_threads()} threads: "
          f"aten {ms['aten']:.2f}, chained bn_act {ms['chain']:.2f}, bn_add_act {ms['fastface']:.2f} "
          f"(x{speedup['fastface_vs_chain']:.2f} the chain, x{speedup['fastface_vs_aten']:.2f} aten)")
    print(f"  saved {path}")
