"""Replicate / split search (Soongswang et al. 2023; PLOS ONE 2024): a two-step greedy search
over where to replicate inverted-residual blocks and where to split the RGB and depth input.

Every network is a `Candidate`; candidates are evaluated in batches by an `Evaluate`
callable (the real one, fastface.search.runner.TrainRunner, trains each through fastface's
Trainer and scores verification accuracy on the validation pairs). The flow:

0. root: the vanilla network (the base spec with a fused input, split 0) trained `root_steps`.
   Input split: the root split at `split` (RGB and depth branches). With merge "add" at
   split 1 the weight transfer is exact, so the split network inherits the root's metrics
   without training; any other split is trained `child_steps`.
1. Replication rounds: children are the parent with one more copy of each candidate block
   position (positions name blocks of the base network; replicating a position again stacks
   another copy) plus, with compare_to "continued", the parent itself trained the same
   `child_steps` ("continue"), so a replica must beat equal extra training rather than the
   shorter-trained parent. The best replica is kept when it beats that reference by more
   than `threshold`; the rounds stop otherwise, after `max_rounds`, or at `max_extra_blocks`.
2. Split: the step-1 network re-split at each position of `split_positions` (the current
   position is the continued reference); the best is kept when it beats the reference by
   more than `threshold`.
Last, with `vanilla_baseline`, the root is continued for as many steps as the winner had
after the root, so the vanilla and the found network have equal training budgets.

Weight transfer: a child's initial weights are its parent's trained weights through the
function-preserving operators of fastface.models (`replicate`: exact; `resplit` 0 -> 1 with
merge add: exact; other split moves: a warm start). `from_scratch` trains every network from
random initialisation for `scratch_steps` instead (the baseline that shows what transfer saves).

Constraints (params, MACs, measured latency) are checked before training: a child over a
budget is recorded as infeasible and never trained. Ties go to the earlier candidate (lower
position / split), so the decisions are a pure function of the metrics: two runs whose
candidates train to the same metrics make the same decisions, however the training was
scheduled.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

from fastface.arch import ArchSpec
from fastface.models.mobilenetv2 import MobileNetV2, replicate, resplit


@dataclass
class ReplicateSplitConfig:
    """Settings of the two-step search (the `replicate_split` section of a search config)."""

    split: int = 1  # input split of step 1 (1: separate RGB and depth stems)
    positions: list[int] | None = None  # base block indices to try replicating; None: every block
    threshold: float = 0.0  # a change is kept only if it beats the reference by more than this
    max_rounds: int = 3
    max_extra_blocks: int = 3
    split_positions: list[int] = field(default_factory=lambda: [1, 2, 3])
    compare_to: Literal["continued", "parent"] = "continued"
    root_steps: int = 200
    child_steps: int = 50
    scratch_steps: int | None = None  # from-scratch training budget; None: root_steps + child_steps
    from_scratch: bool = False
    root_init: str | None = None  # a trained vanilla model.pt: evaluated, not trained, as the root
    vanilla_baseline: bool = True
    # Train-config overrides for children that start from their parent's weights (fine-tuning):
    # e.g. a lower optim.lr, so the restart of the schedule does not undo what the parent learned.
    child_overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> None:
            raise ValueError(f"replicate_split.{key}: {why}")

        if self.split < 0:
            bad("split", f"must be >= 0, got {self.split}")
        if self.threshold < 0:
            bad("threshold", f"must be >= 0, got {self.threshold}")
        if self.max_rounds < 0 or self.max_extra_blocks < 0:
            bad("max_rounds", "max_rounds and max_extra_blocks must be >= 0")
        if self.root_steps < 1 or self.child_steps < 1:
            bad("root_steps", f"root_steps and child_steps must be >= 1, got {self.root_steps}, {self.child_steps}")
        if self.scratch_steps is not None and self.scratch_steps < 1:
            bad("scratch_steps", f"must be >= 1, got {self.scratch_steps}")
        if any(k < 1 for k in self.split_positions):
            bad("split_positions", f"positions are layer indices >= 1, got {self.split_positions}")

    @property
    def scratch_budget(self) -> int:
        """Steps of every network trained from scratch."""
        return self.scratch_steps if self.scratch_steps is not None else self.root_steps + self.child_steps


@dataclass(frozen=True)
class Candidate:
    """One network the search evaluates: its spec, where its weights come from and its budget."""

    key: str
    name: str
    op: str  # "root" | "split" | "replicate" | "continue"
    spec: ArchSpec
    parent: str | None
    steps: int  # training steps of this candidate (0: exact transfer, metrics inherited)
    total_steps: int  # steps along its lineage (root included)
    from_scratch: bool = False
    exact: bool = False  # weights transferred exactly and not trained
    block: int | None = None  # replicate: index in the parent's spec of the block copied
    position: int | None = None  # replicate: base block index; split: the split position
    origins: tuple[int, ...] = ()  # for each block of spec, the base block it descends from

    @property
    def extra_blocks(self) -> int:
        """Replicated blocks beyond the base network."""
        return len(self.origins) - len(set(self.origins))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the journal)."""
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        d["origins"] = list(self.origins)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Candidate":
        """Inverse of to_dict."""
        d = dict(d)
        d["spec"] = ArchSpec.from_dict(d["spec"])
        d["origins"] = tuple(d.get("origins", ()))
        return cls(**d)


