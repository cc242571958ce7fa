"""Fused inverted-residual blocks on the CPU: fastface vs eager PyTorch, torch.compile, onnxruntime.

The 4-channel 112x112 MobileNetV2 face model (ArchSpec.face(), 512-d GDC head) in eval mode,
fp32, batch 1 (latency) and 64 (throughput), whole model and per block, side by side in one run.
Providers:

- eager            the plain modules (conv -> BN -> ReLU6, nothing folded), NCHW
- eager_cl         the same in channels_last
- compile          torch.compile of the plain modules, channels_last
- onnxruntime      the plain model exported to ONNX (opset 17), CPU provider, ORT_ENABLE_ALL
- fastface         the model's fused eval path: BN folded (weights cached, packed once), each
                   block one fastface.ops.ir_block call (C++ kernel), channels_last
- fastface_frozen  fastface.models.freeze(model): the same ops, folded and packed once, with no
                   per-call checks of the cached weights (what a deployment would run)
- fastface_compile torch.compile of the fused model (ir_block stays one op in the graph)

Providers run round-robin (ROUNDS rounds; each round runs every provider for ~TARGET_S), so
load from other processes on the shared machine hits them alike; a time is the median over
rounds. torch and onnxruntime use BENCH_THREADS intra-op threads (default 2). The load average
is saved with the numbers, and a torch.profiler summary of the fastface provider says where its
time goes. Results: bench/results/kernels_cpu.json (written atomically after every test).

    pytest bench/test_bench_kernels.py --benchmark-only -q -s
    BENCH_BATCHES=1 BENCH_BLOCKS=all BENCH_PROVIDERS=eager_cl,fastface pytest bench/test_bench_kernels.py ...
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import pytest
import torch
import torch._dynamo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(ROOT, "build", "inductor-cache"))

from fastface.arch import ArchSpec  # noqa: E402
from fastface.models import build_model, folded_eval, freeze  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")
THREADS = int(os.environ.get("BENCH_THREADS", 2))
BATCHES = [int(b) for b in os.environ.get("BENCH_BATCHES", "1,64").split(",")]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 7))
TARGET_S = float(os.environ.get("BENCH_TARGET_S", 0.25))
ALL = ("eager", "eager_cl", "compile", "onnxruntime", "fastface", "fastface_frozen", "fastface_compile")
PROVIDERS = tuple(p for p in os.environ.get("BENCH_PROVIDERS", ",".join(ALL)).split(",") if p)
# One block of each kind (t = 1 at 56x56, stride 2 at 56x56, residual 28x28 / 14x14 / 7x7, 4x4
# with 960 expanded channels); BENCH_BLOCKS=all runs all 17.
BLOCKS = os.environ.get("BENCH_BLOCKS", "1,2,3,5,12,15")
OUT = os.path.join(RESULTS, os.environ.get("BENCH_OUT", "kernels_cpu.json"))
_report: dict = {}

for _p in PROVIDERS:
    if _p not in ALL:
        raise ValueError(f"unknown provider {_p!r}; choose from {ALL}")


@pytest.fixture(scope="module", autouse=True)
def threads():
    """Every provider runs with THREADS intra-op threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    # Every block shares InvertedResidual.forward: dynamo's default of 8 compiled versions per code
    # object would silently leave the later blocks' "compile" provider running eagerly.
    cfg = torch._dynamo.config
    limits = {n: getattr(cfg, n) for n in ("recompile_limit", "accumulated_recompile_limit", "cache_size_limit",
                                           "accumulated_cache_size_limit") if hasattr(cfg, n)}
    for n in limits:
        setattr(cfg, n, 256)
    yield THREADS
    for n, v in limits.items():
        setattr(cfg, n, v)
    torch.set_num_threads(old)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ArchSpec.face()).eval()
    # Non-trivial BN statistics, so folding is real work and outputs can be compared.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.named_buffers():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def _ort_session(module: torch.nn.Module, example: torch.Tensor, path: str):
    import onnxruntime as ort

    with torch.no_grad(), folded_eval(False):
        torch.onnx.export(module, (example,), path, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _providers(module: torch.nn.Module, x: torch.Tensor, tmp: str,
               names: tuple[str, ...] = PROVIDERS) -> dict[str, Callable[[], object]]:
    """name -> a no-argument call running `module` on x as that provider (warmed up)."""
    plain_cl = copy.deepcopy(module).to(memory_format=torch.channels_last)
    fused = copy.deepcopy(module).to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    out: dict[str, Callable[[], object]] = {}
    for name in names:
        if name == "eager":
            out[name] = lambda: _plain(module, x)
        elif name == "eager_cl":
            out[name] = lambda: _plain(plain_cl, xcl)
        elif name == "compile":
            comp = torch.compile(copy.deepcopy(plain_cl), dynamic=False)
            out[name] = lambda comp=comp: _plain(comp, xcl)
        elif name == "onnxruntime":
            sess = _ort_session(module, x, os.path.join(tmp, f"{id(module)}.onnx"))
            feed = {"input": x.numpy()}
            out[name] = lambda sess=sess, feed=feed: sess.run(None, feed)
        elif name == "fastface":
            out[name] = lambda: _fused(fused, xcl)
        elif name == "fastface_frozen":
            frozen = freeze(fused)
            out[name] = lambda frozen=frozen: _frozen(frozen, xcl)
        elif name == "fastface_compile":
            comp = torch.compile(copy.deepcopy(fused), dynamic=False)
            out[name] = lambda comp=comp: _fused(comp, xcl)
    ref = _plain(module, x)
    for name, fn in out.items():
        t0 = time.perf_counter()
        got = fn()
        got = torch.from_numpy(got[0]) if isinstance(got, list) else got
        fn()
        # The providers compute the same function: a wrong kernel must not produce a fast number.
        torch.testing.assert_close(got, ref, atol=2e-3 * max(1.0, ref.abs().max().item()), rtol=1e-3,
                                   msg=f"{name} disagrees with eager")
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def _plain(module, x):
    with torch.no_grad(), folded_eval(False):
        return module(x)


def _fused(module, x):
    with torch.no_grad(), folded_eval(True):
        return module(x)


def _frozen(module, x):
    with torch.no_grad():
        return module(x)


def _round_robin(benchmark, providers: dict[str, Callable[[], object]]) -> dict[str, dict[str, float]]:
    """Median (and min..max) seconds per call of every provider, measured round-robin."""
    reps = {}
    for name, fn in providers.items():
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, int(TARGET_S / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in providers}

    def one_round() -> None:
        for name, fn in providers.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            times[name].append((time.perf_counter() - t0) / reps[name])

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "calls": reps[name]}
            for name, ts in times.items()}


