"""fastface.ops.dwconv_bn_act (training op): backends against the reference, autograd, opcheck, dispatch."""
from __future__ import annotations

import importlib

import pytest
import torch

from fastface import ops
from fastface._ext import HAS_EXT
from fastface.ops import (
    BackendUnavailable, dwconv_bn_act, dwconv_bn_act_backward, dwconv_bn_act_backward_reference,
    dwconv_bn_act_reference, use_backend,
)
from helpers import assert_fast_within_torch_error

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="fastface._C not built")
EPS = 1e-5


# Tiny ops and networks: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [  # N, C, H, W, k, stride
    (2, 24, 7, 7, 3, 1), (1, 13, 13, 13, 3, 2), (3, 5, 56, 56, 3, 1), (2, 7, 56, 57, 3, 2), (2, 6, 7, 6, 1, 2),
    (1, 9, 11, 6, 5, 1), (4, 17, 9, 8, 5, 2), (2, 3, 6, 5, 7, 2), (3, 40, 4, 4, 3, 1), (2, 3, 1, 1, 3, 1),
]


def _ids(s):
    return "x".join(map(str, s[:4])) + f"_k{s[4]}s{s[5]}"


def _inputs(shape, dtype, seed, channels_last=False, requires_grad=False, offset=0.5):
    n, c, h, w, k, s = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(c, k, k, generator=g, dtype=torch.float64) / k).to(dtype)
    gamma = (torch.randn(c, generator=g, dtype=torch.float64) + 1).to(dtype)
    beta = (torch.randn(c, generator=g, dtype=torch.float64) * 2).to(dtype)
    for t in (x, wt, gamma, beta):
        t.requires_grad_(requires_grad)
    return x, wt, gamma, beta, s


def _d(ts):
    return tuple(t.detach().double() for t in ts)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("relu6", [True, False])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpp_forward_matches_reference(shape, relu6, channels_last):
    seed = abs(hash((shape, relu6, channels_last))) % 2**31
    x, w, g, b, s = _inputs(shape, torch.float32, seed, channels_last)
    with use_backend("cpp"):
        out = dwconv_bn_act(x, w, g, b, s, EPS, relu6)
    ref64 = dwconv_bn_act_reference(*_d((x, w, g, b)), s, EPS, relu6)
    same = dwconv_bn_act_reference(x, w, g, b, s, EPS, relu6)
    for fast, t32, r in zip(out, same, ref64):
        assert fast.shape == r.shape and fast.dtype == torch.float32
        assert_fast_within_torch_error(fast, t32, r)
    y = out[0]
    layout = torch.channels_last if channels_last and y.shape[1] > 1 and y.shape[2] * y.shape[3] > 1 else None
    assert y.is_contiguous(memory_format=layout) if layout else y.is_contiguous()
    with use_backend("cpp"):
        out64 = dwconv_bn_act(*_d((x, w, g, b)), s, EPS, relu6)
    for fast, r in zip(out64, ref64):
        torch.testing.assert_close(fast, r, atol=1e-12, rtol=1e-12)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("relu6", [True, False])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpp_backward_matches_reference(shape, relu6, channels_last):
    seed = abs(hash((shape, relu6, channels_last, "bwd"))) % 2**31
    x, w, g, b, s = _inputs(shape, torch.float32, seed, channels_last)
    y, mean, invstd = dwconv_bn_act_reference(x, w, g, b, s, EPS, relu6)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    with use_backend("cpp"):
        grads = dwconv_bn_act_backward(gy, x, w, g, b, mean, invstd, s, relu6)
    ref = dwconv_bn_act_backward_reference(*_d((gy, x, w, g, b, mean, invstd)), s, relu6)
    same = dwconv_bn_act_backward_reference(gy, x, w, g, b, mean, invstd, s, relu6)
    # PyTorch on x moved by one rounding: some draws (a few values per channel, large invstd) are so
    # ill-conditioned that its error swings 30x between neighbouring inputs (~0.6 % of draws failed the
    # bound against the unmoved one alone at 2 x 6 x 7 x 6, k 1, stride 2).
    xp = x * (1 + torch.finfo(x.dtype).eps * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)))
    _, mp, ip = dwconv_bn_act_reference(xp, w, g, b, s, EPS, relu6)
    probe = dwconv_bn_act_backward_reference(gy, xp, w, g, b, mp, ip, s, relu6)
    for fast, t32, r, pr in zip(grads, same, ref, probe):
        assert fast.shape == r.shape
        assert_fast_within_torch_error(fast, t32, r, floor=1e-5, torch_probe=pr)
    if channels_last and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
    with use_backend("cpp"):
        grads64 = dwconv_bn_act_backward(*_d((gy, x, w, g, b, mean, invstd)), s, relu6)
    for fast, r in zip(grads64, ref):
        torch.testing.assert_close(fast, r, atol=1e-11, rtol=1e-11)