@dataclass
class Result:
    """What evaluating a candidate gave: the objective, resources, weights and timings."""

    key: str
    status: str  # "done" | "infeasible"
    accuracy: float | None
    resources: dict[str, float]
    weights: str | None = None  # model file (fastface.train.checkpoint.save_model format)
    head: str | None = None  # the trained class centres (for children's loss heads), if any
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


Evaluate = Callable[[Sequence[Candidate]], Sequence[Result]]
_EPS = 1e-9
Resources = Callable[[ArchSpec], Mapping[str, float]]


@dataclass
class Outcome:
    """The search's result: the winner, the vanilla reference, the root and every decision."""

    final: Candidate
    final_result: Result
    vanilla: Candidate
    vanilla_result: Result
    root: Candidate
    root_result: Result
    decisions: list[dict[str, Any]]
    candidates: dict[str, Candidate]  # every candidate this run considered, by key
    results: dict[str, Result]


def candidate_key(identity: Mapping[str, Any], spec: ArchSpec, steps: int, from_scratch: bool,
                  parent: str | None = None, op: str | None = None, block: int | None = None,
                  extra: Mapping[str, Any] | None = None) -> str:
    """Content address of a candidate: everything its trained weights depend on.

    From scratch, a network is its spec and budget (the same network reached twice is one
    candidate); with weight transfer also its parent and the operator that made it.
    """
    d: dict[str, Any] = {"identity": dict(identity), "spec": spec.to_dict(), "steps": steps, "scratch": from_scratch,
                         "extra": dict(extra or {})}
    if not from_scratch:
        d.update(parent=parent, op=op, block=block)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_exact_split(parent: ArchSpec, position: int) -> bool:
    """Whether re-splitting `parent` at `position` preserves its function exactly (see fastface.models)."""
    return parent.merge == "add" and {parent.split, position} == {0, 1}


def transfer(parent: MobileNetV2, cand: Candidate) -> MobileNetV2:
    """The child network of `cand` with its parent's weights moved in (replicate / resplit / copy)."""
    if cand.op == "replicate":
        child = replicate(parent, cand.block)
    elif cand.op == "split":
        child = resplit(parent, cand.position)
    elif cand.op == "continue":
        child = copy.deepcopy(parent)
    else:
        raise ValueError(f"candidate {cand.name}: no weight transfer for op {cand.op!r}")
    if child.spec != cand.spec:
        raise ValueError(f"candidate {cand.name}: the transferred network's spec differs from the candidate's")
    return child