def _ratios(t: dict[str, dict[str, float]]) -> dict[str, float]:
    """Speed of fastface (and fastface_compile) relative to each baseline: >1 means fastface is faster."""
    out = {}
    for fast in ("fastface", "fastface_frozen", "fastface_compile"):
        if fast not in t:
            continue
        for base in ("eager", "eager_cl", "compile", "onnxruntime"):
            if base in t:
                out[f"{fast}_vs_{base}"] = t[base]["median_s"] / t[fast]["median_s"]
        best_eager = [t[b]["median_s"] for b in ("eager", "eager_cl") if b in t]
        if best_eager:
            out[f"{fast}_vs_best_eager"] = min(best_eager) / t[fast]["median_s"]
    return out


def _profile(module, x, calls: int = 10) -> tuple[list[dict[str, float]], float]:
    """Top ops of a fastface provider by self CPU time per forward (torch.profiler), after warm-up,
    and the ms per forward of all ops together (the rest of a forward's time is Python)."""
    for _ in range(2):
        _fused(module, x)  # builds the folded-weight caches: not part of a forward's cost
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            _fused(module, x)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    return ([{"op": e.key, "ms_per_forward": e.self_cpu_time_total / calls / 1e3, "calls_per_forward":
              e.count / calls, "share": e.self_cpu_time_total / total} for e in rows[:10]], total / calls / 1e3)


