"""Replicate / split search: the greedy logic (improving / not improving, max extra blocks,
threshold, rounds, the split step, budgets, from-scratch keys) against a scripted objective,
and weight-transfer children that start exactly at their parent's function, evaluated by
the real Trainer on real verification pairs."""
from __future__ import annotations


import pytest
import torch

from fastface.arch import ArchSpec
from fastface.eval.cost import spec_cost
from fastface.search.replicate_split import Candidate, ReplicateSplitConfig, Result, is_exact_split, search, transfer

BASE = ArchSpec.face(width=0.25, embedding=32, split=1)


def resources(spec: ArchSpec) -> dict[str, float]:
    p, m = spec_cost(spec)
    return {"params": float(p), "macs": float(m)}


class Scripted:
    """An objective for testing the decision logic: accuracy from the structure of each network.

    acc = 0.70 + sum of bonus[position] over replicated base blocks + split_bonus[split]
          + 0.001 per child_steps of training (so continuing the parent helps a little).
    """

    def __init__(self, bonus: dict[int, float] | None = None, split_bonus: dict[int, float] | None = None,
                 child_steps: int = 10, second_copy: float = 1.0):
        self.bonus, self.split_bonus = bonus or {}, split_bonus or {}
        self.child_steps, self.second_copy = child_steps, second_copy
        self.batches: list[list[str]] = []

    def acc(self, c: Candidate) -> float:
        a = 0.70 + 0.001 * c.total_steps / self.child_steps + self.split_bonus.get(c.spec.split, 0.0)
        seen: dict[int, int] = {}
        for o in c.origins:
            seen[o] = seen.get(o, 0) + 1
        for o, n in seen.items():
            if n > 1:
                a += self.bonus.get(o, 0.0) * (1 + self.second_copy * (n - 2))
        return round(a, 6)

    def __call__(self, cands):
        self.batches.append([c.name for c in cands])
        return [Result(c.key, "done", self.acc(c), resources(c.spec)) for c in cands]


def cfg(**kw) -> ReplicateSplitConfig:
    base = dict(split=1, positions=[2, 5, 9], threshold=0.0, max_rounds=3, max_extra_blocks=3,
                split_positions=[1, 2, 3], root_steps=20, child_steps=10)
    return ReplicateSplitConfig(**{**base, **kw})


def run(c: ReplicateSplitConfig, obj: Scripted, constraints=None):
    log: list[str] = []
    out = search(BASE, c, obj, resources, constraints, identity={"test": 1}, log=log.append)
    return out, log


def extra_positions(cand: Candidate) -> list[int]:
    return sorted(o for o in set(cand.origins) if cand.origins.count(o) > 1)


def test_improving_replica_is_kept_and_the_rounds_stop_when_nothing_improves():
    obj = Scripted(bonus={5: 0.02}, second_copy=-1.5)  # one copy of block 5 helps, a second hurts
    out, log = run(cfg(), obj)
    rep = [d for d in out.decisions if d["step"] == "replicate"]
    assert [d["accepted"] for d in rep] == [True, False]
    assert rep[0]["best_name"] == "r1:rep5" and rep[0]["gain"] == pytest.approx(0.02)
    # root; the split; round 1; round 2; the split step; vanilla at the same budget.
    assert [b[0] for b in obj.batches] == ["root", "split1", "r1:cont", "r2:cont", "s:cont", "vanilla+30"]
    assert not any(n.startswith("r3:") for b in obj.batches for n in b)  # stopped after round 2
    assert extra_positions(out.final) == [5] and out.final.extra_blocks == 1
    # Splitting the fused root at layer 1 is an exact transfer: no training steps of its own.
    split1 = [c for c in out.candidates.values() if c.name == "split1"][0]
    assert split1.exact and split1.steps == 0 and split1.total_steps == out.root.total_steps
    # Round 1 compared replicas with the parent continued for the same steps.
    assert obj.batches[2][0] == "r1:cont" and rep[0]["reference_name"] == "r1:cont"


def test_no_improvement_stops_after_the_first_round():
    obj = Scripted()
    out, _ = run(cfg(), obj)
    rep = [d for d in out.decisions if d["step"] == "replicate"]
    assert len(rep) == 1 and not rep[0]["accepted"] and rep[0]["gain"] == 0.0
    assert out.final.extra_blocks == 0 and out.final.name == "s:cont"
    # The kept network is the continued parent: as many steps as the replicas had.
    assert out.candidates[rep[0]["reference"]].total_steps == 30


