"""fastface.ops.dwconv_train (depthwise 3 x 3 conv forward/backward, optionally behind an on-the-fly BN + ReLU6;
bn_stats) against plain PyTorch, autograd, opcheck."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastface._ext import HAS_EXT
from fastface.ops.bn_act import bn_stats_reference
from fastface.ops.dwconv_train import (
    BNActDwConvFunction, DwBNActFunction, DwConvFunction, bn_act_dwconv_pays, bn_act_dwconv_reference,
    dw_bn_act_problems, dwconv_backward_pays, dwconv_backward_reference, dwconv_forward_reference,
    dwconv_forward_stats_reference, dwconv_kernel_problems,
)

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="fastface._C not built")

# Tiny ops: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

# (N, C, H, W, stride): odd and even sizes, channel tails (C % 16 != 0), 1 x 1 and 1-wide maps, and
# C past one vector with a tail.
SHAPES = [(2, 17, 7, 7, 2), (3, 37, 13, 13, 1), (1, 3, 8, 9, 2), (2, 16, 6, 5, 2), (2, 5, 1, 1, 1), (1, 4, 1, 6, 2),
          (2, 33, 10, 3, 1), (1, 48, 4, 4, 1), (2, 7, 2, 2, 2)]


def _ids(s):
    return "x".join(map(str, s))


def _inputs(shape, dtype, seed, channels_last=True):
    n, c, h, w, s = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(c, 1, 3, 3, generator=g, dtype=torch.float64).to(dtype)
    oh, ow = (h - 1) // s + 1, (w - 1) // s + 1
    gy = torch.randn(n, c, oh, ow, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        gy = gy.contiguous(memory_format=torch.channels_last)
    return gy, x, wt, s


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
def test_kernel_matches_aten(shape, dtype, channels_last):
    gy, x, w, s = _inputs(shape, dtype, sum(shape), channels_last)
    gx, gw, sums = torch.ops.fastface.dwconv_backward(gy, x, w, s, 1)
    gx_ref, gw_ref, _ = dwconv_backward_reference(gy, x, w, s, 1)
    assert sums.shape == (0, x.shape[1])
    torch.testing.assert_close(gx, gx_ref, **_tol(dtype))
    scale = max(gw_ref.abs().max().item(), 1.0)
    torch.testing.assert_close(gw, gw_ref, atol=_tol(dtype)["atol"] * scale, rtol=_tol(dtype)["rtol"])
    # Output layout follows the input's.
    assert gx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _pro(c, dtype, seed):
    """A BN prologue (mean, scale, beta), wide enough that ReLU6 clips at both ends."""
    g = torch.Generator().manual_seed(seed + 1)
    mean, scale, beta = (torch.randn(3, c, generator=g, dtype=torch.float64) * torch.tensor([[0.5], [2.0], [3.0]])
                         + torch.tensor([[0.0], [0.0], [1.0]])).to(dtype)
    return mean, scale, beta


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn-relu6"])
def test_forward_kernel_matches_conv2d(shape, dtype, channels_last, prologue):
    _, x, w, s = _inputs(shape, dtype, sum(shape), channels_last)
    pro = _pro(x.shape[1], dtype, sum(shape)) if prologue else (None, None, None)
    z = torch.ops.fastface.dwconv_forward(x, w, s, 1, *pro)
    torch.testing.assert_close(z, dwconv_forward_reference(x, w, s, 1, *pro), **_tol(dtype))
    assert z.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_backward_kernel_with_the_prologue_matches_aten(shape, dtype):
    """With the prologue the gradients are w.r.t. a = relu6((x - mean) * scale + beta) and the weight seen through
    it; with sums also the BN backward's sums of grad_a behind the ReLU6 mask."""
    gy, x, w, s = _inputs(shape, dtype, sum(shape) + 7)
    pro = _pro(x.shape[1], dtype, sum(shape))
    for sums in (False, True):
        ga, gw, bn = torch.ops.fastface.dwconv_backward(gy, x, w, s, 1, *pro, sums)
        ga_ref, gw_ref, bn_ref = dwconv_backward_reference(gy, x, w, s, 1, *pro, sums)
        torch.testing.assert_close(ga, ga_ref, **_tol(dtype))
        scale = max(gw_ref.abs().max().item(), 1.0)
        torch.testing.assert_close(gw, gw_ref, atol=_tol(dtype)["atol"] * scale, rtol=_tol(dtype)["rtol"])
        assert bn.dtype == torch.float64 and bn.shape == ((2, x.shape[1]) if sums else (0, x.shape[1]))
        if sums:
            torch.testing.assert_close(bn, bn_ref, atol=_tol(dtype)["atol"] * max(bn_ref.abs().max().item(), 1.0),
                                       rtol=_tol(dtype)["rtol"])


