"""The trainer end to end on a tiny synthetic RGB-D set: training, checkpoints, kill -9 + resume,
non-finite losses, gradient accumulation, and torchrun restarts."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastface.train.config import load_train_config
from fastface.train.trainer import NonFiniteLossError, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    """The 'tiny' synthetic preset: 8 identities x 6 samples + verification pairs (seconds to make)."""
    from fastface.data import synth

    out = str(tmp_path_factory.mktemp("synth-tiny"))
    synth.generate(synth.preset("tiny"), out, workers=1, progress=False)
    return out


def tiny_overrides(data: str, out: str, *extra: str) -> list[str]:
    return [f"data.path={data}/train.rec", "data.batch_size=8", "data.num_workers=0", "data.backend=torch",
            "data.augment=false", "synth.enabled=false", "model.width=0.25", "model.embedding=32",
            "model.split=1", f"run.output={out}", "run.epochs=2", "run.log_every=2", "run.ckpt_every=3",
            "run.progress=false", "run.tensorboard=false", "run.plot=false", "run.threads=1",
            "run.deterministic=true", "run.channels_last=false", "sched.name=fastface", "optim.lr=0.05",
            f"eval.sets=[{data}/val.bin]", "eval.nfolds=2", *extra]


def final_weights(out: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out, "model.pt"), weights_only=False)["state_dict"]


def test_train_writes_everything(tiny_set, tmp_path):
    out = str(tmp_path / "run")
    cfg = load_train_config("configs/demo.yaml", tiny_overrides(tiny_set, out, "run.plot=true", "run.tensorboard=true",
                                                                "run.eval_every=4"))
    t = Trainer(cfg)
    try:
        m = t.fit()
    finally:
        t.close()
    assert m["step"] == t.total_steps == 12  # 48 images / 8 per batch x 2 epochs
    assert 0 <= m["verification"]["val"]["accuracy"] <= 1
    for f in ("model.pt", "spec.json", "metrics.json", "log.csv", "eval.csv", "curves.png"):
        assert os.path.exists(os.path.join(out, f)), f
    with open(os.path.join(out, "log.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0].startswith("step") and len(rows) == 1 + 6
    from fastface.train.checkpoint import complete_steps

    assert complete_steps(os.path.join(out, "ckpt"))[-1] == 12
    assert [e["step"] for e in t.eval_history] == [4, 8, 12]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tb")))
    # Evaluations and checkpoints inside the loop are left out of the training time and samples/s.
    assert all(0 < h["train_s"] <= h["elapsed_s"] for h in t.history)
    assert t.history[-1]["elapsed_s"] - t.history[-1]["train_s"] == pytest.approx(t._paused, abs=1e-6)
    assert t._paused > 0 and m["train_s"] == t.history[-1]["train_s"]


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fastface", "train", "--config", "configs/demo.yaml", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_kill_9_and_resume_gives_identical_weights(tiny_set, tmp_path):
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    p = _run_cli(tiny_overrides(tiny_set, ref_out))
    assert p.wait(600) == 0, p.stdout.read()
    p = _run_cli(tiny_overrides(tiny_set, out, "run.epochs=2"))
    # Kill -9 once the first checkpoint is complete (mid-epoch: 6 batches per epoch).
    deadline = time.time() + 600
    while not os.path.exists(os.path.join(out, "ckpt", "step-00000003", "meta.json")):
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(os.path.join(out, "model.pt"))
    r = _run_cli(tiny_overrides(tiny_set, out, "run.resume=true"))
    log = r.stdout.read()
    assert r.wait(600) == 0, log
    assert "resumed from" in log
    a, b = final_weights(ref_out), final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nonfinite_losses_skip_steps_then_stop(tiny_set, tmp_path, monkeypatch):
    out = str(tmp_path / "nan")
    cfg = load_train_config("configs/demo.yaml", tiny_overrides(tiny_set, out, "run.max_nonfinite_run=4",
                                                                "run.ckpt_every=2"))
    t = Trainer(cfg)
    real_forward = t.pfc.forward
    calls = {"n": 0}

    def poisoned(emb, labels):
        calls["n"] += 1
        loss = real_forward(emb, labels)
        return loss * float("nan") if calls["n"] > 2 else loss  # steps 3.. are NaN

    monkeypatch.setattr(t.pfc, "forward", poisoned)
    before = {}
    with pytest.raises(NonFiniteLossError, match="non-finite for 4 steps in a row") as e:
        orig_step = t.train_step

        def step_and_snapshot(batches):
            if t.step == 2:
                before.update({k: v.clone() for k, v in t.model.state_dict().items()})
            orig_step(batches)

        t.train_step = step_and_snapshot
        t.fit()
    # Checkpoints kept being written (every 2 steps); the weights they hold are the good ones.
    assert "Last complete checkpoint" in str(e.value) and "step-00000004" in str(e.value)
    saved = torch.load(os.path.join(out, "ckpt", "step-00000004", "rank0.pt"), weights_only=False)["model"]
    for k, v in before.items():
        assert torch.equal(v, saved[k]), k
    after = t.model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed during skipped steps"
    assert int(t.stats.nonfinite_total) >= 4
    t.close()


def test_grad_accumulation_averages_micro_batches(tiny_set, tmp_path):
    cfg = load_train_config("configs/demo.yaml", tiny_overrides(tiny_set, str(tmp_path / "acc"), "run.grad_accum=2",
                                                                "optim.clip_grad=0", "optim.lr=0",
                                                                "optim.weight_decay=0", "sched.name=constant"))
    t = Trainer(cfg)
    try:
        t.loader.set_epoch(0)
        it = iter(t.loader)
        a, b = next(it), next(it)
        params = list(t.model.parameters()) + list(t.pfc.parameters())
        refs = []
        from fastface.models.mobilenetv2 import fused_train

        for x, y in (a, b):
            t.model.train()
            with fused_train(t.fused_train):  # the same kernels as the trainer's step
                emb = t.model(x)
            loss = t.pfc(emb, y)
            refs.append(torch.autograd.grad(loss, params))
        captured = []
        t.optimizer.zero_grad = lambda set_to_none=True: captured.append([p.grad.clone() for p in params])
        t.train_step([a, b])
        for g, ga, gb in zip(captured[0], *refs):
            torch.testing.assert_close(g, (ga + gb) / 2, atol=1e-6, rtol=1e-5)
    finally:
        t.close()


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_resumes(tiny_set, tmp_path):
    out = str(tmp_path / "ddp")
    args = tiny_overrides(tiny_set, out, "run.epochs=3", "data.batch_size=4")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2",
           "-m", "fastface", "train", "--config", "configs/demo.yaml", *args]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 600
    while not os.path.exists(os.path.join(out, "ckpt", "step-00000003", "meta.json")):
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    # Kill one worker (a grandchild: torchrun -> workers) with SIGKILL.
    workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) >= 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    log = p.communicate(timeout=900)[0]
    assert p.returncode == 0, log
    assert "resumed from" in log
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert m["step"] == 18  # 48 images / (4 x 2 ranks) x 3 epochs


@pytest.mark.parametrize("extra", [
    ["run.amp=bf16"], ["run.amp=bf16", "run.fused=false"], ["run.amp=fp16"], ["run.amp=fp16", "run.fused=false"],
    ["optim.name=adamw", "optim.lr=1e-3"], ["run.channels_last=true", "sched.name=poly", "sched.warmup_steps=1"]],
    ids=["bf16", "bf16-unfused", "fp16", "fp16-unfused", "adamw", "channels_last-poly"])
def test_precisions_optimisers_and_schedules_train(tiny_set, tmp_path, extra):
    cfg = load_train_config("configs/demo.yaml", tiny_overrides(tiny_set, str(tmp_path / "p"), "eval.sets=[]",
                                                                "run.ckpt_every=0", *extra))
    t = Trainer(cfg)
    try:
        before = [p.detach().clone() for p in t.model.parameters()]
        m = t.fit()
    finally:
        t.close()
    assert m["step"] == 12 and m["nonfinite_steps"] == 0
    assert all(math.isfinite(h["loss"]) for h in t.history)
    fp16 = "run.amp=fp16" in extra
    assert (t.scaler is not None) == fp16  # fp16 needs loss scaling, bf16 does not
    # fp16: the scaler starts at 2^16 and skips steps whose gradients overflow (counted apart).
    assert (m["overflow_steps"] < 12) if fp16 else (m["overflow_steps"] == 0)
    assert type(t.optimizer).__name__ == ("AdamW" if "optim.name=adamw" in extra else "SGD")
    assert t.fused_optimizer and t.optimizer.defaults["fused"]
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_grad_clipping_bounds_the_global_norm(tiny_set, tmp_path):
    cfg = load_train_config("configs/demo.yaml", tiny_overrides(tiny_set, str(tmp_path / "clip"),
                                                                "optim.clip_grad=0.01", "eval.sets=[]"))
    t = Trainer(cfg)
    try:
        t.loader.set_epoch(0)
        batch = next(iter(t.loader))
        seen = []
        real_step = t.optimizer.step

        def step_and_record(*a, **k):
            seen.extend((p, g["weight_decay"], p.grad.clone(), p.detach().clone())
                        for g in t.optimizer.param_groups for p in g["params"] if p.grad is not None)
            return real_step(*a, **k)

        t.optimizer.step = step_and_record
        t.train_step([batch])
        raw = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for _, _, g, _ in seen]))
        assert raw > 1.0  # the raw norm of this loss is far above 0.01
        # The fused step clips inside the update: on this first step (zeroed momentum) the buffer is the
        # gradient it applied, d = clip(g) + wd * p, so clip(g) = buffer - wd * p.
        applied = [t.optimizer.state[p]["momentum_buffer"] - wd * p0 for p, wd, _, p0 in seen]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in applied]))
        assert float(norm) == pytest.approx(0.01, rel=1e-4)
        for d, (_, _, g, _) in zip(applied, seen):
            torch.testing.assert_close(d, g * (0.01 / (raw + 1e-6)), rtol=1e-4, atol=1e-9)
    finally:
        t.close()


def test_shared_bn_buffers_train_exactly_like_separate_ones():
    from fastface.arch import ArchSpec
    from fastface.losses import PartialFC, arcface
    from fastface.models import build_model
    from fastface.train.trainer import share_bn_buffers

    x = torch.randn(6, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    states = []
    for shared in (False, True):
        torch.manual_seed(0)
        model = build_model(ArchSpec.face(split=1, width=0.25, embedding=16, input_size=32)).train()
        flats = share_bn_buffers(model) if shared else []
        pfc = PartialFC(arcface(), 16, 3)
        opt = torch.optim.SGD(list(model.parameters()) + list(pfc.parameters()), lr=0.1, momentum=0.9)
        for _ in range(3):  # the backward needs each layer's saved tensors unbumped by other layers' updates
            opt.zero_grad()
            pfc(model(x), y).backward()
            opt.step()
        states.append(model.state_dict())
        if shared:
            bn = model.trunk[0].dw.bn
            assert bn.running_mean.untyped_storage().data_ptr() == flats[0].untyped_storage().data_ptr()
            assert [f.dtype for f in flats] == [torch.float32, torch.int64]
            snapshot = [f.clone() for f in flats]
            model(x)  # a forward in training mode moves the running statistics inside the flat tensors
            assert not any(torch.equal(a, f) for a, f in zip(snapshot, flats))
            for a, f in zip(snapshot, flats):  # ... and restoring the flat tensors restores every layer
                f.copy_(a)
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_a_skipped_first_step_leaves_the_next_step_exact(tiny_set, tmp_path):
    """A non-finite first step changes nothing: the next step equals a fresh trainer's first step.

    (torch's fused SGD leaves its momentum buffers uninitialised when found_inf skips its first
    step; the trainer zero-initialises them.)"""
    states = []
    for skip_first in (False, True):
        cfg = load_train_config("configs/demo.yaml", tiny_overrides(tiny_set, str(tmp_path / f"s{skip_first}"),
                                                                    "eval.sets=[]", "run.ckpt_every=0",
                                                                    "sched.name=constant", "sched.warmup_steps=0"))
        t = Trainer(cfg)
        try:
            t.loader.set_epoch(0)
            x, y = next(iter(t.loader))
            if skip_first:
                t.train_step([(torch.full_like(x, float("nan")), y)])
                assert int(t.stats.nonfinite_total) == 1
            t.train_step([(x, y)])
            states.append({k: v.clone() for k, v in t.model.state_dict().items()})
        finally:
            t.close()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


@pytest.mark.parametrize("extra,fused", [([], True), (["run.fused=true"], True), (["run.fused=false"], False),
                                         (["run.compile=true"], True),
                                         (["run.fused=false", "run.compile=true"], False)])
def test_fused_training_kernels_where_they_pay(tiny_set, tmp_path, extra, fused):
    """run.fused auto: the fused path, measured faster in each mode (eager CPU: ATen convs + bn_act)."""
    cfg = load_train_config("configs/demo.yaml", tiny_overrides(tiny_set, str(tmp_path / "f"), "eval.sets=[]", *extra))
    t = Trainer(cfg)
    try:
        assert t.device.type == "cpu" and t.fused_train is fused
    finally:
        t.close()


def test_cpu_steps_run_under_the_caching_allocator(tiny_set, tmp_path, monkeypatch):
    """run.cpu_cache auto: on for CPU training (blocks reused from the second step), off again between
    steps, its idle blocks released at close, off when the allocator cannot be installed; true where it
    cannot work is a config error naming it."""
    from fastface.ops import cpu_cache_info

    from fastface.train import trainer as trainer_mod

    cfg = load_train_config("configs/demo.yaml", tiny_overrides(tiny_set, str(tmp_path / "c"), "eval.sets=[]",
                                                                "data.batch_size=16", "model.width=1.0"))
    t = Trainer(cfg)
    try:
        if not trainer_mod.cpu_cache_available():
            pytest.skip("fastface._C not built")
        assert t.cpu_cache
        batch = next(iter(t.loader))
        hits = cpu_cache_info().hits
        t.train_step([batch])
        t.train_step([batch])
        info = cpu_cache_info()
        assert info.hits > hits and not info.enabled
    finally:
        t.close()
    assert cpu_cache_info().cached_bytes == 0
    off = load_train_config("configs/demo.yaml", tiny_overrides(tiny_set, str(tmp_path / "o"), "eval.sets=[]",
                                                                "run.cpu_cache=false"))
    t = Trainer(off)
    try:
        assert not t.cpu_cache
    finally:
        t.close()
    def refuse(enabled: bool = True):
        raise RuntimeError("c10's CPU allocator is held by another allocator of higher priority")

    monkeypatch.setattr(trainer_mod, "cpu_cache", refuse)  # auto: trains without it
    t = Trainer(load_train_config("configs/demo.yaml", tiny_overrides(tiny_set, str(tmp_path / "r"), "eval.sets=[]")))
    try:
        assert not t.cpu_cache
    finally:
        t.close()
    with pytest.raises(ValueError, match="run.cpu_cache=true, but the cache cannot be enabled"):
        Trainer(load_train_config("configs/demo.yaml", tiny_overrides(tiny_set, str(tmp_path / "r2"), "eval.sets=[]",
                                                                      "run.cpu_cache=true")))
    monkeypatch.setattr(trainer_mod, "cpu_cache_available", lambda: False)
    on = load_train_config("configs/demo.yaml", tiny_overrides(tiny_set, str(tmp_path / "n"), "eval.sets=[]",
                                                               "run.cpu_cache=true"))
    with pytest.raises(ValueError, match="run.cpu_cache=true"):
        Trainer(on)
