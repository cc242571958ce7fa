"""Where the benchmarks save their results: bench/results/<name>.json (BENCH_OUT overrides the name), written
atomically, with the machine facts every result carries."""
from __future__ import annotations

import json
import os
import platform
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def save_result(default_name: str, payload: dict, env: str = "BENCH_OUT", section: str | None = None) -> str:
    """Writes payload plus threads, load average, torch version, machine and time to bench/results/<default_name>
    (the environment variable `env` overrides the name); with `section`, as that key of the file, the file's other
    sections kept. Its path."""
    from fastface.utils import atomic_write_text

    payload = {**payload, "threads": payload.get("threads", torch.get_num_threads()), "load_avg": os.getloadavg(),
               "torch": torch.__version__, "machine": platform.platform(), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = os.path.join(RESULTS, os.environ.get(env, default_name))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if section is not None:
        whole = {}
        if os.path.exists(path):
            with open(path) as f:
                whole = json.load(f)
        payload = {**whole, section: payload}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path
