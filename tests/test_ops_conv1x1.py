"""fastface.ops.conv1x1 (a 1x1 conv's forward and one-pass backward on the CPU) against plain PyTorch in float64,
autograd, opcheck, errors, and its use in the model and in ExpandDwConvFunction."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastface._ext import HAS_EXT
from fastface.ops.conv1x1 import (
    Conv1x1Function, conv1x1, conv1x1_backward, conv1x1_backward_pays, conv1x1_backward_reference, conv1x1_forward_pays,
    conv1x1_gemm_backward, conv1x1_gemm_forward, conv1x1_gemm_pays, conv1x1_problems, conv1x1_routes,
)
from helpers import assert_fast_within_torch_error

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="fastface._C not built")
pytestmark = pytest.mark.usefixtures("one_thread")

# (N, Cin, Cout, H, W): the face model's kinds (16 -> 96, 144 -> 24: grad_w accumulated both ways round), tails
# past one vector, wide sides past four vectors (several column blocks), 1 x 1 maps, more pixels than one block.
SHAPES = [(2, 16, 96, 5, 7), (1, 144, 24, 4, 5), (2, 5, 7, 3, 2), (4, 33, 70, 6, 5), (3, 70, 33, 1, 1),
          (7, 24, 17, 9, 11), (1, 1, 1, 2, 3)]


def _ids(s):
    return "x".join(map(str, s))


def _inputs(shape, dtype, seed, channels_last=True):
    n, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(seed)
    r = lambda *size: torch.randn(*size, generator=g, dtype=torch.float64)  # noqa: E731
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (r(n, cin, h, w) + 0.5).to(dtype).contiguous(memory_format=fmt)
    wt = (r(cout, cin, 1, 1) / cin ** 0.5).to(dtype)
    gz = r(n, cout, h, w).to(dtype).contiguous(memory_format=fmt)
    a, c = (r(cin, cin) / cin).to(dtype), r(cin).to(dtype)
    return x, wt, gz, a, c


def _reference64(gz, x, wt, a, c, mask=(True, True)):
    return conv1x1_backward_reference(gz.double(), x.double(), wt.double(), None if a is None else a.double(),
                                      None if c is None else c.double(), mask)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("correction", ["none", "a", "a_c"])
def test_backward_matches_the_reference(shape, dtype, correction):
    """grad_x = g w - x a - c and grad_w = g^T x, within PyTorch's own float32 error of float64 (float64: ~exact)."""
    x, wt, gz, a, c = _inputs(shape, dtype, sum(shape))
    a = a if correction != "none" else None
    c = c if correction == "a_c" else None
    gx, gw = torch.ops.fastface.conv1x1_backward(gz, x, wt, a, c, [True, True])
    rx, rw = _reference64(gz, x, wt, a, c)
    assert gx.dtype == gw.dtype == dtype and gw.shape == wt.shape and gx.shape == x.shape
    assert gx.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float64:
        torch.testing.assert_close(gx, rx, atol=1e-11, rtol=1e-11)
        torch.testing.assert_close(gw, rw, atol=1e-11, rtol=1e-11)
    else:
        tx, tw = conv1x1_backward_reference(gz, x, wt, a, c)
        assert_fast_within_torch_error(gx, tx, rx, factor=4.0)
        assert_fast_within_torch_error(gw, tw, rw, factor=4.0)


@needs_ext
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), cin=st.integers(1, 40), cout=st.integers(1, 80), h=st.integers(1, 7),
       w=st.integers(1, 7), mask=st.sampled_from([(True, True), (True, False), (False, True)]),
       channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_backward_any_shape_mask_and_layout(n, cin, cout, h, w, mask, channels_last, seed):
    """Any channel counts and map sizes, either layout (grad_x follows x's), masked outputs empty (float64)."""
    x, wt, gz, a, c = _inputs((n, cin, cout, h, w), torch.float64, seed, channels_last)
    gx, gw = torch.ops.fastface.conv1x1_backward(gz, x, wt, a, c, list(mask))
    rx, rw = _reference64(gz, x, wt, a, c, mask)
    if mask[0]:
        torch.testing.assert_close(gx, rx, atol=1e-11, rtol=1e-11)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert gx.is_contiguous(memory_format=fmt)
    else:
        assert gx.numel() == 0
    if mask[1]:
        torch.testing.assert_close(gw, rw, atol=1e-11, rtol=1e-11)
    else:
        assert gw.numel() == 0


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_forward_matches_conv2d(shape, dtype):
    x, wt, *_ = _inputs(shape, dtype, sum(shape) + 1)
    z = torch.ops.fastface.conv1x1_forward(x, wt)
    ref = F.conv2d(x.double(), wt.double())
    assert z.dtype == dtype and z.shape == ref.shape and z.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float64:
        torch.testing.assert_close(z, ref, atol=1e-12, rtol=1e-12)
    else:
        assert_fast_within_torch_error(z, F.conv2d(x, wt), ref, factor=4.0)
    zc = torch.ops.fastface.conv1x1_forward(x.contiguous(), wt)
    assert zc.is_contiguous() and torch.equal(zc, z.contiguous())


