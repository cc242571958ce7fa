"""Models from ArchSpecs: shapes, counts, folded inference, and exact replicate / re-split."""
from __future__ import annotations

import pytest
import torch

from fastface.arch import ArchSpec
from fastface.eval.cost import count, spec_cost
from fastface.models import build_model, folded_eval, list_models, replicate, resplit, spec_by_name
from helpers import assert_fast_within_torch_error


# Tiny ops and networks: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights and random BN statistics (so BN is far from the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype == torch.long:
                continue
            if "running_var" in name:
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            elif "running_mean" in name:
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.2)
            elif name.endswith("bn.weight") or name.endswith("bn.bias"):
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5 + (1.0 if "weight" in name else 0))
            else:
                fan = max(1, t[0].numel())
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) / fan ** 0.5)
    return model


def small_face(**kw) -> ArchSpec:
    """The face layout at a smaller input, so fp64 tests stay quick."""
    return ArchSpec.face(input_size=kw.pop("input_size", 48), **kw)


def test_mobilenetv2_published_counts():
    spec = ArchSpec.mobilenetv2()
    model = build_model(spec)
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    c = count(spec)
    assert c.params == 3_504_872
    assert 299e6 < c.macs < 302e6  # published: ~300M MACs at 224x224


@pytest.mark.parametrize("spec", [
    ArchSpec.mobilenetv2(), ArchSpec.face(), ArchSpec.face(split=1), ArchSpec.face(split=5, merge="concat"),
    ArchSpec.face(width=0.5, head="pool"), ArchSpec.face(split=18, width=1.4).with_replica(7),
    ArchSpec.face(inputs={"rgb": 3}),
])
def test_closed_form_cost_matches_module_count(spec):
    c = count(spec)
    assert spec_cost(spec) == (c.params, c.macs)
    assert c.params == sum(p.numel() for p in build_model(spec).parameters())
    # Every layer reports its real output, split branches too (they run grouped, not module by module).
    layers = {li.index: li for li in spec.layers()}
    for lc, li in zip([lc for lc in c.layers if lc.name.startswith(("stem", "block"))],
                      [layers[i] for i in sorted(layers) for _ in range(len(spec.inputs) if i < spec.split else 1)]):
        assert (lc.cout, lc.out_size) == (li.cout, (li.size_out, li.size_out)), lc


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_backward_shapes_every_preset(name, channels_last):
    spec = spec_by_name(name, input_size=64)
    model = build_model(spec)
    x = torch.randn(3, spec.in_channels, 64, 64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    y = model(x)
    assert y.shape == (3, spec.head.dim)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (3, spec.head.dim)


def test_split_model_forward_shapes():
    for k in (1, 4, 18):
        for merge in ("add", "concat"):
            spec = small_face(split=k, merge=merge)
            y = build_model(spec)(torch.randn(2, 4, 48, 48))
            assert y.shape == (2, 512)


def test_bad_input_shape_is_named():
    model = build_model(small_face())
    with pytest.raises(ValueError, match=r"N x 4 x H x W \(rgb:3\+depth:1\), got \(2, 3, 48, 48\)"):
        model(torch.randn(2, 3, 48, 48))


def test_folded_inference_equals_unfolded():
    """float64: equal to 1e-10; float32: within 2x the unfused float32 error against float64 (the
    fused path rounds differently, so a fixed float32 tolerance would only measure luck)."""
    model = randomize(build_model(small_face(split=2)).double(), 0).eval()
    x = torch.randn(2, 4, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(x)
        with folded_eval(False):
            ref = model(x)
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=0)
        model32 = model.float()
        fast32 = model32(x.float())
        with folded_eval(False):
            ref32 = model32(x.float())
    assert_fast_within_torch_error(fast32, ref32, ref)


class _Spy:
    """Counts calls of a model-level op (fastface.models.mobilenetv2.<name>) and the groups it ran."""

    def __init__(self, monkeypatch, name):
        import fastface.models.mobilenetv2 as mnv2

        self.calls, real = [], getattr(mnv2, name)

        def spy(*args):
            self.calls.append(args)
            return real(*args)

        monkeypatch.setattr(mnv2, name, spy)


def _grouped_layers(spec):
    return max(spec.split - 1, 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("split,merge,channels_last", [(0, "add", True), (1, "add", True), (1, "concat", False),
                                                       (4, "add", False), (5, "concat", True)])
def test_fused_eval_equals_unfused_one_call_per_layer(monkeypatch, dtype, split, merge, channels_last):
    """Eval: one ir_block per block layer, the branches of a split layer as one grouped call."""
    spec = small_face(split=split, merge=merge, width=0.5, input_size=32)
    model = randomize(build_model(spec).double(), split + 1).eval()
    x = torch.randn(3, 4, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(split))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), folded_eval(False):
        ref64 = model(x)
    model, x = model.to(dtype), x.to(dtype)
    spy = _Spy(monkeypatch, "ir_block")
    with torch.no_grad():
        fast = model(x)
        with folded_eval(False):
            ref = model(x)
    if dtype == torch.float64:
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=0)
    else:
        assert_fast_within_torch_error(fast, ref, ref64)
    g = _grouped_layers(spec)  # branch layers 1 .. split-1, one grouped call each
    assert [c[-1] for c in spy.calls] == [2] * g + [1] * (len(spec.blocks) - g)


