"""Search reports from the journals: a table of every evaluated network, Pareto plots (accuracy
vs latency and vs parameters, PNG), and the best spec as JSON for ``fastface train model.spec=``.

A search folder holds ``replicate_split/`` (and ``replicate_split_scratch/``) with the
journal of the replicate / split search, and ``netadapt-mcd/`` / ``netadapt-scd/`` with
NetAdapt histories. `collect` reads whichever are there; nothing here trains or measures.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from fastface.arch import ArchSpec
from fastface.search.journal import Journal
from fastface.search.netadapt import pareto_front

RS_DIRS = ("replicate_split", "replicate_split_scratch")
NA_DIRS = ("netadapt-mcd", "netadapt-scd")


@dataclass
class RSView:
    """A replicate / split journal, digested: candidates (newest record per key) and the last run's outcome."""

    path: str
    candidates: dict[str, dict[str, Any]]
    decisions: list[dict[str, Any]]
    final: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)

    def point(self, key: str | None) -> dict[str, Any] | None:
        """The candidate record of key (None if unknown)."""
        return self.candidates.get(key) if key else None


@dataclass
class NAView:
    """A NetAdapt journal, digested: history records with their saved models, and the Pareto fronts."""

    path: str
    mode: str
    records: list[dict[str, Any]]
    models: list[str | None]
    status: str | None
    onnx: dict[int, str]
    problems: list[str] = field(default_factory=list)


def load_rs(folder: str) -> RSView | None:
    """The replicate / split journal in folder, or None if there is none."""
    path = os.path.join(folder, "journal.jsonl")
    if not os.path.exists(path):
        return None
    j = Journal(path)
    cands: dict[str, dict[str, Any]] = {}
    for r in j.of_kind("candidate"):
        cands[r["key"]] = r
    runs = [r["seq"] for r in j.of_kind("run")]
    last_run = runs[-1] if runs else -1
    decisions = [r for r in j.of_kind("decision") if r["seq"] > last_run]
    final = j.last("final")
    if final is not None and final["seq"] < last_run:
        final = None  # the last run has not finished
    if final is not None and final.get("keys"):
        # The finished run's candidates only: an earlier run with other settings left other keys.
        cands = {k: cands[k] for k in final["keys"] if k in cands}
    return RSView(path, cands, decisions, final, [str(p) for p in j.problems])


def load_na(folder: str) -> NAView | None:
    """The NetAdapt journal in folder, or None if there is none."""
    path = os.path.join(folder, "journal.jsonl")
    if not os.path.exists(path):
        return None
    j = Journal(path)
    recs = j.of_kind("record")
    done = j.last("done")
    onnx = {r["iteration"]: r["onnx"] for r in j.of_kind("export")}
    mode = recs[0]["record"]["mode"] if recs else os.path.basename(folder).split("-")[-1]
    return NAView(path, mode, [r["record"] for r in recs], [r.get("weights") for r in recs],
                  done["status"] if done else None, onnx, [str(p) for p in j.problems])


def collect(root: str) -> tuple[dict[str, RSView], dict[str, NAView]]:
    """Every replicate / split and NetAdapt journal under a search folder."""
    rs = {d: v for d in RS_DIRS if (v := load_rs(os.path.join(root, d))) is not None}
    na = {d: v for d in NA_DIRS if (v := load_na(os.path.join(root, d))) is not None}
    return rs, na


def _fmt_int(v: Any) -> str:
    return f"{int(v):,}" if v is not None else "-"


