"""The Triton and CUDA backends of the fused ops (ir_block, dwconv_bn_act) against their references.

Without a GPU the suite still runs every kernel:
- Triton under the interpreter (a subprocess with TRITON_INTERPRET=1 set before import), tiny odd
  shapes, both layouts, fp32 and fp16;
- the Triton kernels compiled for sm_90 at the launch configurations of the MobileNetV2 face
  blocks (a second subprocess without the interpreter: no device needed to compile);
- the CUDA kernels and launchers of csrc/cuda/ built with g++ against a small CPU emulation of the
  CUDA runtime (one std::thread per CUDA thread, std::barrier for __syncthreads), fp32/fp16/bf16.
Tests marked `gpu` run both backends on a device at realistic shapes and opcheck the CUDA ops.

Accuracy follows the flash-attention rule: err(fast vs float64 reference) <= 2 x err(PyTorch in
the same dtype vs float64 reference) + a floor of two ulps at the output's scale.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastface.ops.dwconv_bn_act import dwconv_bn_act_backward_reference, dwconv_bn_act_reference
from fastface.ops.ir_block import ir_block_reference

ROOT = Path(__file__).resolve().parents[1]
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# ---- cases and the shared error computation ---------------------------------------------------

# (N, G, Cin, Ce, Cout, H, W, k, stride, residual, expand, dtype, channels_last, halo)
IR_CASES = {
    "res-7x7-c5": (2, 1, 5, 30, 5, 7, 7, 3, 1, True, True, "fp32", False, True),
    "g2-5x9-cl": (1, 2, 12, 20, 12, 5, 9, 3, 1, True, True, "fp32", True, True),
    "s2-noexpand-g2": (1, 2, 12, 12, 20, 7, 7, 3, 2, False, False, "fp32", False, True),
    "s2-taps-cl": (1, 1, 20, 40, 12, 9, 5, 3, 2, False, True, "fp32", True, False),
    "cin72-chunks": (1, 1, 72, 40, 72, 5, 5, 3, 1, True, True, "fp32", True, True),
    "k5-g2": (1, 2, 8, 24, 8, 6, 7, 5, 1, True, True, "fp32", False, True),
    "noexpand-res-taps": (1, 2, 12, 12, 12, 7, 7, 3, 1, True, False, "fp32", True, False),
    "fp16-g2-cl": (2, 2, 8, 24, 8, 7, 7, 3, 1, True, True, "fp16", True, True),
    "fp16-s2-taps": (1, 1, 12, 40, 20, 9, 5, 3, 2, False, True, "fp16", False, False),
}
# (N, C, H, W, k, stride, relu6, dtype, channels_last, few_programs)
DW_CASES = {
    "7x7-c5": (2, 5, 7, 7, 3, 1, True, "fp32", False, False),
    "s2-c40-cl": (2, 40, 5, 9, 3, 2, True, "fp32", True, False),
    "k5-norelu": (1, 20, 9, 5, 5, 1, False, "fp32", False, False),
    "s3-few-programs": (1, 6, 8, 10, 3, 3, True, "fp32", True, True),
    "s2-c33-few-programs": (1, 33, 9, 7, 3, 2, True, "fp32", True, True),
    "fp16-cl": (3, 12, 6, 7, 3, 1, True, "fp16", True, False),
}


def make_ir_inputs(case: tuple, device: str = "cpu", seed: int = 0) -> tuple:
    """x and the folded weights of one ir_block case, in the case's dtype."""
    n, g, cin, ce, cout, h, w, k, _s, _res, expand, dt, _cl, _halo = case
    dtype = DTYPES[dt]
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = r(n, g * cin, h, w)
    we = r(g * ce, cin, scale=cin ** -0.5) if expand else None
    be = r(g * ce, scale=0.5) if expand else None
    return x, we, be, r(g * ce, k, k, scale=1.0 / k), r(g * ce, scale=0.5), r(g * cout, ce, scale=ce ** -0.5), \
        r(g * cout, scale=0.5)


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def _entry(fast: torch.Tensor, same: torch.Tensor, ref: torch.Tensor) -> list[float]:
    return [_err(fast, ref), _err(same, ref), ref.abs().max().item()]