@needs_ext
def test_large_outputs_take_streaming_stores_and_results_do_not_depend_on_threads():
    """Outputs over simd::kStreamBytes (non-temporal stores, several tasks) are right, and grad_w's task partials
    merge in a fixed order: one, two and three threads give the same bits (three on a two-core box run unevenly,
    so threads done with their own share take tasks from the others': fastface::for_tasks)."""
    x, wt, gz, a, c = _inputs((8, 16, 96, 40, 40), torch.float32, 5)  # z: 9.8 MB, grad_x: 1.6 MB
    xw, ww, gzw, _, _ = _inputs((8, 96, 16, 40, 40), torch.float32, 6)  # grad_x: 9.8 MB
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outs.append((torch.ops.fastface.conv1x1_forward(x, wt), *torch.ops.fastface.conv1x1_backward(gz, x, wt, a, c),
                     *torch.ops.fastface.conv1x1_backward(gzw, xw, ww)))
    torch.set_num_threads(1)
    for one, *more in zip(*outs):
        assert all(torch.equal(one, m) for m in more)
    z, gx, gw, gx2, gw2 = outs[0]
    ref = F.conv2d(x.double(), wt.double())
    assert_fast_within_torch_error(z, F.conv2d(x, wt), ref, factor=4.0)
    rx, rw = _reference64(gz, x, wt, a, c)
    tx, tw = conv1x1_backward_reference(gz, x, wt, a, c)
    assert_fast_within_torch_error(gx, tx, rx, factor=4.0)
    assert_fast_within_torch_error(gw, tw, rw, factor=4.0)
    rx2, rw2 = _reference64(gzw, xw, ww, None, None)
    tx2, tw2 = conv1x1_backward_reference(gzw, xw, ww)
    assert_fast_within_torch_error(gx2, tx2, rx2, factor=4.0)
    assert_fast_within_torch_error(gw2, tw2, rw2, factor=4.0)


@needs_ext
def test_opcheck():
    x, wt, gz, a, c = _inputs((2, 5, 7, 3, 4), torch.float32, 3)
    torch.library.opcheck(torch.ops.fastface.conv1x1_forward.default, (x, wt))
    torch.library.opcheck(torch.ops.fastface.conv1x1_backward.default, (gz, x, wt, a, c, [True, True]))
    torch.library.opcheck(torch.ops.fastface.conv1x1_backward.default, (gz, x, wt, None, None, [False, True]))


@needs_ext
def test_errors_name_the_problem():
    x, wt, gz, a, c = _inputs((2, 5, 7, 3, 4), torch.float32, 4)
    bwd, fwd = torch.ops.fastface.conv1x1_backward, torch.ops.fastface.conv1x1_forward
    with pytest.raises(RuntimeError, match="weight must be Cout x Cin x 1 x 1"):
        fwd(x, torch.randn(7, 5, 3, 3))
    with pytest.raises(RuntimeError, match="does not take x's 5 channels"):
        bwd(gz, x, torch.randn(7, 4, 1, 1), None, None, [True, True])
    with pytest.raises(RuntimeError, match="is not the output of weight"):
        bwd(gz[:, :6], x, wt, None, None, [True, True])
    with pytest.raises(RuntimeError, match="a must be a 5 x 5"):
        bwd(gz, x, wt, torch.randn(4, 4), None, [True, True])
    with pytest.raises(RuntimeError, match="c must be a \\(5\\)"):
        bwd(gz, x, wt, a, torch.randn(6), [True, True])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        fwd(x.half(), wt.half())
    with pytest.raises(RuntimeError, match="must match x's dtype"):
        fwd(x, wt.double())
    assert any("not a groups-1 1x1 conv" in w for w in conv1x1_problems(x, torch.randn(7, 5, 3, 3)))
    assert any("float32/float64" in w for w in conv1x1_problems(x.half(), wt.half()))