def test_cached_folded_weights_follow_parameter_changes():
    model = randomize(build_model(small_face(split=3, input_size=32, width=0.5)).double(), 0).eval()
    x = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        randomize(model, 1)  # in-place copies: version counters move, the caches must notice
        after = model(x)
        with folded_eval(False):
            ref = model(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, atol=1e-10, rtol=0)
    # A dtype move replaces every tensor.
    model = model.float()
    with torch.no_grad():
        torch.testing.assert_close(model(x.float()), ref.float(), atol=2e-5, rtol=0)


def test_eval_forward_is_differentiable():
    """With autograd on, folding is recomputed in the graph: gradients reach every parameter."""
    model = randomize(build_model(small_face(split=2, input_size=32, width=0.5)).double(), 2).eval()
    x = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    import copy

    plain = copy.deepcopy(model)
    model(x).square().sum().backward()
    with folded_eval(False):
        plain(x).square().sum().backward()
    _assert_grads_close(plain, model, rtol=1e-9)


def _train_and_compare(ref, fused, x, steps=2, atol=1e-9):
    """Train steps (forward + backward, no update) of the plain and the fused model on the same data."""
    import copy

    from fastface.models.mobilenetv2 import fused_train

    # The conditioning probe: the plain modules on x moved by about one rounding. How far its gradients
    # land from ref's is the float64 noise this net amplifies; the fused path may differ by a few times that.
    probe = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(12345)
    x_probe = x * (1 + torch.finfo(x.dtype).eps * torch.randn(x.shape, dtype=x.dtype, generator=g))
    x_probe = x_probe.detach().requires_grad_(x.requires_grad)  # a leaf like x (steps backward through it again)
    for step in range(steps):
        gy = None
        for model, on, inp in ((ref, False, x), (fused, True, x), (probe, False, x_probe)):
            model.train().zero_grad()
            with fused_train(on):
                y = model(inp)
            gy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(step)) if gy is None else gy
            y.backward(gy)
            if on:  # relative to the output's scale: see _assert_grads_close on conditioning
                torch.testing.assert_close(y, y_ref, atol=1e-6 * y_ref.abs().max().item(), rtol=0)
            elif model is ref:
                y_ref = y.detach()
        _assert_grads_close(ref, fused, noise=probe)
        for (name, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers()):
            torch.testing.assert_close(b, a, atol=atol, rtol=1e-6, msg=name)


