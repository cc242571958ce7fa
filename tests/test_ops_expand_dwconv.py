"""fastface.ops.expand_dwconv (1x1 expand conv + BN + ReLU6 + depthwise conv with the BN folded into the conv's
algebra; channel_moments, grouped_linear_sub) against plain PyTorch, autograd, opcheck."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastface._ext import HAS_EXT
from fastface.ops.expand_dwconv import (
    ExpandDwConvFunction, channel_moments_reference, expand_dwconv_problems, expand_dwconv_reference,
    grouped_linear_sub_reference,
)

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="fastface._C not built")
pytestmark = pytest.mark.usefixtures("one_thread")

# (N, Cin, Cout, H, W, stride, groups): odd sizes, channel tails past one vector, groups, 1 x 1 maps.
SHAPES = [(2, 5, 30, 7, 7, 2, 1), (3, 16, 96, 9, 8, 1, 1), (1, 24, 144, 5, 6, 2, 1), (2, 6, 18, 4, 5, 1, 2),
          (2, 40, 80, 3, 3, 1, 1), (2, 9, 27, 6, 1, 2, 3), (3, 3, 7, 1, 1, 1, 1)]


def _ids(s):
    return "x".join(map(str, s))


def _inputs(shape, dtype, seed):
    n, cin, cout, h, w, s, groups = shape
    g = torch.Generator().manual_seed(seed)
    r = lambda *size: torch.randn(*size, generator=g, dtype=torch.float64)  # noqa: E731
    # A mean far from 0: the moments must not lose the variance to it.
    x = (r(n, cin, h, w) * 1.5 + 3.0).to(dtype).contiguous(memory_format=torch.channels_last)
    we = (r(cout, cin // groups, 1, 1) / (cin // groups) ** 0.5).to(dtype)
    gamma, beta = (torch.rand(cout, generator=g, dtype=torch.float64) + 0.5).to(dtype), (r(cout) * 0.3).to(dtype)
    wd = (r(cout, 1, 3, 3) / 3).to(dtype)
    oh, ow = (h - 1) // s + 1, (w - 1) // s + 1
    gz = r(n, cout, oh, ow).to(dtype).contiguous(memory_format=torch.channels_last)
    return x, we, gamma, beta, wd, gz, s, groups


@needs_ext
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (3, 48, 4, 3), (1, 33, 1, 1), (64, 24, 9, 9)], ids=_ids)
def test_channel_moments_matches_the_reference(shape, dtype, groups):
    """Mean and within-group covariance (float64) of x over every dim but 1, layouts NCHW and channels_last alike."""
    if shape[1] % groups:
        pytest.skip("groups must divide the channels")
    g = torch.Generator().manual_seed(sum(shape) + groups)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 - 5).to(dtype)
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        mean, cov = torch.ops.fastface.channel_moments(t, groups)
        mr, cr = channel_moments_reference(t, groups)
        assert mean.dtype == cov.dtype == torch.float64 and cov.shape == (groups, shape[1] // groups, shape[1] // groups)
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(mean, mr, atol=tol * 10, rtol=tol)
        torch.testing.assert_close(cov, cr, atol=tol * 10, rtol=tol)
    torch.library.opcheck(torch.ops.fastface.channel_moments.default, (x.contiguous(memory_format=torch.channels_last),
                                                                       groups))


@needs_ext
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), ci=st.integers(1, 37), groups=st.integers(1, 3), hw=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_grouped_linear_sub_matches_the_reference(n, ci, groups, hw, dtype, seed):
    """y - x A - c per pixel, A block-diagonal: any channel count, group count and layout."""
    g = torch.Generator().manual_seed(seed)
    c_ = ci * groups
    x = torch.randn(n, c_, hw, hw + 1, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    y = torch.randn(n, c_, hw, hw + 1, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    a, c = torch.randn(groups, ci, ci, generator=g, dtype=dtype), torch.randn(c_, generator=g, dtype=dtype)
    out = torch.ops.fastface.grouped_linear_sub(y, x, a, c)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, grouped_linear_sub_reference(y, x, a, c), **tol)
    torch.testing.assert_close(torch.ops.fastface.grouped_linear_sub(y.contiguous(), x.contiguous(), a, c), out, **tol)


@needs_ext
def test_grouped_linear_sub_opcheck_and_errors():
    x = torch.randn(2, 6, 3, 4).contiguous(memory_format=torch.channels_last)
    a, c = torch.randn(2, 3, 3), torch.randn(6)
    torch.library.opcheck(torch.ops.fastface.grouped_linear_sub.default, (torch.randn_like(x), x, a, c))
    x2, y2 = torch.randn(7, 6), torch.randn(7, 6)  # N x C rows as well
    torch.testing.assert_close(torch.ops.fastface.grouped_linear_sub(y2, x2, a, c),
                               grouped_linear_sub_reference(y2, x2, a, c), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.ops.fastface.channel_moments(x2, 2)[1], channel_moments_reference(x2, 2)[1],
                               atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="does not split 6 channels"):
        torch.ops.fastface.grouped_linear_sub(x, x, torch.randn(2, 4, 4), c)
    with pytest.raises(RuntimeError, match="c must be"):
        torch.ops.fastface.grouped_linear_sub(x, x, a, torch.randn(5))
    with pytest.raises(RuntimeError, match="groups \\(4\\) must divide the 6 channels"):
        torch.ops.fastface.channel_moments(x, 4)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_function_matches_the_reference_forward_and_backward(shape, dtype):
    """z, the batch statistics and every gradient equal the plain modules' (conv -> BN -> ReLU6 -> depthwise conv)."""
    x, we, gamma, beta, wd, gz, s, groups = _inputs(shape, dtype, sum(shape))
    assert not expand_dwconv_problems(x, we, groups, wd, s)
    leaves = [t.requires_grad_() for t in (x, we, gamma, beta, wd)]
    z, mean, invstd = ExpandDwConvFunction.apply(x, we, groups, gamma, beta, wd, s, 1e-5)
    zr, mr, ir = expand_dwconv_reference(x, we, groups, gamma, beta, wd, s, 1e-5)
    grads = torch.autograd.grad(z, leaves, gz)
    grads_ref = torch.autograd.grad(zr, leaves, gz)
    assert z.is_contiguous(memory_format=torch.channels_last) and not mean.requires_grad
    rel = 2e-4 if dtype == torch.float32 else 1e-10
    for name, got, ref in zip(("z", "mean", "invstd", "x", "w_expand", "gamma", "beta", "w_dw"),
                              (z, mean, invstd, *grads), (zr, mr, ir, *grads_ref)):
        scale = max(ref.abs().max().item(), 1.0)
        torch.testing.assert_close(got, ref, atol=rel * scale, rtol=rel, msg=lambda m, name=name: f"{name}: {m}")


@needs_ext
@pytest.mark.parametrize("shape", [(2, 3, 6, 4, 5, 1, 1), (2, 4, 6, 3, 3, 2, 2)], ids=_ids)
def test_function_gradcheck(shape):
    x, we, gamma, beta, wd, _, s, groups = _inputs(shape, torch.float64, 11)
    args = tuple(t.requires_grad_() for t in (x, we, gamma, beta, wd))
    assert torch.autograd.gradcheck(
        lambda a, b, c, d, e: ExpandDwConvFunction.apply(a, b, groups, c, d, e, s, 1e-5)[0], args)


@needs_ext
def test_problems_name_what_the_function_cannot_take():
    x, we, gamma, beta, wd, _, s, groups = _inputs(SHAPES[0], torch.float32, 1)
    assert any("channels_last" in w for w in expand_dwconv_problems(x.contiguous(), we, 1, wd, s))
    assert any("1x1 conv weight" in w for w in expand_dwconv_problems(x, torch.randn(30, 5, 3, 3), 1, wd, s))
    assert any("depthwise weight" in w for w in expand_dwconv_problems(x, we, 1, torch.randn(29, 1, 3, 3), s))
    assert any("stride" in w for w in expand_dwconv_problems(x, we, 1, wd, 3))