def rs_table(view: RSView, title: str) -> Any:
    """A rich Table of every candidate of a replicate / split search."""
    from rich.table import Table

    t = Table(title=title)
    for col, just in (("name", "left"), ("key", "left"), ("op", "left"), ("split", "right"), ("blocks", "right"),
                      ("steps", "right"), ("params", "right"), ("MMACs", "right"), ("latency ms", "right"),
                      ("accuracy", "right"), ("train s", "right"), ("", "left")):
        t.add_column(col, justify=just)
    final = view.final or {}
    marks = {final.get("best"): "best", final.get("vanilla"): "vanilla", final.get("root"): "root"}
    for r in view.candidates.values():
        c = r["candidate"]
        spec = c["spec"]
        res = r.get("resources", {})
        acc = r.get("accuracy")
        wall = (r.get("timings") or {}).get("wall_s")
        t.add_row(c["name"], r["key"][:8], c["op"], str(spec["split"]), str(len(spec["blocks"])), str(c["total_steps"]),
                  _fmt_int(res.get("params")), f"{res.get('macs', 0) / 1e6:.1f}",
                  f"{res['latency_ms']:.2f}" if res.get("latency_ms") is not None else "-",
                  f"{acc:.4f}" if acc is not None else r["status"], f"{wall:.0f}" if wall else "-",
                  marks.get(r["key"], ""))
    return t


def na_table(view: NAView, title: str) -> Any:
    """A rich Table of a NetAdapt history, Pareto-front members marked."""
    from rich.table import Table

    front = {r["iteration"] for r in _front(view.records)}
    t = Table(title=title)
    for col in ("iter", "blocks", "params", "MMACs", "latency ms (LUT)", "score", "time s", "front"):
        t.add_column(col, justify="right")
    for r in view.records:
        res = r["resources"]
        t.add_row(str(r["iteration"]), str(len(r["spec"]["blocks"])), _fmt_int(res.get("params")),
                  f"{res.get('macs', 0) / 1e6:.1f}",
                  f"{res['latency_ms']:.2f}" if "latency_ms" in res else "-", f"{r['score']:.4f}", f"{r['time_s']:.1f}",
                  "*" if r["iteration"] in front else "")
    return t


def _front(records: list[dict[str, Any]], resource: str = "latency_ms") -> list[dict[str, Any]]:
    if not records or resource not in records[0]["resources"]:
        return []
    return pareto_front(records, resource)


