"""Loss streams for the scheduler tests: plateaus, noisy drops, jumps and NaN/inf holes."""
from __future__ import annotations

import numpy as np


def loss_stream(n: int, seed: int, hole_rate: float = 0.01) -> list[float]:
    """n float32-representable losses built from random segments, with non-finite holes."""
    rng = np.random.default_rng(seed)
    out: list[float] = []
    level = float(rng.uniform(5.0, 20.0))
    while len(out) < n:
        kind = rng.choice(["plateau", "noisy_plateau", "drop", "noisy_drop", "jump"])
        length = int(rng.integers(30, 600))
        t = np.arange(length)
        if kind == "plateau":
            seg = np.full(length, level)  # exactly constant: S decays to 0, the count runs
        elif kind == "noisy_plateau":
            seg = level + rng.normal(0.0, rng.uniform(1e-3, 0.2), length)
        elif kind == "drop":
            seg = level - rng.uniform(1e-5, 1e-2) * t
        elif kind == "noisy_drop":
            seg = level - rng.uniform(1e-4, 1e-2) * t + rng.normal(0.0, 0.1, length)
        else:
            level += float(rng.uniform(-2.0, 2.0))
            seg = np.full(length, level)
        level = float(seg[-1])
        out.extend(seg.tolist())
    arr = np.asarray(out[:n], dtype=np.float32).astype(np.float64)
    holes = rng.random(n) < hole_rate
    arr[holes] = rng.choice([np.nan, np.inf, -np.inf], int(holes.sum()))
    return arr.tolist()