@needs_ext
@pytest.mark.parametrize("shape", [(5, 17, 13, 13), (2, 40, 7, 6), (1, 3, 1, 1)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_bn_act_backward_sums_equals_bn_act_backward(shape, dtype):
    """Given the sums its first pass would reduce, bn_act_backward_sums returns bn_act_backward's gradients."""
    from fastface.ops.bn_act import bn_act_backward_reference

    g = torch.Generator().manual_seed(sum(shape))
    x, gy = (torch.randn(2, *shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).unbind(0)
    x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
    gamma, beta = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).to(dtype), \
        torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype)
    _, mean, invstd = torch.ops.fastface.bn_act(x, gamma, beta, None, 1e-5, True)
    pre = (x - mean[None, :, None, None]) * (invstd * gamma)[None, :, None, None] + beta[None, :, None, None]
    gm = torch.where((pre > 0) & (pre < 6), gy, torch.zeros_like(gy)).double()
    sums = torch.stack([gm.sum((0, 2, 3)), (gm * (x.double() - mean.double()[None, :, None, None])).sum((0, 2, 3))])
    got = torch.ops.fastface.bn_act_backward_sums(gy, x, gamma, beta, mean, invstd, sums, True)
    want = bn_act_backward_reference(gy, x, gamma, beta, mean, invstd, None, True)[:3]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=_tol(dtype)["atol"] * max(b.abs().max().item(), 1.0),
                                   rtol=_tol(dtype)["rtol"] * 10)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fastface.bn_act_backward_sums.default,
                          (gy, x, gamma, beta, mean, invstd, sums, True))
    with pytest.raises(RuntimeError, match="sums must be float64 2 x C"):
        torch.ops.fastface.bn_act_backward_sums(gy, x, gamma, beta, mean, invstd, sums.float(), True)


