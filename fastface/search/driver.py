"""The search driver: configs, the replicate / split search and NetAdaptV2 wired to the real
training pipe, latency tables, and reports (``fastface search replicate-split|netadapt|lut|report``).

A search config (YAML, e.g. configs/search_demo.yaml; unknown keys are errors naming the
key) names a train config plus overrides — how every candidate is trained — and the
search settings. Everything a search does goes to an append-only journal under
``<output>/<search>/journal.jsonl``; running the same command again resumes it: finished
candidates, the trained super-network and NetAdapt iterations are read back, not redone.

NetAdaptV2 here: the base network (the replicate / split winner by default) with its
trained weights becomes a CBC super-network, trained with ordered dropout; a per-layer
latency LUT of this machine (checked against measured networks) is a resource next to
params and MACs; MCD (or SCD, NetAdapt v1) shrinks it under the constraints; every history
point is sliced to a physically smaller network saved as a model file (front members also
as ONNX), and the family is the Pareto front of the history.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Union

from fastface.arch import ArchSpec
from fastface.config_io import ConfigError, load_config, to_dict
from fastface.search.journal import Journal
from fastface.search.replicate_split import Outcome, ReplicateSplitConfig, search
from fastface.search.runner import ParallelConfig, ResourceMeter, TrainRunner, resolve_parallel, train_identity

RESOURCES = ("params", "macs", "latency_ms")
Budget = Union[float, str]


@dataclass
class TrainSection:
    """How every candidate is trained: a train config (YAML) plus key=value overrides."""

    config: str | None = "configs/demo.yaml"
    overrides: list[str] = field(default_factory=list)


@dataclass
class ObjectiveConfig:
    """What the search maximises (verification accuracy on one eval set) and under which budgets."""

    set: str = "val"  # the eval .bin (by file name without extension) whose accuracy counts
    # Budgets of the replicate / split search: params, macs, latency_ms; a number, or "N%" of the vanilla network.
    constraints: dict[str, Budget] = field(default_factory=dict)
    latency_threads: int = 1  # latency is measured at this many threads ...
    latency_batch: int = 1  # ... and this batch size
    latency_runs: int = 20


@dataclass
class NetAdaptSection:
    """NetAdaptV2 settings: super-network training, the LUT, MCD / SCD and their budgets."""

    mode: Literal["mcd", "scd"] = "mcd"
    base: str = "best"  # "best" / "vanilla" (from the replicate / split search), or a model.pt / spec .json
    g: int = 8  # width granularity
    supernet_steps: int = 100
    lr: float = 0.02
    momentum: float = 0.9
    full_share: float = 0.25
    distill: float = 0.0
    candidates: int = 4
    step: float = 0.05
    decay: float = 0.96
    criterion: Literal["accuracy", "per_resource"] = "accuracy"
    max_iterations: int = 30
    # Budgets: params, macs, latency_ms (LUT); a number, or "N%" of the full super-network.
    constraints: dict[str, Budget] = field(default_factory=lambda: {"latency_ms": "70%"})
    calib_batches: int = 4  # training batches for BN recalibration of every candidate
    score_pairs: int = 0  # verification pairs used to score candidates (0: all)
    score_flip: bool = False
    scd_finetune_steps: int = 10
    scd_lr: float = 0.01
    lut: str | None = None  # a LUT JSON from `fastface search lut`; None: built on demand
    lut_runs: int = 20
    lut_rounds: int = 2
    lut_check: int = 4  # networks measured whole to check (and correct) the LUT
    # Check the LUT again every this many iterations (0: only at the start), against the chosen
    # network and the iteration's other candidates: correct it, or fall back above 10 %.
    lut_check_every: int = 5
    export_onnx: bool = True  # write the Pareto-front members as ONNX
    finetune_steps: int = 0  # train the final network this many steps with the Trainer (0: keep the slice)
    # Intra-op threads of the driver's own work (super-network training, scoring); 0: torch's default.
    # On a shared CPU, more threads than free cores make every step many times slower.
    threads: int = 0


@dataclass
class SearchConfig:
    """A search: where it writes, its seed, how candidates train, the objective, and each search's settings."""

    output: str = "runs/search"
    seed: int = 0
    train: TrainSection = field(default_factory=TrainSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    replicate_split: ReplicateSplitConfig = field(default_factory=ReplicateSplitConfig)
    netadapt: NetAdaptSection = field(default_factory=NetAdaptSection)


def load_search_config(path: str | None, overrides: list[str] | None = None) -> SearchConfig:
    """A SearchConfig from YAML plus dotted overrides; unknown keys raise ConfigError naming them."""
    cfg = load_config(SearchConfig, path, overrides)
    for where, cons in (("objective.constraints", cfg.objective.constraints),
                        ("netadapt.constraints", cfg.netadapt.constraints)):
        for name, value in cons.items():
            if name not in RESOURCES:
                raise ConfigError(f"{path}: {where}.{name}: unknown resource (known: {', '.join(RESOURCES)})")
            _budget(value, 1.0, f"{where}.{name}")
    if cfg.netadapt.g < 1 or cfg.netadapt.supernet_steps < 0 or cfg.netadapt.calib_batches < 1:
        raise ConfigError(f"{path}: netadapt: need g >= 1, supernet_steps >= 0, calib_batches >= 1")
    if cfg.netadapt.lut_check < 1 or cfg.netadapt.lut_check_every < 0:
        raise ConfigError(f"{path}: netadapt: need lut_check >= 1 and lut_check_every >= 0, got "
                          f"{cfg.netadapt.lut_check}, {cfg.netadapt.lut_check_every}")
    return cfg


def _budget(value: Budget, reference: float, where: str) -> float:
    """A budget: a number as is, or "N%" of the reference value."""
    if isinstance(value, str):
        v = value.strip()
        try:
            if v.endswith("%"):
                return float(v[:-1]) / 100.0 * reference
            return float(v)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is neither a number nor a percentage like '70%'") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: budget must be a finite number >= 0, got {value!r}")
    return float(value)


