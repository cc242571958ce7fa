"""One candidate's training process: ``python -m fastface.search.worker JOB.json`` (alone, or every
rank under torchrun). It runs fastface's own Trainer on the job's config + overrides (the
child's ArchSpec as model.spec, its transferred weights as model.init), optionally starts
the loss head from the parent's trained class centres, and writes ``result.json`` (rank 0)
once the model, metrics and checkpoint are complete.

``python -m fastface.search.worker --exec CMD ...`` replaces itself with CMD (torchrun) after
asking the kernel to kill it when its parent dies: a search driver killed with SIGKILL
takes its training processes with it instead of leaving them to race a resumed search.

A job is JSON: {"config": YAML path, "overrides": [key=value, ...], "head": path or null,
"result": path, "key": candidate key, "eval_only": bool}.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

PARENT_ENV = "FASTFACE_SEARCH_PARENT"


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux); exit now if the expected parent is gone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    want = os.environ.get(PARENT_ENV)
    # The parent may have died before prctl took effect: then we were re-parented already.
    if want is not None and os.getppid() != int(want):
        os._exit(1)


def load_head(pfc: Any, path: str) -> bool:
    """Copy the parent's class centres (all classes, saved by `save_head`) into this rank's shard."""
    import torch

    blob = torch.load(path, map_location="cpu", weights_only=True)
    full = blob["weight"]
    if full.shape[0] != pfc.num_classes or full.shape[1] != pfc.weight.shape[1]:
        return False
    with torch.no_grad():
        pfc.weight.copy_(full[pfc.class_start:pfc.class_start + pfc.num_local].to(pfc.weight))
    return True


def save_head(ckpt_dir: str, out: str) -> str | None:
    """Gather the class centres of every rank of the newest checkpoint under ckpt_dir into one file."""
    import torch

    from fastface.train import checkpoint as ckpt
    from fastface.utils import atomic_write

    path = ckpt.latest(ckpt_dir)
    if path is None:
        return None
    with open(os.path.join(path, "meta.json")) as f:
        world = json.load(f)["world_size"]
    # Partial FC shards are contiguous class ranges in rank order.
    shards = [torch.load(os.path.join(path, f"rank{r}.pt"), map_location="cpu", weights_only=False)["pfc"]["weight"]
              for r in range(world)]
    weight = torch.cat(shards).contiguous()
    atomic_write(out, lambda f: torch.save({"weight": weight}, f))
    return out


def run_job(job: dict[str, Any]) -> int:
    """Train (or only evaluate) one candidate as the job says; rank 0 writes the result file."""
    from fastface.eval.cost import spec_cost
    from fastface.train import checkpoint as ckpt
    from fastface.train.config import load_train_config
    from fastface.train.trainer import Trainer
    from fastface.utils import atomic_write_text

    t0 = time.perf_counter()
    cfg = load_train_config(job["config"], job["overrides"])
    trainer = Trainer(cfg)
    head_loaded = False
    try:
        # A resumed run restored its own head from the checkpoint: keep it.
        if job.get("head") and trainer.step == 0 and os.path.exists(job["head"]):
            head_loaded = load_head(trainer.pfc, job["head"])
            trainer.log(f"loss head: {'class centres from ' + job['head'] if head_loaded else 'fresh (parent head does not fit)'}")
        if job.get("eval_only"):
            final = trainer.evaluate()
            params, macs = spec_cost(trainer.spec)
            metrics = {"step": 0, "epoch": 0, "verification": final, "params": params, "macs": macs,
                       "samples_per_s": None, "elapsed_s": 0.0, "nonfinite_steps": 0,
                       "spec": json.loads(trainer.spec.to_json())}
            if trainer.is_main:
                ckpt.save_model(os.path.join(cfg.run.output, "model.pt"), trainer.model, trainer.spec.to_json())
        else:
            metrics = trainer.fit()
    finally:
        trainer.close()
    if not trainer.is_main:
        return 0
    head = None
    if not job.get("eval_only"):
        head = save_head(trainer.ckpt_dir, os.path.join(cfg.run.output, "head.pt"))
    elif job.get("head") and head_loaded:
        head = job["head"]
    result = {"key": job["key"], "metrics": metrics, "weights": os.path.join(cfg.run.output, "model.pt"), "head": head,
              "world_size": trainer.dist.world_size, "threads": cfg.run.threads, "wall_s": time.perf_counter() - t0,
              "trainer_elapsed_s": metrics.get("elapsed_s"), "head_loaded": head_loaded}
    atomic_write_text(job["result"], json.dumps(result, indent=2, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: a job file, or --exec CMD... (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    die_with_parent()
    if argv and argv[0] == "--exec":
        os.environ[PARENT_ENV] = str(os.getpid())  # exec keeps the pid: CMD's children check against it
        os.execvp(argv[1], argv[1:])
    if len(argv) != 1:
        print("usage: python -m fastface.search.worker JOB.json | --exec CMD ...", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
