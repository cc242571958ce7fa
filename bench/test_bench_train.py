"""Training samples/s: the fastface trainer's step vs a plain PyTorch loop, side by side in one run.

Same network (the trainer's ArchSpec: 4-channel 112x112 split MobileNetV2, 512-d), same batch,
same classes, data already in memory (the loader is measured in test_bench_data.py). Providers:

- plain_eager            the loop a user writes: model -> normalised FC + ArcFace -> cross-entropy,
                         SGD (momentum, weight decay), grad clip 5; NCHW, fp32; the model's
                         plain PyTorch modules (fused_train(False): none of fastface's kernels)
- plain_channels_last    the same loop in channels_last (the baseline the trainer must beat)
- plain_compile          the same channels_last loop with torch.compile(model): what a user gets
                         from compile alone, so the trainer's own share of the gain is visible
- fastface               Trainer.train_step as the trainer runs it by default (channels_last, fused
                         SGD, on-device FastFace scheduler, non-finite skip, BN restore), fp32,
                         eager; run.fused auto = fused (the same path as fastface_fused)
- fastface_fused         the same with run.fused=true: in eager mode on the CPU, ATen's (oneDNN)
                         convs with every BN (batch statistics) + residual add + ReLU6 as one
                         fastface.ops.bn_act call, forward and backward, and the split stems' add
                         merge folded into them: fastface_fused / fastface_unfused = what it gives
- fastface_unfused       the same with run.fused=false (the model's plain PyTorch modules)
- fastface_compile       the trainer with run.compile=true (torch.compile of the model; run.fused
                         auto: under compile that is the dwconv_bn_act kernels for the depthwise
                         stages, which inductor fuses around; bn_act is eager-only), fp32
- fastface_unfused_compile   compile over the plain modules (inductor fuses BN + ReLU6 itself)
- fastface_unfused_compile_bf16   the same under bf16 autocast (class centres and logits stay
                         fp32): a different precision, reported apart from the fp32 ratios; not in
                         the default list (0.67x the baseline when last measured on this CPU)

A fastface provider's name is "fastface" plus tokens: _fused (run.fused=true), _unfused
(run.fused=false), _compile (run.compile=true), _bf16 (run.amp=bf16); BENCH_PROVIDERS may name
any such combination.

Providers run round-robin (ROUNDS rounds of STEPS steps each), so load from other processes on
the shared machine hits them alike; img/s is given for the median round and for the best round
(the least disturbed: the closest to a quiet machine). The load average and OMP_WAIT_POLICY are
saved with the numbers (PASSIVE keeps waiting OpenMP threads from spinning on a busy machine). Compiled providers compile once before the rounds (cached in
TORCHINDUCTOR_CACHE_DIR, default build/inductor-cache).

    pytest bench/test_bench_train.py --benchmark-only -s
    BENCH_PROVIDERS=plain_channels_last,fastface BENCH_THREADS=2 BENCH_BATCH=64 pytest ...

Results: bench/results/train_throughput.json.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(ROOT, "build", "inductor-cache"))

BATCH = int(os.environ.get("BENCH_BATCH", 64))
CLASSES = int(os.environ.get("BENCH_CLASSES", 300))
STEPS = int(os.environ.get("BENCH_STEPS", 2))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 8))
DEFAULT = ["plain_eager", "plain_channels_last", "plain_compile", "fastface", "fastface_fused", "fastface_unfused",
           "fastface_compile", "fastface_unfused_compile"]
PROVIDERS = [p for p in os.environ.get("BENCH_PROVIDERS", ",".join(DEFAULT)).split(",") if p]
PLAIN = ("plain_eager", "plain_channels_last", "plain_compile")
TOKENS = {"fused": "run.fused=true", "unfused": "run.fused=false", "compile": "run.compile=true", "bf16": "run.amp=bf16"}


def trainer_overrides(name: str) -> list[str]:
    """Config overrides of a fastface provider from the tokens of its name."""
    tokens = name.split("_")
    if (tokens[0] != "fastface" or not set(tokens[1:]) <= set(TOKENS) or len(set(tokens)) != len(tokens)
            or {"fused", "unfused"} <= set(tokens)):
        raise ValueError(f"unknown provider {name!r}: {', '.join(PLAIN)}, or "
                         f"fastface[_fused|_unfused][_compile][_bf16]")
    return [TOKENS[t] for t in tokens[1:]]
BASELINE = "plain_channels_last"


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 4, 112, 112, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def _plain_step(spec, channels_last: bool, compile_: bool) -> Callable[[], None]:
    """The loop a user would write around the same model (plain PyTorch modules, no fastface kernels)."""
    from fastface.losses import arcface
    from fastface.models import build_model
    from fastface.models.mobilenetv2 import fused_train

    torch.manual_seed(0)
    model = build_model(spec).train()
    fc = torch.nn.Parameter(torch.randn(CLASSES, spec.head.dim) * 0.01)
    margin = arcface()
    x, y = _data()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    params = list(model.parameters()) + [fc]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    net = torch.compile(model) if compile_ else model

    def step() -> None:
        with fused_train(False):
            emb = net(x)
        cos = F.linear(F.normalize(emb), F.normalize(fc)).clamp(-1, 1)
        loss = F.cross_entropy(margin(cos, y), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()

    return step


def _trainer(data_dir: str, out: str, threads: int, extra: list[str]):
    from fastface.train.config import load_train_config
    from fastface.train.trainer import Trainer

    cfg = load_train_config(os.path.join(ROOT, "configs", "demo.yaml"), [
        f"data.path={data_dir}/train.rec", f"data.batch_size={BATCH}", "data.backend=torch", "data.num_workers=0",
        "synth.enabled=false", f"run.output={out}", "run.progress=false", "run.tensorboard=false", "run.plot=false",
        "eval.sets=[]", f"run.threads={threads}", "model.split=1", "model.width=1.0", "model.embedding=512",
        "sched.name=fastface", *extra])
    return Trainer(cfg)


@pytest.fixture(scope="module")
def providers(tmp_path_factory) -> dict[str, Callable[[], None]]:
    """Every provider's step function, warmed up (compiled ones compiled)."""
    from fastface.data import synth

    threads = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    data_dir = str(tmp_path_factory.mktemp("bench-train-set"))
    # One image per class: the trainer reads its class count from the set; the batches are in memory.
    synth.generate(synth.preset("tiny", n_ids=CLASSES, samples_per_id=1), data_dir, workers=1, progress=False)
    x, y = _data()
    out: dict[str, Callable[[], None]] = {}
    trainers = []
    spec = None
    for name in PROVIDERS:
        if name not in PLAIN:
            t = _trainer(data_dir, str(tmp_path_factory.mktemp(f"run-{name}")), threads, trainer_overrides(name))
            trainers.append(t)
            spec = t.spec
            out[name] = lambda t=t: t.train_step([(x, y)])
    if spec is None:
        from fastface.arch import ArchSpec

        spec = ArchSpec.face(split=1)
    for name in PROVIDERS:
        if name in PLAIN:
            out[name] = _plain_step(spec, channels_last=name != "plain_eager", compile_=name == "plain_compile")
    out = {name: out[name] for name in PROVIDERS}
    for name, step in out.items():
        t0 = time.perf_counter()
        step()  # compiles (compiled providers), packs weights, sizes the allocator
        step()
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    yield out
    for t in trainers:
        t.close()


