"""`fastface demo` / `make demo`: the main job on the embedded default, then a small search.

Generates the synthetic RGB-D face set (cached), trains the split MobileNetV2 face model with
the FastFace scheduler for a few CPU minutes and prints its verification accuracy, throughput,
parameters and latency, and writes the loss / LR / accuracy plot. Then (configs/search_demo.yaml)
a small replicate / split search and a short NetAdaptV2 run on the same data, and a table of
the found networks against vanilla MobileNetV2 at the same width and training budget. The
last line is the demo training's ``verification accuracy: 0.XXXX``.

Arguments are overrides of configs/demo.yaml; ``search.KEY=VALUE`` overrides the search config
instead, and ``search.enabled=false`` skips the search.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(_ROOT, "configs", "demo.yaml")
SEARCH_CONFIG = os.path.join(_ROOT, "configs", "search_demo.yaml")


def main(overrides: list[str] | None = None) -> int:
    """Run the demo; returns an exit status."""
    from rich.console import Console

    from fastface.eval.cost import summary_table
    from fastface.eval.latency import measure
    from fastface.train.config import load_train_config
    from fastface.train.trainer import Trainer

    train_ov = [o for o in overrides or [] if not o.startswith("search.")]
    search_ov = [o[len("search."):] for o in overrides or [] if o.startswith("search.")]
    search_on = True
    for o in list(search_ov):
        if o.split("=", 1)[0] == "enabled":
            search_on = o.split("=", 1)[1].strip().lower() not in ("false", "0", "no", "off")
            search_ov.remove(o)

    # Into a file or pipe: tables get room and lines stay whole.
    console = Console() if sys.stdout.isatty() else Console(width=160, soft_wrap=True)
    t0 = time.perf_counter()
    cfg = load_train_config(DEMO_CONFIG, train_ov)
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
    t_train = time.perf_counter() - t0
    if search_on:
        t1 = time.perf_counter()
        run_search(console, search_ov)
        console.print(f"demo: training {t_train / 60:.1f} min, search {(time.perf_counter() - t1) / 60:.1f} min")
    if acc is not None:
        print(f"verification accuracy: {acc:.4f}", flush=True)
    return 0


def run_search(console: Any, overrides: list[str]) -> dict[str, Any]:
    """The demo search: replicate / split, then NetAdaptV2 (MCD) on its winner; prints the comparison."""
    from fastface.search.driver import OtherSearchError, load_search_config, run_netadapt, run_replicate_split

    cfg = load_search_config(SEARCH_CONFIG, overrides)
    console.rule("replicate / split search")
    rs = run_replicate_split(cfg, console)
    console.rule("NetAdaptV2 (MCD) on the found network")
    try:
        na = run_netadapt(cfg, "mcd", console)
    except OtherSearchError as e:
        # A NetAdapt search left by an earlier demo on another base network (an older config or
        # version): the demo keeps it aside and searches afresh, where the CLI asks the user.
        folder = os.path.join(cfg.output, "netadapt-mcd")
        aside = f"{folder}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(folder, aside)
        console.print(f"{folder} held another search ({e}); moved to {aside}, searching afresh", highlight=False)
        na = run_netadapt(cfg, "mcd", console)
    return compare(console, cfg, rs, na)


def compare(console: Any, cfg: Any, rs: Any, na: Any) -> dict[str, Any]:
    """Vanilla vs found vs NetAdapt: accuracy on every val pair, params, MACs, latency measured side by side."""
    import torch

    from fastface.data.verification import load_pairs
    from fastface.eval.cost import spec_cost
    from fastface.eval.verification import evaluate_model
    from fastface.search.driver import _set_path, load_train
    from fastface.search.lut import LatencyLUT
    from fastface.train.checkpoint import load_model
    from rich.table import Table

    tc = load_train(cfg)
    o = rs.outcome
    steps = str(o.final.total_steps)
    rows = [("vanilla MobileNetV2 (RGBD input)", o.vanilla_result.weights, steps),
            (f"replicate/split: {o.final.name}", o.final_result.weights, steps)]
    na_steps = f"{steps} + {cfg.netadapt.supernet_steps} supernet"
    if na.finetuned is not None:
        rows.append((f"NetAdaptV2 MCD: iteration {na.records[-1]['iteration']}, fine-tuned", na.finetuned.weights,
                     f"{na_steps} + {cfg.netadapt.finetune_steps}"))
    elif na.records:
        from fastface.search.journal import Journal

        recs = Journal(os.path.join(na.folder, "journal.jsonl")).of_kind("record")
        rows.append((f"NetAdaptV2 MCD: iteration {na.records[-1]['iteration']} (sliced, no fine-tune)",
                     recs[-1]["weights"], na_steps))
    images, issame = load_pairs(_set_path(tc, cfg.objective.set), "rgbd", tc.data.image_size)
    models = [load_model(w) for _, w, _ in rows]
    old = torch.get_num_threads()
    if cfg.netadapt.threads:
        torch.set_num_threads(cfg.netadapt.threads)
    accs = []
    for m in models:
        accs.append(evaluate_model(m, images, issame, batch_size=tc.eval.batch_size, nfolds=tc.eval.nfolds,
                                   flip=tc.eval.flip).accuracy)
    lut = LatencyLUT(threads=cfg.objective.latency_threads, batch=cfg.objective.latency_batch, runs=30, rounds=3)
    lats = lut.measure_networks([m.spec for m in models])  # round-robin: every network sees the same load
    torch.set_num_threads(old)
    t = Table(title=f"found networks vs vanilla MobileNetV2 (width {o.root.spec.width}, {cfg.objective.set}.bin, "
                    f"{len(issame)} pairs)")
    for col in ("network", "split", "blocks", "params", "MMACs", f"latency ms ({lut.threads} thr)", "accuracy",
                "train steps"):
        t.add_column(col, justify="left" if col == "network" else "right")
    out = []
    for (name, w, steps), m, a, ms in zip(rows, models, accs, lats):
        p, mac = spec_cost(m.spec)
        t.add_row(name, str(m.spec.split), str(len(m.spec.blocks)), f"{p:,}", f"{mac / 1e6:.1f}", f"{ms:.2f}", f"{a:.4f}",
                  steps)
        out.append({"network": name, "weights": w, "params": p, "macs": mac, "latency_ms": ms, "accuracy": a,
                    "split": m.spec.split, "blocks": len(m.spec.blocks)})
    console.print(t)
    v, f = out[0], out[1]
    console.print(f"found vs vanilla: accuracy {f['accuracy'] - v['accuracy']:+.4f}, params x{f['params'] / v['params']:.2f}, "
                  f"latency x{f['latency_ms'] / v['latency_ms']:.2f}"
                  + (f"; NetAdaptV2 vs found: latency x{out[2]['latency_ms'] / f['latency_ms']:.2f}, params "
                     f"x{out[2]['params'] / f['params']:.2f}, accuracy {out[2]['accuracy'] - f['accuracy']:+.4f}"
                     if len(out) > 2 else ""), highlight=False)
    console.print(f"search folder: {cfg.output} (journals, table, pareto_latency.png, pareto_params.png, best.json)")
    return {"rows": out}