@needs_ext
def test_statistics_survive_a_large_mean():
    """mean >> std: a one-pass E[z^2] - mean^2 in float32 would lose the variance entirely."""
    x, w, g, b, s = _inputs((4, 16, 14, 14, 3, 1), torch.float32, 1, channels_last=True, offset=3000.0)
    with use_backend("cpp"):
        _, mean, invstd = dwconv_bn_act(x, w, g, b, s, EPS, True)
    _, m64, i64 = dwconv_bn_act_reference(*_d((x, w, g, b)), s, EPS, True)
    _, m32, i32 = dwconv_bn_act_reference(x, w, g, b, s, EPS, True)
    assert_fast_within_torch_error(mean, m32, m64)
    assert_fast_within_torch_error(invstd, i32, i64)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 3, 1), (3, 2, 5, 5, 3, 2), (2, 2, 4, 5, 5, 1)], ids=_ids)
@pytest.mark.parametrize("relu6", [True, False])
def test_gradcheck_float64(backend, seed, shape, relu6):
    if backend == "cpp" and not HAS_EXT:
        pytest.skip("fastface._C not built")
    # Keep pre-activations off the ReLU6 kinks (0 and 6), where finite differences are undefined.
    x, w, g, b, s = _inputs(shape, torch.float64, seed, requires_grad=True)
    with torch.no_grad():
        b.copy_(torch.linspace(2.0, 4.0, b.numel(), dtype=torch.float64))
        g.copy_(torch.linspace(0.3, 0.6, g.numel(), dtype=torch.float64))

    def f(x, w, g, b):
        with use_backend(backend):
            return dwconv_bn_act(x, w, g, b, s, EPS, relu6)[0]

    assert torch.autograd.gradcheck(f, (x, w, g, b))


@needs_ext
def test_mean_and_invstd_are_not_differentiable_and_backward_keeps_the_backend(monkeypatch):
    m = importlib.import_module("fastface.ops.dwconv_bn_act")  # the module (the package attribute is the op)
    calls = []
    original = m._BACKWARD["reference"]
    monkeypatch.setitem(m._BACKWARD, "reference", lambda *a: calls.append(1) or original(*a))
    x, w, g, b, s = _inputs((2, 4, 6, 6, 3, 1), torch.float32, 0, requires_grad=True)
    with use_backend("reference"):
        y, mean, invstd = dwconv_bn_act(x, w, g, b, s, EPS, True)
    assert not mean.requires_grad and not invstd.requires_grad
    y.sum().backward()  # outside the forced block: the automatic choice would be cpp
    assert calls == [1]


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 7, 3, 1), (1, 3, 13, 11, 3, 2), (2, 2, 5, 6, 5, 2)], ids=_ids)
def test_opcheck(shape, channels_last):
    x, w, g, b, s = _inputs(shape, torch.float64, 3, channels_last, requires_grad=True)
    torch.library.opcheck(torch.ops.fastface.dwconv_bn_act.default, (x, w, g, b, s, EPS, True))
    y, mean, invstd = torch.ops.fastface.dwconv_bn_act(x, w, g, b, s, EPS, True)
    gy = torch.randn(y.shape, dtype=torch.float64)
    if channels_last:
        gy = gy.contiguous(memory_format=torch.channels_last)
    plain = (gy, *(t.detach() for t in (x, w, g, b, mean, invstd)))
    torch.library.opcheck(torch.ops.fastface.dwconv_bn_act_backward.default, (*plain, s, True))


@needs_ext
def test_runs_are_bitwise_deterministic():
    x, w, g, b, s = _inputs((3, 20, 28, 28, 3, 2), torch.float32, 4, channels_last=True)
    a = torch.ops.fastface.dwconv_bn_act(x, w, g, b, s, EPS, True)
    c = torch.ops.fastface.dwconv_bn_act(x, w, g, b, s, EPS, True)
    assert all(torch.equal(p, q) for p, q in zip(a, c))
    gy = torch.randn(a[0].shape)
    ga = torch.ops.fastface.dwconv_bn_act_backward(gy, x, w, g, b, a[1], a[2], s, True)
    gc = torch.ops.fastface.dwconv_bn_act_backward(gy, x, w, g, b, a[1], a[2], s, True)
    assert all(torch.equal(p, q) for p, q in zip(ga, gc))


def test_dispatch_auto_choice_and_forced_errors(monkeypatch):
    x, w, g, b, s = _inputs(SHAPES[0], torch.float32, 0)
    assert dwconv_bn_act.select(x, w, g, b, s, EPS, True) == ("cpp" if HAS_EXT else "reference")
    bf = [t.bfloat16() for t in (x, w, g, b)]
    assert dwconv_bn_act.select(*bf, s, EPS, True) == "reference"
    with use_backend("cuda"), pytest.raises(BackendUnavailable) as e:
        dwconv_bn_act(x, w, g, b, s, EPS, True)
    for name in ops.BACKENDS:
        assert f"  {name}:" in str(e.value)
    monkeypatch.setenv("FASTFACE_BACKEND", "reference")
    assert dwconv_bn_act.select(x, w, g, b, s, EPS, True) == "reference"


