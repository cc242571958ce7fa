"""Latency lookup table: LUT sums against measured whole networks on this machine, a wrong
table is flagged, equal layers are measured once, persistence, fallback, use as an MCD resource."""
from __future__ import annotations

import json
import random

import pytest
import torch

from fastface.models.supernet import Supernet, WidthSpace
from fastface.search.lut import LatencyLUT, build_lut, check, layer_entries, sweep_specs
from fastface.search.netadapt import NetAdaptConfig, mcd, params
from test_supernet import tiny_spec

# Relative error allowed between LUT sums and measured networks (tiny networks, batch 1, one
# thread, on a shared 2-core machine under load from other processes). Measured here: the
# sums (per-call overhead counted once) run 5-35 % off the whole networks, mostly below (a
# layer timed alone runs with its weights and activations hot in cache); the scale `check`
# fits brings most networks to a few %, but load swings make single ones 20-50 % off.
RAW_TOLERANCE = 0.40


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread (two made them ~30x slower on the shared 2-core box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def networks(size: int, seed: int = 0) -> list:
    """Four related networks: the full tiny net (fused and split) and two random slices of it."""
    out = []
    for spec in (tiny_spec(size=size), tiny_spec(size=size, split=2, merge="concat")):
        space = WidthSpace(spec, 4)
        out += [space.spec_at(space.full()), space.spec_at(space.random(random.Random(seed)))]
    return out


def test_lut_sums_agree_with_measured_networks():
    specs = networks(32, seed=0) + networks(32, seed=1)[1::2]
    # Up to three measurement sessions: a burst of load from another process can spoil one
    # (about 1 in 6 here); a wrong LUT (next test: raw errors 80-220 %) fails every one.
    for _ in range(3):
        lut = build_lut(specs, threads=1, runs=20, warmup=3, rounds=3)
        r = check(lut, specs, tolerance=0.10)
        print(f"LUT vs 6 measured networks: raw errors {[round(e, 3) for e in r.raw_error]}; scale {r.scale:.3f}, "
              f"leave-one-out corrected errors {[round(e, 3) for e in r.corrected_error]}; action {r.action}")
        if r.max_raw_error <= RAW_TOLERANCE:
            break
    assert r.max_raw_error <= RAW_TOLERANCE, r.as_dict()
    assert lut.checks[-1]["action"] == r.action and lut.fallback == (r.action == "fallback")


def test_a_lut_measured_for_another_resolution_is_flagged():
    small, big = networks(32), networks(128)
    lut128 = build_lut(big, threads=1, runs=10, warmup=2, rounds=2)
    # The same layers' keys at 32 px, holding the times measured at 128 px: a table made for
    # another input resolution (or a slower device), as loaded from a stale file.
    wrong = LatencyLUT(threads=1, runs=10, warmup=2, rounds=2, measure_missing=False)
    wrong.call_overhead_ms = lut128.call_overhead_ms
    for s32, s128 in zip(small, big):
        for e32, e128 in zip(layer_entries(s32), layer_entries(s128)):
            wrong.entries[e32.key] = lut128.entries[e128.key]
    r = check(wrong, small, tolerance=0.10)
    assert r.max_raw_error > 0.5, r.as_dict()
    assert r.action in ("corrected", "fallback") and wrong.checks[-1]["action"] == r.action
    if r.action == "fallback":
        assert wrong.fallback and wrong(small[0]) > 0 and len(wrong.direct) == 1


def test_equal_layers_are_measured_once_and_the_table_round_trips(tmp_path):
    spec = tiny_spec(size=16)
    lut = LatencyLUT(threads=1, runs=3, warmup=1)
    n = lut.measure_spec(spec)
    keys = [e.key for e in layer_entries(spec)]
    assert n == len(set(keys)) == len(lut.entries) and lut.measure_spec(spec) == 0
    # The two stride-1 residual blocks of the 16-channel run share one configuration.
    assert len(set(keys)) < len(keys)
    p = lut.predict(spec)
    assert p > 0 and p == lut(spec)
    path = str(tmp_path / "lut.json")
    lut.save(path)
    again = LatencyLUT.load(path, measure_missing=False)
    assert again.entries == lut.entries and again.predict(spec) == p
    with pytest.raises(KeyError, match="no entry for stem:cin=4,cout=16,k=3,s=2,size=32"):
        again.predict(tiny_spec(size=32))
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="lut.json: not a latency LUT"):
        LatencyLUT.load(path)
    with open(path, "w") as f:
        json.dump({"version": 1, "device": "cpu"}, f)
    with pytest.raises(ValueError, match="lacks field"):
        LatencyLUT.load(path)


def test_sweep_covers_every_width_of_every_layer():
    space = WidthSpace(tiny_spec(size=16), 8)
    specs = sweep_specs(space)
    assert specs[0] == space.spec_at(space.full())
    n_points = sum(len(v.choices) - 1 for v in space.vars.values())
    assert len(specs) <= 1 + n_points and len(specs) > n_points // 2
    assert any(len(s.blocks) < len(space.spec.blocks) for s in specs)  # bypassed blocks included


def test_latency_lut_as_an_mcd_resource():
    sn = Supernet(tiny_spec(size=16), g=8)
    lut = LatencyLUT(threads=1, runs=5, warmup=1)
    full = sn.space.spec_at(sn.space.full())
    lat0 = lut(full)
    calib = [torch.randn(8, 4, 16, 16)]

    def score(model):  # a real, cheap criterion: embedding spread on a fixed batch (higher is better)
        return float(torch.nn.functional.normalize(model(calib[0])).std())

    res = mcd(sn, score, {"latency": lut, "params": params}, {"latency": 0.85 * lat0}, calib,
              NetAdaptConfig(candidates=2, step=0.05, max_iterations=30))
    assert res.status in ("met", "stuck", "max_iterations")
    for r in res.records[1:]:
        assert r["resources"]["latency"] <= r["targets"]["latency"]
    if res.status == "met":
        assert lut(res.spec()) <= 0.85 * lat0
