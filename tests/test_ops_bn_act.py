"""fastface.ops.bn_act (training BN + residual + ReLU6): backends against plain PyTorch, autograd, opcheck."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastface._ext import HAS_EXT
from fastface.ops import BackendUnavailable, bn_act, bn_act_backward, bn_act_backward_reference, use_backend
from helpers import assert_bitwise_same_across_threads

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="fastface._C not built")
EPS = 1e-5

# Tiny ops: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(5, 17, 13, 13), (1, 3, 7, 7), (2, 37, 5, 6), (5, 16, 7, 7), (3, 40, 1, 1), (2, 96, 9, 9), (4, 1, 3, 3),
          (1, 33, 1, 2)]
BACKENDS = ["reference", pytest.param("cpp", marks=needs_ext)]


def _ids(s):
    return "x".join(map(str, s))


def _inputs(shape, dtype, seed, residual, channels_last=True, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.7).to(dtype)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if residual else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        r = r.contiguous(memory_format=torch.channels_last) if r is not None else None
    gamma = (torch.randn(shape[1], generator=g, dtype=torch.float64) + 1).to(dtype)
    beta = (torch.randn(shape[1], generator=g, dtype=torch.float64) * 2).to(dtype)
    gy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    ts = [t for t in (x, gamma, beta, r) if t is not None]
    for t in ts:
        t.requires_grad_(requires_grad)
    return x, gamma, beta, r, gy


def _plain(x, gamma, beta, r, relu6):
    """The modules the op replaces: BatchNorm2d (training) -> + residual -> hardtanh(0, 6)."""
    # The functional form of BatchNorm2d in training (the module's own call), differentiable in gamma and beta.
    y = F.batch_norm(x, None, None, gamma, beta, True, 0.0, EPS)
    if r is not None:
        y = y + r
    return F.hardtanh(y, 0.0, 6.0) if relu6 else y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("residual,relu6", [(False, True), (False, False), (True, False), (True, True)],
                         ids=["act", "none", "res", "res_act"])
def test_forward_and_backward_match_plain_pytorch(backend, shape, dtype, residual, relu6):
    seed = abs(hash((shape, str(dtype), residual, relu6))) % 2**31
    x, gamma, beta, r, gy = _inputs(shape, dtype, seed, residual)
    ins = [t for t in (x, gamma, beta, r) if t is not None]
    with use_backend(backend):
        y, mean, invstd = bn_act(x, gamma, beta, r, EPS, relu6)
    grads = torch.autograd.grad(y, ins, gy)
    y_ref = _plain(x, gamma, beta, r, relu6)
    grads_ref = torch.autograd.grad(y_ref, ins, gy)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, **tol)
    var, m = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, m, **tol)
    torch.testing.assert_close(invstd, torch.rsqrt(var + EPS), **tol)
    for name, a, b in zip(["x", "gamma", "beta", "residual"], grads, grads_ref):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=tol["atol"] * scale * 10, rtol=tol["rtol"] * 10, msg=name)


@needs_ext
@pytest.mark.parametrize("residual,relu6", [(False, True), (True, True), (True, False)])
def test_nchw_input_is_converted_and_stays_nchw(residual, relu6):
    x, gamma, beta, r, gy = _inputs((3, 20, 5, 7), torch.float32, 1, residual, channels_last=False)
    with use_backend("cpp"):
        y, *_ = bn_act(x, gamma, beta, r, EPS, relu6)
    assert y.is_contiguous()
    torch.testing.assert_close(y, _plain(x, gamma, beta, r, relu6), atol=1e-5, rtol=1e-5)
    ins = [t for t in (x, gamma, beta, r) if t is not None]
    gx = torch.autograd.grad(y, ins, gy)[0]
    assert gx.is_contiguous()
    torch.testing.assert_close(gx, torch.autograd.grad(_plain(x, gamma, beta, r, relu6), ins, gy)[0], atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 3, 3), (3, 5, 2, 1), (1, 4, 2, 3)], ids=_ids)
@pytest.mark.parametrize("residual,relu6", [(False, True), (True, False), (True, True)])
def test_gradcheck_float64(backend, shape, residual, relu6):
    x, gamma, beta, r, _ = _inputs(shape, torch.float64, 7, residual)
    # Keep pre-activations off the ReLU6 kinks (0 and 6), where the gradient is undefined.
    with torch.no_grad():
        beta.copy_(torch.linspace(1.5, 4.5, shape[1], dtype=torch.float64))
        gamma.mul_(0.3)

    def f(*ins):
        with use_backend(backend):
            return bn_act(ins[0], ins[1], ins[2], ins[3] if residual else None, EPS, relu6)[0]

    ins = [t for t in (x, gamma, beta, r) if t is not None]
    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (1, 19, 2, 2)], ids=_ids)
@pytest.mark.parametrize("residual,relu6", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_opcheck(shape, residual, relu6, channels_last):
    x, gamma, beta, r, gy = _inputs(shape, torch.float32, 3, residual, channels_last)
    torch.library.opcheck(torch.ops.fastface.bn_act.default, (x, gamma, beta, r, EPS, relu6))
    _, mean, invstd = torch.ops.fastface.bn_act(x.detach(), gamma.detach(), beta.detach(),
                                                r.detach() if r is not None else None, EPS, relu6)
    args = (gy, x.detach(), gamma.detach(), beta.detach(), mean, invstd, r.detach() if r is not None else None, relu6)
    torch.library.opcheck(torch.ops.fastface.bn_act_backward.default, args)


@needs_ext
@pytest.mark.parametrize("residual,relu6", [(False, True), (True, True)])
def test_backward_op_matches_reference(residual, relu6):
    x, gamma, beta, r, gy = _inputs((4, 21, 6, 5), torch.float64, 11, residual, requires_grad=False)
    _, mean, invstd = bn_act(x, gamma, beta, r, EPS, relu6)
    with use_backend("cpp"):
        got = bn_act_backward(gy, x, gamma, beta, mean, invstd, r, relu6)
    want = bn_act_backward_reference(gy, x, gamma, beta, mean, invstd, r, relu6)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
    assert (got[3].numel() == 0) == (r is None)


@needs_ext
def test_statistics_survive_a_large_mean():
    """mean 1e4, std 1: a sum-of-squares formula would lose the variance in float32."""
    x, gamma, beta, _, _ = _inputs((8, 24, 16, 16), torch.float64, 5, False, requires_grad=False)
    x32 = (x + 1e4).float().contiguous(memory_format=torch.channels_last)
    with use_backend("cpp"):
        _, mean, invstd = bn_act(x32, gamma.float(), beta.float(), None, EPS, False)
    var, m = torch.var_mean(x32.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), m, atol=2e-3, rtol=0)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(var + EPS), atol=0, rtol=1e-4)


@needs_ext
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (17, 64, 64, 64)), (torch.float64, (9, 64, 64, 64))],
                         ids=["f32", "f64"])
@pytest.mark.parametrize("residual,relu6", [(True, True), (False, False)], ids=["res_act", "none"])
def test_large_maps_stream_their_outputs_and_merge_chunks(dtype, shape, residual, relu6):
    """Maps of >= 16 MiB (over simd::kStreamBytes) with whole-vector rows take the non-temporal stores (y,
    grad_x and the residual's gradient), and tasks of several 128 KiB chunks merge their statistics (Chan's
    formula): both paths against float64 PyTorch, on 1 and 2 threads, bit for bit alike, with a mean far from 0."""
    x, gamma, beta, r, gy = _inputs(shape, dtype, 21, residual, requires_grad=False)
    x = (x + 30).contiguous(memory_format=torch.channels_last)
    assert x.numel() * x.element_size() >= 16 << 20
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            y, mean, invstd = torch.ops.fastface.bn_act(x, gamma, beta, r, EPS, relu6)
            outs.append((y, mean, invstd, *torch.ops.fastface.bn_act_backward(gy, x, gamma, beta, mean, invstd, r,
                                                                               relu6)))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    y, mean, invstd, gx, gg, gb, gr = outs[0]
    ins = [t.double().requires_grad_() for t in (x, gamma, beta) + ((r,) if residual else ())]
    y_ref = _plain(*ins[:3], ins[3] if residual else None, relu6)
    grads_ref = torch.autograd.grad(y_ref, ins, gy.double())
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    var, m = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), m, **tol)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(var + EPS), **tol)
    gr = (gr if relu6 else gy) if residual else None
    for name, a, b in zip(["x", "gamma", "beta", "residual"], (gx, gg, gb, gr), grads_ref):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, atol=tol["atol"] * scale * 10, rtol=tol["rtol"] * 10, msg=name)


@needs_ext
def test_runs_are_bitwise_deterministic_across_thread_counts():
    x, gamma, beta, r, gy = _inputs((16, 48, 30, 30), torch.float32, 9, True, requires_grad=False)

    def run():
        y, mean, invstd = torch.ops.fastface.bn_act(x, gamma, beta, r, EPS, True)
        return (y, mean, invstd, *torch.ops.fastface.bn_act_backward(gy, x, gamma, beta, mean, invstd, r, True))

    assert_bitwise_same_across_threads(run)


def test_mean_and_invstd_are_not_differentiable():
    x, gamma, beta, _, _ = _inputs((2, 4, 3, 3), torch.float64, 2, False)
    y, mean, invstd = bn_act(x, gamma, beta, None, EPS, True)
    assert y.requires_grad and not mean.requires_grad and not invstd.requires_grad


def test_bad_arguments_are_named():
    x, gamma, beta, _, _ = _inputs((2, 4, 3, 3), torch.float32, 2, False, requires_grad=False)
    with pytest.raises(BackendUnavailable, match=r"gamma and beta must be \(4,\)"):
        bn_act(x, gamma[:3], beta, None, EPS, True)
    with pytest.raises(BackendUnavailable, match="residual must have x's shape"):
        bn_act(x, gamma, beta, x[:1], EPS, True)
    with pytest.raises(BackendUnavailable, match="dtypes differ"):
        bn_act(x, gamma.double(), beta, None, EPS, True)


@needs_ext
def test_dispatch_picks_cpp_on_cpu_and_reference_elsewhere():
    x, gamma, beta, _, _ = _inputs((2, 4, 3, 3), torch.float32, 2, False, requires_grad=False)
    assert bn_act.select(x, gamma, beta, None, EPS, True) == "cpp"
    why = bn_act.reasons(x.half(), gamma.half(), beta.half(), None, EPS, True)
    assert why["cuda"] and why["triton"] and why["cpp"] and not why["reference"]
    with pytest.raises(RuntimeError, match="float32 and float64"):
        torch.ops.fastface.bn_act(x.half(), gamma.half(), beta.half(), None, EPS, True)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("residual,act", [(False, True), (True, False)])
def test_conv_bn_act_module_running_statistics_match_batchnorm(momentum, residual, act):
    """ConvBNAct.forward_bn_act updates running mean / var / count exactly as nn.BatchNorm2d does."""
    from fastface.models.mobilenetv2 import ConvBNAct

    torch.manual_seed(0)
    plain = ConvBNAct(6, 10, 1, act=act).double().to(memory_format=torch.channels_last).train()
    plain.bn.momentum = momentum
    fused = copy.deepcopy(plain)
    for step in range(3):
        x = torch.randn(3, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        r = torch.randn(3, 10, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        y = fused.forward_bn_act(x, r if residual else None)
        y_ref = plain(x) + r if residual else plain(x)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(fused.bn, name), getattr(plain.bn, name), atol=1e-12, rtol=1e-12,
                                       msg=f"step {step}: {name}")


# ---- depthwise conv with the C++ input gradient ---------------------------------------------------


@needs_ext
@pytest.mark.parametrize("momentum", [0.1, 0.3, None], ids=["m0.1", "m0.3", "cumulative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_bn_update_running_matches_batchnorm2d(momentum, dtype):
    """bn_update_running leaves a BN's running statistics and batch count where nn.BatchNorm2d's own training forward
    does, over three steps, for a BN over a slice of the statistics (offset) and for a cumulative average."""
    g = torch.Generator().manual_seed(3)
    ref = torch.nn.BatchNorm2d(5, momentum=momentum).to(dtype).train()
    mine = copy.deepcopy(ref)
    for step in range(3):
        x = torch.randn(4, 5, 3, 2, generator=g, dtype=dtype) * (step + 1) + step
        ref(x)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        invstd = torch.rsqrt(var + mine.eps)
        pad = torch.randn(3, dtype=dtype, generator=g)  # two other BNs' statistics around this one's
        count = x.numel() // 5
        torch.ops.fastface.bn_update_running(mine.running_mean, mine.running_var, mine.num_batches_tracked,
                                             torch.cat([pad[:2], mean, pad[2:]]), torch.cat([pad[:2], invstd, pad[2:]]),
                                             2, mine.eps, count / (count - 1), -1.0 if momentum is None else momentum)
        tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(mine.running_mean, ref.running_mean, **tol)
        torch.testing.assert_close(mine.running_var, ref.running_var, **tol)
        assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1


@needs_ext
def test_bn_update_running_opcheck_and_errors():
    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.zeros((), dtype=torch.long)
    mean, invstd = torch.randn(6), torch.rand(6) + 0.5
    torch.library.opcheck(torch.ops.fastface.bn_update_running.default, (rm, rv, nbt, mean, invstd, 1, 1e-5, 1.1, 0.1))
    with pytest.raises(RuntimeError, match=r"channels \[3, 7\) are outside the 6 statistics"):
        torch.ops.fastface.bn_update_running(rm, rv, nbt, mean, invstd, 3, 1e-5, 1.1, 0.1)
    with pytest.raises(RuntimeError, match="num_batches_tracked must be one int64"):
        torch.ops.fastface.bn_update_running(rm, rv, nbt.float(), mean, invstd, 0, 1e-5, 1.1, 0.1)