def ir_errors(fn, case: tuple, device: str = "cpu") -> dict:
    """{'y': [err fast, err torch same dtype, max |ref|], 'layout_ok': bool} for one ir_block case."""
    _n, g, _cin, _ce, _cout, _h, _w, _k, s, res, _exp, _dt, cl, _halo = case
    args = make_ir_inputs(case, device)
    x = args[0].contiguous(memory_format=torch.channels_last) if cl else args[0]
    ref = ir_block_reference(*[a.double() if a is not None else None for a in args], s, res, g)
    same = ir_block_reference(*args, s, res, g)
    y = fn(x, *args[1:], s, res, g)
    layout_ok = y.dtype == x.dtype and tuple(y.shape) == tuple(ref.shape) and (
        y.is_contiguous(memory_format=torch.channels_last) if cl else y.is_contiguous())
    return {"y": _entry(y, same, ref), "layout_ok": bool(layout_ok)}


def make_dw_inputs(case: tuple, device: str = "cpu", seed: int = 0) -> tuple:
    """x, weight, gamma, beta of one dwconv_bn_act case, in the case's dtype."""
    n, c, h, w, k, _s, _relu, dt, _cl, _few = case
    dtype = DTYPES[dt]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) + 0.5
    weight = torch.randn(c, k, k, generator=gen, dtype=torch.float64) / k
    gamma = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    beta = torch.randn(c, generator=gen, dtype=torch.float64) * 2 + 1.5  # some channels reach the 6 clip
    return tuple(t.to(device=device, dtype=dtype) for t in (x, weight, gamma, beta))


def dw_errors(fwd, bwd, case: tuple, device: str = "cpu") -> dict:
    """Errors of y, mean, invstd and the four gradients for one dwconv_bn_act case."""
    _n, _c, _h, _w, _k, s, relu6, _dt, cl, _few = case
    x, weight, gamma, beta = make_dw_inputs(case, device)
    xl = x.contiguous(memory_format=torch.channels_last) if cl else x
    d = [t.double() for t in (x, weight, gamma, beta)]
    ref = dwconv_bn_act_reference(*d, s, 1e-5, relu6)
    same = dwconv_bn_act_reference(x, weight, gamma, beta, s, 1e-5, relu6)
    fast = fwd(xl, weight, gamma, beta, s, 1e-5, relu6)
    out = {name: _entry(f, t, r) for name, f, t, r in zip(("y", "mean", "invstd"), fast, same, ref)}
    y = fast[0]
    out["layout_ok"] = bool(y.is_contiguous(memory_format=torch.channels_last) if cl else y.is_contiguous())
    # Every backward sees the same statistics (the dtype's), so the errors are the backward's own.
    mean, invstd = same[1], same[2]
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(tuple(ref[0].shape), generator=gen, dtype=torch.float64).to(device=device, dtype=x.dtype)
    gyl = gy.contiguous(memory_format=torch.channels_last) if cl else gy
    bref = dwconv_bn_act_backward_reference(gy.double(), *d, mean.double(), invstd.double(), s, relu6)
    bsame = dwconv_bn_act_backward_reference(gy, x, weight, gamma, beta, mean, invstd, s, relu6)
    bfast = bwd(gyl, xl, weight, gamma, beta, mean, invstd, s, relu6)
    for name, f, t, r in zip(("grad_x", "grad_weight", "grad_gamma", "grad_beta"), bfast, bsame, bref):
        out[name] = _entry(f, t, r)
    gx = bfast[0]
    out["layout_ok"] &= bool(gx.is_contiguous(memory_format=torch.channels_last) if cl else gx.is_contiguous())
    return out


def assert_rule(errors: dict, dtype: torch.dtype, what: str) -> None:
    """err(fast) <= 2 err(torch same dtype) + 2 ulps of the output's scale, for every output."""
    assert errors.pop("layout_ok", True), f"{what}: wrong output layout/dtype/shape"
    for name, (fast, same, scale) in errors.items():
        floor = 2 * EPS[dtype] * max(scale, 1.0)
        assert fast <= 2 * same + floor, f"{what} {name}: err {fast:.3e} > 2 x torch {same:.3e} + {floor:.1e}"


