"""Depthwise 3 x 3 conv training on the CPU: fastface.ops.dwconv_train vs ATen (oneDNN), side by side.

The maps are the face model's depthwise layers (batch 64, channels_last, fp32), named by input
shape and stride, with how many times each occurs in the network. Two tests:

test_dwconv_backward: a depthwise conv's backward (grad_x and grad_weight).
- aten      torch.ops.aten.convolution_backward: what the plain modules run
- fastface  torch.ops.fastface.dwconv_backward: both gradients from one pass over grad_out and x
`routed` is what DwConvFunction runs (fastface where dwconv_backward_pays, else aten).

test_bn_act_dwconv: an inverted-residual block's expand BN (batch statistics) + ReLU6 + depthwise
conv, forward and backward (the layers with an expand conv before them):
- aten      F.batch_norm -> F.hardtanh(0, 6) -> F.conv2d by autograd: the plain modules
- bn_act    fastface.ops.bn_act + oneDNN's conv, backward oneDNN + bn_act_backward (the trainer's
            path before the activation was folded into the conv)
- fastface  BNActDwConvFunction: bn_stats, dwconv_forward with the BN + ReLU6 prologue (the
            activation never written), dwconv_backward with the BN sums, bn_act_backward_sums

test_expand_dwconv: the same layers with their 1x1 expand conv in front (x -> conv -> BN -> ReLU6 ->
depthwise conv), forward and backward w.r.t. x and every weight:
- conv_fastface   oneDNN's 1x1 conv, then BNActDwConvFunction (the path above)
- expand_dwconv   ExpandDwConvFunction: the BN's statistics from x's moments (channel_moments) and
                  its backward folded into the 1x1 conv's (grouped_linear_sub): no pass over e for
                  either
`routed` is the model's choice per map (expand_dwconv where expand_dwconv_pays).

test_dw_bn_act: the same layers' depthwise conv with the BN + ReLU6 after it (expand BN + ReLU6 ->
depthwise conv -> BN + ReLU6), forward and backward w.r.t. e and every weight:
- bn_act     BNActDwConvFunction, then bn_act (statistics pass + normalise pass over z)
- fastface   DwBNActFunction: the conv reduces z's statistics as it writes z (dwconv_forward_stats),
             then bn_act_apply (one pass over z)

Each round runs every provider once per map, round-robin, inside fastface.ops.cpu_cache (as the
trainer runs, so none pays page faults); a time is the median over ROUNDS rounds; totals weigh
each map by its count in the network. Results: bench/results/dwconv_train_cpu.json.

    pytest bench/test_bench_dwconv_train.py --benchmark-only -q -s
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
# (input shape, stride, layers of the face model with it, whether an expand conv precedes it: a block's
# expand BN + ReLU6 folds into it)
LAYERS = [((64, 32, 56, 56), 1, 2, False), ((64, 96, 56, 56), 2, 1, True), ((64, 144, 28, 28), 1, 1, True),
          ((64, 144, 28, 28), 2, 1, True), ((64, 192, 14, 14), 1, 2, True), ((64, 192, 14, 14), 2, 1, True),
          ((64, 384, 7, 7), 1, 4, True), ((64, 576, 7, 7), 1, 2, True), ((64, 576, 7, 7), 2, 1, True),
          ((64, 960, 4, 4), 1, 3, True)]


def _inputs(shape, stride):
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(shape, generator=g).contiguous(memory_format=cl)
    w = torch.randn(shape[1], 1, 3, 3, generator=g)
    gy = torch.randn_like(F.conv2d(x, w, None, stride, 1, 1, shape[1])).contiguous(memory_format=cl)
    return gy, x, w, stride


def _aten(gy, x, w, s):
    torch.ops.aten.convolution_backward(gy, x, w, None, [s, s], [1, 1], [1, 1], False, [0, 0], x.shape[1],
                                        [True, True, False])


def _fastface(gy, x, w, s):
    torch.ops.fastface.dwconv_backward(gy, x, w, s, 1)


PROVIDERS = {"aten": _aten, "fastface": _fastface}
EPS = 1e-5


def _pair_inputs(shape, stride):
    gy, x, w, s = _inputs(shape, stride)
    g = torch.Generator().manual_seed(1)
    e = x * 2 + 0.5
    return gy, e, w, s, torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g) * 0.5


def _pair_aten(gy, e, w, s, gamma, beta):
    ins = [t.detach().requires_grad_() for t in (e, gamma, beta, w)]
    a = F.hardtanh(F.batch_norm(ins[0], None, None, ins[1], ins[2], True, 0.0, EPS), 0.0, 6.0)
    torch.autograd.grad(F.conv2d(a, ins[3], None, s, 1, 1, e.shape[1]), ins, gy)


def _pair_bn_act(gy, e, w, s, gamma, beta):
    a, mean, invstd = torch.ops.fastface.bn_act(e, gamma, beta, None, EPS, True)
    F.conv2d(a, w, None, s, 1, 1, e.shape[1])
    ga, _, _ = torch.ops.aten.convolution_backward(gy, a, w, None, [s, s], [1, 1], [1, 1], False, [0, 0], e.shape[1],
                                                   [True, True, False])
    torch.ops.fastface.bn_act_backward(ga, e, gamma, beta, mean, invstd, None, True)


def _pair_fastface(gy, e, w, s, gamma, beta):
    from fastface.ops.dwconv_train import BNActDwConvFunction

    ins = [t.detach().requires_grad_() for t in (e, gamma, beta, w)]
    z, _, _ = BNActDwConvFunction.apply(*ins, s, EPS)
    torch.autograd.grad(z, ins, gy)


PAIR_PROVIDERS = {"aten": _pair_aten, "bn_act": _pair_bn_act, "fastface": _pair_fastface}


@pytest.fixture(scope="module")
def maps():
    from fastface._ext import HAS_EXT

    if not HAS_EXT:
        pytest.skip("fastface._C not built")
    torch.set_num_threads(THREADS)
    return {f"{'x'.join(map(str, shape))}/s{s}": (_inputs(shape, s), n) for shape, s, n, _ in LAYERS}


def _rounds(benchmark, maps, providers):
    """Median ms per call of every provider per map, round-robin inside fastface.ops.cpu_cache."""
    from fastface.ops import cpu_cache

    times = {m: {p: [] for p in providers} for m in maps}

    def one_round() -> None:
        for m, (args, _) in maps.items():
            for p, fn in providers.items():
                t0 = time.perf_counter()
                fn(*args)
                times[m][p].append(time.perf_counter() - t0)

    with cpu_cache():
        for args, _ in maps.values():  # warm-up: oneDNN primitives, the cache's blocks
            for fn in providers.values():
                fn(*args)
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    return {m: {p: statistics.median(v) * 1e3 for p, v in d.items()} for m, d in times.items()}


def _save(name: str, payload: dict) -> str:
    return save_result("dwconv_train_cpu.json", {**payload, "rounds": ROUNDS}, section=name)


def test_dwconv_backward(benchmark, maps):
    """Median ms per backward of each provider per map; fastface's speed-up over ATen; network totals."""
    from fastface.ops.dwconv_train import dwconv_backward_pays

    ms = _rounds(benchmark, maps, PROVIDERS)
    speedup = {m: d["aten"] / d["fastface"] for m, d in ms.items()}
    routed = {m: "fastface" if dwconv_backward_pays(args[1], args[3]) else "aten" for m, (args, _) in maps.items()}
    total = {p: sum(ms[m][p] * n for m, (_, n) in maps.items()) for p in PROVIDERS}
    total["routed"] = sum(ms[m][routed[m]] * n for m, (_, n) in maps.items())
    path = _save("dwconv_backward", {
        "what": "median ms per depthwise 3x3 conv backward (grad_x + grad_weight), channels_last fp32; speedup = "
                "aten / fastface; total = the face model's depthwise layers (ms per training step); routed = "
                "DwConvFunction's choice per map", "ms": ms, "speedup": speedup, "routed": routed,
        "total_ms": total, "total_speedup": total["aten"] / total["routed"]})
    print(f"\ndepthwise 3x3 backward, median ms over {ROUNDS} rounds, {torch.get_num_threads()} threads:")
    for m, d in ms.items():
        print(f"  {m:<22} aten {d['aten']:7.2f}   fastface {d['fastface']:7.2f}   x{speedup[m]:.2f}   -> {routed[m]}")
    print(f"  network: aten {total['aten']:.1f} ms, fastface {total['fastface']:.1f} ms, routed {total['routed']:.1f} ms"
          f" (x{total['aten'] / total['routed']:.2f})")
    print(f"  saved {path}")


