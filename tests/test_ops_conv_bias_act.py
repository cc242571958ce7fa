"""fastface.ops.conv_bias_act: the C++ kernel against the PyTorch reference, layouts, grads, opcheck, dispatch."""
from __future__ import annotations

import pytest
import torch

from fastface._ext import HAS_EXT
from fastface.ops import BackendUnavailable, conv_bias_act, conv_bias_act_reference, pack_conv_weight, use_backend
from helpers import assert_fast_within_torch_error, assert_layout_follows_input

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="fastface._C not built")

# Tiny ops: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

# N, Cin, Cout, H, W, k, stride, padding, groups
SHAPES = [
    (1, 4, 32, 56, 56, 3, 2, 1, 1),      # the face stem (at half size)
    (2, 24, 136, 4, 4, 1, 1, 0, 1),      # the last 1x1 conv, Cout not a multiple of 16
    (3, 37, 19, 1, 1, 1, 1, 0, 1),       # the head's linear layer as a 1x1 conv on a 1x1 map
    (2, 3, 17, 13, 13, 3, 1, 1, 1),      # odd sizes and channels
    (1, 6, 10, 7, 7, 3, 2, 1, 2),        # two groups (the split stems' layout)
    (2, 5, 7, 9, 11, 5, 2, 2, 1),        # 5x5, non-square image
    (1, 8, 6, 9, 11, 1, 2, 0, 2),        # strided 1x1 with groups: the im2col path
    (1, 3, 40, 8, 7, 3, 3, 0, 1),        # no padding, stride 3
    (70, 16, 24, 3, 3, 1, 1, 0, 1),      # many images: row chunks across images
]


def _ids(s):
    n, cin, cout, h, w, k, st, p, g = s
    return f"n{n}_{cin}-{cout}_{h}x{w}_k{k}s{st}p{p}g{g}"


def _inputs(shape, dtype, seed, channels_last=False, requires_grad=False):
    n, cin, cout, h, w, k, stride, pad, groups = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(cout, cin // groups, k, k, generator=gen, dtype=torch.float64) * (cin // groups * k * k) ** -0.5)
    b = torch.randn(cout, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    return (x.requires_grad_(requires_grad), wt.to(dtype).requires_grad_(requires_grad),
            b.to(dtype).requires_grad_(requires_grad), stride, pad, groups)


@needs_ext
@pytest.mark.parametrize("relu6", [True, False], ids=["relu6", "linear"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_cpp_matches_reference(shape, channels_last, relu6):
    seed = abs(hash((shape, channels_last, relu6))) % 2**31  # fresh inputs per case
    args = (*_inputs(shape, torch.float32, seed, channels_last), relu6)
    with use_backend("cpp"):
        y = conv_bias_act(*args)
    ref64 = conv_bias_act_reference(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    assert y.shape == ref64.shape and y.dtype == torch.float32
    assert_layout_follows_input(y, args[0], channels_last)
    assert_fast_within_torch_error(y, conv_bias_act_reference(*args), ref64)
    args64 = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
    with use_backend("cpp"):
        torch.testing.assert_close(conv_bias_act(*args64), ref64, atol=1e-12, rtol=1e-12)


@needs_ext
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[4]], ids=_ids)
def test_packed_weight_gives_the_same_result(shape):
    """The model passes its cached weight in the kernel's layout (a view): same values, bit for bit."""
    x, w, b, *rest = _inputs(shape, torch.float32, 7, channels_last=True)
    pw = pack_conv_weight(w)
    assert pw.shape == w.shape and torch.equal(pw, w) and not pw.is_contiguous()
    with use_backend("cpp"):
        assert torch.equal(conv_bias_act(x, w, b, *rest, True), conv_bias_act(x, pw, b, *rest, True))


@needs_ext
@pytest.mark.parametrize("shape", [(1, 4, 32, 112, 112, 3, 2, 1, 1), (2, 320, 1280, 4, 4, 1, 1, 0, 1)], ids=_ids)
def test_result_does_not_depend_on_thread_count(shape):
    """Tasks change with the thread count; each output is still summed in the same order."""
    args = (*_inputs(shape, torch.float32, 3, channels_last=True), True)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, 2):
            torch.set_num_threads(n)
            outs.append(torch.ops.fastface.conv_bias_act(*args))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_ext
@pytest.mark.parametrize("relu6", [True, False], ids=["relu6", "linear"])
@pytest.mark.parametrize("shape", [(2, 4, 5, 5, 6, 3, 2, 1, 1), (1, 4, 6, 4, 3, 1, 1, 0, 2)], ids=_ids)
def test_gradcheck_float64(shape, relu6):
    x, w, b, *rest = _inputs(shape, torch.float64, 11, requires_grad=True)
    # Keep pre-activations away from ReLU6's kinks, where finite differences are not the gradient.
    with torch.no_grad():
        y = conv_bias_act_reference(x, w, b, *rest, False)
        b += torch.where((y - y.round()).abs().amin((0, 2, 3)) < 0.05, 0.1, 0.0)

    def f(x, w, b):
        with use_backend("cpp"):
            return conv_bias_act(x, w, b, *rest, relu6)

    assert torch.autograd.gradcheck(f, (x, w, b))


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(1, 4, 5, 6, 5, 3, 2, 1, 1), (2, 6, 4, 3, 3, 1, 1, 0, 2)], ids=_ids)
def test_opcheck(shape, channels_last):
    args = (*_inputs(shape, torch.float64, 5, channels_last, requires_grad=True), True)
    torch.library.opcheck(torch.ops.fastface.conv_bias_act.default, args)