def budgets(constraints: Mapping[str, Budget], reference: Mapping[str, float], where: str) -> dict[str, float]:
    """Absolute budgets from a constraints section (percentages of `reference`)."""
    return {n: _budget(v, reference[n], f"{where}.{n}") for n, v in constraints.items()}


# ---- shared set-up -------------------------------------------------------------------------------


class OtherSearchError(ConfigError):
    """The output folder holds a NetAdapt search this one cannot resume (another base, budget or config)."""


class SearchBusyError(RuntimeError):
    """Another search process holds this output folder."""


@contextlib.contextmanager
def folder_lock(folder: str) -> Iterator[None]:
    """Hold an exclusive lock on folder (released by the kernel even if this process is killed)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip()
        f.close()
        raise SearchBusyError(f"{folder}: another search is running in this folder ({who or 'unknown pid'})") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def _console(console: Any) -> Any:
    if console is not None:
        return console
    from rich.console import Console

    # Lines into a log file or pipe stay whole (greppable) and tables get room; a terminal wraps them.
    tty = sys.stdout.isatty()
    return Console(soft_wrap=not tty, width=None if tty else 160)


def load_train(cfg: SearchConfig) -> Any:
    """The train config every candidate starts from (generating the synthetic set once, here)."""
    from fastface.train.config import load_train_config

    tc = load_train_config(cfg.train.config, cfg.train.overrides)
    names = [os.path.splitext(os.path.basename(p))[0] for p in tc.eval.sets]
    if cfg.objective.set not in names:
        raise ConfigError(f"objective.set: {cfg.objective.set!r} is not among the train config's eval.sets ({names})")
    if tc.synth.enabled:
        from fastface.data import synth

        s = tc.synth
        synth.generate(synth.preset(s.preset, seed=s.seed), s.root, progress=sys.stdout.isatty())
    return tc


def base_spec(tc: Any) -> ArchSpec:
    """The network the train config describes, for the channels its data has."""
    from fastface.data.loader import resolve_channels
    from fastface.data.sources import open_source
    from fastface.train.trainer import resolve_spec

    src = open_source(tc.data.path, tc.data.idx_path)
    return resolve_spec(tc, resolve_channels(tc.data.channels, src))


def _use_gpu(tc: Any) -> bool:
    import torch

    return tc.run.device != "cpu" and torch.cuda.is_available()


def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---- replicate / split ---------------------------------------------------------------------------


@dataclass
class RSRun:
    """A finished replicate / split search: where it wrote, its outcome, and what the runner trained now."""

    folder: str
    outcome: Outcome
    launched: list[str]
    elapsed_s: float


def run_replicate_split(cfg: SearchConfig, console: Any = None) -> RSRun:
    """Run (or resume) the replicate / split search of cfg; writes journal, best.json, table and plots."""
    console = _console(console)
    rs = cfg.replicate_split
    folder = os.path.join(cfg.output, "replicate_split_scratch" if rs.from_scratch else "replicate_split")
    with folder_lock(folder):
        journal = Journal(os.path.join(folder, "journal.jsonl"))
        if journal.problems:
            console.print(f"[yellow]{journal.report()}[/]")
        tc = load_train(cfg)
        base = base_spec(tc)
        slots = resolve_parallel(cfg.parallel, _use_gpu(tc))
        identity = {**train_identity(tc, slots), "seed": cfg.seed}
        root_extra = {"root_init_sha": _file_sha(rs.root_init)} if rs.root_init and not rs.from_scratch else {}
        journal.append("run", config=to_dict(cfg), argv=sys.argv, pid=os.getpid(),
                       slots={"mode": slots.mode, "nproc": slots.nproc, "workers": slots.workers,
                              "threads": slots.threads})
        o = cfg.objective
        meter = ResourceMeter(journal, o.latency_threads, o.latency_batch, o.latency_runs)
        constraints = budgets(o.constraints, meter(base.with_split(0)), "objective.constraints")
        console.print(f"[bold]replicate / split search[/] -> {folder}  ({'from scratch' if rs.from_scratch else 'weight transfer'}; "
                      f"{slots.mode}: {slots.workers} at once x {slots.nproc} proc x {slots.threads} threads"
                      + (f"; budgets {constraints}" if constraints else "") + ")", highlight=False)
        console.print(f"base: {base.describe()}", highlight=False)
        if rs.child_overrides:  # a bad key fails now, naming it, not in the first child's log
            from fastface.train.config import load_train_config

            load_train_config(cfg.train.config, list(cfg.train.overrides) + list(rs.child_overrides))
        runner = TrainRunner(folder, journal, cfg.train.config, list(cfg.train.overrides), tc, slots, o.set, meter,
                             identity, cfg.seed, rs.root_init, console, child_overrides=list(rs.child_overrides))
        outcome = search(base, rs, runner, meter, constraints, identity, root_extra,
                         log=lambda m: console.print(m, highlight=False),
                         on_decision=lambda d: journal.append("decision", **d))
        journal.append("final", best=outcome.final.key, best_name=outcome.final.name, vanilla=outcome.vanilla.key,
                       root=outcome.root.key, best_spec=outcome.final.spec.to_dict(), elapsed_s=runner.elapsed(),
                       keys=list(outcome.candidates))
        outcome.final.spec.save(os.path.join(folder, "best.json"))
    from fastface.search.report import write_report

    write_report(cfg.output, console)
    fr, vr = outcome.final_result, outcome.vanilla_result
    console.print(f"found {outcome.final.name}: accuracy {fr.accuracy:.4f}, {fr.resources['params'] / 1e6:.3f}M params, "
                  f"{outcome.final.total_steps} steps; vanilla {vr.accuracy:.4f}, {vr.resources['params'] / 1e6:.3f}M, "
                  f"{outcome.vanilla.total_steps} steps; best spec: {os.path.join(folder, 'best.json')}", highlight=False)
    return RSRun(folder, outcome, list(runner.launched), runner.elapsed())


# ---- NetAdaptV2 ------------------------------------------------------------------------------------


class _Epochs:
    """A loader as an endless batch stream, epoch after epoch (each epoch its own shuffle)."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        for epoch in itertools.count():
            self.loader.set_epoch(epoch)
            n = 0
            for b in self.loader:
                n += 1
                yield b
            if n == 0:
                raise ValueError("the training loader yields no batches")