def _assert_grads_close(ref, fused, rtol=1e-6, noise=None, noise_factor=30.0):
    """Gradients equal to rtol relative to each tensor's scale, floored at 1e-3 of the largest gradient:
    randomized BN nets are ill-conditioned (float64 rounding shows up at ~1e-9), and a BN shift feeding
    another training-mode BN has a true gradient of 0 that both paths only approximate by rounding noise.
    With ``noise`` (the plain model run on an input moved by one rounding), the bound also admits
    noise_factor times that model's own spread: some random draws amplify one ulp of input to ~1e-6, and the
    fused path rounds differently at every op, not once (30: 30 draws came within 6.4x of one probe)."""
    top = max(p.grad.abs().max().item() for p in ref.parameters())
    probes = dict(noise.named_parameters()) if noise is not None else {}
    for (name, p), (_, q) in zip(ref.named_parameters(), fused.named_parameters()):
        scale = max(p.grad.abs().max().item(), 1e-3 * top)
        spread = (probes[name].grad - p.grad).abs().max().item() if name in probes else 0.0
        bound = max(rtol * scale, noise_factor * spread)
        err = (q.grad - p.grad).abs().max().item()
        assert err <= bound, (f"{name}: gradient error {err:.3e} > max({rtol} x {scale:.3e}, "
                              f"{noise_factor} x input-rounding spread {spread:.3e})")


@pytest.mark.parametrize("split,merge,channels_last", [(0, "add", True), (3, "add", False), (4, "concat", True)])
def test_fused_training_equals_unfused(monkeypatch, split, merge, channels_last):
    """Training with dwconv_bn_act (the GPU / compile path, forced on the CPU): outputs, every gradient
    and the BN running statistics match the plain modules."""
    import copy

    from fastface.models.mobilenetv2 import cpu_bn_act

    spec = small_face(split=split, merge=merge, width=0.35, input_size=32)
    ref = randomize(build_model(spec).double(), 3)
    fused = copy.deepcopy(ref)
    x = torch.randn(3, 4, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(SEED + split))
    if channels_last:
        ref, fused = (m.to(memory_format=torch.channels_last) for m in (ref, fused))
        x = x.contiguous(memory_format=torch.channels_last)
    spy = _Spy(monkeypatch, "dwconv_bn_act")
    with cpu_bn_act(False):
        _train_and_compare(ref, fused, x)
    # One call per block layer and step: the branch copies of a split layer share one (grouped) call.
    assert len(spy.calls) == 2 * len(spec.blocks)
    g = _grouped_layers(spec)
    branch_layers = spec.layers()[1:spec.split]
    assert [c[0].shape[1] for c in spy.calls[:g]] == [2 * li.hidden for li in branch_layers]
    assert all(int(b) == 2 for n, b in fused.named_buffers() if n.endswith("num_batches_tracked"))


def _act_dw_folds(li) -> bool:
    """Whether the model folds block li's expand BN + ReLU6 into its depthwise conv (the measured rule)."""
    from fastface.ops.dwconv_train import bn_act_dwconv_pays

    return bn_act_dwconv_pays(torch.empty(1, 1, li.size_in, li.size_in), li.stride)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("split,merge,x_grad", [(0, "add", False), (1, "add", False), (1, "add", True),
                                                (1, "concat", False), (3, "add", False), (4, "concat", False)])
