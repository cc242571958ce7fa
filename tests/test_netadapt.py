"""NetAdaptV2 search: MCD never over target, determinism and resume from history, SCD,
several constraints at once, Pareto front."""
from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastface.losses import CombinedMarginLoss, PartialFC
from fastface.models.supernet import Supernet, train_supernet
from fastface.search.netadapt import (
    Finetuner, NetAdaptConfig, ResumeMismatch, macs, mcd, mcd_candidate, params, pareto_front, record_model, scd, scd_candidate,
    verification_score,
)
from test_supernet import batches_of, synthetic_faces, tiny_spec


# Tiny ops and networks: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def pairs(templates: torch.Tensor, n: int = 40, noise: float = 0.35, seed: int = 1):
    """Verification pairs (2k, 2k+1): half of the same identity, half of different ones."""
    g = torch.Generator().manual_seed(seed)
    c = templates.shape[0]
    a = torch.randint(c, (n,), generator=g)
    same = torch.arange(n) % 2 == 0
    b = torch.where(same, a, (a + 1 + torch.randint(c - 1, (n,), generator=g)) % c)
    imgs = torch.stack([templates[a], templates[b]], 1).reshape(2 * n, *templates.shape[1:])
    return imgs + noise * torch.randn(imgs.shape, generator=g), same


@pytest.fixture(scope="module")
def trained():
    """A tiny supernet trained briefly with ordered dropout, its calibration batches and a verification scorer."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y, templates = synthetic_faces()
    sn = Supernet(tiny_spec(), g=4)
    head = PartialFC(CombinedMarginLoss(16.0, 1.0, 0.0, 0.2), 16, 8)
    opt = torch.optim.SGD(list(sn.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    batches = batches_of(x, y, 32)
    train_supernet(sn, batches, head, opt, steps=20)
    images, issame = pairs(templates)
    torch.set_num_threads(old)
    return {"supernet": sn, "calib": [b[0] for b in batches[:2]], "batches": batches, "head": head,
            "score": verification_score(images, issame, nfolds=5)}


RES = {"params": params, "macs": macs}


def strip(records):
    """Records without wall times (the only non-deterministic field)."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k != "time_s"}
        out.append(json.loads(json.dumps(r)))
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), frac=st.floats(0.5, 0.99), which=st.sampled_from(["params", "macs", "both"]))
def test_mcd_candidates_are_never_over_target(seed, frac, which):
    sn = Supernet(tiny_spec(split=seed % 3), g=4)
    full = sn.space.full()
    spec = sn.space.spec_at(full)
    names = ["params", "macs"] if which == "both" else [which]
    targets = {n: frac * RES[n](spec) for n in names}
    c = mcd_candidate(sn, full, RES, targets, random.Random(seed))
    assert c is not None  # the smallest tiny network is far below half of every resource
    w, values = c
    assert not sn.space.problems(w)
    assert all(values[n] <= targets[n] for n in names)
    assert values == {n: f(sn.space.spec_at(w)) for n, f in RES.items()}
    assert any(w[n] < full[n] for n in full)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mcd_reaches_the_budget_and_never_records_over_target(trained, seed):
    sn = trained["supernet"]
    p0 = params(sn.space.spec_at(sn.space.full()))
    cfg = NetAdaptConfig(candidates=3, step=0.06, seed=seed)
    res = mcd(sn, trained["score"], RES, {"params": 0.6 * p0}, trained["calib"], cfg)
    assert res.status == "met" and res.final["constraints_met"]
    recs = res.records
    assert recs[0]["iteration"] == 0 and recs[0]["resources"]["params"] == p0
    for prev, r in zip(recs, recs[1:]):
        for c in r["candidates"]:
            assert c["resources"]["params"] <= r["targets"]["params"]
        assert r["resources"]["params"] <= r["targets"]["params"] < prev["resources"]["params"]
        assert r["candidates"][r["chosen"]]["widths"] == r["widths"]
        assert r["score"] == max(c["score"] for c in r["candidates"])  # criterion "accuracy"
        assert 0 <= r["score"] <= 1
    # Every history point slices to a network whose spec and size are those recorded.
    m = record_model(sn, recs[-1], trained["calib"])
    assert m.spec.to_dict() == recs[-1]["spec"]
    assert sum(p.numel() for p in m.parameters()) == recs[-1]["resources"]["params"]
    json.dumps(recs)  # the history is plain JSON


