"""fastface.ops.bn_add_act (two training BNs summed + ReLU6): backends against plain PyTorch, autograd, opcheck."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastface._ext import HAS_EXT
from fastface.ops.bn_act import bn_stats_reference
from fastface.ops import BackendUnavailable, bn_add_act, bn_add_act_backward_reference, bn_add_act_reference, \
    use_backend
from helpers import assert_bitwise_same_across_threads, keep_two_bns_off_relu6_kinks

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="fastface._C not built")
EPS = 1e-5

# Tiny ops: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(5, 17, 13, 13), (1, 3, 7, 7), (2, 37, 5, 6), (3, 40, 1, 1), (4, 1, 3, 3), (1, 33, 1, 2)]
BACKENDS = ["reference", pytest.param("cpp", marks=needs_ext)]


def _ids(s):
    return "x".join(map(str, s))


def _inputs(shape, dtype, seed, channels_last=True, requires_grad=True):
    """x, gamma, beta, r, r_gamma, r_beta (r on another scale and mean than x), grad_y."""
    g = torch.Generator().manual_seed(seed)

    def rand(*s, scale=1.0, shift=0.0):
        return (torch.randn(s, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    x, r = rand(*shape, scale=2, shift=0.7), rand(*shape, scale=0.5, shift=-3)
    if channels_last:
        x, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
    c = shape[1]
    ins = [x, rand(c, shift=1), rand(c, scale=2), r, rand(c, shift=1), rand(c, scale=2)]
    for t in ins:
        t.requires_grad_(requires_grad)
    return (*ins, rand(*shape))


def _plain(x, gamma, beta, r, r_gamma, r_beta, relu6):
    """The modules the op replaces: two BatchNorm2d (training), their sum, hardtanh(0, 6)."""
    y = F.batch_norm(x, None, None, gamma, beta, True, 0.0, EPS) + F.batch_norm(r, None, None, r_gamma, r_beta, True,
                                                                                0.0, EPS)
    return F.hardtanh(y, 0.0, 6.0) if relu6 else y


def _stats(t):
    return bn_stats_reference(t.detach(), EPS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("relu6", [True, False], ids=["act", "none"])
def test_forward_and_backward_match_plain_pytorch(backend, shape, dtype, relu6):
    *ins, gy = _inputs(shape, dtype, abs(hash((shape, str(dtype), relu6))) % 2**31)
    with use_backend(backend):
        y, mean, invstd, r_mean, r_invstd = bn_add_act(*ins, EPS, relu6)
    grads = torch.autograd.grad(y, ins, gy)
    y_ref = _plain(*ins, relu6)
    grads_ref = torch.autograd.grad(y_ref, ins, gy)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, **tol)
    for got, want in zip((mean, invstd, r_mean, r_invstd), (*_stats(ins[0]), *_stats(ins[3]))):
        torch.testing.assert_close(got, want, **tol)
    for name, a, b in zip(["x", "gamma", "beta", "r", "r_gamma", "r_beta"], grads, grads_ref):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=tol["atol"] * scale * 10, rtol=tol["rtol"] * 10, msg=name)


@needs_ext
@pytest.mark.parametrize("relu6", [True, False], ids=["act", "none"])
def test_large_maps_take_the_prefetched_streaming_paths(relu6):
    """A map over simd::kStreamBytes (software prefetch of x, r and grad_y; non-temporal stores of y, grad_x and
    grad_r) and several tasks: against the float64 reference, on 2 threads."""
    *ins, gy = _inputs((9, 48, 64, 64), torch.float32, 5, requires_grad=False)
    assert ins[0].numel() * 4 >= 6 << 20
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = torch.ops.fastface.bn_add_act(*ins, EPS, relu6)
        grads = torch.ops.fastface.bn_add_act_backward(gy, *ins[:3], *out[1:3], *ins[3:], *out[3:5], relu6)
    finally:
        torch.set_num_threads(old)
    d = [t.double() for t in ins]
    want = bn_add_act_reference(*d, EPS, relu6)
    for a, b in zip(out, want):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=1e-4)
    want_g = bn_add_act_backward_reference(gy.double(), *d[:3], *want[1:3], *d[3:], *want[3:5], relu6)
    for name, a, b in zip(["x", "gamma", "beta", "r", "r_gamma", "r_beta"], grads, want_g):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, atol=1e-4 * scale, rtol=1e-3, msg=name)


@needs_ext
def test_nchw_input_is_converted_and_stays_nchw():
    *ins, gy = _inputs((3, 20, 5, 7), torch.float32, 1, channels_last=False)
    with use_backend("cpp"):
        y, *_ = bn_add_act(*ins, EPS, True)
    assert y.is_contiguous()
    torch.testing.assert_close(y, _plain(*ins, True), atol=1e-5, rtol=1e-5)
    gx, _, _, gr, _, _ = torch.autograd.grad(y, ins, gy)
    gx_ref, _, _, gr_ref, _, _ = torch.autograd.grad(_plain(*ins, True), ins, gy)
    assert gx.is_contiguous() and gr.is_contiguous()
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gr, gr_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 3, 3), (3, 5, 2, 1)], ids=_ids)
@pytest.mark.parametrize("relu6", [True, False], ids=["act", "none"])
def test_gradcheck_float64(backend, shape, relu6):
    *ins, _ = _inputs(shape, torch.float64, 7)
    keep_two_bns_off_relu6_kinks(ins, shape[1], 2.5)

    def f(*ts):
        with use_backend(backend):
            return bn_add_act(*ts, EPS, relu6)[0]

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (1, 19, 2, 2)], ids=_ids)
@pytest.mark.parametrize("relu6", [True, False], ids=["act", "none"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_opcheck(shape, relu6, channels_last):
    *ins, gy = _inputs(shape, torch.float32, 3, channels_last)
    torch.library.opcheck(torch.ops.fastface.bn_add_act.default, (*ins, EPS, relu6))
    d = [t.detach() for t in ins]
    _, mean, invstd, r_mean, r_invstd = torch.ops.fastface.bn_add_act(*d, EPS, relu6)
    args = (gy, *d[:3], mean, invstd, *d[3:], r_mean, r_invstd, relu6)
    torch.library.opcheck(torch.ops.fastface.bn_add_act_backward.default, args)


@needs_ext
def test_runs_are_bitwise_deterministic_across_thread_counts():
    *ins, gy = _inputs((16, 48, 30, 30), torch.float32, 9, requires_grad=False)

    def run():
        out = torch.ops.fastface.bn_add_act(*ins, EPS, True)
        return (*out, *torch.ops.fastface.bn_add_act_backward(gy, *ins[:3], *out[1:3], *ins[3:], *out[3:5], True))

    assert_bitwise_same_across_threads(run)


def test_statistics_are_not_differentiable():
    *ins, _ = _inputs((2, 4, 3, 3), torch.float64, 2)
    y, *stats = bn_add_act(*ins, EPS, True)
    assert y.requires_grad and not any(s.requires_grad for s in stats)


def test_bad_arguments_are_named():
    x, gamma, beta, r, r_gamma, r_beta, _ = _inputs((2, 4, 3, 3), torch.float32, 2, requires_grad=False)
    with pytest.raises(BackendUnavailable, match=r"residual must have x's shape"):
        bn_add_act(x, gamma, beta, r[:1], r_gamma, r_beta, EPS, True)
    with pytest.raises(BackendUnavailable, match=r"r's BN: gamma and beta must be \(4,\)"):
        bn_add_act(x, gamma, beta, r, r_gamma[:3], r_beta, EPS, True)
    with pytest.raises(BackendUnavailable, match="dtypes differ"):
        bn_add_act(x, gamma, beta, r.double(), r_gamma, r_beta, EPS, True)


@needs_ext
def test_dispatch_picks_cpp_on_cpu_and_the_kernel_names_bad_dtypes():
    ins = _inputs((2, 4, 3, 3), torch.float32, 2, requires_grad=False)[:6]
    assert bn_add_act.select(*ins, EPS, True) == "cpp"
    assert bn_add_act.select(*(t.half() for t in ins), EPS, True) == "reference"
    with pytest.raises(RuntimeError, match="float32 and float64"):
        torch.ops.fastface.bn_add_act(*(t.half() for t in ins), EPS, True)