def test_max_extra_blocks_caps_replication():
    obj = Scripted(bonus={2: 0.01, 9: 0.03})  # every copy helps
    out, log = run(cfg(max_extra_blocks=2, max_rounds=5), obj)
    assert out.final.extra_blocks == 2 and extra_positions(out.final) == [9]
    assert [d["best_name"] for d in out.decisions if d["step"] == "replicate"] == ["r1:rep9", "r2:rep9"]
    assert not any(n.startswith("r3:") for b in obj.batches for n in b)
    assert any("maximum" in m for m in log)
    out, _ = run(cfg(max_extra_blocks=5, max_rounds=1), Scripted(bonus={9: 0.03}))
    assert out.final.extra_blocks == 1  # max_rounds also caps it


@pytest.mark.parametrize("threshold,accepted", [(0.005, False), (0.003, True)])
def test_threshold(threshold, accepted):
    out, _ = run(cfg(threshold=threshold, max_rounds=1), Scripted(bonus={2: 0.004}))
    d = out.decisions[0]
    assert d["gain"] == pytest.approx(0.004) and d["accepted"] is accepted
    assert out.final.extra_blocks == (1 if accepted else 0)


def test_a_gain_of_rounding_noise_is_no_gain():
    class Noisy(Scripted):
        def acc(self, c):  # replicas score what the continued parent does, up to the last bit
            return 0.57 + (1e-15 if c.op == "replicate" else 0.0)

    out, _ = run(cfg(max_rounds=1), Noisy())
    assert not out.decisions[0]["accepted"] and out.final.extra_blocks == 0


def test_split_step_keeps_the_best_position_and_ties_keep_the_reference():
    obj = Scripted(split_bonus={3: 0.01, 2: 0.01})
    out, _ = run(cfg(max_rounds=1), obj)
    s = [d for d in out.decisions if d["step"] == "split"][0]
    assert s["accepted"] and s["best_name"] == "s:split2"  # a tie between 2 and 3: the earlier position
    assert out.final.spec.split == 2 and out.final.op == "split" and not out.final.exact
    out, _ = run(cfg(max_rounds=1), Scripted())
    assert out.final.spec.split == 1 and out.final.name == "s:cont"


def test_vanilla_baseline_has_the_winners_budget():
    out, _ = run(cfg(max_rounds=2), Scripted(bonus={2: 0.02}, second_copy=-1.5))
    assert out.vanilla.spec == BASE.with_split(0) and out.vanilla.op == "continue"
    assert out.vanilla.total_steps == out.final.total_steps == 20 + 3 * 10
    assert out.root.total_steps == 20 and out.root.spec.split == 0


def test_budgets_skip_candidates_before_training():
    full = resources(BASE)["params"]
    rep9 = resources(BASE.with_replica(9))["params"]
    rep2 = resources(BASE.with_replica(2))["params"]
    assert rep2 < rep9
    obj = Scripted(bonus={2: 0.01, 9: 0.05})
    out, log = run(cfg(max_rounds=1, split_positions=[1]), obj, constraints={"params": (rep2 + rep9) / 2})
    assert "r1:rep9" not in obj.batches[1]  # never trained
    d = out.decisions[0]
    assert [o["status"] for o in d["options"] if o["name"] == "r1:rep9"] == ["infeasible"]
    assert d["best_name"] == "r1:rep2" and any("r1:rep9: over budget" in m for m in log)
    with pytest.raises(ValueError, match="vanilla base network is already over budget"):
        run(cfg(), Scripted(), constraints={"params": full / 2})


def test_from_scratch_trains_every_network_anew_and_never_twice():
    obj = Scripted(bonus={5: 0.02}, second_copy=-1.5)
    out, _ = run(cfg(from_scratch=True, scratch_steps=30), obj)
    cands = out.candidates.values()
    assert all(c.from_scratch and c.parent is None and c.steps == 30 and not c.exact for c in cands)
    names = sum(obj.batches, [])
    assert "split1" in names  # not an exact transfer any more: trained
    # The continued parent is the parent itself (same spec, same budget): evaluated once.
    keys = [c.key for c in cands]
    assert len(names) == len(set(keys))
    assert out.vanilla.key == out.root.key


def test_compare_to_parent_trains_no_continuation():
    obj = Scripted(bonus={2: 0.02}, second_copy=-1.5)
    out, _ = run(cfg(compare_to="parent"), obj)
    assert not any(n.endswith("cont") for b in obj.batches for n in b)
    assert out.decisions[0]["reference_name"] == "split1"


def test_keys_address_content():
    a, _ = run(cfg(max_rounds=1), Scripted())
    b, _ = run(cfg(max_rounds=1), Scripted())
    assert set(a.candidates) == set(b.candidates)
    c, _ = run(cfg(max_rounds=1, child_steps=11), Scripted())
    # Only the root and the exact (untrained) split do not depend on child_steps.
    shared = {k for k in set(a.candidates) & set(c.candidates)}
    assert {a.candidates[k].name for k in shared} == {"root", "split1"}


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="replicate_split.threshold"):
        ReplicateSplitConfig(threshold=-1)
    with pytest.raises(ValueError, match="replicate_split.split_positions"):
        ReplicateSplitConfig(split_positions=[0, 2])
    with pytest.raises(ValueError, match="positions: \\[40\\]"):
        run(cfg(positions=[40]), Scripted())


