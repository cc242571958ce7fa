"""GPU timings of the fused kernels against eager PyTorch (cuDNN) and torch.compile.

    python bench/gpu_bench.py                      # all face blocks, fp16/bf16/fp32, batch 64
    python bench/gpu_bench.py --dtypes fp16 --quick

Inference: the fused inverted-residual block (fastface::ir_block, CUDA and Triton, the Triton
kernel in both variants: halo via tl.gather and per-tap recompute) against the same block in
eager PyTorch (three cuDNN convs) and torch.compile. Achieved bandwidth counts the bytes a fully
fused block must move, x read plus y written, and is compared with the device's copy bandwidth
(a torch copy of a 1 GiB tensor); the goal is >= 70 %.
Training: dwconv_bn_act forward + backward (CUDA and Triton) against eager depthwise conv +
BatchNorm (batch statistics) + ReLU6 with autograd.

Every fused result is checked against a float64 reference first (err <= 2 x err of eager in the
same dtype + 2 ulps): a failed check makes the exit status 1. Without a CUDA device the script
says so and exits with status 2. Writes bench/results/gpu_check_<gpu>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
# (H, Cin, Ce, Cout, stride, groups): MobileNetV2 face blocks (112 x 112 input), the transitions
# between stages, and a split network's two branches in one grouped launch.
IR_BLOCKS = [(56, 24, 144, 24, 1, 1), (56, 24, 144, 32, 2, 1), (28, 32, 192, 32, 1, 1), (28, 32, 192, 64, 2, 1),
             (14, 96, 576, 96, 1, 1), (14, 96, 576, 160, 2, 1), (7, 160, 960, 160, 1, 1), (28, 16, 96, 16, 1, 2)]
# (H, C, stride): the depthwise stages of those blocks.
DW_STAGES = [(56, 144, 1), (56, 144, 2), (28, 192, 1), (14, 576, 1), (7, 960, 1)]
# --smoke: the same pipeline on the CPU (Triton interpreted) at toy sizes, to check the script without a GPU.
SMOKE_IR_BLOCKS = [(7, 8, 24, 8, 1, 1), (7, 8, 24, 16, 2, 1), (6, 4, 12, 4, 1, 2)]
SMOKE_DW_STAGES = [(7, 24, 1), (7, 24, 2)]
DEV = "cuda"


def bench_ms(fn: Callable[[], object]) -> float:
    """Median time of fn in ms, L2 flushed between runs (triton.testing.do_bench), else CUDA events."""
    if DEV == "cpu":
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[1]
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except ImportError:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
        for _ in range(30):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Device copy bandwidth in GB/s: read + write of a 1 GiB tensor."""
    src = torch.empty(2 ** 28 if DEV == "cuda" else 2 ** 24, dtype=torch.float32, device=DEV)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def check(fast: tuple, same: tuple, ref: tuple, dtype: torch.dtype) -> tuple[bool, float, float]:
    """(passes, worst err fast, worst err eager) over paired outputs, by the flash-attention rule."""
    ok, worst_f, worst_s = True, 0.0, 0.0
    for f, s, r in zip(fast, same, ref):
        ef, es = _err(f, r), _err(s, r)
        ok &= ef <= 2 * es + 2 * EPS[dtype] * max(1.0, r.abs().max().item())
        worst_f, worst_s = max(worst_f, ef), max(worst_s, es)
    return bool(ok), worst_f, worst_s


def has_cuda_kernel(op: str) -> bool:
    """Whether fastface._C registered a CUDA kernel for fastface::op."""
    try:
        import fastface.ops  # noqa: F401 - loads the extension and the fake/autograd registrations
        from fastface._ext import has_op
    except ImportError:
        return False
    return has_op(op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastface::{op}", "CUDA")


def ir_inputs(n: int, h: int, cin: int, ce: int, cout: int, groups: int, dtype: torch.dtype) -> tuple:
    """Channels-last x and folded weights of one block, on the GPU."""
    g = torch.Generator(device=DEV).manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)

    x = r(n, groups * cin, h, h).contiguous(memory_format=torch.channels_last)
    return (x, r(groups * ce, cin, scale=cin ** -0.5), r(groups * ce, scale=0.5), r(groups * ce, 3, 3, scale=1 / 3),
            r(groups * ce, scale=0.5), r(groups * cout, ce, scale=ce ** -0.5), r(groups * cout, scale=0.5))