def _resolve_base(cfg: SearchConfig, tc: Any) -> tuple[Any, str | None, str]:
    """(model, its class-centre file or None, description) of netadapt.base."""
    from fastface.models import build_model
    from fastface.train import checkpoint as ckpt

    b = cfg.netadapt.base
    if b in ("best", "vanilla"):
        from fastface.search.report import load_rs

        view = load_rs(os.path.join(cfg.output, "replicate_split"))
        if view is None or view.final is None:
            raise ConfigError(f"netadapt.base={b!r}: no finished replicate / split search in "
                              f"{os.path.join(cfg.output, 'replicate_split')}; run `fastface search replicate-split` "
                              f"first, or set netadapt.base to a model.pt or spec .json")
        r = view.point(view.final["best" if b == "best" else "vanilla"])
        return ckpt.load_model(r["weights"]), r.get("head"), f"{b}: {r['candidate']['name']} ({r['weights']})"
    if b.endswith(".json"):
        spec = ArchSpec.load(b)
        return build_model(spec), None, f"spec {b} (random initialisation)"
    if b == "base":
        return build_model(base_spec(tc)), None, "the train config's network (random initialisation)"
    if not os.path.exists(b):
        raise ConfigError(f"netadapt.base: {b!r} is not 'best', 'vanilla', 'base', a spec .json or an existing model file")
    return ckpt.load_model(b), None, f"model {b}"


