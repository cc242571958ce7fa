"""Training candidates through fastface's Trainer, in separate processes, two ways:

- ``ddp``: one candidate after another, each trained data-parallel by ``nproc`` processes
  (torchrun: NCCL on GPUs, gloo on CPU), every process with ``threads`` intra-op threads.
- ``concurrent``: up to ``workers`` candidates at once, each by its own process group of
  ``nproc`` processes (default 1) on its own GPU(s), or on the CPU with the cores split
  between them through ``threads``.

Either way the global batch stays the train config's ``data.batch_size`` (each rank gets
batch / nproc), every candidate uses the search seed, and a candidate's training depends
only on its key's inputs (spec, init weights, budget, settings, world size, threads): so
the decisions of the two ways agree whenever their candidates run with the same world
size and threads (e.g. ddp with nproc=1 and concurrent with nproc=1, threads equal), and
on GPUs up to the numerics of different world sizes.

Each candidate lives in ``<out>/candidates/<key>/``: spec.json, init.pt (its transferred
weights), job.json, train.log, run/ (the Trainer's output: checkpoints, model.pt,
metrics.json, head.pt) and result.json, written last. The journal gets a "start" record
when a candidate is launched and a "candidate" record when it is done; a finished
candidate is never trained again (its journal record, or a result.json the journal missed
because the driver was killed, is reused), and one killed mid-training resumes from its
newest checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

from fastface.arch import ArchSpec
from fastface.search.journal import Journal
from fastface.search.replicate_split import Candidate, Result, transfer
from fastface.search.worker import PARENT_ENV

_STEP = re.compile(r"step (\d+)/(\d+)")


class CandidateError(RuntimeError):
    """A candidate's training process failed; names the candidate and its log."""


@dataclass
class ParallelConfig:
    """How candidates share the machine (the `parallel` section of a search config)."""

    mode: Literal["ddp", "concurrent"] = "concurrent"
    nproc: int = 0  # processes per candidate; 0: ddp -> one per GPU (CPU: 2), concurrent -> 1
    workers: int = 0  # concurrent: candidates at once; 0: GPUs / nproc (CPU: 2)
    threads: int = 0  # intra-op threads per process; 0: CPU cores / processes running at once

    def __post_init__(self) -> None:
        if self.mode not in ("ddp", "concurrent"):
            raise ValueError(f"parallel.mode: {self.mode!r} is not one of ['ddp', 'concurrent']")
        for k in ("nproc", "workers", "threads"):
            if getattr(self, k) < 0:
                raise ValueError(f"parallel.{k}: must be >= 0, got {getattr(self, k)}")


@dataclass(frozen=True)
class Slots:
    """Resolved parallel settings: processes per candidate, candidates at once, threads, devices per slot."""

    mode: str
    nproc: int
    workers: int
    threads: int
    devices: tuple[tuple[int, ...], ...] | None  # GPU ids per slot (None: CPU)


