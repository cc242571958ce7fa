"""fastface.ops.ir_block: each backend against the PyTorch reference, layouts, groups, opcheck, dispatch."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from fastface import ops
from fastface._ext import HAS_EXT
from fastface.ops import BackendUnavailable, ir_block, ir_block_reference, pack_ir_weights, use_backend
from helpers import assert_fast_within_torch_error, assert_layout_follows_input

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="fastface._C not built")


# Tiny ops and networks: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

# N, G, Cin, Ce, Cout, H, W, k, stride, expand, residual
SHAPES = [
    (2, 1, 24, 144, 24, 7, 7, 3, 1, True, True),      # a face block at 7x7
    (1, 1, 16, 96, 24, 56, 56, 3, 2, True, False),    # 56x56, stride 2
    (1, 2, 13, 20, 13, 13, 13, 3, 1, True, True),     # odd channels, two branches
    (3, 1, 5, 30, 7, 13, 13, 3, 2, True, False),
    (1, 1, 32, 32, 16, 56, 56, 3, 1, False, False),   # t = 1: no expand conv
    (2, 2, 12, 12, 12, 7, 7, 3, 1, False, True),      # t = 1, residual, two branches
    (1, 1, 6, 15, 6, 9, 11, 5, 2, True, False),       # 5x5 kernel, odd sizes
    (1, 3, 4, 8, 4, 6, 5, 7, 1, True, True),          # 7x7 kernel, three groups
    (2, 1, 3, 9, 5, 1, 1, 3, 1, True, False),         # 1x1 image
    (2, 1, 40, 240, 40, 4, 4, 3, 1, True, True),      # 4x4, many channels
]


def _ids(shape):
    n, g, cin, ce, cout, h, w, k, s, e, r = shape
    return f"n{n}g{g}_{cin}-{ce}-{cout}_{h}x{w}_k{k}s{s}{'_exp' if e else ''}{'_res' if r else ''}"


def _inputs(shape, dtype, seed, channels_last=False, requires_grad=False):
    n, g, cin, ce, cout, h, w, k, s, expand, res = shape
    gen = torch.Generator().manual_seed(seed)

    def r(*size, scale=1.0, shift=0.0):
        t = torch.randn(*size, generator=gen, dtype=torch.float64) * scale + shift
        return t.to(dtype).requires_grad_(requires_grad)

    x = torch.randn(n, g * cin, h, w, generator=gen, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(requires_grad)
    we = r(g * ce, cin, scale=cin ** -0.5) if expand else None
    be = r(g * ce, scale=0.5, shift=0.5) if expand else None
    return (x, we, be, r(g * ce, k, k, scale=1 / k), r(g * ce, scale=0.5, shift=0.5), r(g * cout, ce, scale=ce ** -0.5),
            r(g * cout, scale=0.5), s, res, g)


def _ref64(args):
    return ir_block_reference(*(a.detach().double() if isinstance(a, torch.Tensor) else a for a in args))


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpp_matches_reference(shape, channels_last):
    seed = abs(hash((shape, channels_last))) % 2**31  # fresh inputs per case
    args = _inputs(shape, torch.float32, seed, channels_last)
    with use_backend("cpp"):
        y = ir_block(*args)
    ref64 = _ref64(args)
    assert y.shape == ref64.shape and y.dtype == torch.float32
    assert_layout_follows_input(y, args[0], channels_last)
    assert_fast_within_torch_error(y, ir_block_reference(*args), ref64)
    args64 = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
    with use_backend("cpp"):
        y64 = ir_block(*args64)
    torch.testing.assert_close(y64, ref64, atol=1e-12, rtol=1e-12)


@needs_ext
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[5], SHAPES[6]], ids=_ids)
def test_packed_weights_give_the_same_result(shape):
    """The model passes weights in the kernel's layout (views): same values, bit for bit."""
    args = _inputs(shape, torch.float32, 7, channels_last=True)
    x, we, be, wd, bd, wp, bp, *rest = args
    pwe, pwd, pwp = pack_ir_weights(we, wd, wp)
    assert pwd.shape == wd.shape and not pwd.is_contiguous() and not pwp.is_contiguous()
    with use_backend("cpp"):
        a = ir_block(*args)
        b = ir_block(x, pwe, be, pwd, bd, pwp, bp, *rest)
    assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("shape", [SHAPES[1], (64, 1, 24, 144, 24, 7, 7, 3, 1, True, True)], ids=_ids)
def test_result_does_not_depend_on_thread_count(shape):
    """Tiles change with the thread count and tasks go to whichever pool thread claims them; each
    output is still computed in the same order, so every run gives the same bits."""
    args = _inputs(shape, torch.float32, 3, channels_last=True)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, 2, 2):
            torch.set_num_threads(n)
            outs.append(torch.ops.fastface.ir_block(*args))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert_fast_within_torch_error(outs[0], ir_block_reference(*args), _ref64(args))


@needs_ext
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", [(2, 2, 3, 6, 3, 5, 4, 3, 1, True, True), (1, 1, 4, 4, 3, 5, 5, 3, 2, False, False)],
                         ids=_ids)