def test_mcd_is_deterministic_and_resumes_from_history(trained):
    sn = trained["supernet"]
    p0 = params(sn.space.spec_at(sn.space.full()))
    cfg = NetAdaptConfig(candidates=3, step=0.08, seed=7, criterion="per_resource")
    args = (sn, trained["score"], RES, {"params": 0.55 * p0, "macs": 0.8 * macs(sn.space.spec_at(sn.space.full()))},
            trained["calib"])
    whole = mcd(*args, config=cfg)
    assert whole.status == "met" and len(whole.records) >= 4
    seen = []
    part = mcd(*args, config=NetAdaptConfig(candidates=3, step=0.08, seed=7, criterion="per_resource",
                                             max_iterations=2), on_record=lambda r, m: seen.append(r["iteration"]))
    assert part.status == "max_iterations" and len(part.records) == 3 and seen == [0, 1, 2]
    saved = json.loads(json.dumps(part.records))  # as a journal would persist it
    resumed = mcd(*args, config=cfg, history=saved)
    assert strip(resumed.records) == strip(whole.records)
    again = mcd(*args, config=cfg)
    assert strip(again.records) == strip(whole.records)
    with pytest.raises(ResumeMismatch, match="cannot resume: history record 0 has config"):
        mcd(*args, config=NetAdaptConfig(candidates=3, step=0.08, seed=8, criterion="per_resource"), history=saved)
    other = Supernet(tiny_spec(), g=4)
    with pytest.raises(ResumeMismatch, match="weights differ"):
        mcd(other, *args[1:], config=cfg, history=saved)


def test_scd_fine_tunes_one_layer_at_a_time(trained):
    import copy

    sn = copy.deepcopy(trained["supernet"])
    before = {k: v.clone() for k, v in sn.state_dict().items()}
    p0 = params(sn.space.spec_at(sn.space.full()))
    ft = Finetuner(trained["batches"][:2], trained["head"], steps=2, lr=0.01)
    res = scd(sn, trained["score"], RES, {"params": 0.75 * p0}, trained["calib"], ft,
              NetAdaptConfig(step=0.1))
    assert res.status == "met" and len(res.records) >= 2
    for prev, r in zip(res.records, res.records[1:]):
        for c in r["candidates"]:
            changed = [n for n in c["widths"] if c["widths"][n] != prev["widths"][n]]
            assert len(changed) == 1  # single-layer coordinate descent
            assert c["resources"]["params"] <= r["targets"]["params"]
    # The chosen candidates' fine-tuned weights were written back into the supernet.
    assert any(not torch.equal(before[k], v) for k, v in sn.state_dict().items())
    assert record_model(sn, res.final).spec.to_dict() == res.final["spec"]
    with pytest.raises(ValueError, match="weights have changed"):
        record_model(sn, dict(res.final, weights_sha256="0" * 64))  # a record from before later fine-tunes
    # Single-layer candidates never exceed targets either.
    c = scd_candidate(sn, sn.space.full(), "last", RES, {"params": 0.97 * p0})
    assert c is None or c[1]["params"] <= 0.97 * p0


def test_constraints_are_validated(trained):
    sn = trained["supernet"]
    with pytest.raises(ValueError, match="no such resource"):
        mcd(sn, trained["score"], RES, {"latency": 1.0}, trained["calib"])
    with pytest.raises(ValueError, match="at least one constraint"):
        mcd(sn, trained["score"], RES, {}, trained["calib"])
    with pytest.raises(ValueError, match="criterion"):
        NetAdaptConfig(criterion="fastest")


def test_impossible_budget_stops_as_stuck(trained):
    sn = trained["supernet"]
    res = mcd(sn, trained["score"], RES, {"params": 10.0}, trained["calib"],
              NetAdaptConfig(candidates=2, step=0.3, decay=1.0))
    assert res.status == "stuck" and not res.final["constraints_met"]
    for r in res.records[1:]:
        assert r["resources"]["params"] <= r["targets"]["params"]


def brute_front(points):
    out = []
    for i, (s, rs) in enumerate(points):
        dom = False
        for j, (s2, rs2) in enumerate(points):
            if j == i:
                continue
            ge = s2 >= s and all(a <= b for a, b in zip(rs2, rs))
            strict = s2 > s or any(a < b for a, b in zip(rs2, rs))
            if ge and (strict or j < i):
                dom = True
        if not dom:
            out.append(i)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=12),
       st.booleans())
def test_pareto_front_matches_brute_force(pts, two):
    recs = [{"score": s / 5, "resources": {"latency": float(a), "params": float(b)}, "i": i}
            for i, (s, a, b) in enumerate(pts)]
    names = ["latency", "params"] if two else ["latency"]
    front = pareto_front(recs, names)
    want = brute_front([(r["score"], [r["resources"][n] for n in names]) for r in recs])
    assert sorted(r["i"] for r in front) == want
    lats = [r["resources"]["latency"] for r in front]
    assert lats == sorted(lats)
    if not two:  # one resource: along the front, more latency buys strictly more score
        scores = [r["score"] for r in front]
        assert all(a < b for a, b in zip(scores, scores[1:]))
