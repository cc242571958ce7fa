"""The split model's two stems in training on the CPU: fastface.ops.stems_bn_add_act vs the ATen paths, forward +
backward, side by side.

The face model's stems at batch 64 (split 1, add merge): an NCHW 4 x 112 x 112 batch, RGB (3 channels) and depth
(1 channel) each through a 3x3 stride-2 conv to 32 channels (channels_last weights, as the trainer's model) and a
training BN, summed, ReLU6. Providers, each forward then backward from a fixed gradient (the weights' and BN
parameters' gradients; the batch needs none):

- aten      the plain modules: channel split, F.conv2d, F.batch_norm, add, F.hardtanh(0, 6), autograd backward
- bn_add_act    the trainer's path before stems_bn_add_act: the split copied to channels_last per branch,
                oneDNN's convs, fastface.ops.bn_add_act (both BNs + add + ReLU6 in one op), autograd backward
- fastface  torch.ops.fastface.stems_bn_add_act and its backward (the convs recomputed, never stored)

Each round runs every provider once, round-robin, inside fastface.ops.cpu_cache (as the trainer runs); a time is
the median over ROUNDS rounds. In a training step the inputs come from memory rather than the last-level cache,
and the gains there are smaller (bench/test_bench_train.py measures the step). Results:
bench/results/stems_cpu.json.

    pytest bench/test_bench_stems.py --benchmark-only -q -s
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
BATCH = int(os.environ.get("BENCH_BATCH", 64))
EPS = 1e-5


def _inputs():
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(BATCH, 4, 112, 112, generator=g)
    w_a = (torch.randn(32, 3, 3, 3, generator=g) * 0.3).contiguous(memory_format=cl)
    w_b = (torch.randn(32, 1, 3, 3, generator=g) * 0.3).contiguous(memory_format=cl)
    bn = [torch.rand(32, generator=g) + 0.5, torch.randn(32, generator=g) * 0.1,
          torch.rand(32, generator=g) + 0.5, torch.randn(32, generator=g) * 0.1]
    gy = torch.randn(BATCH, 32, 56, 56, generator=g).contiguous(memory_format=cl)
    return x, (w_a, bn[0], bn[1], w_b, bn[2], bn[3]), gy


def _aten(x, params, gy):
    w_a, g_a, b_a, w_b, g_b, b_b = ps = [t.detach().requires_grad_() for t in params]
    z_a, z_b = F.conv2d(x[:, :3], w_a, None, 2, 1), F.conv2d(x[:, 3:], w_b, None, 2, 1)
    y = F.batch_norm(z_a, None, None, g_a, b_a, True, 0.0, EPS) + F.batch_norm(z_b, None, None, g_b, b_b, True, 0.0,
                                                                                 EPS)
    torch.autograd.grad(F.hardtanh(y, 0.0, 6.0), ps, gy)


def _bn_add_act(x, params, gy):
    from fastface.ops import bn_add_act

    w_a, g_a, b_a, w_b, g_b, b_b = ps = [t.detach().requires_grad_() for t in params]
    x_a, x_b = (t.contiguous(memory_format=torch.channels_last) for t in torch.split(x, [3, 1], 1))
    z_a, z_b = F.conv2d(x_a, w_a, None, 2, 1), F.conv2d(x_b, w_b, None, 2, 1)
    y = bn_add_act(z_b, g_b, b_b, z_a, g_a, b_a, EPS, True)[0]
    torch.autograd.grad(y, ps, gy)


def _fastface(x, params, gy):
    f = torch.ops.fastface
    _, m_a, i_a, m_b, i_b = f.stems_bn_add_act(x, *params, 2, EPS, True)
    f.stems_bn_add_act_backward(gy, x, *params[:3], m_a, i_a, *params[3:], m_b, i_b, 2, True)


PROVIDERS = {"aten": _aten, "bn_add_act": _bn_add_act, "fastface": _fastface}


@pytest.fixture(scope="module")
def threads():
    from fastface._ext import HAS_EXT

    if not HAS_EXT:
        pytest.skip("fastface._C not built")
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(old)


def test_stems_forward_backward(benchmark, threads):
    """Median ms per forward + backward of the two stems + BNs + add + ReLU6, per provider; ratios to fastface.
    Results: bench/results/stems_cpu.json."""
    from fastface.ops import cpu_cache

    x, params, gy = _inputs()
    times = {p: [] for p in PROVIDERS}

    def one_round() -> None:
        for p, fn in PROVIDERS.items():
            t0 = time.perf_counter()
            fn(x, params, gy)
            times[p].append(time.perf_counter() - t0)

    with cpu_cache():
        for fn in PROVIDERS.values():
            fn(x, params, gy)
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    ms = {p: statistics.median(v) * 1e3 for p, v in times.items()}
    speedup = {"fastface_vs_bn_add_act": ms["bn_add_act"] / ms["fastface"],
               "fastface_vs_aten": ms["aten"] / ms["fastface"]}
    benchmark.extra_info.update({"ms": ms, "speedup": speedup})
    path = save_result("stems_cpu.json", {
        "what": f"median ms per forward + backward of the face model's two stems (NCHW {BATCH}x4x112x112 batch, 3x3 "
                "stride-2 convs to 32 channels, training BNs, add, ReLU6; gradients of the weights and BN parameters), "
                "fp32", "ms": ms, "speedup": speedup, "rounds": ROUNDS})
    print(f"\nstems forward + backward, median ms over {ROUNDS} rounds, {torch.get_num_threads()} threads: "
          f"aten {ms['aten']:.2f}, convs + bn_add_act {ms['bn_add_act']:.2f}, stems_bn_add_act {ms['fastface']:.2f} "
          f"(x{speedup['fastface_vs_bn_add_act']:.2f} convs + bn_add_act, x{speedup['fastface_vs_aten']:.2f} aten)")
    print(f"  saved {path}")