@needs_ext
@pytest.mark.parametrize("shape", [(5, 17, 13, 13), (1, 3, 1, 1), (4, 40, 7, 9), (64, 16, 3, 3)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_bn_stats_matches_var_mean(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 100).to(dtype)  # a large mean: no cancellation
    x = x.contiguous(memory_format=torch.channels_last)
    for a, b in zip(torch.ops.fastface.bn_stats(x, 1e-5), bn_stats_reference(x.double(), 1e-5)):
        torch.testing.assert_close(a, b.to(dtype), atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=1e-5)
    torch.library.opcheck(torch.ops.fastface.bn_stats.default, (x, 1e-5))


@needs_ext
@pytest.mark.parametrize("shape", [(2, 5, 7, 6, 1), (3, 19, 9, 8, 2), (1, 16, 2, 1, 2)], ids=_ids)
def test_bn_act_dwconv_function_gradcheck_and_opcheck(shape):
    _, e, w, s = _inputs(shape, torch.float64, 4)
    e = (e * 2 + 0.5).detach()
    c = e.shape[1]
    gamma = torch.rand(c, dtype=torch.float64) + 0.5
    beta = torch.randn(c, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (e, gamma, beta, w)]
    assert torch.autograd.gradcheck(lambda *a: BNActDwConvFunction.apply(*a, s, 1e-5)[0], args)
    pro = _pro(c, torch.float64, 1)
    torch.library.opcheck(torch.ops.fastface.dwconv_forward.default, (e, w, s, 1, *pro))
    z = dwconv_forward_reference(e, w, s, 1, *pro)
    for sums in (False, True):
        torch.library.opcheck(torch.ops.fastface.dwconv_backward.default, (torch.randn_like(z), e, w, s, 1, *pro, sums))


@needs_ext
@pytest.mark.parametrize("shape", [(4, 24, 15, 15, 1), (3, 40, 12, 11, 2), (8, 17, 6, 6, 2)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_bn_act_dwconv_function_matches_the_plain_ops(shape, dtype):
    """Forward (z, batch mean, invstd) and every gradient against batch_norm -> relu6 -> conv2d by autograd."""
    _, e, w, s = _inputs(shape, dtype, sum(shape))
    e = e * 2 + 0.5
    g = torch.Generator().manual_seed(3)
    gamma = (torch.rand(e.shape[1], generator=g, dtype=torch.float64) + 0.5).to(dtype)
    beta = torch.randn(e.shape[1], generator=g, dtype=torch.float64).to(dtype)
    ins = [t.clone().requires_grad_() for t in (e, gamma, beta, w)]
    refs = [t.clone().requires_grad_() for t in (e, gamma, beta, w)]
    out = BNActDwConvFunction.apply(*ins, s, 1e-5)
    ref = bn_act_dwconv_reference(*refs, s, 1e-5)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **tol)
    gz = torch.randn_like(ref[0])
    for a, b in zip(torch.autograd.grad(out[0], ins, gz), torch.autograd.grad(ref[0], refs, gz)):
        torch.testing.assert_close(a, b, atol=tol["atol"] * max(b.abs().max().item(), 1.0), rtol=tol["rtol"])


@needs_ext
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 40), h=st.integers(1, 12), w=st.integers(1, 12), s=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_aten_on_drawn_shapes(n, c, h, w, s, seed):
    gy, x, wt, s = _inputs((n, c, h, w, s), torch.float64, seed)
    for a, b in zip(torch.ops.fastface.dwconv_backward(gy, x, wt, s, 1), dwconv_backward_reference(gy, x, wt, s, 1)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@needs_ext
@pytest.mark.parametrize("shape", [(2, 3, 5, 5, 1), (1, 4, 6, 7, 2), (1, 19, 3, 4, 2)], ids=_ids)
def test_gradcheck_and_opcheck(shape):
    gy, x, w, s = _inputs(shape, torch.float64, 3)
    x, w = x.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: DwConvFunction.apply(a, b, s, 1), (x, w))
    torch.library.opcheck(torch.ops.fastface.dwconv_backward.default, (gy, x.detach(), w.detach(), s, 1))


@needs_ext
@pytest.mark.parametrize("shape", [(2, 17, 7, 7, 2, 3), (3, 37, 13, 13, 1, 3), (2, 5, 9, 9, 3, 3), (1, 4, 6, 6, 1, 5),
                                   (2, 8, 14, 14, 2, 3), (2, 19, 29, 30, 1, 3), (1, 16, 28, 31, 2, 3)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_function_matches_conv2d(shape, dtype):
    """DwConvFunction equals conv2d forward and backward (N, C, H, W, stride, k): on the kernels' shapes (C++
    forward from 28 x 28 at stride 1) and on ATen's fallback (stride 3, a 5 x 5 kernel, a stride-2 map below
    28 x 28)."""
    n, c, h, wd, s, k = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, c, h, wd, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, 1, k, k, generator=g, dtype=dtype)
    x, w = x.requires_grad_(), w.requires_grad_()
    y = DwConvFunction.apply(x, w, s, k // 2)
    y_ref = F.conv2d(x, w, None, s, k // 2, 1, c)
    torch.testing.assert_close(y, y_ref, **_tol(dtype))
    gy = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad(y, (x, w), gy), torch.autograd.grad(y_ref, (x, w), gy)):
        torch.testing.assert_close(a, b, atol=_tol(dtype)["atol"] * max(b.abs().max().item(), 1.0),
                                   rtol=_tol(dtype)["rtol"])


@needs_ext
def test_function_skips_the_gradients_nobody_needs():
    gy, x, w, s = _inputs((2, 8, 6, 6, 1), torch.float64, 5)
    wr = w.clone().requires_grad_()
    (gw,) = torch.autograd.grad(DwConvFunction.apply(x, wr, s, 1), (wr,), gy)
    torch.testing.assert_close(gw, dwconv_backward_reference(gy, x, w, s, 1)[1], atol=1e-12, rtol=1e-12)


@needs_ext
def test_weight_gradient_does_not_depend_on_the_thread_count():
    """Per-task partials merged in task order: bitwise the same on 1, 2 and 3 threads (large enough to split; three
    on a two-core box run unevenly, so threads take tasks from each other's shares: fastface::for_tasks)."""
    gy, x, w, s = _inputs((4, 40, 40, 40, 1), torch.float32, 11)
    pro = _pro(40, torch.float32, 0)

    def run():
        return [torch.ops.fastface.dwconv_backward(gy, x, w, s, 1),
                torch.ops.fastface.dwconv_backward(gy, x, w, s, 1, *pro, True)]

    one = run()
    for threads in (2, 3):
        torch.set_num_threads(threads)
        more = run()
        assert all(torch.equal(a, b) for r1, r2 in zip(one, more) for a, b in zip(r1, r2)), threads


@needs_ext
def test_large_maps_stream_their_input_gradient():
    """An 18 MiB grad_x (over simd::kStreamBytes) takes the non-temporal stores; the result is the same as ATen's."""
    gy, x, w, s = _inputs((8, 64, 96, 96, 2), torch.float32, 2)  # 18 MiB
    gx, gw, _ = torch.ops.fastface.dwconv_backward(gy, x, w, s, 1)
    gx_ref, gw_ref, _ = dwconv_backward_reference(gy, x, w, s, 1)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, gw_ref, atol=1e-5 * gw_ref.abs().max().item(), rtol=1e-4)


@needs_ext
@pytest.mark.parametrize("bad, match", [
    (lambda gy, x, w: (gy[:, :, :-1], x, w, 1, 1), "is not the output of"),
    (lambda gy, x, w: (gy, x, w[:-1], 1, 1), "weight must be C x 1 x 3 x 3"),
    (lambda gy, x, w: (gy, x, torch.randn(x.shape[1], 1, 5, 5), 1, 2), "weight must be C x 1 x 3 x 3"),
    (lambda gy, x, w: (gy, x, w, 3, 1), "stride 1 or 2 with padding 1"),
    (lambda gy, x, w: (gy, x, w, 1, 0), "stride 1 or 2 with padding 1"),
    (lambda gy, x, w: (gy.half(), x.half(), w.half(), 1, 1), "float32 and float64 only"),
    (lambda gy, x, w: (gy.float(), x, w, 1, 1), "dtypes differ"),
    (lambda gy, x, w: (gy, x, w, 1, 1, None, torch.ones(6, dtype=x.dtype), None), "mean, scale and beta"),
    (lambda gy, x, w: (gy, x, w, 1, 1, *torch.ones(3, 5, dtype=x.dtype)), "must have C = 6 entries"),
    (lambda gy, x, w: (gy, x, w, 1, 1, None, None, None, True), "sums need the BN"),
], ids=["grad-shape", "weight-channels", "kernel-5", "stride-3", "padding-0", "half", "mixed-dtypes", "partial-prologue",
        "prologue-size", "sums-alone"])
def test_bad_arguments_are_named(bad, match):
    gy, x, w, _ = _inputs((2, 6, 7, 7, 1), torch.float64, 0)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastface.dwconv_backward(*bad(gy, x, w))


def test_problems_name_what_the_kernel_cannot_take():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float16)
    why = " ".join(dwconv_kernel_problems(x, torch.randn(4, 1, 5, 5), 3, 2))
    assert "float16" in why and "3 x 3" in why and "stride 3" in why
    assert dwconv_backward_pays(torch.empty(1, 1, 7, 7), 1) and dwconv_backward_pays(torch.empty(1, 1, 14, 14), 2)
    assert dwconv_backward_pays(torch.empty(1, 1, 4, 4), 1) and not dwconv_backward_pays(torch.empty(1, 1, 7, 3), 2)
    assert bn_act_dwconv_pays(torch.empty(1, 1, 7, 7), 2) and not bn_act_dwconv_pays(torch.empty(1, 1, 3, 12), 2)
    assert bn_act_dwconv_pays(torch.empty(1, 1, 4, 9), 1) and not bn_act_dwconv_pays(torch.empty(1, 1, 3, 3), 1)


def _fused_and_plain(monkeypatch, function, module, x):
    """Train-mode `module` (channels_last) and a copy run on x through the fused path and the plain modules;
    (the input shapes `function` was applied to, plain, fused, fused output, plain output)."""
    from fastface.models.mobilenetv2 import fused_train

    calls = []
    real = function.run  # the stage's forward, alone or under DwBNActFunction
    monkeypatch.setattr(function, "run", lambda *a, **k: (calls.append(a[0].shape), real(*a, **k))[1])
    plain = module.to(memory_format=torch.channels_last).train()
    fused = copy.deepcopy(plain)
    with fused_train(True):
        y = fused(x)
    with fused_train(False):
        y_ref = plain(x)
    return calls, plain, fused, y, y_ref


@needs_ext
def test_model_depthwise_layers_train_through_the_function(monkeypatch):
    """A training ConvBNAct (depthwise, channels_last) runs DwConvFunction in the fused path; forward and
    gradients match the plain module."""
    from fastface.models.mobilenetv2 import ConvBNAct

    torch.manual_seed(0)
    plain = ConvBNAct(24, 24, 3, 2, groups=24)
    x = torch.randn(4, 24, 30, 30).contiguous(memory_format=torch.channels_last).requires_grad_()
    calls, plain, fused, y, y_ref = _fused_and_plain(monkeypatch, DwConvFunction, plain, x)
    assert calls == [x.shape]
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    gy = torch.randn_like(y_ref)
    g = torch.autograd.grad(y, (x, fused.conv.weight), gy)
    g_ref = torch.autograd.grad(y_ref, (x, plain.conv.weight), gy)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-3)


@needs_ext
@pytest.mark.parametrize("stride", [1, 2])
def test_model_blocks_fold_the_expand_activation_into_the_depthwise_conv(monkeypatch, stride):
    """A training InvertedResidual (expand, channels_last, fused path) runs BNActDwConvFunction; its output,
    gradients and running statistics match the plain modules."""
    from fastface.arch import LayerInfo
    from fastface.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    info = LayerInfo(index=1, kind="block", cin=16, cout=16 if stride == 1 else 24, stride=stride, k=3, hidden=96,
                     expand=True, residual=stride == 1, size_in=14, size_out=14 // stride)
    plain = InvertedResidual(info)
    x = torch.randn(4, 16, 14, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    calls, plain, fused, y, y_ref = _fused_and_plain(monkeypatch, BNActDwConvFunction, plain, x)
    assert calls == [(4, 96, 14, 14)]
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    gy = torch.randn_like(y_ref)
    g = torch.autograd.grad(y, [x, *fused.parameters()], gy)
    g_ref = torch.autograd.grad(y_ref, [x, *plain.parameters()], gy)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4 * max(b.abs().max().item(), 1.0), rtol=1e-3)
    for a, b in zip(fused.buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("size,stride", [(3, 1), (3, 2)])
def test_model_blocks_with_small_inputs_keep_bn_act_before_the_depthwise_conv(monkeypatch, size, stride):
    """Where the folded prologue is not taken (inputs under 4 x 4, not measured) the block runs bn_act + DwConvFunction instead,
    with the same output and gradients as the plain modules."""
    from fastface.arch import LayerInfo
    from fastface.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    info = LayerInfo(index=1, kind="block", cin=16, cout=16 if stride == 1 else 24, stride=stride, k=3, hidden=96,
                     expand=True, residual=stride == 1, size_in=size, size_out=(size - 1) // stride + 1)
    x = torch.randn(4, 16, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    real = DwConvFunction.run
    dw_calls = []
    monkeypatch.setattr(DwConvFunction, "run", lambda *a, **k: (dw_calls.append(a[0].shape), real(*a, **k))[1])
    calls, plain, fused, y, y_ref = _fused_and_plain(monkeypatch, BNActDwConvFunction, InvertedResidual(info), x)
    assert calls == [] and dw_calls == [(4, 96, size, size)]
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    gy = torch.randn_like(y_ref)
    g = torch.autograd.grad(y, [x, *fused.parameters()], gy)
    g_ref = torch.autograd.grad(y_ref, [x, *plain.parameters()], gy)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4 * max(b.abs().max().item(), 1.0), rtol=1e-3)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES + [(4, 40, 40, 40, 1), (3, 24, 29, 31, 2), (2, 100, 9, 7, 1)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn-relu6"])
def test_forward_stats_kernel_matches_the_reference(shape, dtype, prologue):
    """dwconv_forward_stats: z is dwconv_forward's bit for bit; its batch mean and invstd match those of z in float64,
    also with a large mean (the sums are about a shift taken from the data); tasks and float runs span
    several rows and images on the larger maps."""
    _, x, w, s = _inputs(shape, dtype, sum(shape))
    pro = _pro(x.shape[1], dtype, sum(shape)) if prologue else (None, None, None)
    for offset in (0.0, 100.0):
        xo = x + offset if not prologue else x
        z, mean, invstd = torch.ops.fastface.dwconv_forward_stats(xo, w, s, 1, *pro, 1e-5)
        assert torch.equal(z, torch.ops.fastface.dwconv_forward(xo, w, s, 1, *pro))
        assert z.is_contiguous(memory_format=torch.channels_last)
        z_ref, *_ = dwconv_forward_stats_reference(xo, w, s, 1, *pro)
        torch.testing.assert_close(z, z_ref, **_tol(dtype))
        # The statistics of the z written (float64 over its values): the reduction's own error, not z's rounding.
        mean_ref, invstd_ref = bn_stats_reference(z.double(), 1e-5)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(mean, mean_ref.to(dtype), **tol)
        torch.testing.assert_close(invstd, invstd_ref.to(dtype), atol=tol["atol"] * invstd_ref.max().item(),
                                   rtol=tol["rtol"])


@needs_ext
def test_forward_stats_do_not_depend_on_the_thread_count_and_opcheck():
    _, x, w, s = _inputs((4, 40, 40, 40, 1), torch.float32, 5)
    pro = _pro(40, torch.float32, 5)
    one = torch.ops.fastface.dwconv_forward_stats(x, w, s, 1, *pro, 1e-5)
    torch.set_num_threads(2)
    two = torch.ops.fastface.dwconv_forward_stats(x, w, s, 1, *pro, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    _, x, w, s = _inputs((2, 6, 7, 7, 2), torch.float64, 1)
    torch.library.opcheck(torch.ops.fastface.dwconv_forward_stats.default, (x, w, s, 1, *_pro(6, torch.float64, 1),
                                                                            1e-5))
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        torch.ops.fastface.dwconv_forward_stats(x, w, s, 1, None, None, None, -1.0)


@needs_ext
@pytest.mark.parametrize("shape", [(5, 17, 13, 13), (2, 40, 7, 6), (1, 3, 1, 1), (3, 70, 30, 30)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("relu6", [True, False], ids=["relu6", "linear"])
def test_bn_act_apply_is_bn_acts_output_given_its_statistics(shape, dtype, relu6):
    from fastface.ops.bn_act import bn_act_apply_reference

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    gamma = (torch.rand(shape[1], generator=g, dtype=torch.float64) * 3 + 0.5).to(dtype)
    beta = (torch.randn(shape[1], generator=g, dtype=torch.float64) * 2 + 2).to(dtype)
    y, mean, invstd = torch.ops.fastface.bn_act(x, gamma, beta, None, 1e-5, relu6)
    got = torch.ops.fastface.bn_act_apply(x, gamma, beta, mean, invstd, relu6)
    assert torch.equal(got, y) and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, bn_act_apply_reference(x, gamma, beta, mean, invstd, relu6), **_tol(dtype))
    torch.library.opcheck(torch.ops.fastface.bn_act_apply.default, (x, gamma, beta, mean, invstd, relu6))
    with pytest.raises(RuntimeError, match="mean and invstd must have C"):
        torch.ops.fastface.bn_act_apply(x, gamma, beta, mean[:-1], invstd, relu6)


def _stage_case(stage, shape, dtype, seed):
    """(inputs, plain z function) of a depthwise stage: DwConvFunction, BNActDwConvFunction, ExpandDwConvFunction."""
    from fastface.ops.expand_dwconv import ExpandDwConvFunction, expand_dwconv_reference

    n, c, h, w, s = shape
    g = torch.Generator().manual_seed(seed)
    r = lambda *sz: torch.randn(*sz, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    cl = torch.channels_last
    wd = r(c, 1, 3, 3)
    if stage is DwConvFunction:
        return (r(n, c, h, w).contiguous(memory_format=cl), wd, s, 1), lambda x, w_, *_: F.conv2d(x, w_, None, s, 1,
                                                                                                  1, c)
    gamma, beta = (r(c).abs() + 0.5), r(c)
    if stage is BNActDwConvFunction:
        e = (r(n, c, h, w) * 2 + 0.5).contiguous(memory_format=cl)
        return (e, gamma, beta, wd, s, 1e-5), lambda *a: bn_act_dwconv_reference(*a[:4], s, 1e-5)[0]
    assert stage is ExpandDwConvFunction
    cin = 5
    x = r(n, cin, h, w).contiguous(memory_format=cl)
    we = r(c, cin, 1, 1)
    return (x, we, 1, gamma, beta, wd, s, 1e-5), lambda *a: expand_dwconv_reference(a[0], a[1], 1, a[3], a[4], a[5], s,
                                                                                     1e-5)[0]


def _stages():
    from fastface.ops.expand_dwconv import ExpandDwConvFunction

    return [DwConvFunction, BNActDwConvFunction, ExpandDwConvFunction]


@needs_ext
@pytest.mark.parametrize("stage", _stages(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", [(4, 24, 15, 15, 1), (3, 40, 12, 11, 2), (2, 17, 7, 7, 1)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_dw_bn_act_function_matches_the_plain_ops(stage, shape, dtype):
    """relu6(BN(stage(...))) through DwBNActFunction: output, batch statistics and every gradient against the
    stage's plain PyTorch definition -> batch_norm -> relu6 by autograd."""
    from fastface.ops.bn_act import bn_act_reference

    inputs, plain = _stage_case(stage, shape, dtype, sum(shape))
    diff = [i for i, t in enumerate(inputs) if torch.is_tensor(t)]
    c = shape[1]
    g = torch.Generator().manual_seed(1)
    gamma = (torch.rand(c, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).requires_grad_()
    beta = (torch.randn(c, generator=g, dtype=torch.float64) + 1).to(dtype).requires_grad_()
    ins = [t.clone().requires_grad_() if i in diff else t for i, t in enumerate(inputs)]
    refs = [t.clone().requires_grad_() if i in diff else t for i, t in enumerate(inputs)]
    y, mean, invstd, *stats = DwBNActFunction.apply(stage, gamma, beta, 1e-5, *ins)
    g2, b2 = gamma.detach().clone().requires_grad_(), beta.detach().clone().requires_grad_()
    y_ref, mean_ref, invstd_ref = bn_act_reference(plain(*refs), g2, b2, None, 1e-5, True)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    for a, b in ((y, y_ref), (mean, mean_ref), (invstd, invstd_ref)):
        torch.testing.assert_close(a, b, **tol)
    assert len(stats) == (0 if stage is DwConvFunction else 2)
    gy = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, [gamma, beta, *[ins[i] for i in diff]], gy)
    want = torch.autograd.grad(y_ref, [g2, b2, *[refs[i] for i in diff]], gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=tol["atol"] * max(b.abs().max().item(), 1.0), rtol=tol["rtol"] * 10)


@needs_ext
@pytest.mark.parametrize("stage", _stages(), ids=lambda f: f.__name__)
def test_dw_bn_act_function_gradcheck(stage):
    inputs, _ = _stage_case(stage, (2, 5, 7, 7, 2), torch.float64, 3)
    diff = [i for i, t in enumerate(inputs) if torch.is_tensor(t)]
    gamma = torch.rand(5, dtype=torch.float64) + 0.5
    beta = torch.randn(5, dtype=torch.float64) + 1

    def f(gm, bt, *ts):
        args = list(inputs)
        for i, t in zip(diff, ts):
            args[i] = t
        return DwBNActFunction.apply(stage, gm, bt, 1e-5, *args)[0]

    args = [t.clone().requires_grad_() for t in (gamma, beta, *[inputs[i] for i in diff])]
    assert torch.autograd.gradcheck(f, args)


def test_dw_bn_act_problems_name_the_layout():
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    assert "channels_last" in " ".join(dw_bn_act_problems(x, torch.randn(4, 1, 3, 3, dtype=torch.float64), 1))