@pytest.fixture(scope="module")
def pair_maps(maps):
    return {f"{'x'.join(map(str, shape))}/s{s}": (_pair_inputs(shape, s), n) for shape, s, n, ex in LAYERS if ex}


def test_bn_act_dwconv(benchmark, pair_maps):
    """Median ms per expand BN + ReLU6 + depthwise conv forward + backward of each provider per map; totals."""
    ms = _rounds(benchmark, pair_maps, PAIR_PROVIDERS)
    total = {p: sum(ms[m][p] * n for m, (_, n) in pair_maps.items()) for p in PAIR_PROVIDERS}
    speedup = {f"fastface_vs_{p}": total[p] / total["fastface"] for p in ("aten", "bn_act")}
    path = _save("bn_act_dwconv", {
        "what": "median ms per expand BN (batch statistics) + ReLU6 + depthwise 3x3 conv, forward + backward, "
                "channels_last fp32; total = the face model's layers with an expand conv (ms per training step)",
        "ms": ms, "total_ms": total, "total_speedup": speedup})
    print(f"\nexpand BN + ReLU6 + depthwise 3x3, forward + backward, median ms over {ROUNDS} rounds:")
    for m, d in ms.items():
        print(f"  {m:<22} " + "   ".join(f"{p} {v:7.2f}" for p, v in d.items())
              + f"   x{d['bn_act'] / d['fastface']:.2f} vs bn_act")
    print("  network: " + ", ".join(f"{p} {v:.1f} ms" for p, v in total.items())
          + f" (x{speedup['fastface_vs_aten']:.2f} vs aten, x{speedup['fastface_vs_bn_act']:.2f} vs bn_act)")
    print(f"  saved {path}")


