"""Synthetic faces: determinism, disjoint verification identities, caching, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_helpers import tiny_set
from fastface.data import synth
from fastface.data.recordio import RecordReader
from fastface.data.verification import read_bin


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_set(tmp_path_factory)


def test_render_is_deterministic_and_varied():
    cfg = synth.SynthConfig()
    a = synth.render_key(3, 0, 5, 2, cfg)
    b = synth.render_key(3, 0, 5, 2, cfg)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].shape == (112, 112, 3) and a[0].dtype == np.uint8
    assert a[1].shape == (112, 112) and a[1].dtype == np.uint16
    c = synth.render_key(3, 0, 5, 3, cfg)  # another sample of the same person
    d = synth.render_key(4, 0, 5, 2, cfg)  # another seed
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
    fg = a[1] > 0
    assert 0.3 < fg.mean() < 0.95, "the face should fill much, not all, of the crop"
    assert np.ptp(a[1][fg].astype(np.int64)) > 5000, "depth should vary across the face"


def test_identities_differ_across_splits():
    cfg = synth.preset("tiny")
    # The first 40 draws (head axes, feature positions, bump amplitudes) exist for everyone.
    train = np.stack([synth.make_identity(0, synth.SPLIT_TRAIN, i, cfg).params[:40] for i in range(cfg.n_ids)])
    for split, n in ((synth.SPLIT_VAL, cfg.val_ids), (synth.SPLIT_TEST, cfg.test_ids)):
        for i in range(n):
            p = synth.make_identity(0, split, i, cfg).params[:40]
            assert np.abs(train - p).sum(1).min() > 1.0


def test_set_layout_and_disjoint_pairs(tiny):
    cfg = synth.preset("tiny")
    with RecordReader(os.path.join(tiny, "train.rec")) as r:
        assert len(r.image_keys()) == cfg.n_ids * cfg.samples_per_id
        assert len(r.identity_ranges()) == cfg.n_ids
        train_payloads = {r[k][1] for k in r.image_keys()}
    assert open(os.path.join(tiny, "property")).read().strip() == f"{cfg.n_ids},112,112"
    for name, split, n_pairs in (("val", synth.SPLIT_VAL, cfg.val_pairs), ("test", synth.SPLIT_TEST, cfg.test_pairs)):
        bins, same = read_bin(os.path.join(tiny, f"{name}.bin"))
        assert len(same) == n_pairs and sum(same) == n_pairs // 2
        plan = json.load(open(os.path.join(tiny, f"{name}_pairs.json")))
        assert plan["split"] == split
        ids = plan["images"]
        for k, s in enumerate(same):
            assert (ids[2 * k][0] == ids[2 * k + 1][0]) == s
        assert not train_payloads & set(bins), "a verification image also appears in training"


def test_cache_reuse_and_invalidation(tiny, tmp_path):
    cfg = synth.preset("tiny")
    before = {f: os.path.getmtime(os.path.join(tiny, f)) for f in ("train.rec", "val.bin", "manifest.json")}
    res = synth.generate(cfg, tiny, workers=1, folder=True, progress=False)
    assert res.reused
    assert before == {f: os.path.getmtime(os.path.join(tiny, f)) for f in before}
    assert synth.cached(tiny, synth.preset("tiny", seed=1), folder=True) is None
    assert synth.cached(tiny, cfg, folder=False) is None
    # A damaged file is not trusted.
    other = str(tmp_path / "copy")
    synth.generate(synth.preset("tiny", n_ids=3, samples_per_id=2, val_pairs=4, test_pairs=4), other, workers=1, progress=False)
    with open(os.path.join(other, "val.bin"), "ab") as f:
        f.write(b"x")
    assert synth.cached(other, synth.preset("tiny", n_ids=3, samples_per_id=2, val_pairs=4, test_pairs=4)) is None


def test_output_independent_of_workers(tmp_path):
    cfg = synth.preset("tiny", n_ids=4, samples_per_id=3, val_ids=3, val_pairs=6, test_ids=3, test_pairs=6)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    synth.generate(cfg, a, workers=1, progress=False)
    synth.generate(cfg, b, workers=2, progress=False)
    for f in ("train.rec", "train.idx", "val.bin", "test.bin"):
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f


def test_cli_synth_then_reuse(tmp_path):
    out = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "fastface", "data", "synth", "--preset", "tiny", "--ids", "2", "--samples-per-id", "2",
           "--val-ids", "2", "--val-pairs", "2", "--test-ids", "2", "--test-pairs", "2", "--out", out, "--workers", "1", "--quiet"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "4 RGB-D images" in first.stdout and "img/s" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "reused" in second.stdout
    info = subprocess.run([sys.executable, "-m", "fastface", "data", "info", out], capture_output=True, text=True, timeout=60)
    assert "4 images, 2 identities, depth: yes" in info.stdout


def test_cli_png_depth_then_convert_to_pgm(tmp_path):
    out = str(tmp_path / "png")
    cmd = [sys.executable, "-m", "fastface", "data", "synth", "--preset", "tiny", "--ids", "2", "--samples-per-id", "2",
           "--val-ids", "2", "--val-pairs", "2", "--test-ids", "2", "--test-pairs", "2", "--out", out, "--workers", "1",
           "--quiet", "--depth-format", "png"]
    made = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    rec = open(os.path.join(out, "train.rec"), "rb").read()
    assert b"\x89PNG" in rec and b"P5\n" not in rec
    dst = str(tmp_path / "pgm.rec")
    conv = subprocess.run([sys.executable, "-m", "fastface", "data", "convert-depth", os.path.join(out, "train.rec"), dst],
                          capture_output=True, text=True, timeout=60)
    assert conv.returncode == 0, conv.stderr
    assert "4 depth maps written as pgm" in conv.stdout
    assert b"P5\n" in open(dst, "rb").read()
    info = subprocess.run([sys.executable, "-m", "fastface", "data", "info", dst], capture_output=True, text=True, timeout=60)
    assert "4 images, 2 identities, depth: yes" in info.stdout, info.stdout + info.stderr
