"""1:1 verification as insightface reports it: flip-summed, L2-normalised embeddings; squared
L2 distance; thresholds 0..4 step 0.01; 10 folds without shuffling (best threshold on 9,
accuracy on the 10th), mean +- std; plus TAR at fixed FAR over all pairs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class VerificationResult:
    """Accuracy (mean, std over folds), the mean best threshold, and TAR at each FAR."""

    accuracy: float
    accuracy_std: float
    threshold: float
    tar_at_far: dict[str, float] = field(default_factory=dict)
    pairs: int = 0

    def as_dict(self) -> dict:
        """Plain dict for logs and JSON."""
        return asdict(self)

    def __str__(self) -> str:
        tars = " ".join(f"TAR@FAR={k}: {v:.4f}" for k, v in self.tar_at_far.items())
        return f"acc {self.accuracy:.4f} +- {self.accuracy_std:.4f} (thr {self.threshold:.2f}) {tars}".strip()


def kfold_indices(n: int, k: int) -> list[np.ndarray]:
    """Test indices of k unshuffled folds (sklearn KFold: the first n % k folds one longer)."""
    sizes = np.full(k, n // k)
    sizes[: n % k] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(k)]


def _accuracy(thr: np.ndarray, dist: np.ndarray, same: np.ndarray) -> np.ndarray:
    pred = dist[None, :] < thr[:, None]
    return (pred == same[None, :]).mean(1)


def tar_at_far(dist: np.ndarray, same: np.ndarray, far: float) -> float | None:
    """True-accept rate at the largest threshold whose false-accept rate is <= far (None: too few pairs)."""
    neg = np.sort(dist[~same])
    if neg.size * far < 1 or not same.any():
        return None
    k = int(np.floor(far * neg.size))
    # Accepting dist < neg[k] lets at most k impostor pairs through.
    thr = neg[k] if k < neg.size else np.inf
    return float((dist[same] < thr).mean())


def evaluate(emb1: torch.Tensor | np.ndarray, emb2: torch.Tensor | np.ndarray, issame, nfolds: int = 10,
             fars: tuple[float, ...] = (1e-3, 1e-4)) -> VerificationResult:
    """Verification metrics of pairs (emb1[i], emb2[i]) with labels issame[i]."""
    e1 = _np(emb1)
    e2 = _np(emb2)
    same = np.asarray(_np(issame)).astype(bool).reshape(-1)
    if e1.shape != e2.shape or e1.shape[0] != same.shape[0]:
        raise ValueError(f"evaluate: emb1 {e1.shape}, emb2 {e2.shape} and issame {same.shape} do not match")
    if same.shape[0] < nfolds:
        raise ValueError(f"evaluate: {same.shape[0]} pairs cannot make {nfolds} folds")
    e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True).clip(1e-12)
    e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True).clip(1e-12)
    dist = ((e1 - e2) ** 2).sum(1)
    thresholds = np.arange(0, 4, 0.01)
    accs, thrs = [], []
    for test in kfold_indices(len(dist), nfolds):
        train = np.setdiff1d(np.arange(len(dist)), test)
        best = thresholds[int(np.argmax(_accuracy(thresholds, dist[train], same[train])))]
        thrs.append(best)
        accs.append(float(((dist[test] < best) == same[test]).mean()))
    tars = {}
    for far in fars:
        v = tar_at_far(dist, same, far)
        if v is not None:
            tars[f"{far:g}"] = v
    return VerificationResult(float(np.mean(accs)), float(np.std(accs)), float(np.mean(thrs)), tars, len(dist))


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


@torch.no_grad()
def _device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's tensors live: its first parameter or buffer, or its `device` attribute (a frozen net)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device(getattr(model, "device", "cpu"))


def embed(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 128, flip: bool = True,
          device: torch.device | str | None = None, channels_last: bool = False) -> torch.Tensor:
    """Embeddings of images (N x C x H x W, normalised), plus those of their horizontal flips."""
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else _device_of(model)
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            e = model(x).float()
            if flip:
                e = e + model(torch.flip(x, dims=[3])).float()
            out.append(e.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate_model(model: torch.nn.Module, images: torch.Tensor, issame, batch_size: int = 128,
                   nfolds: int = 10, flip: bool = True, **kw) -> VerificationResult:
    """Embed pair images (2N: pairs are (2k, 2k+1)) and evaluate."""
    emb = F.normalize(embed(model, images, batch_size, flip, **kw))
    return evaluate(emb[0::2], emb[1::2], issame, nfolds)
