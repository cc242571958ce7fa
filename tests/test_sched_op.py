"""The fused scheduler op (fastface.ops.sched_step) against the plain-Python recurrence."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from _sched_helpers import loss_stream
from fastface._ext import has_op
from fastface.ops import sched_step, sched_step_reference, use_backend
from fastface.ops.sched import HALVINGS, S1, STATE_SIZE, SchedParams, fresh_state
from fastface.sched import ema_haar_slopes, python_lr_scale, python_update

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not has_op("fastface_sched_step"), reason="fastface._C without fastface_sched_step")

# (A) the paper's rates and threshold with a patience short enough (T = 50) that a 10^4-step
# stream reaches the 8-halving cap; (B) a fast detector with hundreds of decisions, a
# non-power-of-two delta (so every division rounds), a warmup, and a cap of 200 halvings
# that the streams reach too.
HPARAMS = {
    "paper": SchedParams.from_hparams(1e-3, 1e-3, 5e-5, 50, 2.0, 8, 0),
    "busy": SchedParams.from_hparams(0.05, 0.02, 1e-3, 20, 1.5, 200, 100),
}
BASE = [0.02, 0.1 / 3.0, 1e-4]


def python_run(losses: list[float], p: SchedParams) -> tuple[list[list[float]], list[list[float]]]:
    """States and LRs after each step, from the plain-Python implementation (the oracle)."""
    st, states, lrs = fresh_state(), [], []
    for L in losses:
        python_update(st, L, p)
        states.append(list(st))
        scale = python_lr_scale(st, p)
        lrs.append([b * scale for b in BASE])
    return states, lrs


def op_run(losses: list[float], p: SchedParams, backend: str, device: str = "cpu",
           loss_dtype: torch.dtype = torch.float32, lr_dtype: torch.dtype = torch.float32):
    state = torch.tensor(fresh_state(), dtype=torch.float64, device=device)
    lrs = torch.zeros(len(BASE), dtype=lr_dtype, device=device)
    base = torch.tensor(BASE, dtype=torch.float64, device=device)
    loss_t = torch.tensor(losses, dtype=loss_dtype, device=device)
    states, out = [], []
    with use_backend(backend):
        impl = sched_step.impls[sched_step.select(state, lrs, loss_t[0], base, *p.args())][0]
        for i in range(len(losses)):
            impl(state, lrs, loss_t[i], base, *p.args())
            states.append(state.tolist())
            out.append(lrs.tolist())
    return states, out


def halving_steps(states: list[list[float]]) -> list[int]:
    return [i for i in range(1, len(states)) if states[i][HALVINGS] != states[i - 1][HALVINGS]]


def assert_same_run(py, op, lr_dtype=np.float32):
    py_states, py_lrs = py
    op_states, op_lrs = op
    assert halving_steps(op_states) == halving_steps(py_states)
    for i, (a, b) in enumerate(zip(op_states, py_states)):
        # Bit-exact: NaN-free by construction (non-finite losses never enter the state).
        assert a == b, f"state differs at step {i}: {a} vs {b}"
    want = np.asarray(py_lrs, dtype=np.float64).astype(lr_dtype)  # round-to-nearest, as the kernels store
    np.testing.assert_array_equal(np.asarray(op_lrs, dtype=lr_dtype), want)


@needs_ext
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("hp", sorted(HPARAMS))
def test_cpp_op_matches_python_10k_steps(seed, hp):
    p = HPARAMS[hp]
    losses = loss_stream(10_000, seed)
    py = python_run(losses, p)
    assert len(halving_steps(py[0])) == (8 if hp == "paper" else 200), "stream too easy: the cap is not reached"
    assert py[0][-1][-2] > 0, "stream has no non-finite holes"
    assert_same_run(py, op_run(losses, p, "cpp"))


def test_reference_op_matches_python_10k_steps():
    p = HPARAMS["busy"]  # the set with a warmup, rounding divisions and the cap reached
    losses = loss_stream(10_000, 7)
    py = python_run(losses, p)
    assert py[0][-1][HALVINGS] == 200
    assert_same_run(py, op_run(losses, p, "reference", lr_dtype=torch.float64), np.float64)


@needs_ext
@pytest.mark.parametrize("loss_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpp_op_reads_any_float_loss(loss_dtype):
    p = HPARAMS["busy"]
    losses = torch.tensor(loss_stream(2_000, 3), dtype=loss_dtype).double().tolist()  # values the op will see
    assert_same_run(python_run(losses, p), op_run(losses, p, "cpp", loss_dtype=loss_dtype))


@needs_ext
def test_opcheck():
    p = HPARAMS["busy"]
    for loss, lr_dtype, groups in [(torch.tensor(3.5), torch.float32, 3),
                                   (torch.tensor([float("nan")], dtype=torch.bfloat16), torch.float64, 1)]:
        state = torch.tensor(fresh_state(), dtype=torch.float64)
        state[7], state[0], state[1], state[2], state[3] = 150.0, 4.0, 1e-4, 2e-4, 20.0  # past warmup, count = T
        args = (state, torch.zeros(groups, dtype=lr_dtype), loss, torch.rand(groups, dtype=torch.float64), *p.args())
        torch.library.opcheck(torch.ops.fastface.fastface_sched_step.default, args)


@needs_ext
def test_op_names_bad_arguments():
    p = HPARAMS["paper"]
    lrs, base, loss = torch.zeros(2), torch.ones(2, dtype=torch.float64), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="state must be a contiguous float64 vector of 8"):
        torch.ops.fastface.fastface_sched_step(torch.zeros(5, dtype=torch.float64), lrs, loss, base, *p.args())
    with pytest.raises(RuntimeError, match="base_lrs must be a contiguous float64 vector as long as lrs"):
        torch.ops.fastface.fastface_sched_step(torch.zeros(STATE_SIZE, dtype=torch.float64), lrs, loss, base[:1],
                                               *p.args())
    with pytest.raises(RuntimeError, match="loss must be a single floating-point value"):
        torch.ops.fastface.fastface_sched_step(torch.zeros(STATE_SIZE, dtype=torch.float64), lrs, torch.ones(2), base,
                                               *p.args())


def test_recurrence_equals_two_stage_form():
    for seed, (alpha, beta) in enumerate([(1e-3, 1e-3), (0.05, 0.02), (0.3, 0.7)]):
        losses = [x for x in loss_stream(5_000, seed, hole_rate=0.0)]
        p = SchedParams.from_hparams(alpha, beta, 5e-5, 10**9, 2.0, 0, 0)
        st, rec = fresh_state(), []
        for L in losses:
            python_update(st, L, p)
            rec.append(st[S1])
        two_stage = ema_haar_slopes(losses, alpha, beta)
        scale = max(abs(x) for x in two_stage)
        np.testing.assert_allclose(rec[1:], two_stage, rtol=1e-9, atol=1e-9 * scale)


def test_seed_is_the_reference_one():
    p = HPARAMS["paper"]
    st = fresh_state()
    python_update(st, 3.0, p)
    python_update(st, 2.5, p)
    assert st[S1] == 1e-3 * (3.0 - 2.5)  # S_1 = alpha (L_0 - L_1), not alpha*beta*(...)


_TRITON_SCRIPT = textwrap.dedent("""
    import os, sys, json
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    sys.path.insert(0, {tests!r})
    from _sched_helpers import loss_stream
    from fastface.ops import sched_step, use_backend
    from fastface.ops.sched import SchedParams, fresh_state
    from fastface.sched import FastFaceScheduler
    p = SchedParams.from_hparams(0.05, 0.02, 1e-3, 5, 1.5, 1000, 10)
    losses = loss_stream(150, 11, hole_rate=0.05)
    out = {{}}
    for backend in ("triton", "cpp"):
        state = torch.tensor(fresh_state(), dtype=torch.float64)
        lrs = torch.zeros(3, dtype=torch.float32)
        base = torch.tensor([0.02, 0.1 / 3, 1e-4], dtype=torch.float64)
        seq = []
        with use_backend(backend):
            for L in losses:
                sched_step(state, lrs, torch.tensor(L, dtype=torch.float32), base, *p.args())
                seq.append(state.tolist() + lrs.tolist())
        out[backend] = seq
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, fused=True)
    sched = FastFaceScheduler(opt, total_steps=100)
    sched.step(torch.tensor(1.0))
    out["auto_backend"] = sched.backend
    print(json.dumps(out))