@dataclass
class NARun:
    """A finished NetAdapt search: its folder, history, status, and the time of each phase."""

    folder: str
    records: list[dict[str, Any]]
    status: str
    timings: dict[str, float]
    front: list[dict[str, Any]]
    finetuned: Any = None  # the Result of training the final network (netadapt.finetune_steps > 0)


def run_netadapt(cfg: SearchConfig, mode: str | None = None, console: Any = None) -> NARun:
    """Run (or resume) NetAdaptV2 (MCD) or NetAdapt v1 (SCD) on cfg's base network (see module doc)."""
    import torch

    from fastface.search import netadapt as na_mod

    console = _console(console)
    na = cfg.netadapt
    mode = mode or na.mode
    if mode not in na_mod.MODES:
        raise ConfigError(f"netadapt.mode: {mode!r} is not one of {list(na_mod.MODES)}")
    folder = os.path.join(cfg.output, f"netadapt-{mode}")
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    if na.threads:
        torch.set_num_threads(na.threads)
    try:
        return _run_netadapt(cfg, mode, folder, timings, t_start, console)
    finally:
        torch.set_num_threads(old_threads)


def _run_netadapt(cfg: SearchConfig, mode: str, folder: str, timings: dict[str, float], t_start: float,
                  console: Any) -> NARun:
    import torch

    from fastface.data.loader import make_loader
    from fastface.data.verification import load_pairs
    from fastface.losses import PartialFC, margin_from_name
    from fastface.models.supernet import Supernet, train_supernet, weights_digest
    from fastface.search import netadapt as na_mod
    from fastface.search.lut import LatencyLUT, check
    from fastface.search.worker import load_head
    from fastface.train import checkpoint as ckpt
    from fastface.utils import atomic_write

    na = cfg.netadapt
    with folder_lock(folder):
        journal = Journal(os.path.join(folder, "journal.jsonl"))
        if journal.problems:
            console.print(f"[yellow]{journal.report()}[/]")
        journal.append("run", config=to_dict(cfg), mode=mode, argv=sys.argv, pid=os.getpid())
        tc = load_train(cfg)
        device = torch.device("cuda" if _use_gpu(tc) else "cpu")
        model, head_path, desc = _resolve_base(cfg, tc)
        model = model.to(device)
        base_sha = weights_digest(model)
        sn = Supernet.from_model(model, na.g)
        console.print(f"[bold]NetAdapt {mode.upper()}[/] -> {folder}; base {desc}", highlight=False)
        console.print(f"super-network: {sn.spec.describe()}; {len(sn.space.names)} searchable widths (g={na.g})",
                      highlight=False)

        loader = make_loader(tc.data, 0, 1)
        try:
            calib = [b[0] for b in itertools.islice(iter(loader), na.calib_batches)]
            margin = margin_from_name(tc.loss.margin, tc.loss.s, tc.loss.m1, tc.loss.m2, tc.loss.m3)
            pfc = PartialFC(margin, sn.spec.head.dim, loader.num_classes, tc.loss.sample_rate, 0, 1).to(device)

            # 1. The super-network, trained with ordered dropout (once; journaled).
            sup = journal.last("supernet", base_sha=base_sha, steps=na.supernet_steps, lr=na.lr,
                               full_share=na.full_share, distill=na.distill, seed=cfg.seed)
            if sup is not None and os.path.exists(sup["weights"]) and os.path.exists(sup["head"]):
                sn.net.load_state_dict(ckpt.load_model(sup["weights"]).state_dict())
                load_head(pfc, sup["head"])
                if weights_digest(sn) != sup["sha"]:
                    raise ValueError(f"{sup['weights']}: the super-network weights differ from the journaled digest")
                console.print(f"super-network: trained before ({sup['weights']}), reused")
                timings["supernet_s"] = 0.0
                head_file = sup["head"]
            else:
                t0 = time.perf_counter()
                if head_path and os.path.exists(head_path):
                    load_head(pfc, head_path)
                losses: list[float] = []
                if na.supernet_steps:
                    opt = torch.optim.SGD(list(sn.parameters()) + list(pfc.parameters()), lr=na.lr,
                                          momentum=na.momentum, weight_decay=tc.optim.weight_decay)
                    console.print(f"super-network: {na.supernet_steps} steps of ordered-dropout training "
                                  f"(full-width share {na.full_share}, distill {na.distill})")
                    losses = train_supernet(sn, _Epochs(loader), pfc, opt, na.supernet_steps, na.full_share, na.distill,
                                            seed=cfg.seed)
                timings["supernet_s"] = time.perf_counter() - t0
                w_path, h_path = os.path.join(folder, "supernet.pt"), os.path.join(folder, "supernet_head.pt")
                ckpt.save_model(w_path, sn.net, sn.spec.to_json())
                weight = pfc.weight.detach().cpu()
                atomic_write(h_path, lambda f: torch.save({"weight": weight}, f))
                head_file = h_path
                journal.append("supernet", base_sha=base_sha, steps=na.supernet_steps, lr=na.lr,
                               full_share=na.full_share, distill=na.distill, seed=cfg.seed, weights=w_path,
                               head=h_path, sha=weights_digest(sn), time_s=timings["supernet_s"],
                               loss_first=losses[:5], loss_last=losses[-5:])
                if losses:
                    console.print(f"super-network: loss {sum(losses[:5]) / len(losses[:5]):.3f} -> "
                                  f"{sum(losses[-5:]) / len(losses[-5:]):.3f} in {timings['supernet_s']:.0f} s")
            sn.eval()

            # 2. The latency LUT of this machine, checked against whole networks.
            t0 = time.perf_counter()
            lut_path = os.path.join(folder, "lut.json")
            o = cfg.objective
            src = lut_path if os.path.exists(lut_path) else na.lut
            if src:
                lut = LatencyLUT.load(src)
                if (lut.threads, lut.batch) != (o.latency_threads, o.latency_batch):
                    raise ConfigError(f"{src}: LUT for {lut.threads} thread(s), batch {lut.batch}; the objective "
                                      f"measures latency at {o.latency_threads} thread(s), batch {o.latency_batch}")
            else:
                lut = LatencyLUT(threads=o.latency_threads, batch=o.latency_batch, runs=na.lut_runs,
                                 rounds=na.lut_rounds, device=str(device))
            if not lut.checks:
                rng = random.Random(cfg.seed)
                specs = [sn.space.spec_at(sn.space.full())] + [
                    sn.space.spec_at(sn.space.random(rng)) for _ in range(max(0, na.lut_check - 1))]
                # A table measured now is timed together with the networks that check it (same load);
                # one loaded from a file is checked as it is (it may be stale or from another machine).
                measured = lut.measure_with_networks(specs) if not src else None
                r = check(lut, specs, tolerance=0.10, measured=measured)
                console.print(f"latency LUT: {len(lut.entries)} layers; vs {len(specs)} measured networks: "
                              + _check_text(r), highlight=False)
                journal.append("lut_check", **r.as_dict())
            lut.save(lut_path)
            timings["lut_s"] = time.perf_counter() - t0

            # 3. MCD / SCD, resumed from the journal.
            images, issame = load_pairs(_set_path(tc, o.set), loader.channels, tc.data.image_size)
            if na.score_pairs:
                images, issame = images[:2 * na.score_pairs], issame[:na.score_pairs]
            score = na_mod.verification_score(images.to(device), issame, nfolds=min(tc.eval.nfolds, len(issame)),
                                              flip=na.score_flip, batch_size=tc.eval.batch_size)
            resources = {"params": na_mod.params, "macs": na_mod.macs, "latency_ms": lut}
            full_values = {n: f(sn.space.spec_at(sn.space.full())) for n, f in resources.items()}
            constraints = budgets(na.constraints, full_values, "netadapt.constraints")
            config = na_mod.NetAdaptConfig(candidates=na.candidates, step=na.step, decay=na.decay,
                                           criterion=na.criterion, seed=cfg.seed, max_iterations=na.max_iterations)
            done = journal.of_kind("record")
            history = [r["record"] for r in done] or None
            if history and mode == "scd":
                last = done[-1]
                sn.net.load_state_dict(ckpt.load_model(last["supernet"]).state_dict())
            points = os.path.join(folder, "points")

            def recheck_lut(rec: dict[str, Any]) -> None:
                """The periodic LUT check: the chosen network and the iteration's other candidates, measured whole."""
                it = rec["iteration"]
                specs = [ArchSpec.from_dict(rec["spec"])]
                for c in rec["candidates"]:
                    s = sn.space.spec_at(c["widths"])
                    if len(specs) < max(2, na.lut_check) and s not in specs:
                        specs.append(s)
                rng = random.Random(f"lut-check:{cfg.seed}:{it}")
                for _ in range(4 * na.lut_check):  # too few distinct candidates: random sub-networks
                    if len(specs) >= max(2, na.lut_check):
                        break
                    s = sn.space.spec_at(sn.space.random(rng))
                    if s not in specs:
                        specs.append(s)
                r = check(lut, specs, tolerance=0.10)
                console.print(f"iteration {it:>3}: latency LUT vs {len(specs)} measured networks: " + _check_text(r),
                              highlight=False)
                journal.append("lut_check", iteration=it, **r.as_dict())

            def on_record(rec: dict[str, Any], m: Any) -> None:
                if na.lut_check_every and rec["iteration"] > 0 and rec["iteration"] % na.lut_check_every == 0:
                    recheck_lut(rec)  # before lut.save below: a resumed search loads the checked table
                d = os.path.join(points, f"iter-{rec['iteration']:04d}")
                path = os.path.join(d, "model.pt")
                ckpt.save_model(path, m, ArchSpec.from_dict(rec["spec"]).to_json(), {"record": rec["iteration"]})
                extra: dict[str, Any] = {}
                if mode == "scd":  # SCD changed the super-network: keep the state after this record
                    sp = os.path.join(folder, "supernet-scd", f"iter-{rec['iteration']:04d}.pt")
                    ckpt.save_model(sp, sn.net, sn.spec.to_json())
                    extra["supernet"] = sp
                    _prune(os.path.dirname(sp), keep=2)
                lut.save(lut_path)
                journal.append("record", record=rec, weights=path, **extra)
                res = rec["resources"]
                tgt = rec.get("targets") or {}
                console.print(f"iteration {rec['iteration']:>3}: latency {res['latency_ms']:.2f} ms"
                              + (f" (target {tgt['latency_ms']:.2f})" if "latency_ms" in tgt else "")
                              + f", params {res['params'] / 1e6:.3f}M, MACs {res['macs'] / 1e6:.1f}M, score "
                              f"{rec['score']:.4f} ({len(rec['candidates'])} candidates, {rec['time_s']:.1f} s)",
                              highlight=False)

            console.print(f"{mode.upper()}: budgets {({n: round(v, 4) for n, v in constraints.items()})} "
                          f"(full network {({n: round(v, 4) for n, v in full_values.items()})})"
                          + (f"; resuming after iteration {history[-1]['iteration']}" if history else ""),
                          highlight=False)
            t0 = time.perf_counter()
            try:
                if mode == "mcd":
                    res = na_mod.mcd(sn, score, resources, constraints, calib, config, history, on_record)
                else:
                    ft_batches = list(itertools.islice(iter(loader), max(1, min(na.scd_finetune_steps, 8))))
                    ft = na_mod.Finetuner(ft_batches, pfc, steps=na.scd_finetune_steps, lr=na.scd_lr)
                    res = na_mod.scd(sn, score, resources, constraints, calib, ft, config, history, on_record)
            except na_mod.ResumeMismatch as e:
                raise OtherSearchError(f"{journal.path}: {e}. This folder holds another NetAdapt search; use another "
                                       f"output folder or remove {folder}") from e
            timings["search_s"] = time.perf_counter() - t0
            journal.append("done", status=res.status, timings=timings)
        finally:
            loader.close()

        # 4. The family: the Pareto front, sliced networks exported.
        front = na_mod.pareto_front(res.records, "latency_ms")
        models = {r["record"]["iteration"]: r["weights"] for r in journal.of_kind("record")}
        if na.export_onnx:
            from fastface.eval.export import export_onnx

            exported = {r["iteration"] for r in journal.of_kind("export")}
            for r in front:
                it = r["iteration"]
                if it in exported:
                    continue
                m = ckpt.load_model(models[it])
                path = os.path.splitext(models[it])[0] + ".onnx"
                with warnings.catch_warnings():  # tracer chatter about shape checks that are constant here
                    warnings.simplefilter("ignore")
                    err = export_onnx(m, path)
                journal.append("export", iteration=it, onnx=path, max_abs_diff=err)
        ArchSpec.from_dict(res.final["spec"]).save(os.path.join(folder, "best.json"))
        finetuned = None
        if na.finetune_steps > 0:
            finetuned = _finetune_final(cfg, tc, folder, journal, res.final, models[res.final["iteration"]], head_file,
                                        console)
    timings["total_s"] = time.perf_counter() - t_start
    console.print(f"{mode.upper()} {res.status} after {len(res.records) - 1} iterations; Pareto front: "
                  f"{len(front)} networks; final {os.path.join(folder, 'best.json')}", highlight=False)
    from fastface.search.report import write_report

    write_report(cfg.output, console)
    return NARun(folder, res.records, res.status, timings, front, finetuned)