def test_bad_arguments_are_named():
    x, w, g, b, s = _inputs(SHAPES[0], torch.float32, 0)
    with pytest.raises(BackendUnavailable, match=r"weight must be C x k x k with C = 24 and odd k"):
        dwconv_bn_act(x, w[:, :2, :2], g, b, s, EPS, True)
    with pytest.raises(BackendUnavailable, match=r"gamma and beta must be \(24,\)"):
        dwconv_bn_act(x, w, g[:3], b, s, EPS, True)


@needs_ext
def test_cpp_kernel_reports_bad_shapes():
    x, w, g, b, s = _inputs(SHAPES[0], torch.float32, 0)
    with pytest.raises(RuntimeError, match="weight must be C x k x k"):
        torch.ops.fastface.dwconv_bn_act(x, w[:5], g, b, s, EPS, True)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.fastface.dwconv_bn_act(x, w.double(), g, b, s, EPS, True)
    with pytest.raises(RuntimeError, match="grad_y must be 2 x 24 x 7 x 7"):
        torch.ops.fastface.dwconv_bn_act_backward(torch.randn(2, 24, 4, 4), x, w, g, b, g, g, s, True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_gpu_backends_match_reference(backend, shape):
    x, w, g, b, s = _inputs(shape, torch.float32, 5, channels_last=True)
    dev = [t.cuda().requires_grad_() for t in (x, w, g, b)]
    if dwconv_bn_act.reasons(*dev, s, EPS, True)[backend]:
        pytest.skip(f"{backend}: " + "; ".join(dwconv_bn_act.reasons(*dev, s, EPS, True)[backend]))
    with use_backend(backend):
        y, mean, invstd = dwconv_bn_act(*dev, s, EPS, True)
    ref64 = dwconv_bn_act_reference(*_d((x, w, g, b)), s, EPS, True)
    same = dwconv_bn_act_reference(x, w, g, b, s, EPS, True)
    for fast, t32, r in zip((y, mean, invstd), same, ref64):
        assert_fast_within_torch_error(fast.cpu(), t32, r)
    gy = torch.randn(y.shape)
    grads = torch.autograd.grad(y, dev, gy.cuda())
    ref = dwconv_bn_act_backward_reference(gy.double(), *_d((x, w, g, b)), ref64[1], ref64[2], s, True)
    t32 = dwconv_bn_act_backward_reference(gy, x, w, g, b, same[1], same[2], s, True)
    for fast, t, r in zip(grads, t32, ref):
        assert_fast_within_torch_error(fast.cpu(), t, r, floor=1e-5)


@needs_ext
@pytest.mark.parametrize("threads", [2, 3])
def test_task_pool_runs_are_correct_and_deterministic(threads):
    """Above ~1M multiply-adds the kernels hand tasks to the task pool (the caller works too)."""
    x, w, g, b, s = _inputs((4, 48, 28, 28, 3, 1), torch.float32, 8, channels_last=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        outs = [torch.ops.fastface.dwconv_bn_act(x, w, g, b, s, EPS, True) for _ in range(3)]
        gy = torch.randn(outs[0][0].shape, generator=torch.Generator().manual_seed(1))
        grads = [torch.ops.fastface.dwconv_bn_act_backward(gy, x, w, g, b, outs[0][1], outs[0][2], s, True)
                 for _ in range(3)]
    finally:
        torch.set_num_threads(before)
    for o in outs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(outs[0], o))
    for gr in grads[1:]:
        assert all(torch.equal(p, q) for p, q in zip(grads[0], gr))
    ref64 = dwconv_bn_act_reference(*_d((x, w, g, b)), s, EPS, True)
    for fast, t32, r in zip(outs[0], dwconv_bn_act_reference(x, w, g, b, s, EPS, True), ref64):
        assert_fast_within_torch_error(fast, t32, r)
    ref = dwconv_bn_act_backward_reference(*_d((gy, x, w, g, b, outs[0][1], outs[0][2])), s, True)
    same = dwconv_bn_act_backward_reference(gy, x, w, g, b, outs[0][1], outs[0][2], s, True)
    for fast, t32, r in zip(grads[0], same, ref):
        assert_fast_within_torch_error(fast, t32, r, floor=1e-5)


@pytest.mark.parametrize("k,s,problem", [(7, 1, "kernel size 7"), (1, 2, "kernel size 1"), (3, 3, "stride 3"),
                                         (3, 1, None), (5, 2, None)])
def test_cuda_backend_states_the_shapes_its_kernel_lacks(k, s, problem):
    """The CUDA kernel is instantiated for k in {3, 5} and strides 1, 2: others fall back, saying why."""
    why = dwconv_bn_act.reasons(*_inputs((1, 4, 8, 8, k, s), torch.float32, 0)[:4], s, EPS, True)["cuda"]
    shape_why = [w for w in why if w.startswith(("kernel size", "stride"))]
    assert shape_why == ([] if problem is None else [f"{problem} (CUDA kernel: {'3 or 5' if 'kernel' in problem else '1 or 2'})"])
