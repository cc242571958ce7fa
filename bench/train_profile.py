"""Where a training step's time goes: the plain channels_last loop vs the fastface trainer, by op class.

The providers and their set-up are bench/test_bench_train.py's (same model, batch, classes, data in
memory); each runs in its own process, as there. torch.profiler records STEPS steps after a warm-up,
and every op's *self* CPU time is put in one class:

- conv_forward / conv_backward   the convolutions but the depthwise ones fastface's kernels run: all of the
                                  plain loop's (ATen's, oneDNN); the trainer's stems (fastface.ops.stems_bn_add_act:
                                  the two stem convs with their BNs, add merge and ReLU6 in one op), the 1x1 convs
                                  (fastface.ops.conv1x1's kernels where they pay, its GEMM form below 28 x 28, else
                                  oneDNN's) and the depthwise ones its kernels leave to oneDNN
- dwconv                          fastface's depthwise kernels (fastface.ops.dwconv_train: forward,
                                  one-pass backward, with an expand BN + ReLU6 folded in where one
                                  precedes them; dwconv_forward_stats, the forward that also reduces
                                  the next BN's statistics), with their autograd nodes
                                  (ExpandDwConvFunction's and DwBNActFunction's too: the 1x1 conv is in
                                  the conv classes)
- bn_act                          BatchNorm + residual add + ReLU6: ATen's batch norm, hardtanh and
                                  the adds of the plain loop, fastface.ops.bn_act in the trainer
                                  (forward and backward, with their autograd nodes; bn_stats and
                                  bn_act_backward_sums, the passes left of a BN folded into a conv;
                                  channel_moments and grouped_linear_sub, those of an expand BN folded
                                  into its 1x1 conv's algebra; bn_add_act, the split stems' two BNs +
                                  add merge + ReLU6; bn_update_running, the running statistics; bn_act_apply,
                                  a depthwise BN's one pass when its conv reduced the statistics)
- optimizer                       SGD (fused or foreach), gradient clipping, zeroing
- other                           everything else (FC + margin loss, autograd glue, allocation);
                                  its largest ops are listed

The point of the table is the ceiling it implies: a trainer that kept its convolutions as they are and
made everything else free could be at most plain step / trainer conv time faster than the plain loop
(printed as `ceiling`). The plain loop's
own convolutions take longer than the trainer's: they page-fault their outputs in (the trainer
runs inside fastface.ops.cpu_cache); plain_channels_last_cache shows the loop without that.

    python bench/train_profile.py [--providers plain_channels_last,plain_channels_last_cache,fastface] [--steps 4]

Writes bench/results/train_profile.json and train_profile.md. Profiled steps run slower than
unprofiled ones (the profiler's own overhead); the shares, not the absolute times, are the result.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

CLASSES = {
    "conv_forward": ("fastface::conv1x1_forward", "Conv1x1Function", "fastface::stems_bn_add_act",
                     "aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::conv2d",
                     "aten::_convolution_mode"),
    "conv_backward": ("fastface::conv1x1_backward", "Conv1x1FunctionBackward", "fastface::stems_bn_add_act_backward",
                      "autograd::engine::evaluate_function: Conv1x1FunctionBackward",
                      "aten::convolution_backward", "ConvolutionBackward0",
                      "autograd::engine::evaluate_function: ConvolutionBackward0"),
    "bn_act": ("aten::native_batch_norm", "aten::_native_batch_norm_legit", "aten::_batch_norm_impl_index",
               "aten::batch_norm", "aten::native_batch_norm_backward", "aten::_batch_norm_with_update",
               "aten::batch_norm_backward", "NativeBatchNormBackward0", "CudnnBatchNormBackward0",
               "autograd::engine::evaluate_function: NativeBatchNormBackward0",
               "aten::hardtanh", "aten::hardtanh_", "aten::hardtanh_backward", "HardtanhBackward0",
               "autograd::engine::evaluate_function: HardtanhBackward0", "aten::relu6",
               "fastface::bn_act", "fastface::bn_act_backward", "BNActFunction", "BNActFunctionBackward",
               "fastface::bn_stats", "fastface::bn_act_backward_sums",
               "autograd::engine::evaluate_function: BNActFunctionBackward", "fastface::bn_add_act",
               "fastface::bn_add_act_backward", "BNAddActFunction", "BNAddActFunctionBackward",
               "autograd::engine::evaluate_function: BNAddActFunctionBackward", "fastface::channel_moments",
               "fastface::grouped_linear_sub", "fastface::bn_update_running", "fastface::bn_act_apply"),
    "dwconv": ("fastface::dwconv_forward", "fastface::dwconv_backward", "DwConvFunction", "DwConvFunctionBackward",
               "autograd::engine::evaluate_function: DwConvFunctionBackward", "BNActDwConvFunction",
               "BNActDwConvFunctionBackward", "autograd::engine::evaluate_function: BNActDwConvFunctionBackward",
               "ExpandDwConvFunction", "ExpandDwConvFunctionBackward",
               "autograd::engine::evaluate_function: ExpandDwConvFunctionBackward", "fastface::dwconv_forward_stats",
               "DwBNActFunction", "DwBNActFunctionBackward",
               "autograd::engine::evaluate_function: DwBNActFunctionBackward"),
    "optimizer": ("aten::_fused_sgd_", "aten::_foreach_add_", "aten::_foreach_mul_", "aten::_foreach_norm",
                  "aten::_foreach_mul", "aten::_foreach_add", "aten::_foreach_lerp_", "aten::linalg_vector_norm",
                  "aten::_foreach_addcmul_", "aten::_foreach_zero_", "Optimizer.step#SGD.step",
                  "Optimizer.zero_grad#SGD.zero_grad"),
}
CLASS_OF = {name: cls for cls, names in CLASSES.items() for name in names}
# The plain loop's residual adds and ReLU6 (hardtanh -> clamp) over feature maps are part of its BN + act
# stage (in the trainer bn_act folds them in); the same ops on small tensors (loss, optimiser) are not.
SIZED = ("aten::add", "aten::add_", "aten::clamp", "aten::clamp_")
ADD_SHAPES_MIN = 1 << 16
# The GEMM route of the 1x1 convs (fastface.ops.conv1x1.conv1x1_gemm_*) runs aten::mm under these autograd
# nodes: its ops are the node's class, not "other" with the FC's mm.
PARENT_CLASS = {"Conv1x1Function": "conv_forward", "Conv1x1FunctionBackward": "conv_backward",
                "StemsBNAddActFunction": "conv_forward", "StemsBNAddActFunctionBackward": "conv_backward"}


def _class_from_parents(e) -> str | None:
    p = getattr(e, "cpu_parent", None)
    while p is not None:
        if p.name in PARENT_CLASS:
            return PARENT_CLASS[p.name]
        p = p.cpu_parent
    return None


def classify(events) -> tuple[dict[str, float], dict[str, float]]:
    """(self CPU ms by class, self CPU ms of the 'other' ops by name) over profiler events (prof.events(): an op
    without a class of its own takes that of the nearest autograd node above it in PARENT_CLASS)."""
    by_class: dict[str, float] = defaultdict(float)
    other: dict[str, float] = defaultdict(float)
    for e in events:
        ms = e.self_cpu_time_total / 1000.0
        cls = CLASS_OF.get(e.key)
        if cls is None and e.key in SIZED and e.input_shapes and e.input_shapes[0]:
            numel = 1
            for d in e.input_shapes[0]:
                numel *= d
            cls = "bn_act" if numel >= ADD_SHAPES_MIN else None
        if cls is None:
            cls = _class_from_parents(e)
        if cls is None:
            cls = "other"
            other[e.key] += ms
        by_class[cls] += ms
    return dict(by_class), dict(other)


def worker(name: str, data: str, steps: int, threads: int) -> dict:
    """Profile one provider in this process on the set in `data`; its per-step ms by class."""
    import test_bench_train as tb
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    step, close = tb._make_step(name, data, os.path.join(data, f"run-{name}"), threads)
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    plain_ms = (time.perf_counter() - t0) / steps * 1000
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        prof_ms = (time.perf_counter() - t0) / steps * 1000
    close()
    by_class, other = classify(prof.events())
    per_step = {k: v / steps for k, v in by_class.items()}
    top_other = sorted(((v / steps, k) for k, v in other.items()), reverse=True)[:8]
    return {"step_ms": plain_ms, "profiled_step_ms": prof_ms, "ms_per_step": per_step,
            "other_top": [{"op": k, "ms": round(v, 3)} for v, k in top_other]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--providers", default="plain_channels_last,plain_channels_last_cache,fastface",
                    help="comma-separated bench/test_bench_train.py providers; the first is the baseline, the "
                         "last the trainer of the ceiling")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.data, args.steps, args.threads)), flush=True)
        return
    import test_bench_train as tb

    names = [p for p in args.providers.split(",") if p]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ff-prof-") as data:
        tb.make_set(data)  # once; every provider's process reads it
        for name in names:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--data", data, "--steps",
                   str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                raise SystemExit(f"train_profile: provider {name} failed (exit {out.returncode}):\n"
                                 f"{out.stderr[-3000:]}")
            rows[name] = json.loads(lines[-1][len("RESULT "):])
    base, fast = names[0], names[-1]
    conv = lambda r: r["ms_per_step"].get("conv_forward", 0.0) + r["ms_per_step"].get("conv_backward", 0.0)
    ceiling = rows[base]["step_ms"] / conv(rows[fast]) if conv(rows[fast]) else float("nan")
    result = {"what": "self CPU ms per training step by op class (torch.profiler), batch "
                      f"{os.environ.get('BENCH_BATCH', 64)}, fp32",
              "threads": args.threads, "steps": args.steps, "torch": torch.__version__,
              "machine": platform.platform(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "providers": rows,
              "ceiling": {"baseline": base, "trainer": fast, "value": ceiling,
                          "meaning": f"{base} step (unprofiled) / {fast} conv time (profiled; oneDNN's and "
                                     "fastface's 1x1 kernels): the most a trainer that keeps these convolutions "
                                     "could gain"}}
    classes = ["conv_forward", "conv_backward", "dwconv", "bn_act", "optimizer", "other"]
    lines = [f"| provider | step (ms) | profiled step (ms) | {' | '.join(classes)} |",
             "|---|---:|---:|" + "---:|" * len(classes)]
    for name, r in rows.items():
        total = sum(r["ms_per_step"].values())
        cells = [f"{r['ms_per_step'].get(c, 0.0):.1f} ({100 * r['ms_per_step'].get(c, 0.0) / total:.0f} %)"
                 for c in classes]
        lines.append(f"| {name} | {r['step_ms']:.1f} | {r['profiled_step_ms']:.1f} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(f"ceiling: {base} step / {fast} convolution time = **{ceiling:.2f}x** "
                 f"(the most {fast} could gain over {base} while its convolutions stay as they are)")
    for name, r in rows.items():
        slow = r["profiled_step_ms"] / r["step_ms"]
        if slow > 1.5:  # seen for the plain loop without the cache: its page faults grow under the profiler
            lines.append(f"\n{name}: the profiled step took {slow:.1f}x the unprofiled one, so its shares "
                         "overstate what it spends outside the profiler")
    for name, r in rows.items():
        lines.append(f"\n{name}, largest 'other' ops (ms/step): "
                     + ", ".join(f"{o['op']} {o['ms']:.1f}" for o in r["other_top"]))
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    for fname, text in (("train_profile.json", json.dumps(result, indent=2)),
                        ("train_profile.md", "# Training step by op class\n\n"
                         "`python bench/train_profile.py` (see its docstring)\n\n" + table + "\n")):
        tmp = os.path.join(args.out, fname + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(args.out, fname))


if __name__ == "__main__":
    main()