def _finetune_final(cfg: SearchConfig, tc: Any, folder: str, journal: Journal, record: dict[str, Any], weights: str,
                    head: str, console: Any) -> Any:
    """Train NetAdapt's final (sliced) network `finetune_steps` steps with the Trainer, as a journaled candidate."""
    from fastface.search.replicate_split import Candidate, Result, candidate_key

    steps = cfg.netadapt.finetune_steps
    slots = resolve_parallel(cfg.parallel, _use_gpu(tc))
    identity = {**train_identity(tc, slots), "seed": cfg.seed}
    spec = ArchSpec.from_dict(record["spec"])
    parent = Result(f"netadapt-{_file_sha(weights)}", "done", record["score"], dict(record["resources"]), weights, head)
    child_ov = list(cfg.replicate_split.child_overrides)
    extra = {"child_overrides": child_ov} if child_ov else None
    cand = Candidate(candidate_key(identity, spec, steps, False, parent.key, "continue", extra=extra),
                     f"netadapt-final+{steps}", "continue", spec, parent.key, steps, steps)
    o = cfg.objective
    runner = TrainRunner(folder, journal, cfg.train.config, list(cfg.train.overrides), tc, slots, o.set,
                         ResourceMeter(journal, o.latency_threads, o.latency_batch, o.latency_runs), identity, cfg.seed,
                         console=console, child_overrides=child_ov)
    runner.results[parent.key] = parent
    (r,) = runner([cand])
    return r