# The face model's expand convs: input channels per hidden width.
EXPAND_CIN = {96: 16, 144: 24, 192: 32, 384: 64, 576: 96, 960: 160}


def _expand_inputs(shape, stride):
    gy, e, w, s, gamma, beta = _pair_inputs(shape, stride)
    g = torch.Generator().manual_seed(2)
    cin = EXPAND_CIN[shape[1]]
    x = torch.randn((shape[0], cin, shape[2], shape[3]), generator=g).contiguous(memory_format=torch.channels_last)
    return gy, x, torch.randn(shape[1], cin, 1, 1, generator=g) / cin ** 0.5, w, s, gamma, beta


def _conv_fastface(gy, x, we, w, s, gamma, beta):
    from fastface.ops.dwconv_train import BNActDwConvFunction

    ins = [t.detach().requires_grad_() for t in (x, we, gamma, beta, w)]
    z, _, _ = BNActDwConvFunction.apply(F.conv2d(ins[0], ins[1]), ins[2], ins[3], ins[4], s, EPS)
    torch.autograd.grad(z, ins, gy)


def _expand_dwconv(gy, x, we, w, s, gamma, beta):
    from fastface.ops.expand_dwconv import ExpandDwConvFunction

    ins = [t.detach().requires_grad_() for t in (x, we, gamma, beta, w)]
    z, _, _ = ExpandDwConvFunction.apply(ins[0], ins[1], 1, ins[2], ins[3], ins[4], s, EPS)
    torch.autograd.grad(z, ins, gy)


EXPAND_PROVIDERS = {"conv_fastface": _conv_fastface, "expand_dwconv": _expand_dwconv}


def test_expand_dwconv(benchmark, maps):
    """Median ms per 1x1 conv + BN + ReLU6 + depthwise conv, forward + backward, of each provider per map; totals."""
    from fastface.ops.expand_dwconv import expand_dwconv_pays

    ex_maps = {f"{EXPAND_CIN[shape[1]]}->{'x'.join(map(str, shape))}/s{s}": (_expand_inputs(shape, s), n)
               for shape, s, n, ex in LAYERS if ex}
    ms = _rounds(benchmark, ex_maps, EXPAND_PROVIDERS)
    routed = {m: "expand_dwconv" if expand_dwconv_pays(args[1]) else "conv_fastface" for m, (args, _) in ex_maps.items()}
    total = {p: sum(ms[m][p] * n for m, (_, n) in ex_maps.items()) for p in EXPAND_PROVIDERS}
    total["routed"] = sum(ms[m][routed[m]] * n for m, (_, n) in ex_maps.items())
    speedup = {m: d["conv_fastface"] / d["expand_dwconv"] for m, d in ms.items()}
    path = _save("expand_dwconv", {
        "what": "median ms per 1x1 expand conv + BN (batch statistics) + ReLU6 + depthwise 3x3 conv, forward + "
                "backward, channels_last fp32; speedup = conv_fastface / expand_dwconv; total = the face model's "
                "expand layers (ms per training step); routed = the model's choice per map",
        "ms": ms, "speedup": speedup, "routed": routed, "total_ms": total,
        "total_speedup": total["conv_fastface"] / total["routed"]})
    print(f"\n1x1 conv + BN + ReLU6 + depthwise 3x3, forward + backward, median ms over {ROUNDS} rounds:")
    for m, d in ms.items():
        print(f"  {m:<26} conv_fastface {d['conv_fastface']:7.2f}   expand_dwconv {d['expand_dwconv']:7.2f}"
              f"   x{speedup[m]:.2f}   -> {routed[m]}")
    print(f"  network: conv_fastface {total['conv_fastface']:.1f} ms, expand_dwconv {total['expand_dwconv']:.1f} ms, "
          f"routed {total['routed']:.1f} ms (x{total['conv_fastface'] / total['routed']:.2f})")
    print(f"  saved {path}")


