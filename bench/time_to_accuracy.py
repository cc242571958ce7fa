"""Time to accuracy: the FastFace scheduler vs polynomial decay with warmup given 4x the steps.

Both runs use the real Trainer with the same config, model, data, seed and recipe; only the
schedule and the run length differ: FastFace trains N steps, the baseline (insightface's
PolynomialLRWarmup, power 2) trains ratio x N. Each evaluates verification accuracy on the
validation pairs every few steps, so the time to a target can be read off. The target is the
baseline's final validation accuracy minus 1 point; the paper's claim to check is FastFace in
about 1/4 of the time with at most about 1 point lost. The held-out test pairs are scored once,
at the end, for both models. With --control a third run, the same polynomial schedule squeezed
into FastFace's N steps, tells whether FastFace's halvings beat simply shortening the baseline.

Time is the trainer's train_s: wall time of the training loop without evaluations and
checkpoints. The machine may be shared, so the load average is saved too; steps are the
load-free measure (both runs cost the same per step).

FastFace's detector hyperparameters are rescaled to the run length by one stated rule
(sched.reference_steps, fastface.sched.rescale_to_run), not tuned on these runs.

    python bench/time_to_accuracy.py --steps 260 --ratio 4 model.width=0.5
    python bench/time_to_accuracy.py --report-only      # rebuild table + plot from finished runs

Runs live in build/time_to_accuracy/<name>/ and resume from their checkpoints if interrupted
(a finished run is reused when its config is unchanged). Writes bench/results/
time_to_accuracy.{json,md,png}.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
REFERENCE_STEPS = 25_000  # the paper's 5 epochs of MS1MV3 at a global batch of 1024
LABELS = {"baseline": "poly + warmup (power 2), 4x steps", "fastface": "FastFace (rescaled to the run)",
          "control": "poly + warmup (power 2), same steps as FastFace"}


def run_overrides(args: argparse.Namespace, name: str, steps: int, eval_every: int, out: str) -> list[str]:
    """The overrides of one arm: everything shared, then the arm's schedule and length."""
    shared = [f"run.max_steps={steps}", "run.epochs=1000", f"run.eval_every={eval_every}",
              f"run.ckpt_every={eval_every}", f"run.log_every={args.log_every}", f"run.output={out}",
              f"run.seed={args.seed}", f"run.threads={args.threads}", "run.progress=false", "run.plot=true",
              f"sched.warmup_steps={args.warmup}", f"eval.sets=[{args.val}]"]
    if name == "fastface":
        sched = ["sched.name=fastface", f"sched.reference_steps={REFERENCE_STEPS}"]
    else:  # baseline and control: the same schedule, ratio x N or N steps
        sched = ["sched.name=poly", "sched.power=2"]
    return shared + list(args.overrides) + sched


def train(args: argparse.Namespace, name: str, steps: int, eval_every: int) -> dict[str, Any]:
    """Train one arm in a fresh process (resuming an interrupted run; reusing a finished one)."""
    out = os.path.join(args.runs, name)
    overrides = run_overrides(args, name, steps, eval_every, out)
    stamp = os.path.join(out, "study_overrides.json")
    done = os.path.exists(os.path.join(out, "metrics.json")) and os.path.exists(stamp)
    if done:
        with open(stamp) as f:
            done = json.load(f) == {"config": args.config, "overrides": overrides}
    if done:
        print(f"[study] {name}: reusing the finished run in {out}", flush=True)
    else:
        from fastface.utils import atomic_write_text

        os.makedirs(out, exist_ok=True)
        if os.path.exists(stamp):
            with open(stamp) as f:
                if json.load(f) != {"config": args.config, "overrides": overrides}:
                    raise SystemExit(f"{out} holds a run with other settings: remove it or pick another --runs folder")
        atomic_write_text(stamp, json.dumps({"config": args.config, "overrides": overrides}, indent=2))
        cmd = [sys.executable, "-m", "fastface", "train", "--config", args.config, "run.resume=true", *overrides]
        print(f"[study] {name}: {steps} steps, load {os.getloadavg()[0]:.1f}\n$ {' '.join(cmd)}", flush=True)
        load0 = os.getloadavg()
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True)
        atomic_write_text(os.path.join(out, "study_load.json"),
                          json.dumps({"load_avg_start": load0, "load_avg_end": os.getloadavg(),
                                      "wall_s_last_attempt": time.time() - t0}, indent=2))
    return collect(out, args)


