"""Latency lookup table: check's decisions on measured times, a wrong table is flagged, equal layers are
measured once, persistence, fallback, use as an MCD resource. How close the sums come to this machine's
measured networks is bench/test_bench_lut.py's (a wall-clock figure)."""
from __future__ import annotations

import json
import random
import statistics

import pytest
import torch

from fastface.models.supernet import Supernet, WidthSpace
from fastface.search.lut import LatencyLUT, build_lut, check, layer_entries, sweep_specs
from fastface.search.netadapt import NetAdaptConfig, mcd, params
from test_supernet import tiny_spec

# Relative error allowed between LUT sums and measured networks (tiny networks of 0.25-0.5 ms,
# batch 1, one thread, on a shared 2-core machine that other processes load in bursts). The
# layers and the networks are timed round-robin in the same rounds, least disturbed of 5
# (`measure_with_networks`), so a burst spoils a number only if it hits all 5 rounds. Measured
# that way here, idle and with two busy-loop processes on both cores: the sums run 3-12 % above
# the networks (median error 5-10 %; a layer timed alone pays its call and cache warm-up that a
# layer in a sequence partly hides), single networks up to 15 % off under load. Timing layers
# first and networks later (the old test) saw 20-60 % errors on single networks under bursts.
# The bounds: the median error, which one disturbed network cannot move, within 15 %; every
# network within 35 % (room for one burst that outlasts the rounds). A wrong table is far off
# both (test_a_lut_measured_for_another_resolution_is_flagged: 80-220 % on every network).
# bench/test_bench_lut.py reports the criterion on the measured sums; it is not asserted here.
MEDIAN_TOLERANCE = 0.15
MAX_TOLERANCE = 0.35


def agrees(r) -> bool:
    """The LUT-vs-measurement criterion of this file (see MEDIAN_TOLERANCE, MAX_TOLERANCE)."""
    return statistics.median(r.raw_error) <= MEDIAN_TOLERANCE and r.max_raw_error <= MAX_TOLERANCE


# Tiny ops and networks: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def networks(size: int, seed: int = 0) -> list:
    """Four related networks: the full tiny net (fused and split) and two random slices of it."""
    out = []
    for spec in (tiny_spec(size=size), tiny_spec(size=size, split=2, merge="concat")):
        space = WidthSpace(spec, 4)
        out += [space.spec_at(space.full()), space.spec_at(space.random(random.Random(seed)))]
    return out


def test_check_decides_from_the_measured_times():
    """check on given network times (how far the sums of this machine's table are from its measured networks is a
    wall-clock figure: bench/test_bench_lut.py measures it): within tolerance "ok" (no correction); off by a common
    factor "corrected" with that factor fitted (leave-one-out errors ~0); scattered "fallback", the first network
    the reference; apply=False leaves the table alone."""
    specs = networks(32, seed=0) + networks(32, seed=1)[1::2]
    lut = LatencyLUT(threads=1, runs=2, warmup=1, rounds=1)
    meas = lut.measure_with_networks(specs)
    assert len(meas) == len(specs) and all(m > 0 for m in meas)
    pred = [lut.predict_raw(s) for s in specs]
    lut.scale = 2.0
    r = check(lut, specs, tolerance=0.10, measured=[p * 1.05 for p in pred])
    assert r.action == "ok" and lut.scale == 1.0 and not lut.fallback and lut.reference is None
    assert max(r.raw_error) == pytest.approx(0.05 / 1.05) and r.measured_ms == pytest.approx([p * 1.05 for p in pred])
    r = check(lut, specs, tolerance=0.10, measured=[p * 1.6 for p in pred])
    assert r.action == "corrected" and lut.scale == pytest.approx(1.6) and not lut.fallback
    assert max(r.corrected_error) < 1e-9 and lut.predict(specs[2]) == pytest.approx(1.6 * pred[2])
    scattered = [p * f for p, f in zip(pred, (1.0, 2.0, 0.5, 3.0, 1.0, 0.3))]
    r = check(lut, specs, tolerance=0.10, apply=False, measured=scattered)
    assert r.action == "fallback" and not lut.fallback and len(lut.checks) == 2
    r = check(lut, specs, tolerance=0.10, measured=scattered)
    assert lut.fallback and lut.scale == 1.0 and lut.reference == (specs[0].to_json(), scattered[0])
    assert [c["action"] for c in lut.checks] == ["ok", "corrected", "fallback"]


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
    assert r.max_raw_error > 0.5 and not agrees(r), r.as_dict()
    assert r.action in ("corrected", "fallback") and wrong.checks[-1]["action"] == r.action
    if r.action == "fallback":
        assert wrong.fallback and wrong(small[0]) > 0 and len(wrong.direct) == 1
        # Direct measurements are relative to the first checked network, timed alongside.
        assert wrong.reference is not None and wrong.reference[0] == small[0].to_json()
        assert wrong.reference[1] == r.measured_ms[0]


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
    with pytest.raises(ValueError, match="2 measured times for 1 networks"):
        check(lut, [spec], measured=[1.0, 2.0])
    lut.reference = (spec.to_json(), 1.5)
    lut.save(path)
    assert LatencyLUT.load(path).reference == lut.reference
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


def test_fallback_measures_relative_to_the_reference():
    a, b = networks(32)[:2]
    lut = LatencyLUT(threads=1, runs=5, warmup=1, rounds=2)
    lut.fallback = True
    lut.reference = (a.to_json(), 10.0)  # as if the reference ran 10 ms when the table was checked
    va, vb = lut(a), lut(b)
    # The reference timed against itself: a ratio near 1 whatever the load now, so near 10 ms,
    # although this tiny network runs in well under 10 ms here.
    assert 5 < va < 20, va
    assert vb > 0 and len(lut.direct) == 2 and lut(b) == vb  # cached: one number per network
