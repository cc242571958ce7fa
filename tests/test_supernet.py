"""CBC super-network: width space, bypass = identity, masked == sliced (fp64), recalibration,
ordered-dropout training, write-back, ONNX export of a slice."""
from __future__ import annotations

import random

import pytest
import torch

from fastface.arch import ArchSpec, BlockSpec, HeadSpec, StemSpec
from fastface.eval.cost import spec_cost
from fastface.losses import CombinedMarginLoss, PartialFC
from fastface.models import build_model
from fastface.models.supernet import (
    Supernet, WidthError, WidthSpace, load_subnet, recalibrate, slice_model, slice_subnet, train_supernet,
)
from test_models import randomize


# Tiny ops and networks: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_spec(split: int = 0, merge: str = "add", head: str = "gdc", size: int = 24, last: int = 48) -> ArchSpec:
    """A small RGB-D network with every kind of layer: t=1 block, residual runs, a stride-1 channel change."""
    blocks = (BlockSpec(1, 8), BlockSpec(4, 16, 2), BlockSpec(4, 16), BlockSpec(4, 16), BlockSpec(4, 24, 2),
              BlockSpec(4, 24), BlockSpec(6, 32, 1))
    return ArchSpec(inputs={"rgb": 3, "depth": 1}, stem=StemSpec(16, 3, 2), blocks=blocks, split=split, merge=merge,
                    head=HeadSpec(head, 16, last), input_size=size, name="tiny")


def random_widths(space: WidthSpace, rng: random.Random, bypass: bool = True) -> dict[str, int]:
    """A valid random widths vector, with at least one bypassed block when the space allows it."""
    w = space.random(rng)
    zeros = [n for n, v in space.vars.items() if v.bypassable]
    if bypass and zeros:
        w[rng.choice(zeros)] = 0
    return w


def test_width_space_of_mobilenetv2_face():
    space = WidthSpace(ArchSpec.face(), g=8)
    v = space.vars
    # Residual runs share one output width: blocks 1-2 (layers 2, 3), 3-5, 6-9, 10-12, 13-15.
    assert v["c2"].layers == (2, 3) and v["c4"].layers == (4, 5, 6) and v["c7"].layers == (7, 8, 9, 10)
    assert v["c0"].layers == (0,) and v["c1"].layers == (1,) and v["c17"].layers == (17,)
    assert "e1" not in v  # t = 1: no expand conv, hidden follows the stem's width
    assert v["e3"].bypassable and not v["e2"].bypassable and not v["e17"].bypassable
    assert v["e3"].choices[:3] == (0, 8, 16) and v["e3"].full == 144
    assert v["last"].full == 1280 and v["last"].choices[0] == 8
    assert [c[0] for c in space.conflicts] == [1, 11, 17]  # stride-1 channel changes
    # With a split, the last branch layer cannot be bypassed (the merge needs it).
    assert not WidthSpace(ArchSpec.face(split=4), 8).vars["e3"].bypassable
    assert WidthSpace(ArchSpec.face(split=5), 8).vars["e3"].bypassable


def test_widths_errors_name_the_problem():
    space = WidthSpace(tiny_spec(), 4)
    with pytest.raises(WidthError, match="unknown width 'e99'"):
        space.check({"e99": 4})
    with pytest.raises(WidthError, match="e3=5: not one of"):
        space.check({"e3": 5})
    with pytest.raises(WidthError, match="e2=0"):
        space.check({"e2": 0})  # a stride-2 block cannot be bypassed
    # Block 6 (layer 7) is 24 -> 32 at stride 1: equal widths would make it residual when sliced.
    with pytest.raises(WidthError, match="would become residual"):
        space.spec_at({"c5": 16, "c7": 16})
    assert space.shrink({"c5": 20, "c7": 20}, "c7") == dict(space.full(), c5=20, c7=16)
    assert space.shrink({"c5": 16, "c7": 20}, "c7") == dict(space.full(), c5=16, c7=12)  # steps over 16


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cbc_width_zero_is_exactly_identity(mode):
    sn = randomize(Supernet(tiny_spec(), g=4), 0)
    sn.train(mode == "train")
    byp = [n for n, v in sn.space.vars.items() if v.bypassable]
    assert byp == ["e3", "e4", "e6"]
    for n in byp:
        j = sn.space.vars[n].layers[0]
        li = sn.space.infos[j]
        x = torch.randn(6, li.cin, li.size_in, li.size_in)
        assert torch.equal(sn.layer_forward(j, x, {n: 0}), x)
        # Per sample: rows at width 0 are the identity, the others are not.
        w = torch.tensor([0, 8, 0, 64, 4, 0])[: x.shape[0]]
        y = sn.layer_forward(j, x, {n: w})
        assert torch.equal(y[w == 0], x[w == 0])
        assert not torch.allclose(y[w > 0], x[w > 0])


SPECS = [tiny_spec(), tiny_spec(split=1), tiny_spec(split=3, merge="concat"), tiny_spec(split=2, head="pool"),
         tiny_spec(split=8, merge="concat", head="classifier", last=0), tiny_spec(split=6, merge="add").with_replica(4)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"split{s.split}-{s.merge}-{s.head.kind}-{len(s.blocks)}")