def _read_csv(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row: dict[str, Any] = {}
        for k, v in r.items():
            try:
                row[k] = json.loads(v) if v and v[0] in "{[" else float(v) if v not in ("", None) else None
            except ValueError:
                row[k] = v
        out.append(row)
    return out


def collect(out: str, args: argparse.Namespace) -> dict[str, Any]:
    """History, evaluations, final metrics and the held-out test score of a finished run."""
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    log = _read_csv(os.path.join(out, "log.csv"))
    evals = [e for e in _read_csv(os.path.join(out, "eval.csv")) if e["set"] == os.path.splitext(
        os.path.basename(args.val))[0]]
    train_s_at = {int(r["step"]): r["train_s"] for r in log}
    for e in evals:
        # Evaluations follow the log line of the same step (eval_every is a multiple of log_every).
        e["train_s"] = train_s_at.get(int(e["step"]))
    test = score_test(out, args)
    load = {}
    if os.path.exists(os.path.join(out, "study_load.json")):
        with open(os.path.join(out, "study_load.json")) as f:
            load = json.load(f)
    return {"dir": os.path.relpath(out, ROOT), "metrics": metrics, "log": log, "evals": evals, "test": test,
            "load": load}


def score_test(out: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """Verification on the held-out test pairs of the final model (cached beside it)."""
    if not args.test or not os.path.exists(args.test):
        return None
    cache = os.path.join(out, "test_score.json")
    model_path = os.path.join(out, "model.pt")
    if os.path.exists(cache) and os.path.getmtime(cache) >= os.path.getmtime(model_path):
        with open(cache) as f:
            return json.load(f)
    import torch

    from fastface.data.verification import load_pairs
    from fastface.eval.verification import evaluate_model
    from fastface.train.checkpoint import load_model

    torch.set_num_threads(args.threads)
    model = load_model(model_path)
    channels = "rgbd" if len(model.spec.inputs) > 1 else next(iter(model.spec.inputs))
    images, issame = load_pairs(args.test, channels, model.spec.input_size)
    r = evaluate_model(model, images, issame).as_dict()
    from fastface.utils import atomic_write_text

    atomic_write_text(cache, json.dumps(r, indent=2))
    return r


def first_reaching(evals: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation at or above target (None: never)."""
    for e in evals:
        if e["accuracy"] >= target - 1e-12:
            return e
    return None


def lr_cuts(log: list[dict[str, Any]], warmup: int) -> list[dict[str, Any]]:
    """Log windows after the warm-up in which the LR fell, with the mean loss before and in the window."""
    cuts = []
    for prev, row in zip(log, log[1:]):
        if row["step"] > warmup and row["lr"] < prev["lr"] * (1 - 1e-6):
            cuts.append({"step": int(row["step"]), "lr": row["lr"], "loss_before": prev["loss"], "loss": row["loss"]})
    return cuts


def summarise(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The study's numbers: finals, the target, steps/seconds to it, ratios, verdict."""
    base, ff = runs["baseline"], runs["fastface"]
    target = base["evals"][-1]["accuracy"] - 0.01
    rows = {}
    for name, r in runs.items():
        m, last = r["metrics"], r["evals"][-1]
        hit = first_reaching(r["evals"], target)
        lrs = [h["lr"] for h in r["log"]]
        rows[name] = {
            "schedule": LABELS[name],
            "steps": int(m["step"]), "train_s": m["train_s"], "samples_per_s": m["samples_per_s"],
            "val_accuracy": last["accuracy"], "val_accuracy_std": last["accuracy_std"],
            "test_accuracy": r["test"]["accuracy"] if r["test"] else None,
            "test_accuracy_std": r["test"]["accuracy_std"] if r["test"] else None,
            "steps_to_target": int(hit["step"]) if hit else None, "train_s_to_target": hit["train_s"] if hit else None,
            "final_lr": lrs[-1] if lrs else None, "nonfinite_steps": m.get("nonfinite_steps"),
            "lr_cuts": lr_cuts(r["log"], args.warmup) if name == "fastface" else None,
            "load_avg": r["load"], "dir": r["dir"],
        }
    b, f = rows["baseline"], rows["fastface"]
    ratios = {
        "fastface_steps / baseline_steps": f["steps"] / b["steps"],
        "fastface_train_s / baseline_train_s": f["train_s"] / b["train_s"],
        "val_accuracy_gap_points (baseline - fastface)": 100 * (b["val_accuracy"] - f["val_accuracy"]),
    }
    if b["test_accuracy"] is not None and f["test_accuracy"] is not None:
        ratios["test_accuracy_gap_points (baseline - fastface)"] = 100 * (b["test_accuracy"] - f["test_accuracy"])
    if f["train_s_to_target"] is not None and b["train_s_to_target"]:
        ratios["fastface / baseline time to target"] = f["train_s_to_target"] / b["train_s_to_target"]
    if "control" in rows:
        ratios["val_accuracy_gap_points (control - fastface)"] = 100 * (rows["control"]["val_accuracy"]
                                                                      - f["val_accuracy"])
    met = f["steps_to_target"] is not None and ratios["fastface_train_s / baseline_train_s"] <= 0.25 * 1.05
    return {"target_val_accuracy": target, "rows": rows, "ratios": ratios,
            "baseline_loss_peak_step": _loss_peak_step(base["log"]),
            "lr0": max((h["lr"] for h in base["log"]), default=None),
            "goal": "FastFace in <= 1/4 of the baseline's training time with <= 1 point of accuracy lost",
            "goal_met": bool(met and ratios["val_accuracy_gap_points (baseline - fastface)"] <= 1.0 + 1e-9)}


def diagnosis(summary: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Why FastFace fell short, when it did because it cut the LR during the early rise of the loss."""
    rows = summary["rows"]
    cuts = rows["fastface"]["lr_cuts"] or []
    rise = summary.get("baseline_loss_peak_step")
    if summary["goal_met"] or not cuts or rise is None:
        return []
    early = [c for c in cuts if c["step"] <= rise]
    if not early:
        return []
    lr0 = summary.get("lr0")
    low = f" (lr0/{lr0 / early[-1]['lr']:.0f})" if lr0 else ""
    return ["", f"Why the goal is missed here: {len(early)} of FastFace's {len(cuts)} LR cuts came by step "
            f"{early[-1]['step']}, inside the early rise of the loss that every arm shows (margin losses climb "
            f"for a while after the start; the baseline's logged loss peaks at step {rise} of "
            f"{rows['baseline']['steps']} and only then falls), leaving the LR at {early[-1]['lr']:.3g}{low} for "
            f"the rest of the run. The detector reads a rising loss as no progress (S_t < lambda) and halves "
            f"after T = ceil(tau * N) steps of it, as the paper's rule says. The rise lasts a roughly fixed "
            f"number of steps (set by the LR and the warm-up), not a fraction of the run: negligible in the "
            f"paper's ~{REFERENCE_STEPS:,}-step runs, a large share of this {args.steps}-step one, so rescaling "
            f"alpha, beta and lambda to the run length (the one rule applied here) cannot remove it. The fix in "
            f"line with the recipe is to start decisions after the rise (a longer warm-up in both arms, as "
            f"configs/demo.yaml does with 60 steps); that rerun of all arms (~30 CPU-minutes on this box) is "
            f"still to do, so this table stands as measured."]


def _loss_peak_step(log: list[dict[str, Any]]) -> int | None:
    """Step of the highest logged loss in the first half of a run (the end of the early rise)."""
    half = [r for r in log if r["step"] <= log[-1]["step"] / 2] if log else []
    return int(max(half, key=lambda r: r["loss"])["step"]) if half else None


def markdown(summary: dict[str, Any], args: argparse.Namespace, cfg_note: str) -> str:
    """The table of the study (markdown)."""
    rows, ratios = summary["rows"], summary["ratios"]

    def fmt(v, spec=".4f"):
        return "not reached" if v is None else format(v, spec) if isinstance(v, float) else str(v)

    lines = [
        "# Time to accuracy: FastFace vs polynomial decay with warmup (4x the steps)", "",
        cfg_note, "",
        f"Target: the baseline's final validation accuracy minus 1 point = **{summary['target_val_accuracy']:.4f}**.",
        "", "| schedule | steps | train s | img/s | val acc (10-fold) | test acc | steps to target "
            "| train s to target |",
        "|---|---|---|---|---|---|---|---|"]
    for name in rows:
        r = rows[name]
        test = "n/a" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f} ± {r['test_accuracy_std']:.4f}"
        lines.append(f"| {r['schedule']} | {r['steps']} | {r['train_s']:.0f} | {r['samples_per_s']:.0f} | "
                     f"{r['val_accuracy']:.4f} ± {r['val_accuracy_std']:.4f} | {test} | {fmt(r['steps_to_target'])} | "
                     f"{fmt(r['train_s_to_target'], '.0f')} |")
    lines += ["", *[f"- {k}: {v:.3f}" for k, v in ratios.items()],
              f"- goal ({summary['goal']}): **{'met' if summary['goal_met'] else 'not met'}**", ""]
    cuts = rows["fastface"]["lr_cuts"] or []
    lines.append("FastFace's LR cuts (log window ending at step: mean loss of the previous window -> this one, "
                 "LR after): " + (", ".join(f"{c['step']}: {c['loss_before']:.2f} -> {c['loss']:.2f}, {c['lr']:.3g}"
                                            for c in cuts) or "none") + ".")
    lines += diagnosis(summary, args)
    loads = ", ".join(f"{n} {r['load_avg'].get('load_avg_start', [float('nan')])[0]:.1f}"
                      f"-{r['load_avg'].get('load_avg_end', [float('nan')])[0]:.1f}" for n, r in rows.items()
                      if r["load_avg"])
    lines += ["", "Seconds are the trainer's train_s (no evaluation, no checkpoints) on a shared 2-core machine "
              f"(1-minute load average at start-end of each run: {loads}); img/s is the median of the last "
              "logged windows and moves with that load. Steps are the load-free measure: every run costs the "
              "same per step.", ""]
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, Any]], summary: dict[str, Any], path: str) -> None:
    """Loss, LR and validation accuracy of both runs (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    colours = {"baseline": "C0", "fastface": "C3", "control": "C2"}
    labels = {"baseline": "poly + warmup, 4x steps", "fastface": "FastFace", "control": "poly + warmup, same steps"}
    for name, r in runs.items():
        steps = [h["step"] for h in r["log"]]
        ax[0].plot(steps, [h["loss"] for h in r["log"]], color=colours[name], label=labels[name])
        ax[1].plot(steps, [h["lr"] for h in r["log"]], color=colours[name], label=labels[name])
        ev = r["evals"]
        ax[2].plot([e["step"] for e in ev], [e["accuracy"] for e in ev], "o-", ms=3, color=colours[name],
                   label=labels[name])
        ax[3].plot([e["train_s"] for e in ev], [e["accuracy"] for e in ev], "o-", ms=3, color=colours[name],
                   label=labels[name])
    for a in ax[2:]:
        a.axhline(summary["target_val_accuracy"], color="grey", ls="--", lw=1, label="target (baseline - 1 pt)")
    ax[0].set(xlabel="step", ylabel="training loss", title="loss")
    ax[1].set(xlabel="step", ylabel="learning rate", title="learning rate", yscale="log")
    ax[2].set(xlabel="step", ylabel="val verification accuracy", title="accuracy vs steps")
    ax[3].set(xlabel="training seconds (no eval)", ylabel="val verification accuracy", title="accuracy vs time")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    """Train (or reuse) both arms, then write the table, JSON and plot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--steps", type=int, default=260, help="FastFace's steps; the baseline gets ratio x steps")
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--evals", type=int, default=13, help="evaluations per run (at equal step intervals)")
    p.add_argument("--log-every", type=int, default=None, help="default: a divisor of both eval intervals")
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps (both arms)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val", default="data/synth-demo/val.bin")
    p.add_argument("--test", default="data/synth-demo/test.bin")
    p.add_argument("--runs", default=os.path.join(ROOT, "build", "time_to_accuracy"))
    p.add_argument("--out", default=os.path.join(RESULTS, "time_to_accuracy"))
    p.add_argument("--only", choices=["fastface", "baseline", "control"], help="train one arm only (no report)")
    p.add_argument("--control", action="store_true", help="also train poly + warmup for FastFace's N steps")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="shared config overrides (both arms)")
    args = p.parse_args()
    if args.steps % args.evals:
        raise SystemExit(f"--steps {args.steps} must be a multiple of --evals {args.evals}")
    ff_every = args.steps // args.evals
    base_every = ff_every * args.ratio
    if args.log_every is None:  # the largest divisor of the eval interval up to 10
        args.log_every = max(d for d in range(1, min(10, ff_every) + 1) if ff_every % d == 0)
    if ff_every % args.log_every or base_every % args.log_every:
        raise SystemExit(f"--log-every {args.log_every} must divide the eval intervals {ff_every} and {base_every}")
    arms = {"fastface": (args.steps, ff_every), "baseline": (args.steps * args.ratio, base_every),
            "control": (args.steps, ff_every)}
    runs: dict[str, dict[str, Any]] = {}
    for name in ("baseline", "fastface", "control"):
        if name == "control" and not (args.control or args.only == "control"):
            continue
        if args.only and name != args.only:
            continue
        steps, every = arms[name]
        if args.report_only:
            runs[name] = collect(os.path.join(args.runs, name), args)
        else:
            runs[name] = train(args, name, steps, every)
    if args.only:
        return
    summary = summarise(runs, args)
    m = runs["fastface"]["metrics"]
    spec = m["spec"]
    note = (f"Model: {spec.get('name')} width {spec.get('width')}, split {spec.get('split')}, "
            f"{m['params']:,} parameters; data: {args.val.rsplit('/', 2)[-2]} (synthetic RGB-D); shared config "
            f"{args.config} + {' '.join(args.overrides) or '(none)'}; seed {args.seed}; {args.threads} threads; "
            f"warm-up {args.warmup} steps in both arms; FastFace alpha, beta, lambda rescaled from the paper's "
            f"defaults by {REFERENCE_STEPS} / {args.steps} (sched.reference_steps), tau 0.05, delta 2, 8 halvings "
            f"at most; evaluation every {ff_every} (FastFace) / {base_every} (baseline) steps on {args.val}.")
    payload = {"what": "time to accuracy, FastFace vs poly+warmup with 4x the steps", "config": args.config,
               "overrides": args.overrides, "seed": args.seed, "threads": args.threads, "warmup_steps": args.warmup,
               "reference_steps": REFERENCE_STEPS, "note": note, **summary,
               "evals": {k: [{"step": e["step"], "accuracy": e["accuracy"], "train_s": e["train_s"]}
                             for e in r["evals"]] for k, r in runs.items()},
               "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    from fastface.utils import atomic_write_text

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_text(args.out + ".json", json.dumps(payload, indent=2, default=float) + "\n")
    md = markdown(summary, args, note)
    atomic_write_text(args.out + ".md", md)
    plot(runs, summary, args.out + ".png")
    print(md)
    print(f"[study] wrote {args.out}.json, .md, .png")


if __name__ == "__main__":
    main()