# ---- weight transfer through the real Trainer -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from fastface.data import synth

    out = str(tmp_path_factory.mktemp("synth-tiny"))
    synth.generate(synth.preset("tiny", val_pairs=40), out, workers=1, progress=False)
    return out


def tiny_overrides(data: str, out: str, *extra: str) -> list[str]:
    return [f"data.path={data}/train.rec", "data.batch_size=8", "data.num_workers=0", "data.backend=torch",
            "data.augment=false", "synth.enabled=false", "model.width=0.25", "model.embedding=32", "model.split=0",
            f"run.output={out}", "run.epochs=1", "run.max_steps=4", "run.progress=false", "run.tensorboard=false",
            "run.plot=false", "run.threads=1", "run.channels_last=false", "run.ckpt_every=0", "sched.name=constant",
            "optim.lr=0.1", f"eval.sets=[{data}/val.bin]", "eval.nfolds=2", "eval.flip=false", *extra]


def calibrated_parent(data: str, out: str) -> str:
    """A fused tiny network whose BN statistics match the data (fresh weights, BN recalibrated on the
    training set), saved as a model file: its embeddings separate the verification pairs, unlike a
    network trained for a handful of steps, whose BN running statistics lag its weights."""
    from fastface.data.loader import DataConfig, make_loader
    from fastface.models import build_model
    from fastface.models.supernet import recalibrate
    from fastface.train import checkpoint as ckpt

    torch.manual_seed(0)
    model = build_model(ArchSpec.face(width=0.25, embedding=32, split=0))
    loader = make_loader(DataConfig(f"{data}/train.rec", batch_size=8, backend="torch", num_workers=0, augment=False))
    recalibrate(model, list(loader))
    ckpt.save_model(out, model, model.spec.to_json())
    return out


def test_children_start_exactly_at_the_parents_function(tiny_set, tmp_path):
    from fastface.train import checkpoint as ckpt
    from fastface.train.config import load_train_config
    from fastface.train.trainer import Trainer

    torch.set_num_threads(1)
    parent_path = calibrated_parent(tiny_set, str(tmp_path / "parent.pt"))
    parent = ckpt.load_model(parent_path)
    spec0 = parent.spec
    cases = [Candidate("a", "split1", "split", spec0.with_split(1), "p", 0, 4, position=1, exact=True)]
    split1 = transfer(parent, cases[0])
    for b in (0, 3, 16):  # t = 1 block, a residual run, the last block (320 channels)
        cases.append(Candidate(f"r{b}", f"rep{b}", "replicate", spec0.with_replica(b), "p", 4, 8, block=b))
    cases.append(Candidate("rs", "rep-after-split", "replicate", split1.spec.with_replica(2), "s", 4, 8, block=2))
    assert is_exact_split(spec0, 1) and not is_exact_split(spec0, 2)

    def evaluate(spec: ArchSpec, init: str, name: str):
        """The child as the search's training job sees it: the Trainer builds spec and loads init."""
        spec_path = str(tmp_path / f"{name}.json")
        spec.save(spec_path)
        t = Trainer(load_train_config("configs/demo.yaml", tiny_overrides(
            tiny_set, str(tmp_path / name), f"model.spec={spec_path}", f"model.init={init}")))
        try:
            return t.evaluate()["val"], t
        finally:
            t.close()

    ref, t_parent = evaluate(spec0, parent_path, "parent-eval")
    assert ref["threshold"] > 0.1  # distances spread: not the collapsed embedding of BN statistics that lag
    images = torch.randn(6, 4, 112, 112)
    with torch.no_grad():
        want = t_parent.model.eval()(images)
    assert want.std(0).mean() > 1e-2  # the embedding depends on the input
    for c in cases:
        child = transfer(split1 if c.key == "rs" else parent, c)
        init = str(tmp_path / f"{c.name}-init.pt")
        ckpt.save_model(init, child, c.spec.to_json())
        got, t = evaluate(c.spec, init, c.name)
        assert t.model.spec == c.spec
        assert got["accuracy"] == ref["accuracy"] and got["threshold"] == ref["threshold"], c.name
        with torch.no_grad():
            torch.testing.assert_close(t.model.eval()(images), want, atol=1e-4, rtol=1e-4)
    # A split moved past layer 1 is a warm start, not the same function.
    warm = transfer(parent, Candidate("w", "split3", "split", spec0.with_split(3), "p", 4, 8, position=3))
    with torch.no_grad():
        assert not torch.allclose(warm.eval()(images), want, atol=1e-3)