def _save() -> None:
    from fastface.utils import atomic_write_text

    meta = {"what": "seconds per call (median over round-robin rounds), eval, fp32; ratios = baseline time / "
                    "fastface time", "threads": THREADS, "rounds": ROUNDS, "providers": list(PROVIDERS),
            "torch": torch.__version__, "machine": platform.platform(), "cpu_count": os.cpu_count(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        import onnxruntime

        meta["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    atomic_write_text(OUT, json.dumps({**meta, **_report}, indent=2) + "\n")


def _print(title: str, t: dict, ratios: dict, batch: int, load: tuple) -> None:
    print(f"\n{title}, batch {batch}, {THREADS} threads, load {load[0]:.1f} -> {os.getloadavg()[0]:.1f}:")
    for name, v in t.items():
        m = v["median_s"]
        print(f"  {name:<17}{m * 1e3:9.3f} ms  {batch / m:9.1f} img/s   ({v['min_s'] * 1e3:.3f}..{v['max_s'] * 1e3:.3f})")
    for k, v in ratios.items():
        print(f"  {k}: x{v:.2f}")


@pytest.mark.parametrize("batch", BATCHES)
def test_whole_model(benchmark, batch):
    """The whole face model: every provider round-robin; ratios, profile and load saved."""
    model = _model()
    x = torch.randn(batch, 4, 112, 112, generator=torch.Generator().manual_seed(batch))
    with tempfile.TemporaryDirectory() as tmp:
        providers = _providers(model, x, tmp)
        load = os.getloadavg()
        t = _round_robin(benchmark, providers)
    ratios = _ratios(t)
    fused = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    calls = 10 if batch <= 8 else 3
    profile, ops_ms = _profile(fused, xcl, calls)
    frozen_profile, frozen_ops_ms = _profile(freeze(fused), xcl, calls)
    benchmark.extra_info.update({"seconds": {k: v["median_s"] for k, v in t.items()}, "ratios": ratios})
    _report.setdefault("whole_model", {})[str(batch)] = {
        "seconds": t, "images_per_s": {k: batch / v["median_s"] for k, v in t.items()}, "ratios": ratios,
        "fastface_profile": profile, "fastface_ops_ms_per_forward": ops_ms, "fastface_frozen_profile": frozen_profile,
        "fastface_frozen_ops_ms_per_forward": frozen_ops_ms, "load_avg_before": load, "load_avg_after": os.getloadavg()}
    _save()
    _print("whole model (4x112x112 MobileNetV2 face, 512-d)", t, ratios, batch, load)
    for name, rows, total in (("fastface", profile, ops_ms), ("fastface_frozen", frozen_profile, frozen_ops_ms)):
        print(f"  {name} profile (self CPU time per forward; all ops {total:.3f} ms):")
        for row in rows[:6]:
            print(f"    {row['op']:<36}{row['ms_per_forward']:8.3f} ms  {100 * row['share']:5.1f} %  "
                  f"x{row['calls_per_forward']:.0f}")


def _block_indices(spec: ArchSpec) -> list[int]:
    if BLOCKS == "all":
        return list(range(1, spec.num_layers))
    return [int(i) for i in BLOCKS.split(",")]


@pytest.mark.parametrize("batch", BATCHES)
def test_blocks(benchmark, batch):
    """Each selected block alone (layer index; its input shape in the face model)."""
    model = _model()
    spec = model.spec
    layers = spec.layers()
    all_t: dict[str, dict] = {}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        entries = []
        for i in _block_indices(spec):
            li = layers[i]
            x = torch.randn(batch, li.cin, li.size_in, li.size_in, generator=torch.Generator().manual_seed(i))
            key = f"block{i}_{li.cin}-{li.hidden}-{li.cout}_s{li.stride}_{li.size_in}x{li.size_in}"
            # A lone block compiled with its fused op is the op itself: no fastface_compile here.
            names = tuple(p for p in PROVIDERS if p not in ("fastface_compile", "fastface_frozen"))
            entries.append((key, _providers(model.layer(i), x, tmp, names)))
        # One benchmark over all blocks: every block's providers round-robin within each round.
        flat = {f"{key}|{name}": fn for key, provs in entries for name, fn in provs.items()}
        t = _round_robin(benchmark, flat)
    for key, provs in entries:
        tb = {name: t[f"{key}|{name}"] for name in provs}
        all_t[key] = {"seconds": tb, "ratios": _ratios(tb)}
        _print(key, tb, all_t[key]["ratios"], batch, load)
    _report.setdefault("blocks", {})[str(batch)] = {**all_t, "load_avg_before": load, "load_avg_after": os.getloadavg()}
    _save()
    with contextlib.suppress(Exception):
        benchmark.extra_info["blocks"] = {k: v["ratios"] for k, v in all_t.items()}