def test_masked_supernet_equals_sliced_network_fp64(spec):
    sn = randomize(Supernet(spec, g=4), 1).double().eval()
    rng = random.Random(spec.split)
    x = torch.randn(3, 4, spec.input_size, spec.input_size, dtype=torch.float64)
    assert torch.equal(sn(x, sn.space.full()), sn(x, None)) or torch.allclose(sn(x, sn.space.full()), sn(x), atol=1e-12)
    for i in range(4):
        w = random_widths(sn.space, rng, bypass=i > 0)
        sub = slice_model(sn, w).eval()
        assert len(sub.spec.blocks) == len(sn.space.kept_layers(w)) - 1
        torch.testing.assert_close(sn(x, w), sub(x), atol=1e-10, rtol=0)
        # The (spec, state_dict) pair rebuilds the same network, and the spec survives JSON.
        s, sd = slice_subnet(sn, w)
        again = build_model(ArchSpec.from_json(s.to_json())).double()
        again.load_state_dict(sd)
        torch.testing.assert_close(again.eval()(x), sub(x), atol=0, rtol=0)
        assert spec_cost(s)[0] == sum(p.numel() for p in sub.parameters())


def test_masked_equals_sliced_on_mobilenetv2_face_split():
    spec = ArchSpec.face(input_size=32, split=2)
    sn = randomize(Supernet(spec), 2).double().eval()
    rng = random.Random(5)
    x = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    w = random_widths(sn.space, rng)
    w["e12"] = w["e15"] = 0
    sub = slice_model(sn, w).eval()
    assert len(sub.spec.blocks) <= 15
    torch.testing.assert_close(sn(x, w), sub(x), atol=1e-10, rtol=0)


def test_per_sample_widths_equal_each_samples_subnetwork():
    sn = randomize(Supernet(tiny_spec(split=1), g=4), 3).double().eval()
    rng = random.Random(1)
    ws = [random_widths(sn.space, rng) for _ in range(4)]
    per_sample = {n: torch.tensor([w[n] for w in ws]) for n in sn.space.names}
    assert len({tuple(t.tolist()) for t in per_sample.values()}) > 1
    x = torch.randn(4, 4, 24, 24, dtype=torch.float64)
    y = sn(x, per_sample)
    for i, w in enumerate(ws):
        torch.testing.assert_close(y[i:i + 1], slice_model(sn, w).eval()(x[i:i + 1]), atol=1e-10, rtol=0)


def test_ordered_dropout_samples_differ_and_keep_a_full_share():
    space = WidthSpace(tiny_spec(), 4)
    w = space.sample(64, full_share=0.25, generator=torch.Generator().manual_seed(0))
    full = space.full()
    at_full = torch.stack([w[n] == full[n] for n in space.names]).all(0)
    assert at_full.sum() >= 16  # 25 % forced, plus any that drew full everywhere
    rows = {tuple(int(w[n][i]) for n in space.names) for i in range(64)}
    assert len(rows) > 40  # per-sample widths really differ inside the batch
    assert (w["e3"] == 0).any() and (w["e3"] > 0).any()


@torch.no_grad()
def test_recalibrated_supernet_matches_recalibrated_slice():
    sn = randomize(Supernet(tiny_spec(split=2, merge="concat"), g=4), 4).double()
    w = random_widths(sn.space, random.Random(3))
    batches = [torch.randn(8, 4, 24, 24, dtype=torch.float64) for _ in range(3)]
    before = sn.net.trunk[1].project.bn.running_mean.clone()
    sub = recalibrate(slice_model(sn, w), batches)
    recalibrate(sn, batches, widths=w)
    assert not torch.allclose(before, sn.net.trunk[1].project.bn.running_mean)
    assert all(m.momentum == 0.1 for m in sn.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(2, 4, 24, 24, dtype=torch.float64)
    sn.eval()
    torch.testing.assert_close(sn(x, w), sub.eval()(x), atol=1e-9, rtol=0)
    torch.testing.assert_close(slice_model(sn, w).eval()(x), sub(x), atol=1e-9, rtol=0)


def test_load_subnet_writes_prefixes_back():
    sn = randomize(Supernet(tiny_spec(split=3, merge="concat"), g=4), 5).double()
    w = random_widths(sn.space, random.Random(4))
    sub = slice_model(sn, w)
    with torch.no_grad():
        for p in sub.parameters():
            p.add_(1.0)
    untouched = sn.net.trunk[-1].project.conv.weight[-1].clone()  # beyond every prefix when c7 < 32
    load_subnet(sn, w, sub)
    again = slice_model(sn, w)
    for a, b in zip(again.state_dict().values(), sub.state_dict().values()):
        assert torch.equal(a, b)
    if w["c7"] < 32:
        assert torch.equal(sn.net.trunk[-1].project.conv.weight[-1], untouched)


def synthetic_faces(classes: int = 8, per_class: int = 32, size: int = 24, seed: int = 0, noise: float = 0.35):
    """A tiny identity task: each class is a random RGB-D template; samples add noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 4, size, size, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    x = templates[labels] + noise * torch.randn(len(labels), 4, size, size, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm], labels[perm], templates


def batches_of(x, y, b):
    return [(x[i:i + b], y[i:i + b]) for i in range(0, len(x) - b + 1, b)]


@pytest.mark.parametrize("distill", [0.0, 1.0])
def test_ordered_dropout_training_lowers_the_loss(distill):
    torch.manual_seed(0)
    x, y, _ = synthetic_faces()
    sn = Supernet(tiny_spec(), g=4)
    head = PartialFC(CombinedMarginLoss(16.0, 1.0, 0.0, 0.2), 16, 8)
    opt = torch.optim.SGD(list(sn.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    losses = train_supernet(sn, batches_of(x, y, 32), head, opt, steps=40, full_share=0.25, distill=distill)
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)


def test_slice_exports_to_onnx(tmp_path):
    from fastface.eval.export import export_onnx

    sn = randomize(Supernet(tiny_spec(split=1), g=4), 6).eval()
    w = random_widths(sn.space, random.Random(8))
    sub = slice_model(sn, w)
    path = str(tmp_path / "slice.onnx")
    err = export_onnx(sub, path)
    assert err is not None and err < 1e-4
    import onnx

    onnx.checker.check_model(onnx.load(path))