""")


@needs_ext
def test_triton_interpreter_matches_cpp():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = _TRITON_SCRIPT.format(tests=str(Path(__file__).parent))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["auto_backend"] == "triton"  # dispatch order: Triton before C++ when the interpreter is on
    tri, cpp = out["triton"], out["cpp"]
    assert any(row[4] > 0 for row in cpp) and cpp[-1][6] > 0  # halvings happened, holes were seen
    for i, (a, b) in enumerate(zip(tri, cpp)):
        assert a == b, f"Triton and C++ differ at step {i}: {a} vs {b}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_kernel_compiles_without_fma(tmp_path):
    src = ROOT / "csrc" / "cuda" / "sched.cu"
    # The flags of `make cuda-check`, plus setup.py's --use_fast_math; --keep leaves the PTX.
    cmd = ["nvcc", "-arch=sm_90", "-std=c++17", "-O3", "--use_fast_math", "-Xcompiler", "-Wall", "--keep",
           "--keep-dir", str(tmp_path), "-c", str(src), "-o", str(tmp_path / "sched.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ptx = "".join(f.read_text() for f in tmp_path.glob("*.ptx"))
    assert ptx, "nvcc kept no PTX"
    # A contracted w1*s1 - w2*s2 would round differently from the Python oracle.
    assert "fma.rn.f64" not in ptx
    assert "mul.rn.f64" in ptx and "add.rn.f64" in ptx


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("hp", sorted(HPARAMS))
def test_gpu_op_matches_python_10k_steps(backend, hp):
    p = HPARAMS[hp]
    losses = loss_stream(10_000, 5)
    assert_same_run(python_run(losses, p), op_run(losses, p, backend, device="cuda"))


def test_stream_helper_is_float32_exact():
    losses = loss_stream(1000, 0)
    finite = [x for x in losses if math.isfinite(x)]
    assert finite == torch.tensor(finite, dtype=torch.float32).double().tolist()
