"""fastface.ops.stems_bn_add_act (two 3x3 stems + training BNs summed + ReLU6): backends against plain PyTorch,
autograd, gradcheck, opcheck."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastface._ext import HAS_EXT
from fastface.ops.bn_act import bn_stats_reference
from fastface.ops import (BackendUnavailable, stems_bn_add_act, stems_bn_add_act_backward_reference,
                          stems_bn_add_act_reference, use_backend)
from helpers import assert_bitwise_same_across_threads, keep_two_bns_off_relu6_kinks

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="fastface._C not built")
EPS = 1e-5

# Tiny ops: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

# (N, ca, cb, H, W, C, stride): the face model's stems (3 + 1 channels, 32 out, stride 2) at small sizes, odd maps,
# channel counts off the vector width (5, 17), over several vectors (33, 70: a 4-vector chunk and a 1-vector one),
# strides 1-3, 1-pixel maps, rows whose pixel count leaves every tail block size (46 = 3 x 12 + 4 + 4 + 2 with
# one vector of channels, 56 = 7 x 8).
CASES = [(2, 3, 1, 9, 11, 32, 2), (3, 2, 2, 7, 5, 17, 1), (1, 1, 3, 6, 6, 33, 2), (2, 3, 1, 13, 13, 70, 3),
         (4, 1, 1, 1, 1, 5, 1), (2, 3, 1, 2, 3, 8, 2), (1, 2, 1, 16, 15, 24, 2), (1, 3, 1, 5, 46, 16, 1),
         (2, 3, 1, 7, 111, 8, 2)]
BACKENDS = ["reference", pytest.param("cpp", marks=needs_ext)]
NAMES = ["w_a", "gamma_a", "beta_a", "w_b", "gamma_b", "beta_b"]


def _ids(c):
    return "n{}-c{}+{}-{}x{}-o{}-s{}".format(*c)


def _inputs(case, dtype, seed, x_channels_last=False, w_channels_last=False, requires_grad=True):
    """x (no gradient: the network input), w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, grad_y."""
    n, ca, cb, h, w, c, s = case
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    x = rand(n, ca + cb, h, w, scale=1.5, shift=0.3)
    if x_channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ws = [rand(c, ca, 3, 3, scale=0.5), rand(c, cb, 3, 3, scale=0.7, shift=0.2)]
    if w_channels_last:
        ws = [t.contiguous(memory_format=torch.channels_last) for t in ws]
    params = [ws[0], rand(c, shift=1), rand(c, scale=2), ws[1], rand(c, shift=1), rand(c, scale=2)]
    for t in params:
        t.requires_grad_(requires_grad)
    oh, ow = (h - 1) // s + 1, (w - 1) // s + 1
    return (x, *params, rand(n, c, oh, ow).contiguous(memory_format=torch.channels_last))


def _plain(x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, stride, relu6):
    """The modules the op replaces: two Conv2d(3x3, padding 1) on the input's channel slices, two BatchNorm2d
    (training), their sum, hardtanh(0, 6)."""
    ca = w_a.shape[1]
    za, zb = F.conv2d(x[:, :ca], w_a, None, stride, 1), F.conv2d(x[:, ca:], w_b, None, stride, 1)
    y = (F.batch_norm(za, None, None, gamma_a, beta_a, True, 0.0, EPS)
         + F.batch_norm(zb, None, None, gamma_b, beta_b, True, 0.0, EPS))
    return F.hardtanh(y, 0.0, 6.0) if relu6 else y


def _stats(x, w, stride, lo, hi):
    return bn_stats_reference(F.conv2d(x[:, lo:hi].detach(), w.detach(), None, stride, 1), EPS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("relu6", [True, False], ids=["act", "none"])
def test_forward_and_backward_match_plain_pytorch(backend, case, dtype, relu6):
    x, *params, gy = _inputs(case, dtype, abs(hash((case, str(dtype), relu6))) % 2**31)
    s = case[-1]
    with use_backend(backend):
        y, mean_a, invstd_a, mean_b, invstd_b = stems_bn_add_act(x, *params, s, EPS, relu6)
    grads = torch.autograd.grad(y, params, gy)
    y_ref = _plain(x, *params, s, relu6)
    grads_ref = torch.autograd.grad(y_ref, params, gy)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    assert y.dtype == dtype and y.shape == y_ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, **tol)
    ca = case[1]
    want = (*_stats(x, params[0], s, 0, ca), *_stats(x, params[3], s, ca, x.shape[1]))
    for got, w in zip((mean_a, invstd_a, mean_b, invstd_b), want):
        torch.testing.assert_close(got, w, **tol)
    for name, a, b in zip(NAMES, grads, grads_ref):
        scale = max(1.0, b.abs().max().item())
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=tol["atol"] * scale * 10, rtol=tol["rtol"] * 10, msg=name)


@needs_ext
@pytest.mark.parametrize("x_cl", [False, True], ids=["x-nchw", "x-nhwc"])
@pytest.mark.parametrize("w_cl", [False, True], ids=["w-nchw", "w-nhwc"])
def test_any_input_layout_and_weight_gradients_in_the_weights_layout(x_cl, w_cl):
    """x is read in its own layout (the trainer passes the loader's NCHW batch; a channels_last one works too);
    the weight gradients come back in the weights' layout (the model's stems are channels_last)."""
    case = (3, 3, 1, 10, 9, 20, 2)
    x, *params, gy = _inputs(case, torch.float32, 4, x_channels_last=x_cl, w_channels_last=w_cl)
    with use_backend("cpp"):
        y, *_ = stems_bn_add_act(x, *params, 2, EPS, True)
    torch.testing.assert_close(y, _plain(x, *params, 2, True), atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(y, params, gy)
    want = torch.autograd.grad(_plain(x, *params, 2, True), params, gy)
    for name, a, b in zip(NAMES, grads, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    for g in (grads[0], grads[3]):
        assert g.is_contiguous(memory_format=torch.channels_last if w_cl else torch.contiguous_format)


@needs_ext
@pytest.mark.parametrize("relu6", [True, False], ids=["act", "none"])
def test_large_maps_take_the_streaming_path_on_two_threads(relu6):
    """y over simd::kStreamBytes (non-temporal stores) and many tasks: against the float64 reference, on 2
    threads."""
    case = (16, 3, 1, 112, 112, 32, 2)
    x, *params, gy = _inputs(case, torch.float32, 5, requires_grad=False)
    assert gy.numel() * 4 >= 6 << 20
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = torch.ops.fastface.stems_bn_add_act(x, *params, 2, EPS, relu6)
        grads = torch.ops.fastface.stems_bn_add_act_backward(gy, x, *params[:3], *out[1:3], *params[3:], *out[3:5], 2,
                                                             relu6)
    finally:
        torch.set_num_threads(old)
    d = [t.double() for t in (x, *params)]
    want = stems_bn_add_act_reference(*d, 2, EPS, relu6)
    for a, b in zip(out, want):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=1e-4)
    want_g = stems_bn_add_act_backward_reference(gy.double(), d[0], *d[1:4], *want[1:3], *d[4:], *want[3:5], 2, relu6)
    for name, a, b in zip(NAMES, grads, want_g):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, atol=1e-4 * scale, rtol=1e-3, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [(2, 2, 1, 4, 5, 3, 2), (3, 1, 1, 3, 3, 2, 1)], ids=_ids)
@pytest.mark.parametrize("relu6", [True, False], ids=["act", "none"])
def test_gradcheck_float64(backend, case, relu6):
    x, *params, _ = _inputs(case, torch.float64, 7)
    keep_two_bns_off_relu6_kinks(params, case[5], 1.5)

    def f(*ts):
        with use_backend(backend):
            return stems_bn_add_act(x, *ts, case[-1], EPS, relu6)[0]

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("case", [(2, 3, 1, 5, 4, 6, 2), (1, 1, 2, 3, 3, 17, 1)], ids=_ids)
@pytest.mark.parametrize("relu6", [True, False], ids=["act", "none"])
def test_opcheck(case, relu6):
    x, *params, gy = _inputs(case, torch.float32, 3)
    s = case[-1]
    torch.library.opcheck(torch.ops.fastface.stems_bn_add_act.default, (x, *params, s, EPS, relu6))
    d = [t.detach() for t in params]
    _, mean_a, invstd_a, mean_b, invstd_b = torch.ops.fastface.stems_bn_add_act(x, *d, s, EPS, relu6)
    args = (gy, x, *d[:3], mean_a, invstd_a, *d[3:], mean_b, invstd_b, s, relu6)
    torch.library.opcheck(torch.ops.fastface.stems_bn_add_act_backward.default, args)


@needs_ext
def test_the_registered_op_refuses_a_gradient_for_x():
    x, *params, gy = _inputs((2, 3, 1, 5, 4, 6, 2), torch.float32, 3)
    x.requires_grad_()
    y, *_ = torch.ops.fastface.stems_bn_add_act(x, *params, 2, EPS, True)
    with pytest.raises(RuntimeError, match="x is the network input and gets no gradient"):
        y.backward(gy)


@needs_ext
def test_runs_are_bitwise_deterministic_across_thread_counts():
    x, *params, gy = _inputs((6, 3, 1, 40, 36, 32, 2), torch.float32, 9, requires_grad=False)

    def run():
        out = torch.ops.fastface.stems_bn_add_act(x, *params, 2, EPS, True)
        return (*out, *torch.ops.fastface.stems_bn_add_act_backward(gy, x, *params[:3], *out[1:3], *params[3:],
                                                                       *out[3:5], 2, True))

    assert_bitwise_same_across_threads(run)


def test_statistics_are_not_differentiable_and_x_gets_no_gradient():
    x, *params, _ = _inputs((2, 3, 1, 4, 4, 4, 2), torch.float64, 2)
    y, *stats = stems_bn_add_act(x, *params, 2, EPS, True)
    assert y.requires_grad and not any(s.requires_grad for s in stats)
    with pytest.raises(ValueError, match="x is the network input"):
        stems_bn_add_act(x.requires_grad_(), *params, 2, EPS, True)


def test_bad_arguments_are_named():
    x, w_a, g_a, b_a, w_b, g_b, b_b, _ = _inputs((2, 3, 1, 5, 5, 4, 2), torch.float32, 2, requires_grad=False)
    with pytest.raises(BackendUnavailable, match=r"input channels \(3 \+ 1\) must add up to x's 5"):
        stems_bn_add_act(torch.cat([x, x[:, :1]], 1), w_a, g_a, b_a, w_b, g_b, b_b, 2, EPS, True)
    with pytest.raises(BackendUnavailable, match=r"w_b must be C x cin x 3 x 3"):
        stems_bn_add_act(x, w_a, g_a, b_a, w_b[..., :1, :1], g_b, b_b, 2, EPS, True)
    with pytest.raises(BackendUnavailable, match=r"output channels differ \(4 and 3\)"):
        stems_bn_add_act(x, w_a, g_a, b_a, w_b[:3], g_b, b_b, 2, EPS, True)
    with pytest.raises(BackendUnavailable, match=r"gamma_b must have 4 entries"):
        stems_bn_add_act(x, w_a, g_a, b_a, w_b, g_b[:2], b_b, 2, EPS, True)
    with pytest.raises(BackendUnavailable, match="share one dtype"):
        stems_bn_add_act(x.double(), w_a, g_a, b_a, w_b, g_b, b_b, 2, EPS, True)
    with pytest.raises(BackendUnavailable, match="stride must be >= 1"):
        stems_bn_add_act(x, w_a, g_a, b_a, w_b, g_b, b_b, 0, EPS, True)


@needs_ext
def test_dispatch_picks_cpp_on_cpu_and_the_kernel_names_bad_arguments():
    ins = _inputs((2, 3, 1, 5, 5, 4, 2), torch.float32, 2, requires_grad=False)[:7]
    assert stems_bn_add_act.select(*ins, 2, EPS, True) == "cpp"
    assert stems_bn_add_act.select(*(t.half() for t in ins), 2, EPS, True) == "reference"
    with pytest.raises(RuntimeError, match="float32/float64 only"):
        torch.ops.fastface.stems_bn_add_act(*(t.half() for t in ins), 2, EPS, True)
    with pytest.raises(RuntimeError, match="input channels"):
        torch.ops.fastface.stems_bn_add_act(ins[0][:, :3], *ins[1:], 2, EPS, True)
    y, *stats = torch.ops.fastface.stems_bn_add_act(*ins, 2, EPS, True)
    with pytest.raises(RuntimeError, match="grad_y must be 2 x 4 x 3 x 3"):
        torch.ops.fastface.stems_bn_add_act_backward(y[:, :, :2], ins[0], *ins[1:4], *stats[:2], *ins[4:], *stats[2:],
                                                     2, True)
