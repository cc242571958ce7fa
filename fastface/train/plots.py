"""Training curves: loss, learning rate and verification accuracy against steps (PNG)."""
from __future__ import annotations

import os
from typing import Any


def plot_training(history: list[dict[str, Any]], eval_history: list[dict[str, Any]], path: str,
                  title: str | None = None) -> str:
    """Write a 3-panel PNG (loss, LR on a log axis, accuracy per verification set); returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["loss"] for h in history], color="C0")
    axes[0].set(xlabel="step", ylabel="loss", title="training loss")
    axes[1].plot(steps, [h["lr"] for h in history], color="C1")
    axes[1].set(xlabel="step", ylabel="learning rate", title="learning rate", yscale="log")
    sets = sorted({e["set"] for e in eval_history})
    for i, name in enumerate(sets):
        rows = [e for e in eval_history if e["set"] == name]
        axes[2].plot([r["step"] for r in rows], [r["accuracy"] for r in rows], "o-", color=f"C{i + 2}", label=name)
    axes[2].set(xlabel="step", ylabel="accuracy", title="verification accuracy")
    if sets:
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
