"""Models from ArchSpecs: shapes, counts, folded inference, and exact replicate / re-split."""
from __future__ import annotations

import pytest
import torch

from fastface.arch import ArchSpec
from fastface.eval.cost import count, spec_cost
from fastface.models import build_model, folded_eval, list_models, replicate, resplit, spec_by_name


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


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_folded_inference_equals_unfolded(dtype, atol):
    model = randomize(build_model(small_face(split=2)).to(dtype), 0).eval()
    x = torch.randn(2, 4, 48, 48, dtype=dtype)
    with torch.no_grad():
        fast = model(x)
        with folded_eval(False):
            ref = model(x)
    torch.testing.assert_close(fast, ref, atol=atol, rtol=0)


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


@pytest.mark.slow
def test_torch_compile_with_fastface_ops():
    """The eval path calls torch.ops.fastface.dwconv2d: it must trace under torch.compile."""
    spec = ArchSpec.face(input_size=32, width=0.35, split=2)
    model = randomize(build_model(spec), 1).eval()
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), ref, atol=1e-5, rtol=1e-5)