ROUTE_PAIRS = [("fastface", "fastface"), ("aten", "fastface"), ("fastface", "aten"), ("gemm", "gemm"),
               ("gemm", "fastface"), ("aten", "gemm")]


@needs_ext
@pytest.mark.parametrize("routes", ROUTE_PAIRS, ids="-".join)
def test_function_gradcheck(routes):
    x, wt, *_ = _inputs((2, 3, 5, 3, 4), torch.float64, 7)
    assert torch.autograd.gradcheck(lambda a, b: Conv1x1Function.apply(a, b, *routes),
                                    (x.requires_grad_(), wt.requires_grad_()))


def test_function_gemm_routes_gradcheck_without_the_extension():
    """The GEMM routes are plain PyTorch: gradcheck holds on NCHW and channels_last inputs alike."""
    for cl in (True, False):
        x, wt, *_ = _inputs((2, 4, 3, 3, 5), torch.float64, 11, channels_last=cl)
        assert torch.autograd.gradcheck(lambda a, b: Conv1x1Function.apply(a, b, "gemm", "gemm"),
                                        (x.requires_grad_(), wt.requires_grad_()))


def test_function_rejects_an_unknown_route():
    x, wt, *_ = _inputs((1, 2, 3, 2, 2), torch.float32, 1)
    with pytest.raises(ValueError, match="route 'mkl' is not one of"):
        Conv1x1Function.apply(x, wt, "mkl", "aten")


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw_grad", "nchw"])
def test_gemm_forms_match_the_reference(shape, dtype, layout):
    """conv1x1_gemm_forward / _backward = F.conv2d and its ATen backward (float64 exact to rounding; float32 within
    PyTorch's own error of float64), channels_last out, masked-off outputs empty; a grad_out or x not channels_last
    is taken as well (copied into rows)."""
    x, wt, gz, *_ = _inputs(shape, dtype, sum(shape) + 3, channels_last=layout != "nchw")
    if layout == "nchw_grad":
        gz = gz.contiguous()
    z = conv1x1_gemm_forward(x, wt)
    assert z.shape == (shape[0], shape[2], shape[3], shape[4]) and z.dtype == dtype
    assert z.is_contiguous(memory_format=torch.channels_last)
    gx, gw = conv1x1_gemm_backward(gz, x, wt)
    rx, rw = _reference64(gz, x, wt, None, None)
    assert gx.shape == x.shape and gw.shape == wt.shape and gx.is_contiguous(memory_format=torch.channels_last)
    zr = F.conv2d(x.double(), wt.double())
    if dtype == torch.float64:
        for got, ref in ((z, zr), (gx, rx), (gw, rw)):
            torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    else:
        assert_fast_within_torch_error(z, F.conv2d(x, wt), zr)
        tx, tw = conv1x1_backward_reference(gz, x, wt)
        assert_fast_within_torch_error(gx, tx, rx)
        assert_fast_within_torch_error(gw, tw, rw)
    ex, ew = conv1x1_gemm_backward(gz, x, wt, (False, True))
    assert ex.numel() == 0 and torch.equal(ew, gw)
    ex, ew = conv1x1_gemm_backward(gz, x, wt, (True, False))
    assert ew.numel() == 0 and torch.equal(ex, gx)


def test_gemm_forms_take_an_empty_batch():
    """No pixels: an empty output of the right shape and a zero weight gradient (not a reshape error)."""
    x, wt, gz, *_ = _inputs((0, 5, 7, 3, 2), torch.float32, 2)
    assert conv1x1_gemm_forward(x, wt).shape == (0, 7, 3, 2)
    gx, gw = conv1x1_gemm_backward(gz, x, wt)
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(wt))