def resolve_parallel(p: ParallelConfig, use_gpu: bool) -> Slots:
    """Fill in the defaults of `p` for this machine; errors name the setting."""
    import torch

    gpus = torch.cuda.device_count() if use_gpu else 0
    cores = os.cpu_count() or 1
    if p.mode == "ddp":
        nproc = p.nproc or (gpus or min(2, cores))
        workers = 1
    else:
        nproc = p.nproc or 1
        workers = p.workers or ((gpus // nproc) if gpus else min(2, cores))
    if workers < 1:
        raise ValueError(f"parallel: {gpus} GPU(s) cannot hold a candidate of nproc={nproc} processes")
    threads = p.threads or max(1, cores // (nproc * workers))
    devices = None
    if gpus:
        if nproc * workers > gpus:
            raise ValueError(f"parallel: {workers} worker(s) x nproc={nproc} needs {nproc * workers} GPUs, "
                             f"this machine has {gpus}")
        devices = tuple(tuple(range(s * nproc, (s + 1) * nproc)) for s in range(workers))
    return Slots(p.mode, nproc, workers, threads, devices)


class ResourceMeter:
    """Resources of a spec: params and MACs (closed form) and measured latency (cached, journaled).

    Latency is whole-network wall time at batch `batch` with `threads` threads (the p10 of
    `runs` timed calls, least of 2 rounds: fastface.search.lut.LatencyLUT.measure_networks).
    It is measured in the driver while no candidate trains, and kept in the journal so a
    resumed search decides on the same numbers.
    """

    def __init__(self, journal: Journal | None, threads: int = 1, batch: int = 1, runs: int = 20,
                 measure_latency: bool = True):
        self.journal, self.threads, self.batch, self.runs = journal, threads, batch, runs
        self.measure_latency = measure_latency
        self.cache: dict[str, float] = {}
        if journal is not None:
            for r in journal.of_kind("latency"):
                if (r.get("threads"), r.get("batch")) == (threads, batch):
                    self.cache[r["spec_sha"]] = r["latency_ms"]

    def latency_ms(self, spec: ArchSpec) -> float:
        """Measured latency of spec (ms), cached by spec."""
        from fastface.search.lut import LatencyLUT

        sha = hashlib.sha256(spec.to_json().encode()).hexdigest()[:16]
        if sha not in self.cache:
            lut = LatencyLUT(batch=self.batch, threads=self.threads, runs=self.runs, warmup=3, rounds=2)
            self.cache[sha] = float(lut.measure_networks([spec])[0])
            if self.journal is not None:
                self.journal.append("latency", spec_sha=sha, latency_ms=self.cache[sha], threads=self.threads,
                                    batch=self.batch)
        return self.cache[sha]

    def __call__(self, spec: ArchSpec) -> dict[str, float]:
        from fastface.eval.cost import spec_cost

        params, macs = spec_cost(spec)
        out = {"params": float(params), "macs": float(macs)}
        if self.measure_latency:
            out["latency_ms"] = self.latency_ms(spec)
        return out


def train_identity(cfg: Any, slots: Slots) -> dict[str, Any]:
    """The training settings a candidate's weights depend on (part of every candidate key)."""
    from fastface.config_io import to_dict

    d = to_dict(cfg)
    d.pop("synth", None)
    run = d["run"]
    for k in ("output", "resume", "progress", "tensorboard", "plot", "log_every", "ckpt_every", "keep_ckpts",
              "eval_every", "max_steps", "epochs", "threads", "max_nonfinite_run"):
        run.pop(k, None)
    for k in ("spec", "init"):
        d["model"].pop(k, None)
    d["data"].pop("num_workers", None)  # the batches are a pure function of (seed, epoch, position)
    d["data"].pop("prefetch", None)
    return {"train": d, "world_size": slots.nproc, "threads": slots.threads}


@dataclass
class _Running:
    cand: Candidate
    proc: subprocess.Popen
    slot: int
    started: float
    log_path: str
    log_file: Any
    task: Any = None
    steps_done: int = 0


@dataclass
class TrainRunner:
    """The real `Evaluate` of the replicate / split search: trains candidates with the Trainer (see module doc)."""

    out_dir: str
    journal: Journal
    train_config: str | None
    train_overrides: list[str]
    train_cfg: Any  # the loaded TrainConfig (for batch size, eval sets)
    slots: Slots
    objective_set: str
    resources: Callable[[ArchSpec], Mapping[str, float]]
    identity: dict[str, Any]
    seed: int = 0
    root_init: str | None = None
    console: Any = None
    ckpt_every: int = 0  # 0: a quarter of each candidate's steps
    child_overrides: list[str] = field(default_factory=list)  # for children trained from their parent's weights
    prior_elapsed: float = 0.0
    results: dict[str, Result] = field(default_factory=dict)
    launched: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.t0 = time.perf_counter()
        # Wall time of earlier runs that did not finish (killed): the search's clock continues.
        last_final = max([r["seq"] for r in self.journal.of_kind("final")], default=-1)
        self.prior_elapsed = max([r.get("timings", {}).get("search_elapsed_s") or 0.0
                                  for r in self.journal.of_kind("candidate") if r["seq"] > last_final], default=0.0)
        batch = self.train_cfg.data.batch_size
        if batch % self.slots.nproc:
            raise ValueError(f"data.batch_size={batch} (the global batch) does not split over nproc={self.slots.nproc} "
                             f"processes")

    # ---- bookkeeping ------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Search wall time so far, including earlier (interrupted) runs of it."""
        return self.prior_elapsed + time.perf_counter() - self.t0

    def say(self, msg: str) -> None:
        """A line on the terminal."""
        if self.console is not None:
            self.console.print(msg, highlight=False)

    def cand_dir(self, c: Candidate) -> str:
        """Folder of candidate c."""
        return os.path.join(self.out_dir, "candidates", f"{c.key}")

    def _from_record(self, rec: Mapping[str, Any]) -> Result:
        return Result(rec["key"], rec["status"], rec.get("accuracy"), dict(rec.get("resources", {})),
                      rec.get("weights"), rec.get("head"), dict(rec.get("metrics", {})), dict(rec.get("timings", {})))

    def _record(self, c: Candidate, r: Result, **extra: Any) -> None:
        self.results[c.key] = r
        self.journal.append("candidate", key=c.key, name=c.name, op=c.op, status=r.status, accuracy=r.accuracy,
                            resources=r.resources, weights=r.weights, head=r.head, metrics=r.metrics,
                            timings=r.timings, candidate=c.to_dict(), **extra)

    def _accuracy(self, metrics: Mapping[str, Any], c: Candidate) -> float:
        ver = metrics.get("verification", {})
        if self.objective_set not in ver:
            raise CandidateError(f"candidate {c.name} ({c.key}): no accuracy on the objective set "
                                 f"{self.objective_set!r}; evaluated: {sorted(ver)}")
        return float(ver[self.objective_set]["accuracy"])

    # ---- preparing a candidate ----------------------------------------------------------------
    def _known(self, c: Candidate) -> Result | None:
        if c.key in self.results:
            return self.results[c.key]
        rec = self.journal.last("candidate", key=c.key)
        if rec is not None and rec.get("status") == "done" and rec.get("weights") and os.path.exists(rec["weights"]):
            r = self._from_record(rec)
            self.results[c.key] = r
            return r
        if rec is not None and rec.get("status") == "done":
            self.say(f"[yellow]{c.name}: journaled weights {rec.get('weights')} are missing; training it again[/]")
        # Finished, but the driver died before journaling it: adopt the result file.
        res_path = os.path.join(self.cand_dir(c), "result.json")
        if os.path.exists(res_path):
            try:
                with open(res_path) as f:
                    done = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                self.say(f"[yellow]{res_path}: unreadable ({e}); training {c.name} again[/]")
                return None
            if done.get("key") == c.key and os.path.exists(done.get("weights", "")):
                r = self._result_from_file(c, done)
                self._record(c, r, recovered=True)
                self.say(f"{c.name}: finished before the last interruption; result recovered from {res_path}")
                return r
        return None

    def _parent_result(self, c: Candidate) -> Result:
        if c.parent is None or c.parent not in self.results:
            raise RuntimeError(f"candidate {c.name}: its parent {c.parent} has not been evaluated")
        return self.results[c.parent]

    def _write_init(self, c: Candidate, path: str) -> None:
        from fastface.train import checkpoint as ckpt

        parent = ckpt.load_model(self._parent_result(c).weights, map_location="cpu")
        child = transfer(parent, c)
        ckpt.save_model(path, child, c.spec.to_json(), {"parent": c.parent, "op": c.op})

    def _exact(self, c: Candidate) -> Result:
        """An exactly transferred, untrained child: its weights written, its metrics the parent's."""
        pr = self._parent_result(c)
        d = self.cand_dir(c)
        os.makedirs(d, exist_ok=True)
        weights = os.path.join(d, "model.pt")
        self._write_init(c, weights)
        metrics = dict(pr.metrics, inherited_from=c.parent)
        r = Result(c.key, "done", pr.accuracy, dict(self.resources(c.spec)), weights, pr.head, metrics,
                   {"wall_s": 0.0, "search_elapsed_s": self.elapsed()})
        self._record(c, r)
        self.say(f"{c.name}: exact weight transfer from {c.parent}; accuracy {pr.accuracy:.4f} inherited")
        return r

    def _job(self, c: Candidate, slot: int) -> tuple[list[str], dict[str, str], str]:
        d = self.cand_dir(c)
        os.makedirs(d, exist_ok=True)
        c.spec.save(os.path.join(d, "spec.json"))
        s = self.slots
        steps = c.steps
        ckpt_every = self.ckpt_every or max(1, steps // 4)
        ov = list(self.train_overrides) + [
            f"model.spec={os.path.join(d, 'spec.json')}", f"run.output={os.path.join(d, 'run')}",
            "run.epochs=1000000000", f"run.max_steps={max(1, steps)}", "run.resume=true", f"run.threads={s.threads}",
            "run.progress=false", "run.tensorboard=false", "run.plot=false", "run.eval_every=0",
            f"run.ckpt_every={ckpt_every}", f"run.seed={self.seed}", "synth.enabled=false",
            f"data.batch_size={self.train_cfg.data.batch_size // s.nproc}",
            f"run.log_every={max(1, min(10, steps // 10 or 1))}"]
        head = None
        eval_only = False
        if c.op == "root":
            if c.steps == 0:
                if not self.root_init:
                    raise RuntimeError("a root with 0 steps needs replicate_split.root_init")
                ov.append(f"model.init={self.root_init}")
                eval_only = True
        elif not c.from_scratch:
            ov += list(self.child_overrides)
            init = os.path.join(d, "init.pt")
            if not os.path.exists(init):
                self._write_init(c, init)
            ov.append(f"model.init={init}")
            head = self._parent_result(c).head
        job = {"config": self.train_config, "overrides": ov, "head": head, "key": c.key,
               "result": os.path.join(d, "result.json"), "eval_only": eval_only}
        from fastface.utils import atomic_write_text

        job_path = os.path.join(d, "job.json")
        atomic_write_text(job_path, json.dumps(job, indent=1))
        env = {**os.environ, PARENT_ENV: str(os.getpid()), "OMP_NUM_THREADS": str(s.threads),
               "MKL_NUM_THREADS": str(s.threads), "PYTHONUNBUFFERED": "1"}
        if s.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, s.devices[slot]))
        py = sys.executable
        if s.nproc > 1:
            cmd = [py, "-m", "fastface.search.worker", "--exec", py, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={s.nproc}", "-m", "fastface.search.worker", job_path]
        else:
            cmd = [py, "-m", "fastface.search.worker", job_path]
        return cmd, env, os.path.join(d, "train.log")

    def _result_from_file(self, c: Candidate, done: Mapping[str, Any]) -> Result:
        metrics = done["metrics"]
        timings = {"wall_s": done.get("wall_s"), "trainer_elapsed_s": done.get("trainer_elapsed_s"),
                   "search_elapsed_s": self.elapsed()}
        return Result(c.key, "done", self._accuracy(metrics, c), dict(self.resources(c.spec)), done["weights"],
                      done.get("head"), {k: metrics[k] for k in ("verification", "params", "macs", "step",
                                                                  "samples_per_s", "elapsed_s") if k in metrics},
                      timings)

    # ---- running ------------------------------------------------------------------------------
    def __call__(self, cands: Sequence[Candidate]) -> list[Result]:
        """Evaluate a batch: reuse finished ones, transfer exact ones, train the rest (see module doc)."""
        todo: list[Candidate] = []
        for c in cands:
            if any(x.key == c.key for x in todo):
                continue  # the same network twice in one batch: train it once
            if self._known(c) is not None:
                self.say(f"{c.name}: evaluated before (#{c.key}), accuracy {self.results[c.key].accuracy:.4f}; reused")
                continue
            if c.exact:
                self._exact(c)
            else:
                todo.append(c)
        # Resources first, while nothing trains (latency is measured in this process).
        for c in todo:
            self.resources(c.spec)
        if todo:
            self._train(todo)
        return [self.results[c.key] for c in cands]

    def _train(self, todo: list[Candidate]) -> None:
        pending = deque(todo)
        running: dict[int, _Running] = {}
        failures: list[str] = []
        progress = self._progress()
        overall = progress.add_task(f"{len(todo)} to train", total=len(todo)) if progress else None
        try:
            while pending or running:
                free = [s for s in range(self.slots.workers) if s not in running]
                while pending and free and not failures:
                    c, slot = pending.popleft(), free.pop(0)
                    running[slot] = self._launch(c, slot, progress)
                for slot, r in list(running.items()):
                    rc = r.proc.poll()
                    self._update(r, progress)
                    if rc is None:
                        continue
                    r.log_file.close()
                    del running[slot]
                    if progress is not None:
                        progress.remove_task(r.task)
                        progress.advance(overall)
                    err = self._finish(r, rc)
                    if err:
                        failures.append(err)
                if failures and not running:
                    break
                time.sleep(0.2)
        except BaseException:
            for r in running.values():
                r.proc.kill()
                r.proc.wait()
            raise
        finally:
            if progress is not None:
                progress.stop()
        if failures:
            raise CandidateError("\n".join(failures) + "\nFinished candidates are journaled; run the same command "
                                                       "again to resume.")

    def _launch(self, c: Candidate, slot: int, progress: Any) -> _Running:
        cmd, env, log_path = self._job(c, slot)
        self.journal.append("start", key=c.key, name=c.name, slot=slot, nproc=self.slots.nproc,
                            threads=self.slots.threads, mode=self.slots.mode)
        self.launched.append(c.key)
        log_file = open(log_path, "a")
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=os.getcwd())
        where = f"GPU {','.join(map(str, self.slots.devices[slot]))}" if self.slots.devices else f"{self.slots.threads} thr"
        self.say(f"start {c.name} #{c.key} ({c.op}, {c.steps} steps, {self.slots.nproc} proc x {where})")
        r = _Running(c, proc, slot, time.perf_counter(), log_path, log_file)
        if progress is not None:
            r.task = progress.add_task(c.name, total=max(1, c.steps))
        return r

    def _update(self, r: _Running, progress: Any) -> None:
        if progress is None:
            return
        try:
            with open(r.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(r.log_path) - 4096))
                tail = f.read().decode(errors="replace")
        except OSError:
            return
        m = _STEP.findall(tail)
        if m:
            progress.update(r.task, completed=int(m[-1][0]))

    def _finish(self, r: _Running, rc: int) -> str | None:
        c = r.cand
        res_path = os.path.join(self.cand_dir(c), "result.json")
        if rc != 0 or not os.path.exists(res_path):
            tail = _tail(r.log_path, 15)
            why = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
            return f"candidate {c.name} #{c.key} failed ({why}); log: {r.log_path}\n{tail}"
        with open(res_path) as f:
            done = json.load(f)
        res = self._result_from_file(c, done)
        self._record(c, res, world_size=done.get("world_size"), threads=done.get("threads"), mode=self.slots.mode)
        self.say(f"done  {c.name} #{c.key}: accuracy {res.accuracy:.4f}  params {res.resources['params'] / 1e6:.3f}M"
                 + (f"  latency {res.resources['latency_ms']:.2f} ms" if "latency_ms" in res.resources else "")
                 + f"  ({time.perf_counter() - r.started:.0f} s)")
        return None

    def _progress(self) -> Any:
        if self.console is None or not self.console.is_terminal:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                     console=self.console, transient=True)
        p.start()
        return p


def _tail(path: str, n: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


__all__ = ["CandidateError", "ParallelConfig", "ResourceMeter", "Slots", "TrainRunner", "resolve_parallel",
           "train_identity"]