def _check_text(r: Any) -> str:
    """One line on a LUT check: errors and what the table does about them."""
    raw = f"LUT sums within {r.max_raw_error:.1%} of the measurements"
    if r.action == "ok":
        return f"{raw} (tolerance {r.tolerance:.0%}): used as is"
    if r.action == "corrected":
        return f"{raw}; scaled by {r.scale:.3f}: within {r.max_error:.1%} (leave-one-out)"
    return (f"{raw}, {max(r.corrected_error):.1%} after scaling: over {r.tolerance:.0%}, so latency is measured on "
            f"whole networks instead (slower, exact)")


def _set_path(tc: Any, name: str) -> str:
    for p in tc.eval.sets:
        if os.path.splitext(os.path.basename(p))[0] == name:
            return p
    raise ConfigError(f"objective.set: {name!r} is not among eval.sets")


def _prune(folder: str, keep: int) -> None:
    files = sorted(f for f in os.listdir(folder) if f.startswith("iter-"))
    for f in files[:-keep]:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, f))


# ---- the latency LUT ---------------------------------------------------------------------------------


def build_lut_file(spec: ArchSpec, out: str, g: int = 8, sweep: bool = True, check_networks: int = 4,
                   threads: int = 1, batch: int = 1, runs: int = 20, rounds: int = 2, seed: int = 0,
                   console: Any = None) -> dict[str, Any]:
    """Measure a latency LUT for spec's width space on this machine, check it, write it as JSON."""
    from fastface.models.supernet import WidthSpace
    from fastface.search.lut import LatencyLUT, check, sweep_specs

    console = _console(console)
    space = WidthSpace(spec, g)
    specs = sweep_specs(space) if sweep else [spec]
    lut = LatencyLUT.load(out) if os.path.exists(out) else LatencyLUT(threads=threads, batch=batch, runs=runs,
                                                                       rounds=rounds)
    if (lut.threads, lut.batch) != (threads, batch):
        raise ConfigError(f"{out}: existing LUT for {lut.threads} thread(s), batch {lut.batch}; asked for {threads}, "
                          f"{batch}")
    t0 = time.perf_counter()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("LUT"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("measure", total=len(specs))
        for i, s in enumerate(specs):
            lut.measure_spec(s)
            bar.update(task, completed=i + 1)
            if i % 50 == 49:
                lut.save(out)  # a long sweep keeps what it measured if interrupted
    t_measure = time.perf_counter() - t0
    rng = random.Random(seed)
    checks = [space.spec_at(space.full())] + [space.spec_at(space.random(rng)) for _ in range(max(0, check_networks - 1))]
    # The check networks' layers are timed again together with the networks (the same load), so
    # the check measures what the table gets wrong, not load that differed between the two.
    r = check(lut, checks, tolerance=0.10, measured=lut.measure_with_networks(checks))
    lut.save(out)
    console.print(f"{out}: {len(lut.entries)} layer configurations from {len(specs)} networks in {t_measure:.0f} s "
                  f"({threads} thread(s), batch {batch}); check vs {len(checks)} measured networks: {_check_text(r)}",
                  highlight=False)
    return {"path": out, "entries": len(lut.entries), "networks": len(specs), "measure_s": t_measure, **r.as_dict()}


__all__ = ["NARun", "NetAdaptSection", "ObjectiveConfig", "RSRun", "SearchBusyError", "SearchConfig", "TrainSection",
           "base_spec", "budgets", "build_lut_file", "folder_lock", "load_search_config", "load_train",
           "run_netadapt", "run_replicate_split"]