@needs_ext
@pytest.mark.parametrize("needs", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("routes", ROUTE_PAIRS, ids="-".join)
def test_function_matches_conv2d_forward_and_backward(needs, routes):
    x, wt, gz, *_ = _inputs((3, 16, 40, 5, 6), torch.float32, 8)
    x.requires_grad_(needs[0])
    wt.requires_grad_(needs[1])
    z = Conv1x1Function.apply(x, wt, *routes)
    zr = F.conv2d(x, wt)
    leaves = [t for t in (x, wt) if t.requires_grad]
    got, ref = torch.autograd.grad(z, leaves, gz), torch.autograd.grad(zr, leaves, gz)
    torch.testing.assert_close(z, zr, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_conv1x1_routes_by_the_measured_rule():
    """channels_last float32 maps under autograd take Conv1x1Function on conv1x1_routes' routes: the C++ kernels on
    the large small-channel maps (and the forward of the expanding convs below 28 x 28), the GEMMs for the rest
    below 28 x 28; wide maps of 28 x 28 and more, NCHW inputs, no grad: F.conv2d."""
    big = torch.randn(1, 16, 28, 28).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(96, 16, 1, 1, requires_grad=True)
    assert conv1x1_forward_pays(big, 96) and conv1x1_forward_pays(big[:, :, :14, :14], 96)
    assert conv1x1_backward_pays(big[:, :, :14, :14], 96) and not conv1x1_backward_pays(big[:, :, :7, :7], 96)
    assert conv1x1_forward_pays(big[:, :, :7, :7], 96) and not conv1x1_forward_pays(big[:, :, :4, :4], 96)
    proj14 = torch.randn(1, 192, 14, 14)  # a projection (cout < cin) below 28 x 28: the GEMM's forward
    assert not conv1x1_forward_pays(proj14, 32) and conv1x1_backward_pays(proj14, 32)
    assert conv1x1_routes(proj14, 32) == ("gemm", "fastface")
    assert conv1x1_routes(big[:, :, :7, :7], 96) == ("fastface", "gemm")
    assert conv1x1_routes(torch.randn(1, 960, 4, 4), 320) == ("gemm", "gemm")
    assert conv1x1_routes(big, 96) == ("fastface", "fastface")
    assert conv1x1_gemm_pays(proj14) and not conv1x1_gemm_pays(big)
    wide28 = torch.randn(1, 64, 28, 28)  # both sides wide at 28 x 28: oneDNN is at its peak there
    for pays in (conv1x1_forward_pays, conv1x1_backward_pays):
        assert not pays(wide28, 96)
    assert conv1x1_routes(wide28, 96) == ("aten", "aten")
    wide28 = wide28.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert type(conv1x1(wide28, w.detach()[:, :1].expand(96, 64, 1, 1).contiguous()).grad_fn).__name__ \
        == "ConvolutionBackward0"
    wide14 = torch.randn(1, 64, 14, 14)  # the forward pays there since its tasks are balanced, the backward not
    assert conv1x1_forward_pays(wide14, 96) and not conv1x1_backward_pays(wide14, 96)
    for small in (big[:, :, :7, :7], big[:, :, :4, :4]):
        small = small.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        ys = conv1x1(small, w)  # the forward's kernel or the GEMM, the GEMMs' backward
        assert (type(ys.grad_fn).__name__ == "Conv1x1FunctionBackward") == HAS_EXT
        gz = torch.randn_like(ys)
        got = torch.autograd.grad(ys, (small, w), gz)
        ref = torch.autograd.grad(F.conv2d(small, w), (small, w), gz)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    y = conv1x1(big, w)
    assert (type(y.grad_fn).__name__ == "Conv1x1FunctionBackward") == HAS_EXT
    assert type(conv1x1(big.detach().contiguous().requires_grad_(), w).grad_fn).__name__ != "Conv1x1FunctionBackward"
    with torch.no_grad():
        torch.testing.assert_close(conv1x1(big, w), F.conv2d(big, w))


def test_backward_wrapper_falls_back_to_the_reference():
    """conv1x1_backward takes what the kernel cannot (bfloat16) through the reference."""
    x, wt, gz, a, c = _inputs((2, 4, 6, 3, 3), torch.float64, 9)
    b = [t.bfloat16() for t in (gz, x, wt, a, c)]
    assert conv1x1_problems(b[1], b[2])
    gx, gw = conv1x1_backward(*b)
    rx, rw = _reference64(*[t.double() for t in b])
    assert gx.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(gx.double(), rx, atol=0.1, rtol=0.02)
    torch.testing.assert_close(gw.double(), rw, atol=0.1, rtol=0.02)