# ---- (a) Triton under the interpreter -------------------------------------------------------------

_INTERP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    sys.path.insert(0, {tests!r})
    import torch
    import test_ops_fused_gpu_backends as T
    from fastface.kernels import dwconv_bn_act as D
    from fastface.kernels.ir_block import ir_block_triton
    import fastface.ops as ops

    out = {{"ir": {{}}, "dw": {{}}, "dispatch": {{}}}}
    for name, case in T.IR_CASES.items():
        halo = case[-1]
        fn = lambda *a, halo=halo: ir_block_triton(*a, halo=halo)
        out["ir"][name] = T.ir_errors(fn, case)
    for name, case in T.DW_CASES.items():
        D._TARGET_PROGRAMS = 2 if case[-1] else 1024  # 2: several tiles per program and per chunk
        out["dw"][name] = T.dw_errors(D.forward, D.backward, case)
    D._TARGET_PROGRAMS = 1024

    # Through fastface.ops with the backend forced (when the dispatch entries exist).
    case = T.IR_CASES["g2-5x9-cl"]
    args = T.make_ir_inputs(case)
    x = args[0].contiguous(memory_format=torch.channels_last)
    direct = ir_block_triton(x, *args[1:], 1, True, 2)
    with ops.use_backend("triton"):
        via = ops.ir_block(x, *args[1:], 1, True, 2)
    out["dispatch"]["ir_block"] = torch.equal(direct, via) and via.is_contiguous(memory_format=torch.channels_last)
    if "triton" in getattr(getattr(ops, "dwconv_bn_act", None), "impls", {{}}):
        case = T.DW_CASES["s2-c40-cl"]
        xx, w, g, b = T.make_dw_inputs(case)
        xx = xx.contiguous(memory_format=torch.channels_last)
        y0, m0, i0 = D.forward(xx, w, g, b, 2, 1e-5, True)
        with ops.use_backend("triton"):
            y1, m1, i1 = ops.dwconv_bn_act(xx, w, g, b, 2, 1e-5, True)
        out["dispatch"]["dwconv_bn_act"] = all(torch.equal(p, q) for p, q in ((y0, y1), (m0, m1), (i0, i1)))
    else:
        out["dispatch"]["dwconv_bn_act"] = "fastface.ops has no triton dwconv_bn_act backend yet"
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def interp_results() -> dict:
    pytest.importorskip("triton")
    script = _INTERP_SCRIPT.format(tests=str(Path(__file__).parent))
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("name", sorted(IR_CASES))
def test_triton_ir_block_interpreter(interp_results, name):
    assert_rule(dict(interp_results["ir"][name]), DTYPES[IR_CASES[name][11]], f"ir_block[{name}]")


@pytest.mark.parametrize("name", sorted(DW_CASES))
def test_triton_dwconv_bn_act_interpreter(interp_results, name):
    assert_rule(dict(interp_results["dw"][name]), DTYPES[DW_CASES[name][7]], f"dwconv_bn_act[{name}]")


@pytest.mark.parametrize("op", ["ir_block", "dwconv_bn_act"])
def test_triton_through_dispatch(interp_results, op):
    got = interp_results["dispatch"][op]
    if isinstance(got, str):
        pytest.skip(got)
    assert got is True, f"fastface.ops.{op} with use_backend('triton') differs from the kernel called directly"


# ---- (a') the Triton kernels compile for sm_90 at the face blocks' launch configurations -----------

# (H, Cin, Ce, Cout, stride): the inverted-residual blocks of the MobileNetV2 face network.
FACE_BLOCKS = [(56, 24, 144, 24, 1), (56, 24, 144, 32, 2), (28, 32, 192, 32, 1), (14, 96, 576, 96, 1),
               (7, 160, 960, 160, 1), (7, 160, 960, 320, 1)]

_COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, {tests!r})
    import test_ops_fused_gpu_backends as T
    from fastface.kernels import dwconv_bn_act as D, ir_block as I

    def build(fn, const, ptr, num_warps):
        sig = {{a: ("constexpr" if a in const else ptr.get(a, ptr["*"]) if a.endswith("_ptr") else
                    "fp32" if a == "eps" else "i32") for a in fn.arg_names}}
        k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps, num_stages=2))
        return len(k.asm["cubin"])

    done = []
    for (h, cin, ce, cout, s), dt, halo in [(b, "fp16", True) for b in T.FACE_BLOCKS] + [
            (T.FACE_BLOCKS[0], "bf16", False), (T.FACE_BLOCKS[3], "fp32", True)]:
        oh = (h - 1) // s + 1
        meta, warps, _ = I.launch_config(oh, oh, s, 3, cin, ce, cout, True, s == 1 and cin == cout, halo,
                                         T.DTYPES[dt])
        assert build(I._ir_block_kernel, meta, {{"*": "*" + dt}}, warps) > 0
        done.append(f"ir_block {{h}}x{{h}} {{cin}}-{{ce}}-{{cout}} s{{s}} {{dt}} {{'halo' if halo else 'taps'}}")
    f32 = {{a: "*fp32" for a in ("part_mean_ptr", "part_m2_ptr", "affine_ptr", "part_ptr", "coef_ptr",
                                  "gw_part_ptr")}}
    th, tw, bp, bhp = D._grad_tile(1, 3)
    base = dict(STRIDE=1, K=3, BLOCK_PIX=D._BLOCK_PIX, BLOCK_C=D._BLOCK_C)
    for fn, const in [(D._stats_kernel, base), (D._finalize_kernel, dict(BLOCK_C=D._BLOCK_C)),
                      (D._normalize_kernel, dict(base, RELU6=True)), (D._bwd_sums_kernel, dict(base, RELU6=True)),
                      (D._bwd_finalize_kernel, dict(BLOCK_C=D._BLOCK_C)),
                      (D._bwd_grad_kernel, dict(STRIDE=1, K=3, RELU6=True, TH=th, TW=tw, BLOCK_P=bp, BLOCK_HP=bhp,
                                                BLOCK_KK=16, BLOCK_C=D._BLOCK_C)),
                      (D._reduce_gw_kernel, dict(KK=9, BLOCK=256))]:
        assert build(fn, const, dict(f32, **{{"*": "*fp16"}}), D._WARPS) > 0
        done.append(fn.__name__)
    print("RESULT " + json.dumps(done))
""")


def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001 - any failure here means the toolchain is missing, not a bug
        pytest.skip(f"triton has no NVIDIA toolchain here ({e})")
    if not ptxas or not os.path.exists(ptxas):
        pytest.skip("triton's ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = _COMPILE_SCRIPT.format(tests=str(Path(__file__).parent))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    done = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert len(done) == len(FACE_BLOCKS) + 2 + 7


# ---- (b) the CUDA kernels, run on the CPU through a small emulation of the CUDA runtime ------------

_EMU_RUNTIME = r"""
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <vector>
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct uint3 { unsigned x, y, z; };
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
template <class F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
inline thread_local uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emu_barrier;
inline std::vector<float> emu_dynamic_smem(1 << 20);
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
// Blocks run one after another; the threads of a block run concurrently.
template <class... KArgs, class... Args>
cudaError_t emu_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  if (smem > emu_dynamic_smem.size() * sizeof(float)) return cudaErrorInvalidValue;
  gridDim = grid;
  blockDim = block;
  const unsigned nt = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(nt);
        emu_barrier = &bar;
        std::fill(emu_dynamic_smem.begin(), emu_dynamic_smem.end(), NAN);  // unwritten shared memory reads NaN
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < nt; ++t)
          ts.emplace_back([&, t] {
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            blockIdx = {bx, by, bz};
            kernel(args...);
          });
        for (auto& th : ts) th.join();
      }
  return cudaSuccess;
}
"""
_EMU_FP16 = r"""
#pragma once
struct __half { _Float16 v; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
"""
_EMU_BF16 = r"""
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = (uint32_t)b.bits << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  if (std::isnan(f)) return {0x7fc0};
  uint32_t u; std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return {(uint16_t)(u >> 16)};
}
"""
_EMU_WRAPPERS = {
    "ir_block": r"""
