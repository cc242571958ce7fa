"""The training loop: data -> ArchSpec model -> margin loss (Partial FC) -> optimiser + schedule.

Launched by torchrun (or as one plain process). One optimiser step per `grad_accum` batches;
the loss is divided by the accumulation count and DDP syncs only on the last micro-step. The
hot loop never reads a tensor on the host: the FastFace scheduler decides on the device, a
non-finite loss skips the update through the fused optimiser's `found_inf`, and the host reads
counters only when it logs (every `log_every` steps).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fastface.arch import ArchSpec
from fastface.config_io import to_dict
from fastface.losses import PartialFC, margin_from_name
from fastface.models import build_model, spec_by_name, transfer_weights
from fastface.models.mobilenetv2 import fused_train
from fastface.ops.cpu_cache import available as cpu_cache_available
from fastface.ops.cpu_cache import cpu_cache, cpu_cache_info, empty_cpu_cache
from fastface.train import checkpoint as ckpt
from fastface.train import dist as fdist
from fastface.train.config import TrainConfig
from fastface.utils import atomic_write_text


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: training stopped, the last checkpoint is intact."""


MODALITIES = {"rgb": {"rgb": 3}, "depth": {"depth": 1}, "rgbd": {"rgb": 3, "depth": 1}}


def resolve_spec(cfg: TrainConfig, channels: str) -> ArchSpec:
    """The ArchSpec this run trains: a spec file, or the preset with the config's options."""
    if cfg.model.spec:
        spec = ArchSpec.load(cfg.model.spec)
    else:
        inputs = MODALITIES[channels]
        split = cfg.model.split if len(inputs) > 1 else 0
        spec = spec_by_name(cfg.model.preset, split=split, merge=cfg.model.merge, width=cfg.model.width,
                            embedding=cfg.model.embedding, head=cfg.model.head, inputs=inputs,
                            input_size=cfg.data.image_size)
    want = MODALITIES[channels]
    if spec.inputs != want:
        raise ValueError(f"model inputs {spec.inputs} do not match the data's channels {channels!r} ({want})")
    if spec.input_size != cfg.data.image_size:
        raise ValueError(f"model input_size {spec.input_size} != data.image_size {cfg.data.image_size}")
    return spec


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def share_bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Move every BatchNorm running buffer into one flat tensor per dtype (shared storage); returns the flats.

    BN updates its running statistics in place during the forward, before the step knows whether
    its loss is finite. Snapshotting and restoring a few flat tensors (one memcpy and one select
    each) undoes a skipped step exactly, where per-buffer clones cost ~3 ops per BN layer per step.
    Call after the model reached its device and dtype (`.to()` could copy the buffers apart); later
    `load_state_dict` copies into the buffers in place and keeps the sharing.
    """
    seen: set[int] = set()
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for b in (m.running_mean, m.running_var, m.num_batches_tracked):
                if b is not None and id(b) not in seen:  # a buffer shared by two modules moves once
                    seen.add(id(b))
                    groups.setdefault((b.dtype, b.device), []).append(b)
    flats = []
    for members in groups.values():
        flat = torch.cat([b.detach().reshape(-1) for b in members])
        offset = 0
        with torch.no_grad():
            for b in members:
                # set_ (not a view): each buffer keeps its own autograd version counter, so one BN
                # layer's in-place update does not invalidate another layer's saved inputs.
                b.set_(flat.untyped_storage(), offset, b.shape, b.stride())
                offset += b.numel()
        flats.append(flat)
    return flats


@dataclass
class StepStats:
    """Device-side counters, read by the host only when logging."""

    loss_sum: torch.Tensor
    loss_n: torch.Tensor
    nonfinite_total: torch.Tensor
    nonfinite_run: torch.Tensor
    overflow_total: torch.Tensor  # fp16 steps the loss scaler skipped (finite loss, overflowing gradients)


class Trainer:
    """Trains cfg's model on cfg's data; `fit()` runs to the end and returns final metrics."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        run = cfg.run
        if run.threads:
            torch.set_num_threads(run.threads)
        if run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.dist = fdist.setup(run.device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        on_cpu = self.device.type == "cpu"
        if run.cpu_cache and not (on_cpu and cpu_cache_available()):
            fdist.cleanup()
            raise ValueError("run.cpu_cache=true needs training on the CPU with the fastface extension built "
                             f"(device {self.device.type}; {cpu_cache_info().reason or 'extension built'})")
        self.cpu_cache = run.cpu_cache if run.cpu_cache is not None else on_cpu and cpu_cache_available()
        if self.cpu_cache:
            try:  # installs the allocator now; another one of higher priority would refuse it
                with cpu_cache():
                    pass
            except RuntimeError as e:
                if run.cpu_cache:
                    fdist.cleanup()
                    raise ValueError(f"run.cpu_cache=true, but the cache cannot be enabled: {e}") from e
                self.cpu_cache = False
        # torchrun restarts the workers of a failed job: pick up its last checkpoint.
        self.resume = run.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        os.makedirs(run.output, exist_ok=True)
        self.ckpt_dir = os.path.join(run.output, "ckpt")

        if cfg.synth.enabled:
            self._make_synth()

        from fastface.data.loader import make_loader

        seed_everything(run.seed)
        self.loader = make_loader(cfg.data, self.dist.rank, self.dist.world_size)
        self.num_classes = self.loader.num_classes
        self.spec = resolve_spec(cfg, self.loader.channels)
        self.model = build_model(self.spec).to(self.device)
        if cfg.model.init:
            self._init_from(cfg.model.init)
        if run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.bn_flats = share_bn_buffers(self.model)
        # A model that splits its input by modality makes each branch's slice dense itself (one copy
        # from the loader's NCHW batch); converting the whole batch first would copy it twice.
        self.splits_input = bool(getattr(self.model, "splits_input", False))
        # run.fused None (auto): the fused training path everywhere. It was measured faster than the
        # plain modules in each mode: eager CPU runs ATen's convs + fastface.ops.bn_act (BN + residual +
        # ReLU6 in one pass each way; bench/results/train_throughput.json, fastface_fused vs
        # fastface_unfused), torch.compile and GPUs the dwconv_bn_act kernels (see RunConfig.fused).
        self.fused_train = run.fused if run.fused is not None else True
        margin = margin_from_name(cfg.loss.margin, cfg.loss.s, cfg.loss.m1, cfg.loss.m2, cfg.loss.m3)
        self.pfc = PartialFC(margin, self.spec.head.dim, self.num_classes, cfg.loss.sample_rate,
                             self.dist.rank, self.dist.world_size).to(self.device)
        self.net: nn.Module = self.model
        if self.dist.distributed:
            # Gradients as views of DDP's buckets: no copy between them after the all-reduce.
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        if run.compile:
            self.net = torch.compile(self.net)
        self._net_modules = list(self.net.modules())

        batches_per_step = run.grad_accum
        per_epoch = len(self.loader) // batches_per_step
        if per_epoch < 1:
            raise ValueError(f"an epoch has {len(self.loader)} batches on each rank, fewer than grad_accum="
                             f"{run.grad_accum}: use a smaller batch or more data")
        self.steps_per_epoch = per_epoch
        self.total_steps = per_epoch * run.epochs if run.epochs >= 1 else 0
        if run.max_steps:
            self.total_steps = min(self.total_steps, run.max_steps) if self.total_steps else run.max_steps
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[run.amp]
        self.scaler = torch.amp.GradScaler(self.device.type) if run.amp == "fp16" else None
        z = lambda dt=torch.float32: torch.zeros((), device=self.device, dtype=dt)  # noqa: E731
        self.stats = StepStats(z(torch.float64), z(), z(torch.int64), z(torch.int64), z(torch.int64))
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self._val_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._tb = None
        self.elapsed_before = 0.0
        # Wall time spent evaluating and checkpointing inside fit(): excluded from samples/s and train_s.
        self.paused_before = 0.0
        self._paused = 0.0
        if self.resume:
            self._load_latest()

    # ---- set-up ------------------------------------------------------------------------
    def _make_synth(self) -> None:
        from fastface.data import synth

        s = self.cfg.synth
        if self.is_main:
            res = synth.generate(synth.preset(s.preset, seed=s.seed), s.root, progress=self.cfg.run.progress)
            self.log(f"synthetic set {s.root}: {'reused' if res.reused else f'{res.images} images in {res.seconds:.0f} s'}")
        fdist.barrier()

    def _init_from(self, path: str) -> None:
        parent = ckpt.load_model(path, map_location="cpu").to(self.device)
        fresh = transfer_weights(parent, self.model)
        self.log(f"initialised from {path}" + (f" (fresh: {', '.join(fresh)})" if fresh else ""))

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        on_device_lr = self.cfg.sched.name == "fastface"
        fc_wd = o.weight_decay if o.fc_weight_decay is None else o.fc_weight_decay
        groups = [{"params": list(self.model.parameters()), "weight_decay": o.weight_decay},
                  {"params": list(self.pfc.parameters()), "weight_decay": fc_wd}]
        # A tensor LR lets the on-device scheduler change it without a host round trip.
        lr: Any = torch.tensor(o.lr, device=self.device) if on_device_lr else o.lr
        fused = all(p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
                    for g in groups for p in g["params"])
        if o.name == "sgd":
            opt = torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov, fused=fused)
            if fused and o.momentum:
                # torch's fused SGD allocates the momentum buffers with empty_like on its first step and
                # takes them as initialised from then on, even when found_inf skipped that step: a first
                # step skipped as non-finite (or an fp16 overflow) left garbage momentum that the next
                # step applied (weights blown up). Zero buffers give the same first update (dampening
                # is 0: buf = 0 * momentum + grad = grad) and are initialised whatever is skipped.
                for g in groups:
                    for p in g["params"]:
                        opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            opt = torch.optim.AdamW(groups, lr=lr, betas=o.betas, fused=fused)
        self.fused_optimizer = fused
        return opt

    def _make_scheduler(self):
        from fastface.train.schedules import build_scheduler

        return build_scheduler(self.cfg.sched, self.optimizer, self.total_steps)

    # ---- logging -------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        """Print on rank 0."""
        if self.is_main:
            print(f"[fastface] {msg}", flush=True)

    def _tensorboard(self):
        if self._tb is None and self.is_main and self.cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(self.cfg.run.output, "tb"))
            except ImportError:
                self._tb = False
        return self._tb or None

    # ---- checkpoints -------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        st = {
            "pfc": self.pfc.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loader": self.loader.state_dict(),
            "rng": ckpt.rng_state(),
            "step": self.step,
            "epoch": self.epoch,
            "stats": {k: getattr(self.stats, k).clone()
                      for k in ("nonfinite_total", "nonfinite_run", "overflow_total")},
            "elapsed": self.elapsed_before + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0),
            "paused": self.paused_before + self._paused,
        }
        if self.is_main:
            st["model"] = self.model.state_dict()
            st["spec"] = self.spec.to_json()
            st["history"] = self.history
            st["eval_history"] = self.eval_history
        return st

    def save_checkpoint(self) -> str:
        """Write a complete checkpoint of this step (collective: every rank must call it)."""
        meta = {"spec": json.loads(self.spec.to_json()), "config": to_dict(self.cfg), "epoch": self.epoch,
                "num_classes": self.num_classes}
        return ckpt.save(self.ckpt_dir, self.step, self.dist.rank, self.dist.world_size, self._state(), meta,
                         keep=self.cfg.run.keep_ckpts)

    def _load_latest(self) -> None:
        path = ckpt.latest(self.ckpt_dir)
        if path is None:
            self.log(f"resume: no complete checkpoint in {self.ckpt_dir}, starting fresh")
            return
        state, meta = ckpt.load(path, self.dist.rank, self.dist.world_size, map_location=self.device)
        main, _ = (state, meta) if self.is_main else ckpt.load(path, 0, self.dist.world_size, map_location=self.device)
        if main["spec"] != self.spec.to_json():
            raise ckpt.CheckpointError(f"{path}: its ArchSpec differs from this run's model")
        self.model.load_state_dict(main["model"])
        self.history = main.get("history", [])
        self.eval_history = main.get("eval_history", [])
        self.pfc.load_state_dict(state["pfc"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.epoch = state["step"], state["epoch"]
        for k, v in state["stats"].items():
            getattr(self.stats, k).copy_(v)
        self.elapsed_before = state.get("elapsed", 0.0)
        self.paused_before = state.get("paused", 0.0)
        self.log(f"resumed from {path} (step {self.step}, epoch {self.epoch})")

    # ---- one step ----------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One optimiser step over `grad_accum` batches (no host synchronisation)."""
        with cpu_cache() if self.cpu_cache else contextlib.nullcontext():
            self._train_step(batches)

    def _train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        run = self.cfg.run
        if not all(m.training for m in self._net_modules):  # (a train() walk costs ~1 ms a step on its own)
            self.net.train()
        saved_bn = [f.clone() for f in self.bn_flats]
        loss_sum = torch.zeros((), device=self.device)
        n = len(batches)
        for i, (x, y) in enumerate(batches):
            x = x.to(self.device, non_blocking=True)
            if run.channels_last and not self.splits_input:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(self.device, non_blocking=True)
            sync = contextlib.nullcontext()
            if self.dist.distributed and i < n - 1:
                sync = self.net.no_sync() if hasattr(self.net, "no_sync") else sync
            with sync:
                with self._autocast(), fused_train(self.fused_train):
                    emb = self.net(x)
                loss = self.pfc(emb, y)
                scaled = loss / n
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum = loss_sum + loss.detach().float()
        loss_mean = fdist.all_reduce_mean(loss_sum / n)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        clip = self.cfg.optim.clip_grad
        # A fused optimiser (without a loss scaler) clips inside its step: it divides the gradients by clip_scale,
        # clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6)) inverted; on the CPU clip_grad_norm_'s foreach
        # multiply is a loop of one small op per parameter (~170 a step).
        fused_clip = clip > 0 and self.fused_optimizer and self.scaler is None
        if clip > 0 and not fused_clip:
            norm = nn.utils.clip_grad_norm_(params, clip, foreach=True)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        clip_scale = ((norm + 1e-6) / clip).clamp_min(1.0).float() if fused_clip else None
        finite_loss = torch.isfinite(loss_mean)
        bad = ~(finite_loss & torch.isfinite(norm))
        # Under fp16 loss scaling, overflowing gradients with a finite loss are routine (the scaler
        # lowers its scale and the step is skipped): they do not count towards the non-finite stop.
        nonfinite = ~finite_loss if self.scaler is not None else bad
        if self.fused_optimizer:
            # The fused optimiser skips the whole update (weight decay and momentum too) on device.
            self.optimizer.found_inf = bad.float()
            self.optimizer.grad_scale = clip_scale
            self.optimizer.step()
        elif not bool(bad):  # (only unfused optimisers pay this host sync)
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        # BN running statistics from a non-finite forward would poison later evaluations.
        for f, s in zip(self.bn_flats, saved_bn):
            f.copy_(torch.where(bad, s, f))
        self.scheduler.step(loss_mean) if getattr(self.scheduler, "takes_loss", False) else self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st = self.stats
        st.loss_sum += torch.where(finite_loss, loss_mean.double(), 0.0)
        st.loss_n += finite_loss.float()
        st.nonfinite_total += nonfinite.long()
        st.nonfinite_run.copy_((st.nonfinite_run + 1) * nonfinite.long())
        st.overflow_total += (bad & ~nonfinite).long()

    # ---- evaluation --------------------------------------------------------------------
    def _load_val_sets(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._val_sets is None:
            from fastface.data.verification import load_pairs

            self._val_sets = {}
            for path in self.cfg.eval.sets:
                name = os.path.splitext(os.path.basename(path))[0]
                self._val_sets[name] = load_pairs(path, self.loader.channels, self.cfg.data.image_size)
        return self._val_sets

    def evaluate(self) -> dict[str, dict[str, Any]]:
        """Verification on every configured .bin set (rank 0 computes, others wait)."""
        from fastface.eval.verification import evaluate_model

        out: dict[str, dict[str, Any]] = {}
        if self.is_main and self.cfg.eval.sets:
            for name, (images, issame) in self._load_val_sets().items():
                r = evaluate_model(self.model, images, issame, self.cfg.eval.batch_size, self.cfg.eval.nfolds,
                                   self.cfg.eval.flip, device=self.device, channels_last=self.cfg.run.channels_last)
                out[name] = r.as_dict()
                self.log(f"step {self.step} {name}: {r}")
                self.eval_history.append({"step": self.step, "set": name, **r.as_dict()})
                tb = self._tensorboard()
                if tb is not None:
                    tb.add_scalar(f"val/{name}_accuracy", r.accuracy, self.step)
            self._write_csv()
        fdist.barrier()
        return out

    # ---- the loop ------------------------------------------------------------------------
    def _check_nonfinite(self) -> None:
        run_len = int(self.stats.nonfinite_run)
        if run_len >= self.cfg.run.max_nonfinite_run:
            last = ckpt.latest(self.ckpt_dir)
            raise NonFiniteLossError(
                f"the loss was non-finite for {run_len} steps in a row (up to step {self.step}); those steps were "
                f"skipped without changing the weights. Stopping. Last complete checkpoint: {last or 'none'}. "
                f"Lower optim.lr, use run.amp=bf16 instead of fp16, or check the data.")

    def _log_step(self, t_last: float, paused_last: float, samples: int, bar) -> None:
        st = self.stats
        n = float(st.loss_n)
        loss = float(st.loss_sum) / n if n else float("nan")  # nan: every loss of the window was non-finite
        st.loss_sum.zero_()
        st.loss_n.zero_()
        lr = float(self.scheduler.get_last_lr()[0])
        dt = max(1e-9, time.perf_counter() - t_last - (self._paused - paused_last))
        sps = samples * self.dist.world_size / dt
        elapsed = self.elapsed_before + time.perf_counter() - self._t0
        done = self.step - self._start_step
        eta = (self.total_steps - self.step) * (time.perf_counter() - self._t0) / max(1, done)
        row = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "samples_per_s": sps,
               "nonfinite": int(st.nonfinite_total), "overflow": int(st.overflow_total), "elapsed_s": elapsed,
               "train_s": elapsed - self.paused_before - self._paused}
        self.history.append(row)
        if self.is_main:
            msg = (f"step {self.step}/{self.total_steps} epoch {self.epoch} loss {loss:.4f} lr {lr:.3g} "
                   f"{sps:.0f} samples/s eta {eta / 60:.1f} min"
                   + (f" nonfinite {row['nonfinite']}" if row["nonfinite"] else "")
                   + (f" fp16-overflow skips {row['overflow']}" if row["overflow"] else ""))
            if bar is not None:
                bar.console.print(f"[fastface] {msg}")
            else:
                self.log(msg)
            tb = self._tensorboard()
            if tb is not None:
                for k in ("loss", "lr", "samples_per_s"):
                    tb.add_scalar(f"train/{k}", row[k], self.step)
            self._write_csv()

    def fit(self) -> dict[str, Any]:
        """Train to total_steps; returns the final metrics (also written to output/metrics.json)."""
        run = self.cfg.run
        self._t0 = time.perf_counter()
        self._start_step = self.step
        accum = run.grad_accum
        self.log(f"{self.spec.describe()} | {self.num_classes} classes | {self.loader.num_samples} images | "
                 f"world {self.dist.world_size} | {self.total_steps} steps ({self.steps_per_epoch}/epoch) | "
                 f"loader {self.loader.backend} | device {self.device}")
        bar, task = self._progress()
        t_last, paused_last, samples = time.perf_counter(), self._paused, 0
        batch = self.cfg.data.batch_size
        try:
            while self.step < self.total_steps:
                self.loader.set_epoch(self.epoch)
                pending: list[tuple[torch.Tensor, torch.Tensor]] = []
                for x, y in self.loader:
                    pending.append((x, y))
                    if len(pending) < accum:
                        continue
                    self.train_step(pending)
                    samples += sum(b[0].shape[0] for b in pending)
                    pending = []
                    self.step += 1
                    if bar is not None:
                        bar.update(task, completed=self.step)
                    last = self.step >= self.total_steps
                    if self.step % run.log_every == 0 or last:
                        self._log_step(t_last, paused_last, samples, bar)
                        t_last, paused_last, samples = time.perf_counter(), self._paused, 0
                    if self.step % min(run.log_every, max(1, run.max_nonfinite_run)) == 0 or last:
                        self._check_nonfinite()
                    if run.eval_every and self.step % run.eval_every == 0 and not last:
                        self._paused_call(self.evaluate)
                    if run.ckpt_every and self.step % run.ckpt_every == 0 and not last:
                        self._paused_call(self.save_checkpoint)
                    if last:
                        break
                else:
                    self.epoch += 1
                    continue
                break
        finally:
            if bar is not None:
                bar.stop()
        final = self.evaluate()
        self.save_checkpoint()
        return self._finish(final)

    def _paused_call(self, fn) -> None:
        t = time.perf_counter()
        fn()
        self._paused += time.perf_counter() - t

    def _progress(self):
        if not (self.is_main and self.cfg.run.progress and sys.stdout.isatty()):
            return None, None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        bar.start()
        return bar, bar.add_task("train", total=self.total_steps, completed=self.step)

    def _finish(self, final: dict[str, Any]) -> dict[str, Any]:
        from fastface.eval.cost import spec_cost

        params, macs = spec_cost(self.spec)
        sps = [h["samples_per_s"] for h in self.history[-5:]]
        elapsed = self.elapsed_before + time.perf_counter() - self._t0
        metrics = {"step": self.step, "epoch": self.epoch, "verification": final, "params": params, "macs": macs,
                   "samples_per_s": float(np.median(sps)) if sps else None, "elapsed_s": elapsed,
                   "train_s": self.history[-1]["train_s"] if self.history else None,
                   "nonfinite_steps": int(self.stats.nonfinite_total),
                   "overflow_steps": int(self.stats.overflow_total), "spec": json.loads(self.spec.to_json())}
        if self.is_main:
            out = self.cfg.run.output
            ckpt.save_model(os.path.join(out, "model.pt"), self.model, self.spec.to_json())
            self.spec.save(os.path.join(out, "spec.json"))
            atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=2, default=float))
            if self.cfg.run.plot:
                from fastface.train.plots import plot_training

                plot_training(self.history, self.eval_history, os.path.join(out, "curves.png"))
            tb = self._tensorboard()
            if tb is not None:
                tb.close()
        fdist.barrier()
        return metrics

    def _write_csv(self) -> None:
        out = self.cfg.run.output
        for name, rows in (("log.csv", self.history), ("eval.csv", self.eval_history)):
            if not rows:
                continue
            keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()})
            atomic_write_text(os.path.join(out, name), buf.getvalue())

    def close(self) -> None:
        """Stop loader workers and leave the process group."""
        self.loader.close()
        if self.cpu_cache:
            empty_cpu_cache()
        fdist.cleanup()


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a full training job (one process of it under torchrun)."""
    t = Trainer(cfg)
    try:
        return t.fit()
    finally:
        t.close()

