"""Checkpoints that survive a kill at any moment.

Layout: <dir>/step-00001234/{meta.json, rank0.pt, rank1.pt, ...}. Every rank writes its own
file atomically into step-XXXXXXXX.tmp/; after a barrier rank 0 writes meta.json and renames
the folder. A folder without the .tmp suffix is therefore complete; `latest()` ignores the rest.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

from fastface.train.dist import barrier
from fastface.utils import atomic_write, atomic_write_text

_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (names the path and why)."""


def rng_state() -> dict[str, Any]:
    """All RNG states a deterministic resume needs."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def step_dir(root: str, step: int) -> str:
    """Folder of the checkpoint at `step`."""
    return os.path.join(root, f"step-{step:08d}")


def save(root: str, step: int, rank: int, world_size: int, state: dict[str, Any], meta: dict[str, Any],
         keep: int = 2) -> str:
    """Write this rank's state; rank 0 completes the checkpoint after all ranks wrote (collective)."""
    final = step_dir(root, step)
    tmp = final + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    atomic_write(os.path.join(tmp, f"rank{rank}.pt"), lambda f: torch.save(state, f))
    barrier()
    if rank == 0:
        atomic_write_text(os.path.join(tmp, "meta.json"),
                          json.dumps({**meta, "step": step, "world_size": world_size}, indent=2))
        if os.path.exists(final):  # a re-save of the same step (resumed at a checkpoint boundary)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
    barrier()
    return final


def _prune(root: str, keep: int) -> None:
    done = complete_steps(root)
    for s in done[:-keep] if keep > 0 else []:
        shutil.rmtree(step_dir(root, s), ignore_errors=True)
    for name in os.listdir(root):  # leftovers of killed saves
        if name.endswith(".tmp") and _STEP_DIR.match(name[:-4]) and int(name[5:13]) < (done[-1] if done else 0):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def complete_steps(root: str) -> list[int]:
    """Steps with a complete checkpoint under root, ascending."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(root, name, "meta.json")):
            out.append(int(m.group(1)))
    return sorted(out)


def latest(root: str) -> str | None:
    """The newest complete checkpoint folder, or None."""
    steps = complete_steps(root)
    return step_dir(root, steps[-1]) if steps else None


def load(path: str, rank: int, world_size: int, map_location: Any = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """(this rank's state, meta) of a complete checkpoint; errors name the file and the problem."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({e})") from e
    if meta.get("world_size") != world_size:
        raise CheckpointError(f"{path} was written by {meta.get('world_size')} ranks; resume it with the same "
                              f"number of processes (now {world_size}): Partial FC shards and loader shards depend on it")
    fpath = os.path.join(path, f"rank{rank}.pt")
    try:
        state = torch.load(fpath, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{fpath}: cannot load ({type(e).__name__}: {e})") from e
    return state, meta


def save_model(path: str, model: torch.nn.Module, spec_json: str, extra: dict[str, Any] | None = None) -> None:
    """A self-contained model file: ArchSpec JSON + weights (what `fastface eval/export` read)."""
    blob = {"spec": spec_json, "state_dict": model.state_dict(), **(extra or {})}
    atomic_write(path, lambda f: torch.save(blob, f))


def load_model(path: str, map_location: Any = "cpu") -> torch.nn.Module:
    """Rebuild a model saved by save_model (or the rank-0 file of a trainer checkpoint)."""
    from fastface.arch import ArchSpec
    from fastface.models import build_model

    if os.path.isdir(path):
        path = os.path.join(path, "rank0.pt")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {e})") from e
    if "spec" not in blob or ("state_dict" not in blob and "model" not in blob):
        raise CheckpointError(f"{path}: not a fastface model file (no spec / weights)")
    model = build_model(ArchSpec.from_json(blob["spec"]))
    model.load_state_dict(blob.get("state_dict", blob.get("model")))
    return model