def _rs_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (x, accuracy) not dominated: lower x and higher accuracy."""
    out = []
    for x, a, n in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or a > out[-1][1]:
            out.append((x, a, n))
    return out


def plot_pareto(rs: dict[str, RSView], na: dict[str, NAView], out_dir: str) -> list[str]:
    """Accuracy vs latency and vs params (two PNGs): every candidate, the fronts, vanilla and best marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    lat_label = "latency (ms, batch 1, CPU; replicate/split: measured, NetAdapt: LUT)"
    for resource, label, fname, scale in (("latency_ms", lat_label, "pareto_latency.png", 1.0),
                                          ("params", "parameters (millions)", "pareto_params.png", 1e-6)):
        fig, ax = plt.subplots(figsize=(7, 5))
        any_point = False
        for name, v in rs.items():
            pts = [(r["resources"][resource] * scale, r["accuracy"], r["candidate"]["name"])
                   for r in v.candidates.values() if r.get("accuracy") is not None and resource in r.get("resources", {})]
            if not pts:
                continue
            any_point = True
            tag = "from scratch" if name.endswith("scratch") else "weight transfer"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, alpha=0.6, label=f"replicate/split ({tag})")
            front = _rs_front(pts)
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", alpha=0.6)
            final = v.final or {}
            for key, marker, lab in ((final.get("vanilla"), "s", "vanilla MobileNetV2"), (final.get("best"), "*", "found")):
                r = v.point(key)
                if r is not None and resource in r["resources"]:
                    ax.scatter([r["resources"][resource] * scale], [r["accuracy"]], marker=marker, s=140,
                               edgecolors="black", zorder=5, label=f"{lab} ({tag})")
        for name, v in na.items():
            recs = [r for r in v.records if resource in r["resources"]]
            if not recs:
                continue
            any_point = True
            ax.scatter([r["resources"][resource] * scale for r in recs], [r["score"] for r in recs], s=14, marker="^",
                       alpha=0.6, label=f"NetAdapt {v.mode.upper()} history (sliced, BN recalibrated)")
            front = pareto_front(recs, resource)
            ax.plot([r["resources"][resource] * scale for r in front], [r["score"] for r in front], "--", alpha=0.7)
        if not any_point:
            plt.close(fig)
            continue
        ax.set_xlabel(label)
        ax.set_ylabel("verification accuracy (val)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written


def best_spec(rs: dict[str, RSView], na: dict[str, NAView]) -> tuple[ArchSpec, str] | None:
    """The spec to hand to training and where it came from: NetAdapt's final network, else the replicate/split winner."""
    for name in NA_DIRS:
        v = na.get(name)
        if v is not None and v.records and v.status == "met":
            return ArchSpec.from_dict(v.records[-1]["spec"]), f"{name} iteration {v.records[-1]['iteration']}"
    v = rs.get("replicate_split") or rs.get("replicate_split_scratch")
    if v is not None and v.final is not None:
        r = v.point(v.final["best"])
        if r is not None:
            return ArchSpec.from_dict(r["candidate"]["spec"]), f"replicate/split winner {r['candidate']['name']}"
    return None


def write_report(root: str, console: Any = None) -> dict[str, Any]:
    """Print the tables, write the plots, best.json and summary.json under root; returns the summary."""
    from fastface.utils import atomic_write_text

    rs, na = collect(root)
    if not rs and not na:
        raise FileNotFoundError(f"{root}: no search journal found (looked for {', '.join(RS_DIRS + NA_DIRS)})")
    summary: dict[str, Any] = {"root": root, "replicate_split": {}, "netadapt": {}}
    say = console.print if console is not None else (lambda *a, **k: None)
    for name, v in rs.items():
        for p in v.problems:
            say(f"[yellow]{p}[/]")
        say(rs_table(v, f"{name}: {len(v.candidates)} candidates"))
        final = v.final or {}
        summary["replicate_split"][name] = {
            "journal": v.path, "complete": v.final is not None,
            **{k: v.point(final.get(k)) and _brief(v.point(final.get(k))) for k in ("best", "vanilla", "root")}}
    for name, v in na.items():
        for p in v.problems:
            say(f"[yellow]{p}[/]")
        say(na_table(v, f"{name}: {len(v.records)} history points, status {v.status}"))
        front = _front(v.records)
        final = _brief_na(v.records[-1], v.models[-1]) if v.records else None
        summary["netadapt"][name] = {
            "journal": v.path, "status": v.status, "final": final,
            "front": [_brief_na(r, v.models[r["iteration"]], v.onnx.get(r["iteration"])) for r in front]}
    summary["plots"] = plot_pareto(rs, na, root)
    best = best_spec(rs, na)
    if best is not None:
        spec, origin = best
        spec.save(os.path.join(root, "best.json"))
        summary["best"] = {"spec": os.path.join(root, "best.json"), "from": origin}
        say(f"best spec ({origin}): {os.path.join(root, 'best.json')}  — train it with "
            f"`fastface train --config configs/demo.yaml model.spec={os.path.join(root, 'best.json')}`", highlight=False)
    for p in summary["plots"]:
        say(f"plot: {p}", highlight=False)
    atomic_write_text(os.path.join(root, "summary.json"), json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {"key": r["key"], "name": r["candidate"]["name"], "accuracy": r.get("accuracy"),
            "resources": r.get("resources"), "weights": r.get("weights"), "total_steps": r["candidate"]["total_steps"],
            "split": r["candidate"]["spec"]["split"], "blocks": len(r["candidate"]["spec"]["blocks"])}


def _brief_na(r: dict[str, Any], weights: str | None, onnx: str | None = None) -> dict[str, Any]:
    return {"iteration": r["iteration"], "score": r["score"], "resources": r["resources"], "weights": weights,
            "onnx": onnx, "blocks": len(r["spec"]["blocks"])}


__all__ = ["NAView", "RSView", "best_spec", "collect", "load_na", "load_rs", "na_table", "plot_pareto", "rs_table",
           "write_report"]
