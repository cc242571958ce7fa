"""fastface.ops.dwconv2d: each backend against the PyTorch reference, gradients, opcheck, dispatch."""
from __future__ import annotations

import pytest
import torch

from fastface import ops
from fastface._ext import HAS_EXT
from fastface.ops import BackendUnavailable, dwconv2d, dwconv2d_reference, use_backend
from helpers import assert_fast_within_torch_error

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="fastface._C not built")

SHAPES = [  # N, C, H, W, k, stride, padding
    (2, 24, 7, 7, 3, 1, 1), (1, 13, 13, 13, 3, 2, 1), (3, 5, 56, 56, 3, 1, 1), (2, 7, 56, 57, 3, 2, 1),
    (1, 9, 11, 6, 5, 1, 2), (2, 3, 1, 1, 3, 1, 1), (1, 4, 9, 9, 3, 2, 0), (1, 2, 2, 3, 7, 3, 3),
]


def _inputs(shape, dtype, seed, channels_last=False, requires_grad=False):
    n, c, h, w, k, s, p = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype) * 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wt = torch.randn(c, 1, k, k, generator=g, dtype=dtype)
    b = torch.randn(c, generator=g, dtype=dtype)
    for t in (x, wt, b):
        t.requires_grad_(requires_grad)
    return x, wt, b, s, p


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu6", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpp_forward_matches_reference(shape, relu6, channels_last):
    seed = hash((shape, relu6, channels_last)) % 2**31  # fresh inputs per case
    x, w, b, s, p = _inputs(shape, torch.float32, seed, channels_last)
    with use_backend("cpp"):
        y = dwconv2d(x, w, b, s, p, relu6)
    ref64 = dwconv2d_reference(x.double(), w.double(), b.double(), s, p, relu6)
    assert y.shape == ref64.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last and x.shape[1] > 1 and
                           x.shape[2] * x.shape[3] > 1 else torch.contiguous_format)
    assert_fast_within_torch_error(y, dwconv2d_reference(x, w, b, s, p, relu6), ref64)
    with use_backend("cpp"):
        y64 = dwconv2d(x.double(), w.double(), b.double(), s, p, relu6)
    torch.testing.assert_close(y64, ref64, atol=1e-12, rtol=1e-12)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_backward_matches_reference(shape):
    x, w, b, s, p = _inputs(shape, torch.float32, 11, requires_grad=True)
    gy = torch.randn(dwconv2d_reference(x, w, b, s, p, True).shape)
    with use_backend("cpp"):
        grads = torch.autograd.grad(dwconv2d(x, w, b, s, p, True), (x, w, b), gy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.autograd.grad(dwconv2d_reference(x64, w64, b64, s, p, True), (x64, w64, b64), gy.double())
    same = torch.autograd.grad(dwconv2d_reference(x, w, b, s, p, True), (x, w, b), gy)
    for g_fast, g_same, g_ref in zip(grads, same, ref):
        assert_fast_within_torch_error(g_fast, g_same, g_ref, floor=1e-5)


@needs_ext
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 6, 5, 3, 1, 1), (1, 2, 7, 7, 3, 2, 1), (1, 2, 5, 4, 5, 2, 2)])
@pytest.mark.parametrize("relu6", [True, False])
def test_gradcheck_float64(seed, shape, relu6):
    x, w, b, s, p = _inputs(shape, torch.float64, seed, requires_grad=True)
    with use_backend("cpp"):
        assert torch.autograd.gradcheck(lambda x, w, b: dwconv2d(x, w, b, s, p, relu6), (x, w, b))


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 7, 7, 3, 1, 1), (1, 3, 13, 11, 3, 2, 1)])
def test_opcheck(shape, channels_last):
    x, w, b, s, p = _inputs(shape, torch.float64, 3, channels_last, requires_grad=True)
    torch.library.opcheck(torch.ops.fastface.dwconv2d.default, (x, w, b, s, p, True))
    gy = torch.randn(dwconv2d_reference(x, w, b, s, p, True).shape, dtype=torch.float64)
    out = torch.ops.fastface.dwconv2d(x, w, b, s, p, True).detach()
    torch.library.opcheck(torch.ops.fastface.dwconv2d_backward.default, (gy, x.detach(), w.detach(), out, s, p, True))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu6", [True, False])
def test_cuda_matches_reference(shape, relu6):
    x, w, b, s, p = _inputs(shape, torch.float32, 5, requires_grad=True)
    xc, wc, bc = (t.detach().cuda().requires_grad_() for t in (x, w, b))
    with use_backend("cuda"):
        y = dwconv2d(xc, wc, bc, s, p, relu6)
    ref64 = dwconv2d_reference(x.double(), w.double(), b.double(), s, p, relu6)
    assert_fast_within_torch_error(y.cpu(), dwconv2d_reference(x, w, b, s, p, relu6), ref64)
    gy = torch.randn(y.shape)
    g = torch.autograd.grad(y, (xc, wc, bc), gy.cuda())
    gr = torch.autograd.grad(dwconv2d_reference(x, w, b, s, p, relu6), (x, w, b), gy)
    for a, r in zip(g, gr):
        torch.testing.assert_close(a.cpu(), r, atol=1e-4, rtol=1e-4)


def test_reference_is_always_available_and_auto_picks_fastest():
    x, w, b, s, p = _inputs(SHAPES[0], torch.float32, 0)
    with use_backend("reference"):
        y = dwconv2d(x, w, b, s, p, True)
    torch.testing.assert_close(y, dwconv2d_reference(x, w, b, s, p, True))
    assert dwconv2d.select(x, w, b, s, p, True) == ("cpp" if HAS_EXT else "reference")
    # bf16 has no C++ kernel: the automatic choice falls back to the reference.
    assert dwconv2d.select(x.bfloat16(), w.bfloat16(), b.bfloat16(), s, p, True) == "reference"


def test_forced_backend_that_cannot_run_lists_every_backend(monkeypatch):
    x, w, b, s, p = _inputs(SHAPES[0], torch.float32, 0)
    with use_backend("cuda"), pytest.raises(BackendUnavailable) as e:
        dwconv2d(x, w, b, s, p, True)
    msg = str(e.value)
    for name in ops.BACKENDS:
        assert f"  {name}:" in msg
    assert "not CUDA" in msg
    monkeypatch.setenv("FASTFACE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="forced backend 'cuda'"):
        dwconv2d(x, w, b, s, p, True)
    # dwconv2d has no Triton kernel at all: forcing Triton (for the ops that have one) keeps its own choice.
    monkeypatch.delenv("FASTFACE_BACKEND")
    auto = dwconv2d.select(x, w, b, s, p, True)
    monkeypatch.setenv("FASTFACE_BACKEND", "triton")
    assert dwconv2d.select(x, w, b, s, p, True) == auto
    monkeypatch.setenv("FASTFACE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTFACE_BACKEND='fastest'"):
        dwconv2d(x, w, b, s, p, True)


@needs_ext
def test_cpp_kernel_reports_bad_shapes():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(RuntimeError, match="weight must be C x 1 x k x k"):
        torch.ops.fastface.dwconv2d(x, torch.randn(3, 1, 3, 3), torch.randn(4), 1, 1, True)
    with pytest.raises(RuntimeError, match="too small"):
        torch.ops.fastface.dwconv2d(torch.randn(1, 4, 2, 2), torch.randn(4, 1, 7, 7), torch.randn(4), 1, 0, True)