def _tail_inputs(shape, stride):
    gy, e, w, s, gamma, beta = _pair_inputs(shape, stride)
    g = torch.Generator().manual_seed(3)
    oh, ow = (shape[2] - 1) // s + 1, (shape[3] - 1) // s + 1
    gy = torch.randn((shape[0], shape[1], oh, ow), generator=g).contiguous(memory_format=torch.channels_last)
    return gy, e, w, s, gamma, beta, torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)


def _tail_bn_act(gy, e, w, s, gamma, beta, g2, b2):
    from fastface.ops.dwconv_train import BNActDwConvFunction

    ins = [t.detach().requires_grad_() for t in (e, gamma, beta, w, g2, b2)]
    z, _, _ = BNActDwConvFunction.apply(*ins[:4], s, EPS)
    y, _, _ = torch.ops.fastface.bn_act(z, ins[4], ins[5], None, EPS, True)
    torch.autograd.grad(y, ins, gy)


def _tail_fastface(gy, e, w, s, gamma, beta, g2, b2):
    from fastface.ops.dwconv_train import BNActDwConvFunction, DwBNActFunction

    ins = [t.detach().requires_grad_() for t in (e, gamma, beta, w, g2, b2)]
    y = DwBNActFunction.apply(BNActDwConvFunction, ins[4], ins[5], EPS, *ins[:4], s, EPS)[0]
    torch.autograd.grad(y, ins, gy)


TAIL_PROVIDERS = {"bn_act": _tail_bn_act, "fastface": _tail_fastface}


def test_dw_bn_act(benchmark, maps):
    """Median ms per expand BN + ReLU6 + depthwise conv + BN + ReLU6, forward + backward, per map; totals."""
    from fastface.ops.dwconv_train import bn_act_dwconv_pays

    tail_maps = {f"{'x'.join(map(str, shape))}/s{s}": (_tail_inputs(shape, s), n) for shape, s, n, ex in LAYERS
                 if ex and bn_act_dwconv_pays(torch.empty(shape), s)}
    ms = _rounds(benchmark, tail_maps, TAIL_PROVIDERS)
    total = {p: sum(ms[m][p] * n for m, (_, n) in tail_maps.items()) for p in TAIL_PROVIDERS}
    speedup = {m: d["bn_act"] / d["fastface"] for m, d in ms.items()}
    path = _save("dw_bn_act", {
        "what": "median ms per expand BN + ReLU6 + depthwise 3x3 conv + BN (batch statistics) + ReLU6, forward + "
                "backward, channels_last fp32; speedup = bn_act / fastface; total = the face model's layers where "
                "the expand BN folds into the conv (ms per training step)",
        "ms": ms, "speedup": speedup, "total_ms": total, "total_speedup": total["bn_act"] / total["fastface"]})
    print(f"\nexpand BN + ReLU6 + depthwise 3x3 + BN + ReLU6, forward + backward, median ms over {ROUNDS} rounds:")
    for m, d in ms.items():
        print(f"  {m:<22} bn_act {d['bn_act']:7.2f}   fastface {d['fastface']:7.2f}   x{speedup[m]:.2f}")
    print(f"  network: bn_act {total['bn_act']:.1f} ms, fastface {total['fastface']:.1f} ms "
          f"(x{total['bn_act'] / total['fastface']:.2f})")
    print(f"  saved {path}")
