"""Scaling study: the fastface trainer with 1..N processes (torchrun; NCCL on GPUs, gloo on CPU).

    python bench/scaling.py --procs 1 2 --steps 40                      # this 2-core CPU
    python bench/scaling.py --procs 1 2 4 8 --steps 200 --device cuda --batch 128

Every run trains the same model from the same config for the same number of steps at the same
per-process batch (weak scaling, as data-parallel training is used: the global batch grows with
the process count). samples/s is global (all ranks), the median of the trainer's logged windows
after the first (which holds start-up and warm-up). Speed-up = samples/s(N) / samples/s(1);
efficiency = speed-up / N.

CPU threads: the cores are split evenly, so every run uses the whole machine: N processes x
(cores / N) threads each (--threads-per-proc overrides). The hardware then does not grow with
N: a speed-up above 1 means data-parallel processes use the same cores better than intra-op
threads do (and efficiency = speed-up / N is not a hardware efficiency). On GPUs each process
drives one GPU, and speed-up / N is the usual scaling efficiency.

Writes bench/results/scaling.json and scaling.png (and keeps each run in build/scaling/).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(n: int, args: argparse.Namespace, data: str) -> dict:
    """One training run with n processes; its throughput and settings."""
    out = os.path.join(args.runs, f"procs-{n}")
    cores = os.cpu_count() or 1
    threads = args.threads_per_proc or max(1, cores // n)
    overrides = [f"data.path={data}", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
                 f"run.output={out}", f"run.max_steps={args.steps}", "run.epochs=1000",
                 f"run.log_every={args.log_every}", "run.ckpt_every=0", "run.eval_every=0", "eval.sets=[]",
                 "run.progress=false", "run.plot=false", "run.tensorboard=false", f"run.threads={threads}",
                 f"run.device={args.device}", "synth.enabled=false", *args.overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "fastface", "train", "--config", args.config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"[scaling] {n} process(es) x {threads} thread(s), load {os.getloadavg()[0]:.1f}\n$ {' '.join(cmd)}",
          flush=True)
    load0 = os.getloadavg()
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    wall = time.time() - t0
    with open(os.path.join(out, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    windows = [float(r["samples_per_s"]) for r in rows][1:]
    if not windows:
        raise SystemExit(f"--steps {args.steps} / --log-every {args.log_every} leaves no window after the first")
    row = {"procs": n, "threads_per_proc": threads, "samples_per_s": statistics.median(windows),
           "windows_samples_per_s": windows, "global_batch": args.batch * n, "wall_s": wall,
           "load_avg_start": load0, "load_avg_end": os.getloadavg()}
    from fastface.utils import atomic_write_text

    atomic_write_text(os.path.join(out, "scaling_row.json"), json.dumps(row, indent=2))
    return row


def saved_row(n: int, args: argparse.Namespace) -> dict:
    """The row a finished run of n processes saved (for --report-only)."""
    path = os.path.join(args.runs, f"procs-{n}", "scaling_row.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: run without --report-only first")
    with open(path) as f:
        return json.load(f)


def main() -> None:
    """Run each process count, write JSON + plot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="per process")
    p.add_argument("--workers", type=int, default=1, help="loader workers per process")
    p.add_argument("--threads-per-proc", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--data", default=None, help="train.rec (default: the synthetic demo set, generated if missing)")
    p.add_argument("--runs", default=os.path.join(ROOT, "build", "scaling"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "scaling.json"))
    p.add_argument("--report-only", action="store_true", help="rebuild JSON + plot from the saved runs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = p.parse_args()
    if sorted(args.procs) != args.procs or args.procs[0] != 1:
        raise SystemExit(f"--procs must start at 1 and increase (the speed-up is relative to 1), got {args.procs}")
    if args.steps // args.log_every < 2:
        raise SystemExit("need at least two log windows: raise --steps or lower --log-every")
    data = args.data
    if args.report_only:
        pass
    elif data is None:
        from fastface.data import synth

        synth.generate(synth.preset("demo"), os.path.join(ROOT, "data", "synth-demo"), progress=False)
        data = os.path.join(ROOT, "data", "synth-demo", "train.rec")
    rows = [saved_row(n, args) if args.report_only else run(n, args, data) for n in args.procs]
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup"] = r["samples_per_s"] / base
        r["efficiency"] = r["speedup"] / r["procs"]
    import torch

    same_cores = args.device == "cpu" and not args.threads_per_proc
    note = ("CPU cores split evenly among the processes: the hardware is the same for every N, so speed-up > 1 "
            "means processes use the cores better than intra-op threads; efficiency = speed-up / N is not a "
            "hardware efficiency" if same_cores else "one device per process")
    payload = {"what": "trainer throughput vs processes (weak scaling, fixed per-process batch)", "note": note,
               "device": args.device, "backend": "nccl" if args.device == "cuda" else "gloo",
               "cores": os.cpu_count(), "steps": args.steps, "batch_per_proc": args.batch, "config": args.config,
               "overrides": args.overrides, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "torch": torch.__version__, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
    from fastface.utils import atomic_write_text

    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ns = [r["procs"] for r in rows]
    ax[0].plot(ns, [r["samples_per_s"] for r in rows], "o-", label="measured")
    if not same_cores:
        ax[0].plot(ns, [base * n for n in ns], "--", color="grey", label="linear")
    where = f"{os.cpu_count()} CPU cores split among the processes" if same_cores else args.device
    ax[0].set(xlabel="processes", ylabel="samples/s (global)", title=f"throughput ({where})", xticks=ns)
    ax[0].legend()
    if same_cores:
        ax[1].plot(ns, [r["speedup"] for r in rows], "o-")
        ax[1].axhline(1.0, color="grey", ls="--", lw=1)
        ax[1].set(xlabel="processes", ylabel="speed-up vs 1 process", title="same cores: speed-up", xticks=ns)
    else:
        ax[1].plot(ns, [r["efficiency"] for r in rows], "o-")
        ax[1].set(xlabel="processes", ylabel="efficiency", title="scaling efficiency", ylim=(0, 1.2), xticks=ns)
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    png = os.path.splitext(args.out)[0] + ".png"
    fig.savefig(png + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(png + ".tmp.png", png)
    for r in rows:
        print(f"{r['procs']} procs x {r['threads_per_proc']} threads: {r['samples_per_s']:.1f} samples/s  "
              f"speed-up {r['speedup']:.2f}  efficiency {r['efficiency']:.2f}  (load {r['load_avg_start'][0]:.1f})")
    print(f"{note}\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