def run_ir_blocks(args, copy_bw: float, rows: list, failures: list) -> None:
    from fastface.ops.ir_block import ir_block_reference

    cuda_ok = has_cuda_kernel("ir_block")
    try:
        from fastface.kernels.ir_block import ir_block_triton
    except ImportError as e:
        ir_block_triton = None
        print(f"  Triton unavailable: {e}")
    for h, cin, ce, cout, s, groups in (SMOKE_IR_BLOCKS if args.smoke else IR_BLOCKS)[: 3 if args.quick else None]:
        res = s == 1 and cin == cout
        for dt in args.dtypes:
            dtype = DTYPES[dt]
            a = ir_inputs(args.batch, h, cin, ce, cout, groups, dtype)
            tail = (s, res, groups)
            ref = ir_block_reference(*[t.double() for t in a], *tail)
            eager_y = ir_block_reference(*a, *tail)
            providers: dict[str, Callable[[], torch.Tensor]] = {"eager": lambda a=a: ir_block_reference(*a, *tail)}
            if args.compile and dt in args.compile_dtypes:
                compiled = torch.compile(ir_block_reference, dynamic=False)
                providers["compile"] = lambda a=a, f=compiled: f(*a, *tail)
            if cuda_ok:
                providers["cuda"] = lambda a=a: torch.ops.fastface.ir_block(*a, *tail)
            if ir_block_triton is not None:
                providers["triton"] = lambda a=a: ir_block_triton(*a, *tail, halo=True)
                providers["triton-taps"] = lambda a=a: ir_block_triton(*a, *tail, halo=False)
            io_bytes = (a[0].numel() + eager_y.numel()) * a[0].element_size()
            shape = f"{h}x{h} {cin}-{ce}-{cout} s{s}" + (f" g{groups}" if groups > 1 else "")
            eager_ms = None
            for name, fn in providers.items():
                try:
                    ok, err, err_eager = (True, 0.0, 0.0) if name == "eager" else \
                        check((fn(),), (eager_y,), (ref,), dtype)
                    ms = bench_ms(fn)
                except Exception as e:  # noqa: BLE001 - a crashing provider is reported and fails the run
                    failures.append(f"ir_block {shape} {dt} {name}: {type(e).__name__}: {e}")
                    print(f"  FAILED {failures[-1]}")
                    continue
                eager_ms = ms if name == "eager" else eager_ms
                gbps = io_bytes / (ms * 1e-3) / 1e9
                row = dict(kind="ir_block", shape=shape, batch=args.batch, dtype=dt, provider=name, ms=ms, gbps=gbps,
                           frac_copy_bw=gbps / copy_bw, speedup_vs_eager=(eager_ms / ms) if eager_ms else None,
                           ok=ok, err=err, err_eager=err_eager)
                rows.append(row)
                if not ok:
                    failures.append(f"ir_block {shape} {dt} {name}: err {err:.3e} vs eager {err_eager:.3e}")
                print(f"  ir_block {shape:24s} {dt} {name:12s} {ms * 1e3:9.1f} us  {gbps:7.0f} GB/s "
                      f"({100 * gbps / copy_bw:5.1f} % of copy)  x{row['speedup_vs_eager'] or 0:5.2f}"
                      f"{'' if ok else '  ACCURACY CHECK FAILED'}", flush=True)


def eager_dw_train(x, w, gamma, beta, gy, stride):
    """Depthwise conv + BatchNorm (batch statistics) + ReLU6, forward and backward, in eager PyTorch."""
    xs, ws, gs, bs = (t.detach().requires_grad_(True) for t in (x, w, gamma, beta))
    z = F.conv2d(xs, ws[:, None], None, stride=stride, padding=1, groups=x.shape[1])
    y = F.relu6(F.batch_norm(z, None, None, gs, bs, training=True, momentum=0.0, eps=1e-5))
    torch.autograd.backward(y, gy)
    return y, xs.grad, ws.grad, gs.grad, bs.grad