def _ratios(ips: dict[str, float]) -> dict[str, float]:
    """Every provider against the baseline, fused against unfused, compiled fastface against plain compile."""
    ratios = {f"{name}/{BASELINE}": v / ips[BASELINE] for name, v in ips.items() if BASELINE in ips}
    for name in ips:  # what fastface's fused training kernels give, eager and compiled
        if "_unfused" not in name:
            continue
        for fused in (name.replace("_unfused", "_fused"), name.replace("_unfused", "")):
            if fused in ips and fused != name:
                ratios[f"{fused}/{name}"] = ips[fused] / ips[name]
    for name in ips:
        if name.startswith("fastface") and "compile" in name and "plain_compile" in ips:
            ratios[f"{name}/plain_compile"] = ips[name] / ips["plain_compile"]
    return ratios


def test_train_throughput(benchmark, providers):
    """Round-robin img/s of every provider; ratios to the channels_last plain loop; JSON saved."""
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in providers}

    def one_round() -> None:
        for name, step in providers.items():
            t0 = time.perf_counter()
            for _ in range(STEPS):
                step()
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    # Two statistics: the median round, and the best round (the one other processes on a shared
    # machine disturbed least; a provider's best is the closest to its speed on a quiet machine).
    ips = {name: BATCH * STEPS / statistics.median(ts) for name, ts in times.items()}
    best = {name: BATCH * STEPS / min(ts) for name, ts in times.items()}
    spread = {name: [BATCH * STEPS / max(ts), BATCH * STEPS / min(ts)] for name, ts in times.items()}
    ratios, ratios_best = _ratios(ips), _ratios(best)
    benchmark.extra_info.update({"images_per_s": ips, "images_per_s_best": best, "ratios": ratios,
                                 "ratios_best": ratios_best})
    payload = {
        "what": "training images/s: median round and best round of round-robin rounds (min..max in 'range')",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "batch": BATCH, "classes": CLASSES, "threads": torch.get_num_threads(), "steps_per_round": STEPS,
        "rounds": ROUNDS, "baseline": BASELINE, "images_per_s": ips, "images_per_s_best": best, "range": spread,
        "ratios": ratios, "ratios_best": ratios_best,
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "torch": torch.__version__,
        "machine": platform.platform(), "cpu_count": os.cpu_count(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    from fastface.utils import atomic_write_text

    path = os.path.join(RESULTS, os.environ.get("BENCH_OUT", "train_throughput.json"))
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    print(f"\ntraining img/s, batch {BATCH}, {torch.get_num_threads()} threads, load {load_before[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}:")
    print(f"  {'provider':<32}{'median':>8}{'best':>8}   ratio vs {BASELINE} (median, best)")
    for name in ips:
        r, rb = ratios.get(f"{name}/{BASELINE}"), ratios_best.get(f"{name}/{BASELINE}")
        print(f"  {name:<32}{ips[name]:8.1f}{best[name]:8.1f}" + (f"   x{r:.2f}, x{rb:.2f}" if r is not None else ""))
    for k, v in ratios.items():
        if not k.endswith(f"/{BASELINE}"):
            print(f"  {k}: x{v:.2f} (best rounds: x{ratios_best[k]:.2f})")
    print(f"  saved {path}")