using namespace fastface::cuda;
extern "C" int emu_ir_block(const void* x, const void* we, const void* be, const void* wd, const void* bd,
                            const void* wp, const void* bp, void* y, int dtype, const int64_t* v, int expand, int res) {
  const IrBlockShape s{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], expand != 0, res != 0};
  return ir_block_forward(x, we, be, wd, bd, wp, bp, y, (FusedDType)dtype, s, nullptr);
}
""",
    "dwconv_bn_act": r"""
using namespace fastface::cuda;
static DwBnShape shape_of(const int64_t* v) { return DwBnShape{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]}; }
extern "C" size_t emu_dwbn_workspace(const int64_t* v) { return dwconv_bn_act_workspace(shape_of(v)); }
extern "C" int emu_dwbn_forward(const void* x, const void* w, const float* g, const float* b, void* y, void* m,
                                void* iv, int dtype, const int64_t* v, float eps, int relu6, void* ws) {
  return dwconv_bn_act_forward(x, w, g, b, y, m, iv, (FusedDType)dtype, shape_of(v), eps, relu6 != 0, ws, nullptr);
}
extern "C" int emu_dwbn_backward(const void* gy, const void* x, const void* w, const float* g, const float* b,
                                 const float* m, const float* iv, void* gx, void* gw, float* gg, float* gb, int dtype,
                                 const int64_t* v, int relu6, void* ws) {
  return dwconv_bn_act_backward(gy, x, w, g, b, m, iv, gx, gw, gg, gb, (FusedDType)dtype, shape_of(v), relu6 != 0,
                                ws, nullptr);
}
""",
}
_LAUNCHES = {"ir_block": 1, "dwconv_bn_act": 7}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """csrc/cuda/{ir_block,dwconv_bn_act}.cu built for the CPU emulation, as a ctypes library."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    out = tmp_path_factory.mktemp("cuda_emu")
    for name, text in (("cuda_runtime.h", _EMU_RUNTIME), ("cuda_fp16.h", _EMU_FP16), ("cuda_bf16.h", _EMU_BF16)):
        (out / name).write_text(text)
    for header in ("ir_block.h", "dwconv_bn_act.h", "float_convert.cuh"):
        shutil.copy(ROOT / "csrc" / "cuda" / header, out / header)
    launch = re.compile(r"(\b[\w:]+(?:<[^;<>()]*>)?)\s*<<<(.+?)>>>\(", re.S)
    procs = []
    for name, wrapper in _EMU_WRAPPERS.items():
        src = (ROOT / "csrc" / "cuda" / f"{name}.cu").read_text()
        src = src.replace("extern __shared__ float smem[];", "float* smem = emu_dynamic_smem.data();")
        # 4 reduction blocks instead of 1024: tiny shapes then take several chunks and tiles per block.
        src, n_target = re.subn(r"kTargetBlocks = \d+;", "kTargetBlocks = 4;", src)
        src, n_launch = launch.subn(r"emu_launch(\1, \2, ", src)
        assert n_launch == _LAUNCHES[name] and n_target == (name == "dwconv_bn_act"), (name, n_launch, n_target)
        (out / f"{name}.cpp").write_text(src + wrapper)
        procs.append(subprocess.Popen(["g++", "-std=c++20", "-O1", "-fPIC", "-pthread", "-w", "-I", str(out), "-c",
                                       str(out / f"{name}.cpp"), "-o", str(out / f"{name}.o")],
                                      stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=600)[1] for p in procs]
    if any(p.returncode for p in procs):
        text = "".join(errors)
        first = next((ln for ln in text.splitlines() if "error" in ln), "")
        if re.search(r"cuda_(runtime|fp16|bf16)\.h:\d+|barrier", first):  # the shim, not the kernels
            pytest.skip(f"this g++ cannot build the emulation shim (C++20 <barrier>, _Float16): {first}")
        pytest.fail(text[-4000:])
    lib = out / "libfused_emu.so"
    subprocess.run(["g++", "-shared", "-pthread", *[str(out / f"{n}.o") for n in _EMU_WRAPPERS], "-o", str(lib)],
                   check=True, capture_output=True)
    return ctypes.CDLL(str(lib))


_DT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _i64(*v: int):
    return (ctypes.c_int64 * len(v))(*v)


