"""The trainer end to end on a tiny synthetic RGB-D set: training, checkpoints, kill -9 + resume,
non-finite losses, gradient accumulation, and torchrun restarts."""
from __future__ import annotations

import json
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
    cfg = load_train_config("configs/demo.yaml", tiny_overrides(tiny_set, out, "run.plot=true"))
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
        for x, y in (a, b):
            t.model.train()
            loss = t.pfc(t.model(x), y)
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
