"""`fastface demo` / `make demo`: the main job on the embedded default.

Generates the synthetic RGB-D face set (cached), trains the split MobileNetV2 face model with
the FastFace scheduler for a few CPU minutes, then prints verification accuracy, throughput,
parameters and latency, and writes the loss / LR / accuracy plot.
"""
from __future__ import annotations

import os

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def main(overrides: list[str] | None = None) -> int:
    """Run the demo; returns an exit status."""
    from rich.console import Console

    from fastface.eval.cost import summary_table
    from fastface.eval.latency import measure
    from fastface.train.config import load_train_config
    from fastface.train.trainer import Trainer

    console = Console()
    cfg = load_train_config(DEMO_CONFIG, overrides or [])
    trainer = Trainer(cfg)
    try:
        console.print(summary_table(trainer.spec))
        metrics = trainer.fit()
    finally:
        trainer.close()
    lat = measure(trainer.model, (trainer.spec.in_channels, trainer.spec.input_size, trainer.spec.input_size), batch=1,
                  runs=30)
    acc = metrics["verification"].get("val", {}).get("accuracy")
    console.print(f"model: {trainer.spec.describe()}")
    console.print(f"params: {metrics['params']:,}   MACs: {metrics['macs'] / 1e6:.1f}M   "
                  f"latency (batch 1, CPU): {lat.median_ms:.2f} ms")
    console.print(f"training: {metrics['step']} steps in {metrics['elapsed_s'] / 60:.1f} min, "
                  f"{metrics['samples_per_s']:.0f} samples/s")
    console.print(f"plot: {os.path.join(cfg.run.output, 'curves.png')}")
    if acc is not None:
        print(f"verification accuracy: {acc:.4f}", flush=True)
    return 0