def _emu_ir_block(lib):
    def run(x, we, be, wd, bd, wp, bp, s, res, g):
        n, c, h, w = x.shape
        k = wd.shape[-1]
        oh, ow = (h - 1) // s + 1, (w - 1) // s + 1
        # Every tensor handed over stays referenced until the call returns (no dangling temporaries).
        xc = x.contiguous(memory_format=torch.channels_last)
        we, be, wd, bd, wp, bp = (t.contiguous() if t is not None else None for t in (we, be, wd, bd, wp, bp))
        y = torch.empty(n, wp.shape[0], oh, ow, dtype=x.dtype, memory_format=torch.channels_last)
        v = _i64(n, h, w, oh, ow, g, c // g, wd.shape[0] // g, wp.shape[0] // g, k, s)
        rc = lib.emu_ir_block(_ptr(xc), _ptr(we), _ptr(be), _ptr(wd), _ptr(bd), _ptr(wp), _ptr(bp), _ptr(y),
                              _DT_CODE[x.dtype], v, int(we is not None), int(res))
        assert rc == 0, f"ir_block_forward returned {rc}"
        # The registration (fused_cuda.cpp) returns NCHW-contiguous output for NCHW input.
        return y if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else y.contiguous()

    return run


def _emu_dwconv_bn_act(lib):
    lib.emu_dwbn_workspace.restype = ctypes.c_size_t

    def shape(x, weight, s):
        n, c, h, w = x.shape
        k = weight.shape[-1]
        return _i64(n, c, h, w, (h - 1) // s + 1, (w - 1) // s + 1, k, s)

    def out_layout(t, x):
        return t if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else t.contiguous()

    def fwd(x, weight, gamma, beta, s, eps, relu6):
        v = shape(x, weight, s)
        ws = torch.empty(lib.emu_dwbn_workspace(v) // 4 + 1)
        xc, wc = x.contiguous(memory_format=torch.channels_last), weight.contiguous()
        g32, b32 = gamma.float().contiguous(), beta.float().contiguous()
        y = torch.empty(v[0], v[1], v[4], v[5], dtype=x.dtype, memory_format=torch.channels_last)
        mean, invstd = torch.empty(v[1], dtype=x.dtype), torch.empty(v[1], dtype=x.dtype)
        rc = lib.emu_dwbn_forward(_ptr(xc), _ptr(wc), _ptr(g32), _ptr(b32), _ptr(y), _ptr(mean), _ptr(invstd),
                                  _DT_CODE[x.dtype], v, ctypes.c_float(eps), int(relu6), _ptr(ws))
        assert rc == 0, f"dwconv_bn_act_forward returned {rc}"
        return out_layout(y, x), mean, invstd

    def bwd(gy, x, weight, gamma, beta, mean, invstd, s, relu6):
        v = shape(x, weight, s)
        ws = torch.empty(lib.emu_dwbn_workspace(v) // 4 + 1)
        xc, gyc = x.contiguous(memory_format=torch.channels_last), gy.contiguous(memory_format=torch.channels_last)
        wc = weight.contiguous()
        g32, b32, m32, i32 = (t.float().contiguous() for t in (gamma, beta, mean, invstd))
        gx = torch.empty_like(xc, memory_format=torch.channels_last)
        gw = torch.empty_like(wc)
        gg, gb = torch.empty(v[1]), torch.empty(v[1])
        rc = lib.emu_dwbn_backward(_ptr(gyc), _ptr(xc), _ptr(wc), _ptr(g32), _ptr(b32), _ptr(m32), _ptr(i32), _ptr(gx),
                                   _ptr(gw), _ptr(gg), _ptr(gb), _DT_CODE[x.dtype], v, int(relu6), _ptr(ws))
        assert rc == 0, f"dwconv_bn_act_backward returned {rc}"
        return out_layout(gx, x), gw, gg.to(gamma.dtype), gb.to(beta.dtype)

    return fwd, bwd


EMU_IR_CASES = {k: v for k, v in IR_CASES.items() if k in ("res-7x7-c5", "g2-5x9-cl", "s2-noexpand-g2",
                                                           "s2-taps-cl", "cin72-chunks", "k5-g2")}
EMU_IR_CASES.update({
    "fp16-g2": (1, 2, 8, 24, 8, 7, 7, 3, 1, True, True, "fp16", True, True),
    "bf16-s2": (1, 1, 8, 40, 16, 9, 10, 3, 2, False, True, "bf16", False, True),
    "cout170-two-blocks": (1, 1, 8, 16, 170, 3, 3, 3, 1, False, True, "fp32", False, True),
    "10x9-two-tiles": (1, 1, 6, 36, 6, 10, 9, 3, 1, True, True, "fp32", True, True),
})
EMU_DW_CASES = {k: v for k, v in DW_CASES.items() if k not in ("s3-few-programs",)}  # the CUDA path: stride 1, 2
EMU_DW_CASES["bf16-s2"] = (2, 12, 7, 7, 3, 2, True, "bf16", True, False)


@pytest.mark.parametrize("name", sorted(EMU_IR_CASES))
def test_cuda_ir_block_emulated(emu, name):
    case = EMU_IR_CASES[name]
    assert_rule(ir_errors(_emu_ir_block(emu), case), DTYPES[case[11]], f"ir_block CUDA (emulated) [{name}]")


@pytest.mark.parametrize("name", sorted(EMU_DW_CASES))
def test_cuda_dwconv_bn_act_emulated(emu, name):
    case = EMU_DW_CASES[name]
    fwd, bwd = _emu_dwconv_bn_act(emu)
    assert_rule(dw_errors(fwd, bwd, case), DTYPES[case[7]], f"dwconv_bn_act CUDA (emulated) [{name}]")


def test_cuda_launchers_reject_unsupported_sizes(emu):
    x = torch.zeros(1, 4, 5, 5)
    w = torch.zeros(4, 4)
    wd = torch.zeros(4, 4, 4)  # even k
    y = torch.empty(1, 4, 5, 5)
    rc = emu.emu_ir_block(_ptr(x), _ptr(w), _ptr(w[0]), _ptr(wd), _ptr(w[0]), _ptr(w), _ptr(w[0]), _ptr(y), 0,
                          _i64(1, 5, 5, 5, 5, 1, 4, 4, 4, 4, 1), 1, 0)
    assert rc != 0
    assert emu.emu_dwbn_workspace(_i64(1, 4, 5, 5, 5, 5, 7, 1)) == 0  # k = 7: not built


# ---- the GPU check script and benchmark, without a GPU ------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_gpu_bench_without_cuda_says_so_and_fails():
    bench = ROOT / "bench" / "gpu_bench.py"
    usage = subprocess.run([sys.executable, str(bench), "--help"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and "--smoke" in usage.stdout, usage.stderr
    run = subprocess.run([sys.executable, str(bench)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no CUDA device" in run.stderr, (run.returncode, run.stderr)
    if shutil.which("bash") and not shutil.which("nvidia-smi"):
        script = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                                timeout=120)
        assert script.returncode == 2 and "no NVIDIA GPU" in script.stderr, (script.returncode, script.stderr)


# ---- (c) on a GPU: both backends at the face blocks' shapes, and opcheck -----------------------------

GPU_IR_CASES = {f"{h}x{h}-{cin}-{ce}-{cout}-s{s}": (4, 1, cin, ce, cout, h, h, 3, s, s == 1 and cin == cout, True,
                                                    "fp32", True, True)
                for h, cin, ce, cout, s in FACE_BLOCKS}
GPU_IR_CASES["split-g2-28x28-nchw"] = (4, 2, 16, 96, 16, 28, 28, 3, 1, True, True, "fp32", False, True)
GPU_DW_CASES = {"56x56-144": (8, 144, 56, 56, 3, 1, True, "fp32", True, False),
                "56x56-144-s2": (8, 144, 56, 56, 3, 2, True, "fp32", True, False),
                "14x14-576": (8, 576, 14, 14, 3, 1, True, "fp32", True, False),
                "7x7-960-nchw": (8, 960, 7, 7, 3, 1, True, "fp32", False, False)}


def _with_dtype(case: tuple, index: int, dt: str) -> tuple:
    return case[:index] + (dt,) + case[index + 1:]


def _has_cuda_kernel(op: str) -> bool:
    from fastface._ext import has_op

    return has_op(op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastface::{op}", "CUDA")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dt", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(GPU_IR_CASES))
@pytest.mark.parametrize("backend", ["cuda", "triton", "triton-taps"])
def test_gpu_ir_block(backend, name, dt):
    case = _with_dtype(GPU_IR_CASES[name], 11, dt)
    if backend == "cuda":
        if not _has_cuda_kernel("ir_block"):
            pytest.skip("fastface._C was built without CUDA kernels")
        fn = torch.ops.fastface.ir_block
    else:
        from fastface.kernels.ir_block import ir_block_triton

        def fn(*a):
            return ir_block_triton(*a, halo=backend == "triton")
    assert_rule(ir_errors(fn, case, "cuda"), DTYPES[dt], f"ir_block {backend} [{name}, {dt}]")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dt", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(GPU_DW_CASES))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_dwconv_bn_act(backend, name, dt):
    case = _with_dtype(GPU_DW_CASES[name], 7, dt)
    if backend == "cuda":
        if not _has_cuda_kernel("dwconv_bn_act"):
            pytest.skip("fastface._C was built without CUDA kernels")
        fwd, bwd = torch.ops.fastface.dwconv_bn_act, torch.ops.fastface.dwconv_bn_act_backward
    else:
        from fastface.kernels import dwconv_bn_act as D

        fwd, bwd = D.forward, D.backward
    assert_rule(dw_errors(fwd, bwd, case, "cuda"), DTYPES[dt], f"dwconv_bn_act {backend} [{name}, {dt}]")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cuda_kernels_are_deterministic():
    if not _has_cuda_kernel("dwconv_bn_act"):
        pytest.skip("fastface._C was built without CUDA kernels")
    x, w, g, b = make_dw_inputs(GPU_DW_CASES["56x56-144"], "cuda")
    x = x.contiguous(memory_format=torch.channels_last)
    first = torch.ops.fastface.dwconv_bn_act(x, w, g, b, 1, 1e-5, True)
    gy = torch.randn_like(first[0])
    grads = torch.ops.fastface.dwconv_bn_act_backward(gy, x, w, g, b, first[1], first[2], 1, True)
    for _ in range(3):
        again = torch.ops.fastface.dwconv_bn_act(x, w, g, b, 1, 1e-5, True)
        assert all(torch.equal(p, q) for p, q in zip(first, again))
        assert all(torch.equal(p, q) for p, q in zip(
            grads, torch.ops.fastface.dwconv_bn_act_backward(gy, x, w, g, b, first[1], first[2], 1, True)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_gpu_opcheck_cuda_ops(dt):
    if not (_has_cuda_kernel("ir_block") and _has_cuda_kernel("dwconv_bn_act")):
        pytest.skip("fastface._C was built without CUDA kernels")
    import fastface.ops  # noqa: F401 - registers the fake kernels and autograd formulas

    dtype = DTYPES[dt]
    case = _with_dtype((2, 2, 8, 32, 8, 9, 7, 3, 1, True, True, "fp32", True, True), 11, dt)
    args = make_ir_inputs(case, "cuda")
    x = args[0].contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fastface.ir_block.default, (x, *args[1:], 1, True, 2))
    no_expand = make_ir_inputs(_with_dtype((1, 1, 16, 16, 24, 8, 8, 3, 2, False, False, "fp32", False, True), 11, dt),
                               "cuda")
    torch.library.opcheck(torch.ops.fastface.ir_block.default, (*no_expand, 2, False, 1))
    xd, wd, gd, bd = make_dw_inputs((2, 40, 9, 9, 3, 2, True, dt, True, False), "cuda")
    xd = xd.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fastface.dwconv_bn_act.default, (xd, wd, gd, bd, 2, 1e-5, True))
    y, mean, invstd = torch.ops.fastface.dwconv_bn_act(xd, wd, gd, bd, 2, 1e-5, True)
    gy = torch.randn_like(y, dtype=dtype)
    torch.library.opcheck(torch.ops.fastface.dwconv_bn_act_backward.default,
                          (gy, xd, wd, gd, bd, mean, invstd, 2, True))