def run_dw_stages(args, rows: list, failures: list) -> None:
    from fastface.ops.dwconv_bn_act import dwconv_bn_act_backward_reference, dwconv_bn_act_reference

    cuda_ok = has_cuda_kernel("dwconv_bn_act")
    try:
        from fastface.kernels import dwconv_bn_act as tri
    except ImportError as e:
        tri = None
        print(f"  Triton unavailable: {e}")
    for h, c, s in (SMOKE_DW_STAGES if args.smoke else DW_STAGES)[: 2 if args.quick else None]:
        for dt in args.dtypes:
            dtype = DTYPES[dt]
            g = torch.Generator(device=DEV).manual_seed(0)
            x = torch.randn(args.batch, c, h, h, generator=g, device=DEV).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            w = (torch.randn(c, 3, 3, generator=g, device=DEV) / 3).to(dtype)
            gamma = (torch.rand(c, generator=g, device=DEV) + 0.5).to(dtype)
            beta = torch.randn(c, generator=g, device=DEV).to(dtype)
            y_ref, mean, invstd = dwconv_bn_act_reference(*(t.double() for t in (x, w, gamma, beta)), s, 1e-5, True)
            gy = torch.randn(tuple(y_ref.shape), generator=g, device=DEV).to(dtype)
            gy = gy.contiguous(memory_format=torch.channels_last)
            mean_d, invstd_d = mean.to(dtype), invstd.to(dtype)
            grads_ref = dwconv_bn_act_backward_reference(gy.double(), *(t.double() for t in (x, w, gamma, beta)),
                                                         mean_d.double(), invstd_d.double(), s, True)
            y_same = dwconv_bn_act_reference(x, w, gamma, beta, s, 1e-5, True)[0]
            grads_same = dwconv_bn_act_backward_reference(gy, x, w, gamma, beta, mean_d, invstd_d, s, True)
            providers: dict[str, Callable] = {"eager": lambda x=x, w=w, gm=gamma, b=beta, gy=gy:
                                              eager_dw_train(x, w, gm, b, gy, s)}
            pairs = []
            if cuda_ok:
                pairs.append(("cuda", torch.ops.fastface.dwconv_bn_act, torch.ops.fastface.dwconv_bn_act_backward))
            if tri is not None:
                pairs.append(("triton", tri.forward, tri.backward))
            for name, fwd, bwd in pairs:
                def step(fwd=fwd, bwd=bwd, x=x, w=w, gm=gamma, b=beta, gy=gy):
                    y, m, i = fwd(x, w, gm, b, s, 1e-5, True)
                    return (y, *bwd(gy, x, w, gm, b, m, i, s, True))
                providers[name] = step
            shape = f"{h}x{h} C{c} s{s}"
            # Bytes a fused fwd+bwd must move: x, y (fwd); grad_y, x, grad_x (bwd).
            io_bytes = (3 * x.numel() + 2 * y_ref.numel()) * x.element_size()
            eager_ms = None
            for name, fn in providers.items():
                try:
                    if name == "eager":
                        ok, err, err_eager = True, 0.0, 0.0
                    else:
                        y_fast = fn()[0]
                        grads = bwd_only(name, pairs, x, w, gamma, beta, gy, mean_d, invstd_d, s)
                        ok, err, err_eager = check((y_fast, *grads), (y_same, *grads_same), (y_ref, *grads_ref),
                                                   dtype)
                    ms = bench_ms(fn)
                except Exception as e:  # noqa: BLE001 - a crashing provider is reported and fails the run
                    failures.append(f"dwconv_bn_act {shape} {dt} {name}: {type(e).__name__}: {e}")
                    print(f"  FAILED {failures[-1]}")
                    continue
                eager_ms = ms if name == "eager" else eager_ms
                gbps = io_bytes / (ms * 1e-3) / 1e9
                rows.append(dict(kind="dwconv_bn_act fwd+bwd", shape=shape, batch=args.batch, dtype=dt, provider=name,
                                 ms=ms, gbps=gbps, speedup_vs_eager=(eager_ms / ms) if eager_ms else None, ok=ok,
                                 err=err, err_eager=err_eager))
                if not ok:
                    failures.append(f"dwconv_bn_act {shape} {dt} {name}: err {err:.3e} vs eager {err_eager:.3e}")
                print(f"  dwconv_bn_act {shape:16s} {dt} {name:8s} {ms * 1e3:9.1f} us  {gbps:7.0f} GB/s  "
                      f"x{(eager_ms / ms) if eager_ms else 0:5.2f}{'' if ok else '  ACCURACY CHECK FAILED'}",
                      flush=True)


def bwd_only(name, pairs, x, w, gamma, beta, gy, mean, invstd, s):
    """The backend's gradients from the reference statistics (so they compare with the references')."""
    bwd = {n: b for n, _f, b in pairs}[name]
    return bwd(gy, x, w, gamma, beta, mean, invstd, s, True)


