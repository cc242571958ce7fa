"""1x1 conv training on the CPU: fastface.ops.conv1x1 vs ATen (oneDNN), side by side.

The maps are the face model's 1x1 convs (batch 64, channels_last, fp32), named Cin->Cout@H, with how
many times each occurs in the network (the expand convs at 56 x 56 and 28 x 28 run inside
ExpandDwConvFunction, whose backward takes conv1x1_backward with its BN correction folded in; the
rest are projections). Providers, forward and backward timed apart:

- aten      F.conv2d / torch.ops.aten.convolution_backward (grad_x + grad_weight): the plain modules
- fastface  torch.ops.fastface.conv1x1_forward / conv1x1_backward (both gradients from one pass over
            grad_out)
- gemm      fastface.ops.conv1x1.conv1x1_gemm_forward / conv1x1_gemm_backward (torch.mm over the
            channels_last pixel rows: MKL's sgemm)

`routed` is what the model runs: each map's forward and backward on the route fastface.ops.conv1x1.conv1x1_routes
picks (fastface where conv1x1_forward_pays / conv1x1_backward_pays: forward on maps of at least 28 x 28 with
one side of at most 32 channels and on the expanding convs below 28 x 28, backward on maps of at least
14 x 14 with one side of at most 32 channels; else gemm below 28 x 28; else aten). Each round runs every provider once per map, round-robin, inside
fastface.ops.cpu_cache (as the trainer runs); a time is the median over ROUNDS rounds; totals weigh
each map by its count in the network. Results: bench/results/conv1x1_cpu.json.

    pytest bench/test_bench_conv1x1.py --benchmark-only -q -s
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from _results import save_result

from fastface.ops.conv1x1 import conv1x1_gemm_backward, conv1x1_gemm_forward

THREADS = int(os.environ.get("BENCH_THREADS", 2))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 15))
# (Cin, Cout, H, layers of the face model with it)
LAYERS = [(32, 16, 56, 1), (16, 96, 56, 1), (96, 24, 28, 1), (24, 144, 28, 2), (144, 24, 28, 1), (144, 32, 14, 1),
          (32, 192, 14, 3), (192, 32, 14, 2), (192, 64, 7, 1), (64, 384, 7, 4), (384, 64, 7, 3), (384, 96, 7, 1),
          (96, 576, 7, 3), (576, 96, 7, 2), (576, 160, 4, 1), (160, 960, 4, 3), (960, 160, 4, 2), (960, 320, 4, 1),
          (320, 1280, 4, 1)]


def _inputs(cin, cout, h):
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(64, cin, h, h, generator=g).contiguous(memory_format=cl)
    w = torch.randn(cout, cin, 1, 1, generator=g) / cin ** 0.5
    gz = torch.randn(64, cout, h, h, generator=g).contiguous(memory_format=cl)
    return gz, x, w


PROVIDERS = {
    "aten_forward": lambda gz, x, w: F.conv2d(x, w),
    "fastface_forward": lambda gz, x, w: torch.ops.fastface.conv1x1_forward(x, w),
    "aten_backward": lambda gz, x, w: torch.ops.aten.convolution_backward(
        gz, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False]),
    "fastface_backward": lambda gz, x, w: torch.ops.fastface.conv1x1_backward(gz, x, w, None, None, [True, True]),
    "gemm_forward": lambda gz, x, w: conv1x1_gemm_forward(x, w),
    "gemm_backward": lambda gz, x, w: conv1x1_gemm_backward(gz, x, w),
}


def test_conv1x1(benchmark):
    """Median ms per forward and per backward of each provider per map; speed-ups; network totals."""
    from fastface._ext import HAS_EXT

    if not HAS_EXT:
        pytest.skip("fastface._C not built")
    from fastface.ops import cpu_cache
    from fastface.ops.conv1x1 import conv1x1_routes

    torch.set_num_threads(THREADS)
    maps = {f"{ci}->{co}@{h}": (_inputs(ci, co, h), n) for ci, co, h, n in LAYERS}
    times = {m: {p: [] for p in PROVIDERS} for m in maps}

    def one_round() -> None:
        for m, (args, _) in maps.items():
            for p, fn in PROVIDERS.items():
                t0 = time.perf_counter()
                fn(*args)
                times[m][p].append(time.perf_counter() - t0)

    with cpu_cache():
        for args, _ in maps.values():  # warm-up: oneDNN primitives, the cache's blocks
            for fn in PROVIDERS.values():
                fn(*args)
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    ms = {m: {p: statistics.median(v) * 1e3 for p, v in d.items()} for m, d in times.items()}
    speedup = {m: {f"{p}_{k}": d[f"aten_{k}"] / d[f"{p}_{k}"] for p in ("fastface", "gemm")
                   for k in ("forward", "backward")} for m, d in ms.items()}
    routed = {m: dict(zip(("forward", "backward"), conv1x1_routes(args[1], args[2].shape[0])))
              for m, (args, _) in maps.items()}
    total = {p: sum(ms[m][p] * n for m, (_, n) in maps.items()) for p in PROVIDERS}
    routed_ms = sum(sum(ms[m][f"{routed[m][k]}_{k}"] for k in ("forward", "backward")) * n
                    for m, (_, n) in maps.items())
    aten_ms = total["aten_forward"] + total["aten_backward"]
    path = save_result("conv1x1_cpu.json", {
        "rounds": ROUNDS,
        "what": "median ms per 1x1 conv forward and backward (grad_x + grad_weight), batch 64, channels_last fp32; "
                "speedup = aten / provider; totals over the face model's layers (ms per training step); routed: "
                "the route conv1x1_routes picks for each map (fastface, gemm or aten)",
        "ms": ms, "speedup": speedup, "routes": routed, "total_ms": total,
        "total_aten_ms": aten_ms, "total_routed_ms": routed_ms, "total_routed_speedup": aten_ms / routed_ms})
    print(f"\n1x1 conv, median ms over {ROUNDS} rounds (forward | backward):")
    for m, d in ms.items():
        print(f"  {m:<13} aten {d['aten_forward']:6.2f} | {d['aten_backward']:6.2f}   fastface "
              f"{d['fastface_forward']:6.2f} | {d['fastface_backward']:6.2f}   gemm {d['gemm_forward']:6.2f} | "
              f"{d['gemm_backward']:6.2f}   routed: {routed[m]['forward']} | {routed[m]['backward']}")
    print(f"  network: aten {aten_ms:.1f} ms, routed {routed_ms:.1f} ms (x{aten_ms / routed_ms:.2f})")
    print(f"  saved {path}")
