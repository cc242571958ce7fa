"""Margin losses and Partial FC: formulas, the plain-loss equivalence, and 2 gloo ranks == 1 rank."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastface.losses import CombinedMarginLoss, PartialFC, arcface, cosface, dist_cross_entropy


def plain_loss(margin: CombinedMarginLoss, emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    cos = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1)
    return F.cross_entropy(margin(cos, labels), labels)


def test_arcface_and_cosface_formulas():
    cos = torch.tensor([[0.3, 0.9], [-0.99, 0.2]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    out = arcface()(cos, labels) / 64
    theta = math.acos(0.3)
    assert out[0, 0].item() == pytest.approx(math.cos(theta + 0.5))
    # theta + m > pi: the threshold fallback cos - m*sin(m) keeps the logit monotone.
    assert out[1, 0].item() == pytest.approx(-0.99 - math.sin(math.pi - 0.5) * 0.5)
    assert out[0, 1].item() == pytest.approx(0.9) and out[1, 1].item() == pytest.approx(0.2)
    out = cosface()(cos, labels) / 64
    assert out[0, 0].item() == pytest.approx(0.3 - 0.4)
    # m1 (SphereFace-style) goes through the general angular path.
    out = CombinedMarginLoss(64, 1.2, 0.1, 0.05)(cos, labels) / 64
    assert out[0, 0].item() == pytest.approx(math.cos(1.2 * theta + 0.1) - 0.05)
    # label -1: the row is left untouched.
    out = arcface()(cos, torch.tensor([-1, 1])) / 64
    assert torch.allclose(out[0], cos[0])


def test_arcface_easy_margin_applies_only_where_cos_is_positive():
    cos = torch.tensor([[0.3], [-0.2]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    out = CombinedMarginLoss(64, 1.0, 0.5, 0.0, easy_margin=True)(cos, labels) / 64
    assert out[0, 0].item() == pytest.approx(math.cos(math.acos(0.3) + 0.5))
    assert out[1, 0].item() == pytest.approx(-0.2)  # cos <= 0: no margin (the threshold form would apply one)
    hard = arcface()(cos, labels) / 64
    assert hard[1, 0].item() == pytest.approx(math.cos(math.acos(-0.2) + 0.5))


def test_partial_fc_logits_are_float32_under_autocast(monkeypatch):
    torch.manual_seed(0)
    pfc = PartialFC(arcface(), 16, 20)
    emb = torch.randn(6, 16)
    labels = torch.randint(0, 20, (6,))
    seen = []
    linear = F.linear

    def spy(x, w, *a):
        out = linear(x, w, *a)
        seen.append(out.dtype)  # autocast would cast inside the op: look at what comes out
        return out

    monkeypatch.setattr(F, "linear", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pfc(emb.bfloat16(), labels)
    monkeypatch.undo()
    assert seen == [torch.float32]
    assert pfc.weight.dtype == torch.float32 and loss.dtype == torch.float32
    # The same value as the fp32 loss of the bf16-rounded embeddings: nothing else was rounded.
    torch.testing.assert_close(loss, pfc(emb.bfloat16().float(), labels), rtol=0, atol=0)


def test_margin_gradcheck():
    cos = (torch.rand(4, 6, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    labels = torch.tensor([0, 5, -1, 2])
    for m in (arcface(), cosface(), CombinedMarginLoss(64, 1.3, 0.2, 0.1)):
        assert torch.autograd.gradcheck(lambda c: m(c, labels), (cos,))


def test_dist_cross_entropy_equals_torch_single_rank():
    logits = torch.randn(8, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (8,))
    a = dist_cross_entropy(logits, labels)
    b = F.cross_entropy(logits, labels)
    torch.testing.assert_close(a, b)
    ga, = torch.autograd.grad(a * 3, logits)
    gb, = torch.autograd.grad(b * 3, logits)
    torch.testing.assert_close(ga, gb)


def test_partial_fc_one_rank_full_rate_equals_plain_loss():
    torch.manual_seed(0)
    pfc = PartialFC(arcface(), 16, 37, sample_rate=1.0).double()
    emb = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 37, (10,))
    loss = pfc(emb, labels)
    w = pfc.weight.detach().clone().requires_grad_()
    ref = plain_loss(arcface(), emb, w, labels)
    torch.testing.assert_close(loss, ref)
    g1 = torch.autograd.grad(loss, (emb, pfc.weight))
    g2 = torch.autograd.grad(ref, (emb, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_partial_fc_sampling_keeps_positives():
    torch.manual_seed(1)
    pfc = PartialFC(cosface(), 8, 100, sample_rate=0.1)
    labels = torch.tensor([3, 3, 97, 50, 12, 64, 71, 88, 5, 1, 2, 4])  # 11 distinct > num_sample = 10
    index, remapped = pfc._sample(labels)
    assert index.numel() == 11
    assert torch.equal(index[remapped], labels)  # every label maps to its own centre
    loss = pfc(torch.randn(12, 8), labels)
    assert torch.isfinite(loss)


def test_partial_fc_rejects_bad_input():
    pfc = PartialFC(arcface(), 8, 10)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 10\)"):
        pfc(torch.randn(2, 8), torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="2 embeddings but 3 labels"):
        pfc(torch.randn(2, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(arcface(), 8, 10, sample_rate=0)


def _two_rank_worker(rank: int, world: int, init: str, payload: dict, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        emb_all, labels_all, weight_all = payload["emb"], payload["labels"], payload["weight"]
        n = emb_all.shape[0] // world
        pfc = PartialFC(arcface(), emb_all.shape[1], weight_all.shape[0]).double()
        with torch.no_grad():
            pfc.weight.copy_(weight_all[pfc.class_start:pfc.class_start + pfc.num_local])
        emb = emb_all[rank * n:(rank + 1) * n].clone().requires_grad_()
        loss = pfc(emb, labels_all[rank * n:(rank + 1) * n])
        loss.backward()
        # The embedding gradient is scaled by the world size, so that DDP's average of the
        # backbone gradients over ranks gives the single-rank gradient: undo that scale here.
        out[rank] = {"loss": loss.item(), "emb_grad_avg": emb.grad / world, "start": pfc.class_start,
                     "weight_grad": pfc.weight.grad.clone()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_partial_fc_two_gloo_ranks_match_one_rank(tmp_path):
    torch.manual_seed(3)
    emb = torch.randn(12, 8, dtype=torch.float64)
    labels = torch.randint(0, 9, (12,))
    weight = torch.randn(9, 8, dtype=torch.float64) * 0.1
    manager = mp.Manager()
    out = manager.dict()
    init = f"file://{tmp_path / 'rdzv'}"
    mp.start_processes(_two_rank_worker, args=(2, init, {"emb": emb, "labels": labels, "weight": weight}, out),
                       nprocs=2, join=True, start_method="spawn")
    # One rank, the same global batch.
    e = emb.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    ref = plain_loss(arcface(), e, w, labels)
    ref.backward()
    for r in (0, 1):
        assert out[r]["loss"] == pytest.approx(ref.item(), rel=1e-12)
        ours = out[r]["emb_grad_avg"]
        torch.testing.assert_close(ours, e.grad[r * 6:(r + 1) * 6])
        s = out[r]["start"]
        wg = out[r]["weight_grad"]
        torch.testing.assert_close(wg, w.grad[s:s + wg.shape[0]])