def test_bn_act_training_equals_unfused(monkeypatch, dtype, split, merge, x_grad):
    """Training on eager CPU (channels_last): ATen convs + one bn_act per BN (residual add folded in; the two
    stems' add merge as one stems_bn_add_act, convs included, or, with an input that needs a gradient, as ATen's
    convs + one bn_add_act); outputs, every gradient and the running statistics match the plain modules."""
    import copy

    spec = small_face(split=split, merge=merge, width=0.35, input_size=32)
    torch.manual_seed(SEED + split)
    ref = build_model(spec).to(dtype)
    if dtype == torch.float64:  # float32: the initialised net (a randomized one is too ill-conditioned at batch 4
        ref = randomize(ref, 3)  # for float32 rounding to compare two orders of the same sums)
    ref = ref.to(memory_format=torch.channels_last)
    fused = copy.deepcopy(ref)
    x = torch.randn(4, 4, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(SEED + split))
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(x_grad)
    bn_spy, dw_spy = _Spy(monkeypatch, "bn_act"), _Spy(monkeypatch, "dwconv_bn_act")
    stems_spy = _Spy(monkeypatch, "stems_bn_add_act")
    act_dw_spy, gdc_spy = _Spy(monkeypatch, "_bn_act_dwconv_train"), _Spy(monkeypatch, "_gdc_head_train")
    add_spy, tail_spy = _Spy(monkeypatch, "bn_add_act"), _Spy(monkeypatch, "_stage_bn_act_train")
    if dtype == torch.float64:
        _train_and_compare(ref, fused, x)
    else:
        _train_and_compare_f32(ref, fused, x)
    assert not dw_spy.calls
    # Every BatchNorm2d of the trunk, stems and last conv runs in bn_act, except a block's expand BN, which
    # runs folded into its depthwise conv (_bn_act_dwconv_train) where that pays (bn_act_dwconv_pays; this
    # net has both kinds); grouped branch layers (split >= 2) run one call per BN position for all branches;
    # a concat merge's BN stays the plain module; the two stems of an add merge at split 1 run as one
    # stems_bn_add_act (one bn_add_act after ATen's convs when the input needs a gradient);
    # a block's depthwise BN runs under DwBNActFunction (_stage_bn_act_train), not as a bn_act call, where its
    # conv is the C++ forward: after an expand BN folded into it, or alone where that pays (stride 1,
    # >= 28 x 28).
    from fastface.models.mobilenetv2 import ConvBNAct

    g = len(spec.inputs)
    n_conv = sum(isinstance(m, ConvBNAct) for m in fused.modules())
    grouped_layers = [fused.layer(j, mod) for j in range(1, spec.split) for mod in spec.inputs]
    grouped = sum(isinstance(m, ConvBNAct) for layer in grouped_layers for m in layer.modules())
    expand = [li for li in spec.layers() if li.kind == "block" and li.expand]
    folded = sum(_act_dw_folds(li) for li in expand)  # one call per layer: branch copies run grouped
    assert 0 < folded < len(expand) and len(act_dw_spy.calls) == 2 * folded
    assert len(gdc_spy.calls) == 2  # the GDC head's global depthwise conv as a weighted sum
    stems_added = g if (split == 1 and merge == "add" and g == 2) else 0
    assert len(add_spy.calls) == 2 * (stems_added > 0 and x_grad)
    assert len(stems_spy.calls) == 2 * (stems_added > 0 and not x_grad)
    tails = sum(_act_dw_folds(li) if li.expand else (li.stride == 1 and li.size_in >= 28)
                for li in spec.layers() if li.kind == "block")
    assert 0 < tails and len(tail_spy.calls) == 2 * tails
    assert len(bn_spy.calls) == 2 * (n_conv - grouped + grouped // g - folded - stems_added - tails)
    assert all(int(b) == 2 for n, b in fused.named_buffers() if n.endswith("num_batches_tracked"))


@pytest.mark.parametrize("split,merge", [(0, "add"), (1, "add"), (3, "add")])
def test_expand_dwconv_training_equals_unfused(monkeypatch, split, merge):
    """Eager CPU training with the expand BN folded into the 1x1 conv's algebra (ExpandDwConvFunction, routed here
    for every map where the depthwise kernels take it, as the measured threshold would route the face model's
    28 x 28 and 56 x 56 layers): outputs, every gradient and the running statistics match the plain modules, the
    branch copies of a split layer included (grouped 1x1 conv)."""
    import copy

    import fastface.models.mobilenetv2 as mv

    monkeypatch.setattr(mv, "expand_dwconv_pays", lambda x: True)
    spec = small_face(split=split, merge=merge, width=0.35, input_size=32)
    ref = randomize(build_model(spec).double(), 3).to(memory_format=torch.channels_last)
    fused = copy.deepcopy(ref)
    x = torch.randn(4, 4, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(SEED + split))
    x = x.contiguous(memory_format=torch.channels_last)
    spy, act_dw_spy = _Spy(monkeypatch, "_expand_dwconv_train"), _Spy(monkeypatch, "_bn_act_dwconv_train")
    _train_and_compare(ref, fused, x)
    expand = [li for li in spec.layers() if li.kind == "block" and li.expand]
    folded = sum(_act_dw_folds(li) for li in expand)
    assert 0 < folded and len(spy.calls) == 2 * folded and not act_dw_spy.calls
    if split >= 3:  # a grouped branch layer folded too
        assert any(c[3] > 1 for c in spy.calls)


@pytest.mark.parametrize("cpp", [True, False], ids=["cpp", "python"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
def test_update_running_stats_matches_batchnorm2d(monkeypatch, cpp, momentum):
    """The fused path's running-statistics update (the C++ op on the CPU, the Python path on other devices and under
    compile) leaves float64 BNs where nn.BatchNorm2d's own training forward does, two BNs over one tensor's slices."""
    import copy

    import fastface.models.mobilenetv2 as mv
    from fastface._ext import HAS_EXT

    if cpp and not HAS_EXT:
        pytest.skip("fastface._C not built")
    if not cpp:
        monkeypatch.setattr(mv, "has_op", lambda name: False)
    g = torch.Generator().manual_seed(5)
    refs = [torch.nn.BatchNorm2d(c, momentum=momentum).double().train() for c in (3, 4)]
    mine = copy.deepcopy(refs)
    for step in range(3):
        x = torch.randn(4, 7, 3, 2, generator=g, dtype=torch.float64) * (step + 1) + step
        refs[0](x[:, :3])
        refs[1](x[:, 3:])
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        mv._update_running_stats(mine, mean, torch.rsqrt(var + 1e-5), x.numel() // 7)
    for a, b in zip(mine, refs):
        torch.testing.assert_close(a.running_mean, b.running_mean, atol=1e-13, rtol=1e-13)
        torch.testing.assert_close(a.running_var, b.running_var, atol=1e-13, rtol=1e-13)
        assert int(a.num_batches_tracked) == 3


SEED = 0


def _train_and_compare_f32(ref, fused, x, steps=2):
    """float32: each step's output, gradients and running statistics of the fused path are as close to a
    float64 run of the plain modules as float32 PyTorch's (flash-attention rule: a randomized BN net at
    batch 3 is ill-conditioned, so a fixed tolerance would test the net, not the kernels). PyTorch's own
    error is taken as the larger of its runs on x and on x moved by one rounding (assert_fast_within_torch_error's
    torch_probe): on this net it swings 4x between such neighbouring inputs (3e-3 .. 1.4e-2 on the output)."""
    import copy

    from fastface.models.mobilenetv2 import fused_train

    ref64, probe = copy.deepcopy(ref).double(), copy.deepcopy(ref)
    xp = x * (1 + torch.finfo(x.dtype).eps * torch.randn(x.shape, generator=torch.Generator().manual_seed(7)))
    xp = xp.detach().requires_grad_(x.requires_grad)  # a leaf like x (steps backward through it again)
    for step in range(steps):
        outs, gy = [], None
        for model, on, inp in ((ref64, False, x), (ref, False, x), (fused, True, x), (probe, False, xp)):
            model.train().zero_grad()
            with fused_train(on):
                y = model(inp.to(next(model.parameters()).dtype))
            if gy is None:
                gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            y.backward(gy.to(y.dtype))
            outs.append(y.detach())
        assert_fast_within_torch_error(outs[2], outs[1], outs[0], factor=4.0, floor=1e-5, torch_probe=outs[3])
        top = max(q.grad.abs().max().item() for q in ref64.parameters())
        for p64, p32, pf, pp in zip(ref64.parameters(), ref.parameters(), fused.parameters(), probe.parameters()):
            assert_fast_within_torch_error(pf.grad, p32.grad, p64.grad, factor=4.0, floor=1e-4 * top,
                                           torch_probe=pp.grad)
        for b64, b32, bf, bp in zip(ref64.buffers(), ref.buffers(), fused.buffers(), probe.buffers()):
            if b64.dtype.is_floating_point:
                assert_fast_within_torch_error(bf, b32, b64, factor=4.0, floor=1e-5, torch_probe=bp)
            else:
                assert torch.equal(bf, b32), name


def test_bn_act_training_nchw_uses_the_plain_modules(monkeypatch):
    import copy

    spec = small_face(split=1, width=0.35, input_size=32)
    ref = randomize(build_model(spec).double(), 5)
    fused = copy.deepcopy(ref)
    spy = _Spy(monkeypatch, "bn_act")
    _train_and_compare(ref, fused, torch.randn(3, 4, 32, 32, dtype=torch.float64))
    assert all(c[0].shape[-2:] == (1, 1) for c in spy.calls)  # only maps whose memory is NHWC as well


def test_branch_inputs_are_dense_in_the_models_layout():
    """A splitting model hands each stem its channels dense in the model's layout, from an NCHW or a channels_last
    batch alike (the trainer leaves the batch NCHW for it): the same training output either way."""
    import copy

    cl = torch.channels_last
    spec = small_face(split=1, width=0.35, input_size=32)
    nhwc = build_model(spec).to(memory_format=cl).train()
    nchw = copy.deepcopy(nhwc).to(memory_format=torch.contiguous_format)
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(SEED))
    assert nhwc.splits_input and not build_model(small_face(split=0, width=0.35, input_size=32)).splits_input
    for model, fmt in ((nhwc, cl), (nchw, torch.contiguous_format)):
        for batch in (x, x.contiguous(memory_format=cl)):
            parts = model._branch_inputs(batch)
            assert [p.shape[1] for p in parts] == [3, 1]
            assert all(p.is_contiguous(memory_format=fmt) for p in parts)
            assert torch.equal(torch.cat(parts, 1), x)
    assert torch.equal(nhwc(x), nhwc(x.contiguous(memory_format=cl)))


@pytest.mark.parametrize("kernel", ["dwconv_bn_act", "bn_act"])
def test_fused_training_cumulative_average_and_frozen_bn(monkeypatch, kernel):
    """momentum=None (cumulative running average), and a BN frozen in eval mode inside a training net."""
    import copy

    from fastface.models.mobilenetv2 import cpu_bn_act

    ref = randomize(build_model(small_face(split=3, width=0.35, input_size=32)).double(), 4)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    x = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    if kernel == "bn_act":  # its fast layout; NCHW runs the plain modules
        ref = ref.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fused = copy.deepcopy(ref)
    spy = _Spy(monkeypatch, kernel)
    with cpu_bn_act(kernel == "bn_act"):
        _train_and_compare(ref, fused, x, steps=3)
        ref.layer(3).dw.bn.eval()  # a frozen BN: the plain module path must take over (exactly)
        fused.layer(3).dw.bn.eval()
        _train_and_compare(ref, fused, x, steps=1)
    assert spy.calls


def test_fused_training_rejects_a_single_value_per_channel_like_batchnorm():
    model = build_model(small_face(input_size=32, width=0.35)).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        model(torch.randn(1, 4, 32, 32))


def _check_same_function(parent, child, dtype, atol, seed=0):
    x = torch.randn(3, parent.spec.in_channels, parent.spec.input_size, parent.spec.input_size, dtype=dtype,
                    generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(child(x), parent(x), atol=atol, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("split,block", [(0, 0), (0, 1), (0, 5), (3, 0), (3, 1), (3, 6), (1, 16), (6, 3)])
def test_replicate_is_function_preserving(dtype, atol, split, block):
    parent = randomize(build_model(small_face(split=split)).to(dtype), split * 31 + block).eval()
    child = replicate(parent, block)
    assert child.spec == parent.spec.with_replica(block)
    assert len(child.spec.blocks) == len(parent.spec.blocks) + 1
    _check_same_function(parent, child.eval(), dtype, atol)
    # The copy is live: it has its own parameters that change the output once trained.
    copy = child.layer(block + 2, "rgb" if block + 2 < child.spec.split else None)
    assert copy.use_res and copy.project.bn.weight.abs().sum() == 0


def test_replicate_chain_and_concat_merge():
    parent = randomize(build_model(small_face(split=4, merge="concat")).double(), 5).eval()
    child = replicate(replicate(replicate(parent, 2), 2), 10)
    _check_same_function(parent, child.eval(), torch.float64, 1e-10)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_split_at_one_is_exact_both_ways(dtype, atol):
    fused = randomize(build_model(small_face(split=0)).to(dtype), 7).eval()
    split1 = resplit(fused, 1).eval()
    assert split1.spec.split == 1 and split1.branches is not None
    _check_same_function(fused, split1, dtype, atol)
    # Train the split copy a little so the two branches' BNs differ, then merge back.
    randomize(split1, 8)
    fused_again = resplit(split1, 0).eval()
    _check_same_function(split1, fused_again, dtype, atol)


@pytest.mark.parametrize("src,dst,merge", [(1, 4, "add"), (4, 2, "add"), (0, 3, "concat"), (3, 0, "add")])
def test_deeper_resplit_is_a_warm_start(src, dst, merge):
    """Not exact (see fastface.models.mobilenetv2): weights move, the spec is right, outputs finite."""
    parent = randomize(build_model(small_face(split=src)).double(), 3).eval()
    child = resplit(parent, dst, merge).eval()
    assert child.spec == parent.spec.with_split(dst, merge)
    x = torch.randn(2, 4, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        assert torch.isfinite(child(x)).all()
    # Layers past both split points are shared in both networks and must have been copied.
    j = max(src, dst) + 1
    torch.testing.assert_close(child.layer(j).dw.conv.weight, parent.layer(j).dw.conv.weight)


def _compile_spec() -> ArchSpec:
    """Small but complete: split stems, two grouped branch layers (t = 1 and residual), a stride-2 block."""
    from fastface.arch import BlockSpec, HeadSpec, StemSpec

    return ArchSpec(stem=StemSpec(8, 3, 2), blocks=(BlockSpec(1, 8), BlockSpec(4, 8), BlockSpec(4, 16, 2)), split=3,
                    head=HeadSpec("pool", 16, 32), input_size=16, name="compile_test")


@pytest.mark.slow
def test_torch_compile_with_fastface_ops():
    """The eval path calls torch.ops.fastface.ir_block (grouped for the branches): it must trace
    under torch.compile with fullgraph=True and give the eager result."""
    model = randomize(build_model(_compile_spec()), 1).eval()
    x = torch.randn(2, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), ref, atol=1e-5, rtol=1e-5)


def test_torch_compile_is_one_graph_before_any_eager_call(monkeypatch):
    """The trainer compiles before any eager call: the extension's dispatcher queries (kernel_for) are
    compile-time constants, so training and eval trace as one graph each (they used to break the graph
    at every block and hit dynamo's recompile limit)."""
    import importlib

    from fastface.models.mobilenetv2 import fused_train

    irb = importlib.import_module("fastface.ops.ir_block")  # the module (fastface.ops.ir_block is also the op)
    torch._dynamo.reset()
    monkeypatch.setattr(irb, "_KERNELS", {})  # nothing answered yet, as in a fresh process
    model = randomize(build_model(_compile_spec()), 3).train()
    x = torch.randn(2, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    with fused_train(True):
        explained = torch._dynamo.explain(model)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    monkeypatch.setattr(irb, "_KERNELS", {})
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model.eval())(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
def test_torch_compile_training_with_fused_dwconv_bn_act():
    """Training under torch.compile traces the dwconv_bn_act autograd path (grouped branches too) in
    one graph; outputs, gradients and running statistics match eager. aot_eager: the tracing is what
    is ours to test, and inductor's C++ codegen would triple the time."""
    import copy

    eager = randomize(build_model(_compile_spec()).double(), 2).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 4, 16, 16, dtype=torch.float64)
    ye, yc = eager(x), compiled(x)
    torch.testing.assert_close(yc, ye, atol=1e-10, rtol=1e-10)
    ye.square().sum().backward()
    yc.square().sum().backward()
    _assert_grads_close(eager, compiled_model)
    for (n, a), (_, b) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10, msg=n)


def test_gpu_kernels_pay_follows_the_h200_measurements(monkeypatch):
    """On CUDA the fused ops run only where bench/gpu_check.sh measured them faster than cuDNN, or when forced."""
    from types import SimpleNamespace

    from fastface.models.mobilenetv2 import gpu_kernels_pay
    from fastface.ops import use_backend

    def cuda(h):  # what the routing reads of a CUDA tensor (no GPU here)
        return SimpleNamespace(device=torch.device("cuda", 0), shape=(64, 960, h, h), dim=lambda: 4)

    monkeypatch.delenv("FASTFACE_BACKEND", raising=False)
    assert not any(gpu_kernels_pay(cuda(h)) for h in (7, 14, 56))
    assert gpu_kernels_pay(torch.zeros(1, 4, 56, 56))  # the CPU paths route themselves
    for forced in ("cuda", "triton"):
        with use_backend(forced):
            assert gpu_kernels_pay(cuda(56))
    with use_backend("reference"):
        assert not gpu_kernels_pay(cuda(56))
    monkeypatch.setenv("FASTFACE_BACKEND", "cuda")
    assert gpu_kernels_pay(cuda(56))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("split", [0, 2])
def test_gpu_model_routes_to_cudnn_unless_forced(monkeypatch, split):
    """CUDA eval: cuDNN's folded convs by default (no ir_block call), ir_block when forced; same output."""
    from fastface.ops import use_backend

    monkeypatch.delenv("FASTFACE_BACKEND", raising=False)
    spec = small_face(split=split, merge="add", width=0.5, input_size=32)
    model = randomize(build_model(spec), split + 1).cuda().eval()
    x = torch.randn(3, 4, 32, 32, device="cuda")
    spy = _Spy(monkeypatch, "ir_block")
    # cuDNN's fp32 convs round through TF32 by default (~1e-3 apart for folded and unfolded weights on an H200).
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        with folded_eval(False):
            ref = model(x)
        plain = model(x)
        assert spy.calls == []
        with use_backend("cuda"):
            forced = model(x)
    assert len(spy.calls) == len(spec.blocks)  # one per layer, a split layer's branches as one grouped call
    torch.testing.assert_close(plain, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(forced, ref, atol=1e-4, rtol=1e-4)
    # A frozen model routes the same way: its ir_block steps run as cuDNN convs unless a backend is forced.
    from fastface.models import freeze
    from fastface.ops import ir_block, ir_block_reference

    net = freeze(model)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        torch.testing.assert_close(net(x), ref, atol=1e-4, rtol=1e-4)
        fns = next(iter(net._resolved.values()))
        assert ir_block_reference in [f for f, _ in fns]
        with use_backend("cuda"):
            torch.testing.assert_close(net(x), ref, atol=1e-4, rtol=1e-4)
    assert any(f is ir_block.impls["cuda"][0] for fns in net._resolved.values() for f, _ in fns)


def test_gdc_head_train_matches_module_and_returns_channels_last_gradients():
    """The training GDC head (one weighted sum per channel) equals GDCHead's own forward and backward, and hands its
    input a channels_last gradient: an NCHW one made the last BN's backward copy the map first."""
    import copy

    from fastface.models.heads import GDCHead
    from fastface.models.mobilenetv2 import _gdc_head_train

    torch.manual_seed(SEED)
    head = GDCHead(24, 5, 16).double().train()
    ref = copy.deepcopy(head)
    f = torch.randn(6, 24, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    f_ref = f.clone().requires_grad_()
    f = f.requires_grad_()
    mid, seen = f * 1.0, {}

    def layout(g: torch.Tensor) -> None:
        seen["cl"] = g.is_contiguous(memory_format=torch.channels_last)

    mid.register_hook(layout)
    y, y_ref = _gdc_head_train(head, mid), ref(f_ref)
    torch.testing.assert_close(y, y_ref)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    assert seen["cl"]
    torch.testing.assert_close(f.grad, f_ref.grad)
    for (name, p), p_ref in zip(head.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
