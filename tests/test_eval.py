"""Verification metrics, latency measurement, and ONNX export."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastface.arch import ArchSpec
from fastface.eval import verification as V
from fastface.eval.export import export_onnx
from fastface.eval.latency import measure, measure_onnx
from fastface.models import build_model


def test_kfold_matches_sklearn_layout():
    folds = V.kfold_indices(23, 10)
    assert [len(f) for f in folds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.array_equal(np.concatenate(folds), np.arange(23))


def test_perfectly_separable_pairs():
    rng = np.random.default_rng(0)
    n = 4000
    base = rng.standard_normal((n, 16))
    same = np.arange(n) % 2 == 0
    other = rng.standard_normal((n, 16))
    emb2 = np.where(same[:, None], base + 0.01 * rng.standard_normal((n, 16)), other)
    r = V.evaluate(base, emb2, same)
    assert r.accuracy == 1.0 and r.accuracy_std == 0.0
    assert 0 < r.threshold < 4
    assert r.tar_at_far["0.001"] == pytest.approx(1.0, abs=0.01)
    assert "0.0001" not in r.tar_at_far  # 2000 impostor pairs cannot resolve FAR 1e-4


def test_random_embeddings_are_at_chance():
    rng = np.random.default_rng(1)
    e1, e2 = rng.standard_normal((2000, 32)), rng.standard_normal((2000, 32))
    same = rng.random(2000) < 0.5
    r = V.evaluate(e1, e2, same)
    assert 0.45 < r.accuracy < 0.56


def test_known_answer_against_brute_force():
    """Accuracy equals a direct re-implementation of the 10-fold protocol."""
    rng = np.random.default_rng(2)
    n = 300
    same = rng.random(n) < 0.5
    e1 = rng.standard_normal((n, 8))
    e2 = np.where(same[:, None], e1 + rng.standard_normal((n, 8)) * 0.9, rng.standard_normal((n, 8)))
    r = V.evaluate(e1, e2, same)
    n1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    n2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    d = ((n1 - n2) ** 2).sum(1)
    accs = []
    for k in range(10):
        test = np.arange(k * 30, (k + 1) * 30)
        train = np.setdiff1d(np.arange(n), test)
        best, best_acc = None, -1
        for t in np.arange(0, 4, 0.01):
            a = ((d[train] < t) == same[train]).mean()
            if a > best_acc:
                best, best_acc = t, a
        accs.append(((d[test] < best) == same[test]).mean())
    assert r.accuracy == pytest.approx(np.mean(accs)) and r.accuracy_std == pytest.approx(np.std(accs))


def test_tar_at_far_respects_far():
    rng = np.random.default_rng(3)
    d = np.concatenate([rng.random(1000) * 2, rng.random(5000) * 2 + 1])
    same = np.concatenate([np.ones(1000, bool), np.zeros(5000, bool)])
    tar = V.tar_at_far(d, same, 1e-3)
    thr_far = (d[~same] < np.sort(d[~same])[5]).mean()
    assert thr_far <= 1e-3
    assert tar == pytest.approx((d[same] < np.sort(d[~same])[5]).mean())


def test_bad_shapes():
    with pytest.raises(ValueError, match="do not match"):
        V.evaluate(np.zeros((10, 4)), np.zeros((9, 4)), np.zeros(10, bool))


def test_evaluate_model_flip_sum():
    model = build_model(ArchSpec.face(input_size=32, width=0.35)).eval()
    images = torch.randn(40, 4, 32, 32)
    issame = torch.arange(20) % 2 == 0
    r = V.evaluate_model(model, images, issame, batch_size=16)
    assert 0 <= r.accuracy <= 1 and r.pairs == 20
    e = V.embed(model, images[:4], flip=True)
    with torch.no_grad():
        ref = model(images[:4]) + model(images[:4].flip(3))
    torch.testing.assert_close(e, ref, atol=1e-5, rtol=1e-5)


def test_latency_measure_and_onnx(tmp_path):
    model = build_model(ArchSpec.face(input_size=32, width=0.35))
    lat = measure(model, (4, 32, 32), batch=2, runs=5, warmup=1)
    assert lat.median_ms > 0 and lat.runs == 5 and lat.images_per_s > 0
    path = str(tmp_path / "m.onnx")
    err = export_onnx(model, path)
    assert err < 1e-4
    lo = measure_onnx(path, (4, 32, 32), batch=3, runs=3, warmup=1, threads=1)
    assert lo.median_ms > 0