def test_dispatch_reasons_and_reference_fallback():
    x, w, b, *rest = _inputs((1, 4, 8, 6, 6, 3, 1, 1, 1), torch.float32, 1)
    reasons = conv_bias_act.reasons(x.half(), w.half(), b.half(), *rest, True)
    assert any("float16" in r for r in reasons["cpp"]) and reasons["reference"] == []
    assert conv_bias_act.select(x.bfloat16(), w.bfloat16(), b.bfloat16(), *rest, True) == "reference"
    if HAS_EXT:
        assert conv_bias_act.select(x, w, b, *rest, True) == "cpp"


@needs_ext
def test_bad_arguments_are_named():
    x, w, b, *rest = _inputs((1, 4, 8, 6, 6, 3, 1, 1, 1), torch.float32, 1)
    with use_backend("cpp"), pytest.raises(BackendUnavailable, match=r"bias must be \(8,\)"):
        conv_bias_act(x, w, b[:5], *rest, True)
    with pytest.raises(RuntimeError, match="input channels per group"):
        torch.ops.fastface.conv_bias_act(x[:, :3], w, b, 1, 1, 1, True)
    with pytest.raises(RuntimeError, match="kernel larger"):
        torch.ops.fastface.conv_bias_act(x[:, :, :2, :2], w, b, 1, 0, 1, True)


def test_forcing_a_backend_the_op_lacks_keeps_the_automatic_choice():
    """conv_bias_act has no CUDA or Triton kernel: a model forced to those backends keeps running it."""
    x, w, b = torch.randn(2, 3, 9, 9), torch.randn(8, 3, 3, 3), torch.randn(8)
    auto = conv_bias_act.select(x, w, b, 1, 1, 1, True)
    for forced in ("cuda", "triton"):
        with use_backend(forced):
            assert conv_bias_act.select(x, w, b, 1, 1, 1, True) == auto
            torch.testing.assert_close(conv_bias_act(x, w, b, 1, 1, 1, True),
                                       conv_bias_act_reference(x, w, b, 1, 1, 1, True), atol=1e-5, rtol=1e-5)
    with use_backend("reference"):
        assert conv_bias_act.select(x, w, b, 1, 1, 1, True) == "reference"
