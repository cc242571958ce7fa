"""NetAdaptV2 search over a CBC super-network: multi-layer coordinate descent (MCD), and the
single-layer NetAdapt-v1 mode (SCD) for comparison; both write the same resumable history.

One iteration (both modes): every constrained resource r that is not yet within its budget
gets a lower target, T_r = max(budget_r, R_r(current) - step * R_r(initial) * decay^(i-1)) for
iteration i = 1, 2, ...; resources already within budget must stay there (T_r = budget_r).
- MCD draws J candidates, each by shrinking randomly chosen searchable widths one choice at
  a time (several layers per candidate) until every resource is under its target; each is
  scored with the super-network's own weights, sliced and BN-recalibrated, no fine-tuning.
- SCD makes one candidate per searchable width: that width alone lowered until the targets
  hold; each candidate (the *sliced* network) is fine-tuned for a few steps by the caller's
  `finetune`, recalibrated and scored; the chosen candidate's fine-tuned weights are written
  back into the super-network's prefixes (NetAdapt v1 carries the chosen network forward).
The best candidate is the one with the highest score ("accuracy"), or the least score lost per
resource saved ("per_resource": (score_cur - score) / sum_r (R_r(cur) - R_r) / R_r(initial)).
The search stops when every constraint holds (status "met"), when no candidate can meet the
targets ("stuck"), or after max_iterations.

Resources are plain callables ArchSpec -> float (no gradient): `params`, `macs` below, or a
fastface.search.lut.LatencyLUT. Scores come from a callable nn.Module -> float, higher better
(e.g. `verification_score`). A candidate is never accepted or recorded over a target.

History: a list of JSON-ready dicts, one per iteration (record 0 = the full network). Passing
the records so far back as `history` continues the search exactly where it stopped: the next
iteration's random draws are seeded by (seed, iteration), and the targets and the current
network come from the records, so a resumed run equals an uninterrupted one (given the same
resources: persist a LatencyLUT with the history).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from fastface.arch import ArchSpec
from fastface.eval import cost
from fastface.models.mobilenetv2 import MobileNetV2
from fastface.models.supernet import Supernet, Widths, load_subnet, recalibrate, slice_model, weights_digest

Resource = Callable[[ArchSpec], float]
Score = Callable[[nn.Module], float]
Record = dict[str, Any]
CRITERIA = ("accuracy", "per_resource")
MODES = ("mcd", "scd")


def params(spec: ArchSpec) -> float:
    """Resource: parameters of the network a spec describes (closed form)."""
    return float(cost.spec_cost(spec)[0])


def macs(spec: ArchSpec) -> float:
    """Resource: per-image multiply-accumulates (closed form)."""
    return float(cost.spec_cost(spec)[1])


def verification_score(images: torch.Tensor, issame: Any, nfolds: int = 10, flip: bool = False,
                       batch_size: int = 256) -> Score:
    """Score callable: 1:1 verification accuracy on pairs (images 2N x C x H x W, pairs (2k, 2k+1))."""
    from fastface.eval.verification import evaluate_model

    def score(model: nn.Module) -> float:
        return float(evaluate_model(model, images, issame, batch_size=batch_size, nfolds=nfolds, flip=flip).accuracy)

    return score


@dataclass
class NetAdaptConfig:
    """Search settings; all but max_iterations must match when a search resumes from its history."""

    candidates: int = 8  # J candidates per MCD iteration
    step: float = 0.025  # target reduction per iteration, as a fraction of the initial resource
    decay: float = 0.96  # the step shrinks by this factor every iteration
    criterion: str = "accuracy"  # or "per_resource"
    seed: int = 0
    max_iterations: int = 200
    tries: int = 4  # MCD draws up to tries * J times to find J distinct candidates

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"NetAdaptConfig.criterion: {self.criterion!r} is not one of {CRITERIA}")
        if not (0 < self.step < 1):
            raise ValueError(f"NetAdaptConfig.step: must be in (0, 1), got {self.step}")
        if not (0 < self.decay <= 1):
            raise ValueError(f"NetAdaptConfig.decay: must be in (0, 1], got {self.decay}")
        if self.candidates < 1 or self.tries < 1 or self.max_iterations < 0:
            raise ValueError(f"NetAdaptConfig: candidates, tries >= 1 and max_iterations >= 0 needed, got {self}")

    def identity(self) -> dict[str, Any]:
        """The settings that decide the search path (everything but max_iterations)."""
        d = asdict(self)
        d.pop("max_iterations")
        return d


@dataclass
class NetAdaptResult:
    """History records, why the search stopped, and helpers to turn records into networks."""

    records: list[Record]
    status: str  # "met" | "stuck" | "max_iterations"
    supernet: Supernet = field(repr=False)

    @property
    def final(self) -> Record:
        """The last accepted network."""
        return self.records[-1]

    def spec(self, i: int = -1) -> ArchSpec:
        """ArchSpec of record i."""
        return ArchSpec.from_dict(self.records[i]["spec"])

    def model(self, i: int = -1, calib: Iterable[Any] | None = None) -> MobileNetV2:
        """Record i as a physically sliced network (see `record_model`)."""
        return record_model(self.supernet, self.records[i], calib)

    def pareto(self, resources: str | Sequence[str]) -> list[Record]:
        """Pareto front of the history (see `pareto_front`)."""
        return pareto_front(self.records, resources)


def record_model(supernet: Supernet, record: Record, calib: Iterable[Any] | None = None) -> MobileNetV2:
    """A history point as a sliced network with its weights (BN recalibrated on `calib` if given).

    MCD never changes the super-network, so every MCD record slices from it. SCD writes
    fine-tuned weights back, so only its latest record matches the current weights; an older
    one raises (the driver keeps those weights from on_record).
    """
    if record.get("weights_sha256") is not None and record["weights_sha256"] != weights_digest(supernet):
        raise ValueError(f"record {record['iteration']}: the super-network's weights have changed since it was "
                         f"recorded (SCD fine-tunes them); use the weights saved by on_record")
    model = slice_model(supernet, record["widths"])
    if calib is not None:
        recalibrate(model, calib)
    return model


def pareto_front(records: Sequence[Record], resources: str | Sequence[str], score_key: str = "score") -> list[Record]:
    """Records not dominated in (higher score, lower each resource), sorted by the first resource.

    A record is dominated when another is at least as good in all of them and better in one;
    of exact ties the earliest record is kept.
    """
    names = [resources] if isinstance(resources, str) else list(resources)
    if not names:
        raise ValueError("pareto_front: name at least one resource")
    pts = [(-float(r[score_key]), *(float(r["resources"][n]) for n in names)) for r in records]
    front = []
    for i, p in enumerate(pts):
        dominated = any(all(a <= b for a, b in zip(q, p)) and (q != p or j < i) for j, q in enumerate(pts) if j != i)
        if not dominated:
            front.append(records[i])
    return sorted(front, key=lambda r: (float(r["resources"][names[0]]), -float(r[score_key])))


# ---- candidates --------------------------------------------------------------------------------


def _evaluate_resources(spec: ArchSpec, resources: Mapping[str, Resource]) -> dict[str, float]:
    return {n: float(f(spec)) for n, f in resources.items()}


def _under(values: Mapping[str, float], targets: Mapping[str, float]) -> bool:
    return all(values[n] <= t for n, t in targets.items())


def mcd_candidate(supernet: Supernet, widths: Widths, resources: Mapping[str, Resource],
                  targets: Mapping[str, float], rng: random.Random) -> tuple[Widths, dict[str, float]] | None:
    """Shrink randomly chosen widths one choice at a time until every target holds; None if impossible."""
    space = supernet.space
    w = dict(widths)
    while True:
        values = _evaluate_resources(space.spec_at(w), resources)
        if _under(values, targets):
            return w, values
        options = [n for n in space.names if space.can_shrink(w, n)]
        if not options:
            return None
        w = space.shrink(w, rng.choice(options))


def scd_candidate(supernet: Supernet, widths: Widths, name: str, resources: Mapping[str, Resource],
                  targets: Mapping[str, float]) -> tuple[Widths, dict[str, float]] | None:
    """Lower one width (only) until every target holds; None if even its smallest value does not."""
    space = supernet.space
    w: Widths | None = space.shrink(widths, name)
    while w is not None:
        values = _evaluate_resources(space.spec_at(w), resources)
        if _under(values, targets):
            return w, values
        w = space.shrink(w, name)
    return None


def _targets(records: Sequence[Record], constraints: Mapping[str, float], config: NetAdaptConfig) -> dict[str, float]:
    it = len(records)  # the iteration about to run (record 0 is the initial network)
    r0, cur = records[0]["resources"], records[-1]["resources"]
    out = {}
    for n, budget in constraints.items():
        if cur[n] <= budget:
            out[n] = float(budget)
        else:
            out[n] = max(float(budget), cur[n] - config.step * r0[n] * config.decay ** (it - 1))
    return out


def _criterion(score: float, values: Mapping[str, float], cur: Record, r0: Mapping[str, float],
               constraints: Mapping[str, float], kind: str) -> float:
    """Lower is better: -score, or score lost per (initial-normalised) resource saved."""
    if kind == "accuracy":
        return -score
    saved = sum((cur["resources"][n] - values[n]) / r0[n] for n in constraints if r0[n] > 0)
    return (cur["score"] - score) / saved if saved > 0 else math.inf


# ---- the search loop -----------------------------------------------------------------------------


def _validate(supernet: Supernet, resources: Mapping[str, Resource], constraints: Mapping[str, float]) -> None:
    if not constraints:
        raise ValueError("NetAdapt: give at least one constraint (resource name -> budget)")
    for n, b in constraints.items():
        if n not in resources:
            raise ValueError(f"NetAdapt: constraint on {n!r} but no such resource (have {', '.join(resources)})")
        if not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
            raise ValueError(f"NetAdapt: budget of {n!r} must be a finite number >= 0, got {b!r}")


def _score_model(model: nn.Module, score: Score, calib: Sequence[Any]) -> float:
    recalibrate(model, calib)
    model.eval()
    with torch.no_grad():
        return float(score(model))


def _initial_record(supernet: Supernet, mode: str, score: Score, resources: Mapping[str, Resource],
                    constraints: Mapping[str, float], calib: Sequence[Any],
                    config: NetAdaptConfig) -> tuple[Record, MobileNetV2]:
    t0 = time.perf_counter()
    full = supernet.space.full()
    spec = supernet.space.spec_at(full)
    model = slice_model(supernet, full)
    s = _score_model(model, score, calib)
    rec: Record = {
        "mode": mode, "iteration": 0, "widths": full, "spec": spec.to_dict(),
        "resources": _evaluate_resources(spec, resources), "targets": None, "score": s, "criterion": None,
        "candidates": [], "chosen": None, "constraints_met": None, "config": config.identity(),
        "constraints": {n: float(b) for n, b in constraints.items()}, "g": supernet.space.g,
        "supernet_spec": supernet.spec.to_dict(), "weights_sha256": weights_digest(supernet),
        "time_s": time.perf_counter() - t0,
    }
    rec["constraints_met"] = _under(rec["resources"], rec["constraints"])
    return rec, model


class ResumeMismatch(ValueError):
    """A history that this search cannot continue (another mode, config, budget or super-network)."""


def _check_history(history: Sequence[Record], supernet: Supernet, mode: str, constraints: Mapping[str, float],
                   config: NetAdaptConfig) -> None:
    r0 = history[0]
    want = {"mode": mode, "config": config.identity(), "constraints": {n: float(b) for n, b in constraints.items()},
            "g": supernet.space.g, "supernet_spec": supernet.spec.to_dict()}
    for k, v in want.items():
        if r0.get(k) != v:
            raise ResumeMismatch(f"cannot resume: history record 0 has {k}={r0.get(k)!r}, this search has {v!r}")
    for i, r in enumerate(history):
        if r.get("iteration") != i:
            raise ResumeMismatch(f"cannot resume: history record {i} has iteration {r.get('iteration')!r}")
    last = history[-1]
    if mode == "mcd" and r0["weights_sha256"] != weights_digest(supernet):
        raise ResumeMismatch("cannot resume: the super-network's weights differ from those the history was made with")
    if mode == "scd" and last["weights_sha256"] != weights_digest(supernet):
        raise ResumeMismatch(f"cannot resume SCD: the super-network's weights are not those after record "
                         f"{last['iteration']} (load the checkpoint saved with it)")


def _search(mode: str, supernet: Supernet, score: Score, resources: Mapping[str, Resource],
            constraints: Mapping[str, float], calib: Sequence[Any], config: NetAdaptConfig | None,
            history: Sequence[Record] | None, on_record: Callable[[Record, MobileNetV2], None] | None,
            finetune: Callable[[MobileNetV2], None] | None) -> NetAdaptResult:
    config = config or NetAdaptConfig()
    _validate(supernet, resources, constraints)
    calib = list(calib)
    if history:
        records = [dict(r) for r in history]
        _check_history(records, supernet, mode, constraints, config)
    else:
        rec, model = _initial_record(supernet, mode, score, resources, constraints, calib, config)
        records = [rec]
        if on_record is not None:
            on_record(rec, model)
    space = supernet.space
    while True:
        cur = records[-1]
        if _under(cur["resources"], constraints):
            return NetAdaptResult(records, "met", supernet)
        it = len(records)
        if it > config.max_iterations:
            return NetAdaptResult(records, "max_iterations", supernet)
        t0 = time.perf_counter()
        targets = _targets(records, constraints, config)
        proposals: list[tuple[Widths, dict[str, float]]] = []
        if mode == "mcd":
            rng = random.Random(f"mcd:{config.seed}:{it}")  # str seeds hash deterministically across runs
            for _ in range(config.tries * config.candidates):
                c = mcd_candidate(supernet, cur["widths"], resources, targets, rng)
                # None: this random path bottomed out over target; another path may not.
                if c is not None and c[0] not in [p[0] for p in proposals]:
                    proposals.append(c)
                if len(proposals) == config.candidates:
                    break
        else:
            for name in space.names:
                c = scd_candidate(supernet, cur["widths"], name, resources, targets)
                if c is not None:
                    proposals.append(c)
        if not proposals:
            return NetAdaptResult(records, "stuck", supernet)
        cands, models, crits = [], [], []
        for w, values in proposals:
            if not _under(values, targets):  # the generators guarantee this; a record must never break it
                raise AssertionError(f"candidate {w} is over target: {values} vs {targets}")
            model = slice_model(supernet, w)
            if finetune is not None:
                model.train()
                finetune(model)
            s = _score_model(model, score, calib)
            crit = _criterion(s, values, cur, records[0]["resources"], constraints, config.criterion)
            crits.append(crit)
            # JSON has no infinity: "nothing saved" is recorded as null.
            cands.append({"widths": w, "resources": values, "score": s,
                          "criterion": crit if math.isfinite(crit) else None})
            models.append(model)
        best = min(range(len(cands)), key=lambda i: (crits[i], -cands[i]["score"], i))
        chosen = cands[best]
        if mode == "scd":
            load_subnet(supernet, chosen["widths"], models[best])
        spec = space.spec_at(chosen["widths"])
        rec = {
            "mode": mode, "iteration": it, "widths": chosen["widths"], "spec": spec.to_dict(),
            "resources": chosen["resources"], "targets": targets, "score": chosen["score"],
            "criterion": chosen["criterion"], "candidates": cands, "chosen": best,
            "constraints_met": _under(chosen["resources"], constraints),
            "weights_sha256": weights_digest(supernet) if mode == "scd" else None,
            "time_s": time.perf_counter() - t0,
        }
        records.append(rec)
        if on_record is not None:
            on_record(rec, models[best])


def mcd(supernet: Supernet, score: Score, resources: Mapping[str, Resource], constraints: Mapping[str, float],
        calib: Sequence[Any], config: NetAdaptConfig | None = None, history: Sequence[Record] | None = None,
        on_record: Callable[[Record, MobileNetV2], None] | None = None) -> NetAdaptResult:
    """NetAdaptV2 multi-layer coordinate descent; `history` resumes, `on_record(record, model)` sees each step.

    resources: name -> callable(ArchSpec) -> float, all recorded; constraints: name -> budget
    (resource <= budget); calib: training batches for BN recalibration of every candidate.
    """
    return _search("mcd", supernet, score, resources, constraints, calib, config, history, on_record, None)


def scd(supernet: Supernet, score: Score, resources: Mapping[str, Resource], constraints: Mapping[str, float],
        calib: Sequence[Any], finetune: Callable[[MobileNetV2], None], config: NetAdaptConfig | None = None,
        history: Sequence[Record] | None = None,
        on_record: Callable[[Record, MobileNetV2], None] | None = None) -> NetAdaptResult:
    """NetAdapt v1 single-layer coordinate descent: one candidate per width, each fine-tuned by `finetune`.

    `finetune(model)` trains the sliced candidate in place (see `Finetuner`); the chosen one's
    weights are written back into the super-network. Resuming needs the super-network as it
    was after the last record (checked by weight digest).
    """
    return _search("scd", supernet, score, resources, constraints, calib, config, history, on_record, finetune)


class Finetuner:
    """Short fine-tune of a sliced candidate: `steps` SGD steps on the first batches, a fresh copy of the loss head.

    Every candidate sees the same batches and starts from the same head, so candidates are
    compared on equal terms; the head's updates are discarded afterwards.
    """

    def __init__(self, batches: Sequence[Any], loss_fn: nn.Module, steps: int = 10, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4):
        if steps < 1:
            raise ValueError(f"Finetuner: steps must be >= 1, got {steps}")
        self.batches, self.loss_fn, self.steps = list(batches), loss_fn, steps
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        if not self.batches:
            raise ValueError("Finetuner: no batches")

    def __call__(self, model: MobileNetV2) -> None:
        import copy

        head = copy.deepcopy(self.loss_fn)
        opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=self.lr,
                              momentum=self.momentum, weight_decay=self.weight_decay)
        p = next(model.parameters())
        model.train()
        head.train()
        for i in range(self.steps):
            x, y = self.batches[i % len(self.batches)]
            loss = head(model(x.to(device=p.device, dtype=p.dtype)), y.to(p.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


__all__ = ["CRITERIA", "Finetuner", "NetAdaptConfig", "NetAdaptResult", "Record", "Resource", "Score",
           "macs", "mcd", "mcd_candidate", "params", "pareto_front", "record_model", "scd", "scd_candidate",
           "verification_score"]