def write_results(args, meta: dict, rows: list, failures: list) -> tuple[str, str]:
    gpu = re.sub(r"[^A-Za-z0-9_-]+", "-", meta["gpu"]).strip("-")
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"gpu_check_{gpu}")
    with open(base + ".json.tmp", "w") as f:
        json.dump({"meta": meta, "rows": rows, "failures": failures}, f, indent=2)
    os.replace(base + ".json.tmp", base + ".json")
    lines = [f"# Fused kernels on {meta['gpu']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, batch {args.batch}; "
             f"device copy bandwidth {meta['copy_gbps']:.0f} GB/s. Times are medians (L2 flushed).", ""]
    for kind, unit in (("ir_block", "x read + y written"), ("dwconv_bn_act fwd+bwd", "x, y, grad_y, x, grad_x")):
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        providers = list(dict.fromkeys(r["provider"] for r in sel))
        lines += [f"## {kind}", "", f"us (speed-up vs eager) [% of copy bandwidth, bytes = {unit}]", "",
                  "| shape | dtype | " + " | ".join(providers) + " |", "|---|---|" + "---|" * len(providers)]
        for key in dict.fromkeys((r["shape"], r["dtype"]) for r in sel):
            cells = []
            for p in providers:
                r = next((r for r in sel if (r["shape"], r["dtype"], r["provider"]) == (*key, p)), None)
                if r is None:
                    cells.append("-")
                    continue
                frac = r["gbps"] / meta["copy_gbps"]
                cells.append(f"{r['ms'] * 1e3:.1f} (x{r['speedup_vs_eager'] or 1:.2f}) [{100 * frac:.0f} %]"
                             + ("" if r["ok"] else " FAIL"))
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
        lines.append("")
    if failures:
        lines += ["## Failures", ""] + [f"- {f}" for f in failures] + [""]
    with open(base + ".md.tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(base + ".md.tmp", base + ".md")
    return base + ".json", base + ".md"


def main() -> int:
    """Time everything, write JSON + markdown; 0 if all checks passed, 1 if one failed, 2 without CUDA."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtypes", default="fp16,bf16,fp32", help="comma-separated: fp16,bf16,fp32")
    p.add_argument("--compile-dtypes", default="fp16", help="dtypes that also time torch.compile (it compiles "
                   "once per shape and dtype, ~10-30 s each)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    p.add_argument("--quick", action="store_true", help="the first few shapes only")
    p.add_argument("--out-dir", default=None, help="default: bench/results (build/gpu_bench_smoke with --smoke)")
    p.add_argument("--smoke", action="store_true", help="check the script on the CPU: toy shapes, batch 2, Triton "
                   "interpreted, no torch.compile (timings meaningless)")
    args = p.parse_args()
    if args.out_dir is None:
        args.out_dir = os.path.join(ROOT, "build", "gpu_bench_smoke") if args.smoke else \
            os.path.join(ROOT, "bench", "results")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.compile_dtypes = [d.strip() for d in args.compile_dtypes.split(",") if d.strip()]
    unknown = [d for d in args.dtypes + args.compile_dtypes if d not in DTYPES]
    if unknown:
        p.error(f"unknown dtypes {unknown}; choose from {sorted(DTYPES)}")
    global DEV
    if args.smoke:
        DEV, args.batch, args.compile = "cpu", 2, False
        args.dtypes = [d for d in args.dtypes if d != "bf16"]  # the interpreter has no bf16
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported, below
    elif not torch.cuda.is_available():
        print("gpu_bench: no CUDA device is available (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, built for CUDA {torch.version.cuda}); nothing to time.", file=sys.stderr)
        return 2
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    t0 = time.time()
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else f"smoke-cpu-{platform.machine()}"
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
                python=platform.python_version(), batch=args.batch, cuda_ext=has_cuda_kernel("ir_block"))
    meta["copy_gbps"] = copy_bandwidth()
    print(f"{meta['gpu']}: copy bandwidth {meta['copy_gbps']:.0f} GB/s; fastface CUDA kernels: {meta['cuda_ext']}")
    rows: list = []
    failures: list = []
    if not meta["cuda_ext"] and DEV == "cuda":
        failures.append("fastface._C has no CUDA kernels (build with FORCE_CUDA=1 on a CUDA torch)")
    print("inference: fused inverted-residual block")
    run_ir_blocks(args, meta["copy_gbps"], rows, failures)
    write_results(args, meta, rows, failures)  # a run stopped in the next part keeps this one's rows
    print("training: depthwise conv + BN + ReLU6, forward and backward")
    run_dw_stages(args, rows, failures)
    meta["seconds"] = time.time() - t0
    js, md = write_results(args, meta, rows, failures)
    print(f"wrote {js} and {md} ({meta['seconds']:.0f} s)")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