def test_gradcheck_float64(seed, shape):
    """The op's autograd (registered; backward recomputes the block) is exact."""
    args = _inputs(shape, torch.float64, seed, requires_grad=True)
    tensors = [a for a in args[:7] if a is not None]
    idx = [i for i, a in enumerate(args[:7]) if a is not None]

    def f(*ts):
        full = list(args)
        for i, t in zip(idx, ts):
            full[i] = t
        with use_backend("cpp"):
            return ir_block(*full)

    assert torch.autograd.gradcheck(f, tensors)


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(1, 2, 5, 8, 5, 6, 5, 3, 1, True, True), (2, 2, 4, 4, 4, 5, 5, 3, 1, False, True),
                                   (1, 1, 3, 9, 5, 7, 6, 3, 2, True, False)], ids=_ids)
def test_opcheck(shape, channels_last):
    args = _inputs(shape, torch.float64, 5, channels_last, requires_grad=True)
    torch.library.opcheck(torch.ops.fastface.ir_block.default, args)


def test_reference_is_always_available_and_auto_picks_fastest():
    args = _inputs(SHAPES[0], torch.float32, 0)
    with use_backend("reference"):
        y = ir_block(*args)
    torch.testing.assert_close(y, ir_block_reference(*args))
    assert ir_block.select(*args) == ("cpp" if HAS_EXT else "reference")
    bf = tuple(a.bfloat16() if isinstance(a, torch.Tensor) else a for a in args)
    assert ir_block.select(*bf) == "reference"  # no bf16 CPU kernel


def test_forced_backend_that_cannot_run_lists_every_backend(monkeypatch):
    args = _inputs(SHAPES[0], torch.float32, 0)
    assert ir_block.select(*args) in ("cpp", "reference")  # remembered for this signature ...
    with use_backend("cuda"), pytest.raises(BackendUnavailable) as e:
        ir_block(*args)  # ... but a forced backend is part of the remembered key
    msg = str(e.value)
    for name in ops.BACKENDS:
        assert f"  {name}:" in msg
    assert "not cuda" in msg
    monkeypatch.setenv("FASTFACE_BACKEND", "reference")
    assert ir_block.select(*args) == "reference"


def test_bad_arguments_are_named():
    args = list(_inputs(SHAPES[0], torch.float32, 0))
    args[5] = torch.randn(24, 100)  # w_proj with the wrong Ce
    with pytest.raises(BackendUnavailable, match=r"w_proj must be \(G\*Cout\) x 144"):
        ir_block(*args)
    args = list(_inputs(SHAPES[0], torch.float32, 0))
    args[7] = 3
    with pytest.raises(BackendUnavailable, match="stride must be 1 or 2"):
        ir_block(*args)


@needs_ext
def test_cpp_kernel_reports_bad_shapes():
    args = list(_inputs(SHAPES[2], torch.float32, 0))
    args[9] = 3  # 26 channels are not 3 groups
    with pytest.raises(RuntimeError, match="not a multiple of groups=3"):
        torch.ops.fastface.ir_block(*args)
    args = list(_inputs(SHAPES[3], torch.float32, 0))
    args[8] = True  # residual with stride 2
    with pytest.raises(RuntimeError, match="residual needs stride 1"):
        torch.ops.fastface.ir_block(*args)
    args = list(_inputs(SHAPES[0], torch.float32, 0))
    args[3] = args[3].double()
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.fastface.ir_block(*args)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or importlib.util.find_spec("fastface.kernels.ir_block")
                    is None, reason="triton or its ir_block kernel not available")
def test_triton_backend_wiring_with_packed_weights():
    """The Triton entry point gets contiguous weights even when the caller passes packed views."""
    shape = (1, 2, 3, 6, 3, 5, 4, 3, 1, True, True)
    args = _inputs(shape, torch.float32, 9)
    x, we, be, wd, bd, wp, bp, *rest = args
    pwe, pwd, pwp = pack_ir_weights(we, wd, wp)
    with use_backend("triton"):
        why = ir_block.reasons(x, pwe, be, pwd, bd, pwp, bp, *rest)["triton"]
        if why:
            pytest.skip("triton cannot run here: " + "; ".join(why))
        y = ir_block(x, pwe, be, pwd, bd, pwp, bp, *rest)
    assert ir_block.select(*args) != "triton"  # CPU tensors: never the interpreter unless forced
    assert_fast_within_torch_error(y, ir_block_reference(*args), _ref64(args))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_gpu_backends_match_reference(backend, shape):
    args = _inputs(shape, torch.float32, 5, channels_last=True)
    dev = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    if ir_block.reasons(*dev)[backend]:
        pytest.skip(f"{backend}: " + "; ".join(ir_block.reasons(*dev)[backend]))
    with use_backend(backend):
        y = ir_block(*dev)
    assert_fast_within_torch_error(y.cpu(), ir_block_reference(*args), _ref64(args))


@pytest.mark.parametrize("k,problem", [(9, "kernel size 9 (CUDA kernel: at most 7)"), (7, None), (3, None)])
def test_cuda_backend_states_the_kernel_sizes_it_lacks(k, problem):
    """The CUDA kernel handles k <= 7: larger kernels fall back, saying why."""
    why = ir_block.reasons(*_inputs((1, 1, 4, 8, 4, 9, 9, k, 1, True, False), torch.float32, 0))["cuda"]
    assert [w for w in why if w.startswith("kernel size")] == ([] if problem is None else [problem])