class _Search:
    """State of one run of the greedy search (see `search`)."""

    def __init__(self, base: ArchSpec, cfg: ReplicateSplitConfig, evaluate: Evaluate, resources: Resources,
                 constraints: Mapping[str, float], identity: Mapping[str, Any], root_extra: Mapping[str, Any],
                 log: Callable[[str], None], on_decision: Callable[[dict[str, Any]], None] | None):
        self.base, self.cfg, self.evaluate, self.resources = base, cfg, evaluate, resources
        self.constraints, self.identity, self.root_extra = dict(constraints), dict(identity), dict(root_extra)
        self.log, self.on_decision = log, on_decision
        self.cands: dict[str, Candidate] = {}
        self.results: dict[str, Result] = {}
        self.decisions: list[dict[str, Any]] = []
        self.scratch = cfg.from_scratch

    # ---- candidates ---------------------------------------------------------------------------
    def _make(self, name: str, op: str, spec: ArchSpec, parent: Candidate | None, steps: int, exact: bool = False,
              block: int | None = None, position: int | None = None, origins: tuple[int, ...] = ()) -> Candidate:
        if self.scratch:
            steps, exact = self.cfg.scratch_budget, False
        total = steps if (self.scratch or parent is None) else parent.total_steps + steps
        if op == "root":
            extra = self.root_extra
        else:
            extra = {"child_overrides": self.cfg.child_overrides} if self.cfg.child_overrides and not self.scratch else {}
        key = candidate_key(self.identity, spec, steps, self.scratch, parent.key if parent else None, op, block, extra)
        return Candidate(key, name, op, spec, None if self.scratch or parent is None else parent.key, steps, total,
                         self.scratch, exact, block, position, origins)

    def root(self) -> Candidate:
        """The vanilla network (fused input), trained from scratch or given as root_init."""
        vanilla = self.base.with_split(0)
        steps = 0 if self.cfg.root_init else self.cfg.root_steps
        return self._make("root", "root", vanilla, None, steps, origins=tuple(range(len(vanilla.blocks))))

    def cont(self, p: Candidate, name: str, steps: int | None = None) -> Candidate:
        """p itself trained further (the reference a change must beat)."""
        return self._make(name, "continue", p.spec, p, self.cfg.child_steps if steps is None else steps,
                          origins=p.origins)

    def replica(self, p: Candidate, position: int, name: str) -> Candidate | None:
        """p with one more copy of base block `position` (None if p has no such block)."""
        idx = [i for i, o in enumerate(p.origins) if o == position]
        if not idx:
            return None
        b = idx[-1]  # stack copies after the last one
        spec = p.spec.with_replica(b)
        origins = p.origins[:b + 1] + (position,) + p.origins[b + 1:]
        return self._make(name, "replicate", spec, p, self.cfg.child_steps, block=b, position=position,
                          origins=origins)

    def split(self, p: Candidate, k: int, name: str) -> Candidate:
        """p with its input split at layer k."""
        exact = is_exact_split(p.spec, k)
        return self._make(name, "split", p.spec.with_split(k), p, 0 if exact else self.cfg.child_steps, exact=exact,
                          position=k, origins=p.origins)

    # ---- evaluation -----------------------------------------------------------------------------
    def over_budget(self, values: Mapping[str, float]) -> list[str]:
        """The constraints these resource values break, as text."""
        return [f"{n} {values[n]:.4g} > {b:.4g}" for n, b in self.constraints.items() if values.get(n, 0) > b]

    def run(self, batch: list[Candidate]) -> list[Result]:
        """Results of a batch: over-budget ones recorded untrained, known ones reused, the rest evaluated."""
        todo: list[Candidate] = []
        for c in batch:
            self.cands[c.key] = c
            if c.key in self.results or any(t.key == c.key for t in todo):
                continue
            values = dict(self.resources(c.spec))
            over = self.over_budget(values)
            if over and c.op != "root":
                self.results[c.key] = Result(c.key, "infeasible", None, values, metrics={"over": over})
                self.log(f"{c.name}: over budget ({', '.join(over)}); not trained")
            else:
                todo.append(c)
        if todo:
            for c, r in zip(todo, self.evaluate(todo)):
                if r.key != c.key:
                    raise RuntimeError(f"evaluate returned a result for {r.key} where {c.key} ({c.name}) was due")
                self.results[c.key] = r
        return [self.results[c.key] for c in batch]

    def acc(self, c: Candidate) -> float:
        """The objective of an evaluated candidate."""
        r = self.results[c.key]
        if r.status != "done" or r.accuracy is None:
            raise RuntimeError(f"candidate {c.name} has no accuracy (status {r.status})")
        return r.accuracy

    def decide(self, kind: str, round_: int, ref: Candidate, ref_acc: float, options: list[Candidate]) -> Candidate | None:
        """The best feasible option if it beats ref_acc by more than the threshold, else None; journaled."""
        feasible = [c for c in options if self.results[c.key].status == "done"]
        best = max(feasible, key=lambda c: self.acc(c), default=None)  # max keeps the first of ties
        gain = self.acc(best) - ref_acc if best is not None else None
        # Accuracies are fold means: equal ones can differ in the last bit, which is no gain.
        accepted = best is not None and gain > self.cfg.threshold + _EPS
        d = {"step": kind, "round": round_, "reference": ref.key, "reference_name": ref.name, "reference_accuracy": ref_acc,
             "options": [{"key": c.key, "name": c.name, "status": self.results[c.key].status,
                          "accuracy": self.results[c.key].accuracy} for c in options],
             "best": best.key if best else None, "best_name": best.name if best else None, "gain": gain,
             "threshold": self.cfg.threshold, "accepted": accepted}
        self.decisions.append(d)
        if self.on_decision is not None:
            self.on_decision(d)
        verdict = (f"keep {best.name} (+{gain:.4f})" if accepted else
                   f"keep {ref.name}" + (f" (best {best.name}: {gain:+.4f} <= {self.cfg.threshold})" if best else
                                         " (no feasible option)"))
        self.log(f"{kind}{'' if round_ < 0 else f' round {round_}'}: {verdict}")
        return best if accepted else None

    # ---- the two steps ----------------------------------------------------------------------------
    def go(self) -> Outcome:
        """Root, input split, replication rounds, split step, vanilla reference."""
        cfg = self.cfg
        root = self.root()
        over = self.over_budget(dict(self.resources(root.spec)))
        if over:
            raise ValueError(f"the vanilla base network is already over budget ({', '.join(over)}): replication and "
                             f"splitting only add cost, so no candidate can meet it")
        (rr,) = self.run([root])
        p = root
        if cfg.split > 0:
            if cfg.split > root.spec.num_layers:
                raise ValueError(f"replicate_split.split: {cfg.split} is beyond the network's {root.spec.num_layers} layers")
            p = self.split(root, cfg.split, f"split{cfg.split}")
            (r,) = self.run([p])
            if r.status != "done":
                raise ValueError(f"the input split alone is over budget ({', '.join(r.metrics['over'])})")
        positions = cfg.positions if cfg.positions is not None else list(range(len(self.base.blocks)))
        bad = [i for i in positions if not 0 <= i < len(self.base.blocks)]
        if bad:
            raise ValueError(f"replicate_split.positions: {bad} are not block indices of the base network "
                             f"(0..{len(self.base.blocks) - 1})")

        # Step 1: replication rounds.
        extra = 0
        for rnd in range(1, cfg.max_rounds + 1):
            if extra >= cfg.max_extra_blocks:
                self.log(f"step 1: {extra} extra block(s), the maximum; stop")
                break
            options = [c for pos in positions if (c := self.replica(p, pos, f"r{rnd}:rep{pos}")) is not None]
            if not options:
                self.log("step 1: no block position to replicate; stop")
                break
            ref = self.cont(p, f"r{rnd}:cont") if cfg.compare_to == "continued" else p
            self.run(([ref] if ref is not p else []) + options)
            best = self.decide("replicate", rnd, ref, self.acc(ref), options)
            if best is None:
                p = ref
                break
            p, extra = best, extra + 1

        # Step 2: the split position.
        options = []
        for k in cfg.split_positions:
            if k == p.spec.split:
                continue
            if k > p.spec.num_layers:
                self.log(f"step 2: split {k} is beyond the network's {p.spec.num_layers} layers; skipped")
                continue
            options.append(self.split(p, k, f"s:split{k}"))
        final = p
        if options:
            ref = self.cont(p, "s:cont") if cfg.compare_to == "continued" else p
            self.run(([ref] if ref is not p else []) + options)
            best = self.decide("split", -1, ref, self.acc(ref), options)
            final = best if best is not None else ref
        else:
            self.log("step 2: no other split position in range; keep the step-1 network")

        # The vanilla reference at the same training budget.
        vanilla, vr = root, rr
        if cfg.vanilla_baseline and not self.scratch and final.total_steps > root.total_steps:
            vanilla = self.cont(root, f"vanilla+{final.total_steps - root.total_steps}",
                                final.total_steps - root.total_steps)
            (vr,) = self.run([vanilla])
        return Outcome(final, self.results[final.key], vanilla, vr, root, rr, self.decisions, self.cands, self.results)


def search(base: ArchSpec, cfg: ReplicateSplitConfig, evaluate: Evaluate, resources: Resources,
           constraints: Mapping[str, float] | None = None, identity: Mapping[str, Any] | None = None,
           root_extra: Mapping[str, Any] | None = None, log: Callable[[str], None] = print,
           on_decision: Callable[[dict[str, Any]], None] | None = None) -> Outcome:
    """Run the two-step replicate / split search from `base` (see the module docstring).

    evaluate: trains and scores a batch of candidates (results in the same order);
    resources: spec -> {"params", "macs", "latency_ms", ...}; constraints: name -> budget;
    identity: the training settings, part of every candidate key (so a changed setting never
    reuses a stale result); root_extra: what else the root depends on (e.g. a root_init file).
    """
    return _Search(base, cfg, evaluate, resources, constraints or {}, identity or {}, root_extra or {}, log,
                   on_decision).go()


__all__ = ["Candidate", "Evaluate", "Outcome", "ReplicateSplitConfig", "Resources", "Result", "candidate_key",
           "is_exact_split", "search", "transfer"]
