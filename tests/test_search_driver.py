"""The search driver end to end on a tiny synthetic set, every candidate trained by the real
Trainer in its own process: a concurrent search; the same search in ddp mode, killed with
SIGKILL mid-way and resumed (finished candidates are not trained again, the decisions and
every candidate's weights equal the uninterrupted concurrent run's); a candidate trained
data-parallel by two gloo processes; NetAdapt (MCD) on the winner through the CLI; the LUT
and report subcommands; config errors."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from fastface.search.journal import Journal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny synthetic set (40 verification pairs) and a BN-calibrated vanilla root network."""
    from fastface.data import synth
    from test_search_replicate_split import calibrated_parent

    d = tmp_path_factory.mktemp("search")
    data = str(d / "data")
    synth.generate(synth.preset("tiny", val_pairs=40), data, workers=1, progress=False)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    root = calibrated_parent(data, str(d / "root.pt"))
    torch.set_num_threads(old)
    return {"data": data, "root": root, "dir": d}


def write_config(tiny, name: str, mode: str = "concurrent", **rs) -> tuple[str, str]:
    """A search config for the tiny set: one replication position, one other split position."""
    data, out = tiny["data"], str(tiny["dir"] / name)
    cfg = {
        "output": out, "seed": 0,
        "train": {"config": os.path.join(ROOT, "configs/demo.yaml"), "overrides": [
            f"data.path={data}/train.rec", "data.batch_size=8", "data.num_workers=0", "data.backend=torch",
            "data.augment=false", "synth.enabled=false", "model.width=0.25", "model.embedding=32", "model.split=0",
            "run.deterministic=false", "run.channels_last=false", f"eval.sets=[{data}/val.bin]", "eval.nfolds=2",
            "eval.flip=false", "sched.name=constant", "sched.warmup_steps=0", "optim.lr=0.01"]},
        "objective": {"set": "val", "latency_runs": 3},
        "parallel": {"mode": mode, "nproc": 1, "workers": 2, "threads": 1},
        "replicate_split": {"split": 1, "positions": [2], "max_rounds": 1, "max_extra_blocks": 1,
                            "split_positions": [2], "root_steps": 1, "child_steps": 3, "root_init": tiny["root"],
                            "vanilla_baseline": False, **rs},
        "netadapt": {"supernet_steps": 3, "candidates": 2, "step": 0.1, "max_iterations": 3, "calib_batches": 2,
                     "lut_runs": 3, "lut_rounds": 1, "lut_check": 2, "lut_check_every": 1, "score_pairs": 0, "g": 8, "threads": 1,
                     "constraints": {"params": "90%"}},
    }
    path = str(tiny["dir"] / f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path, out


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastface", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


def weights_sha(path: str) -> str:
    sd = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    h = hashlib.sha256()
    for k, t in sd.items():
        h.update(k.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def done_candidates(journal: Journal) -> dict[str, dict]:
    return {r["key"]: r for r in journal.of_kind("candidate") if r["status"] == "done"}


@pytest.fixture(scope="module")
def reference(tiny):
    """The uninterrupted search: two candidates at a time, one thread each."""
    from fastface.search.driver import load_search_config, run_replicate_split

    path, out = write_config(tiny, "concurrent")
    run = run_replicate_split(load_search_config(path))
    return {"run": run, "out": out, "journal": Journal(os.path.join(out, "replicate_split", "journal.jsonl"))}


@pytest.mark.slow
def test_concurrent_search_journals_everything(reference):
    run, j = reference["run"], reference["journal"]
    o = run.outcome
    names = {r["name"] for r in j.of_kind("candidate")}
    assert names == {"root", "split1", "r1:cont", "r1:rep2", "s:cont", "s:split2"}
    done = done_candidates(j)
    assert len(done) == 6 and len(run.launched) == 5  # split1 is an exact transfer: not trained
    for r in done.values():
        assert os.path.exists(r["weights"]) and 0 <= r["accuracy"] <= 1
        assert {"params", "macs", "latency_ms"} <= set(r["resources"])
    split1 = [r for r in done.values() if r["name"] == "split1"][0]
    root = [r for r in done.values() if r["name"] == "root"][0]
    assert split1["accuracy"] == root["accuracy"] and split1["metrics"]["inherited_from"] == root["key"]
    # Two candidates ran at once: their start records precede both completions.
    seqs = [(r["kind"], r["name"]) for r in j if r["kind"] in ("start", "candidate") and r["name"].startswith("r1")]
    assert [k for k, _ in seqs[:2]] == ["start", "start"]
    assert [d["step"] for d in j.of_kind("decision")] == ["replicate", "split"]
    final = j.last("final")
    assert final["best"] == o.final.key and o.final.name in ("r1:rep2", "r1:cont", "s:cont", "s:split2")
    best = os.path.join(reference["out"], "best.json")
    from fastface.arch import ArchSpec

    assert ArchSpec.load(best) == o.final.spec  # ready for `fastface train ... model.spec=best.json`
    for f in ("pareto_latency.png", "pareto_params.png", "summary.json"):
        assert os.path.getsize(os.path.join(reference["out"], f)) > 0


@pytest.fixture(scope="module")
def killed_and_resumed(tiny, reference):
    """The same search in ddp mode (nproc 1) from the CLI: SIGKILLed while a candidate trains, then resumed."""
    path, out = write_config(tiny, "ddp", mode="ddp")
    jpath = os.path.join(out, "replicate_split", "journal.jsonl")
    p = cli("search", "replicate-split", "--config", path)
    deadline = time.time() + 300
    while True:  # kill once a trained candidate is journaled and another one is training
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline, "the search never reached the kill point"
        if os.path.exists(jpath):
            j = Journal(jpath)
            done = {r["key"] for r in j.of_kind("candidate")}
            started = [r for r in j.of_kind("start") if r["key"] not in done]
            if len(done) >= 3 and started:
                break
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = Journal(jpath)
    in_flight = [r["key"] for r in before.of_kind("start") if r["key"] not in done_candidates(before)]
    # A torn line at the end, as an interrupted copy of the journal would leave it.
    with open(jpath, "a") as f:
        f.write('{"seq": 999, "kind": "candidate", "key": "tor')
    deadline = time.time() + 30  # the orphaned training process dies with its parent
    while any(_alive_with(os.path.join(out, "replicate_split", "candidates", k)) for k in in_flight):
        assert time.time() < deadline, "a training process outlived the killed driver"
        time.sleep(0.2)
    r = cli("search", "replicate-split", "--config", path)
    log = r.communicate(timeout=600)[0]
    assert r.returncode == 0, log
    return {"out": out, "before": before, "after": Journal(jpath), "log": log, "in_flight": in_flight}


def _alive_with(text: str) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        return True
            except OSError:
                pass
    return False


@pytest.mark.slow
def test_killed_search_resumes_without_redoing_finished_candidates(killed_and_resumed, reference):
    k = killed_and_resumed
    before, after = k["before"], k["after"]
    finished = set(done_candidates(before))
    assert len(finished) >= 3 and k["in_flight"]
    assert "journal.jsonl" in k["log"] and "not a complete JSON record" in k["log"]  # the torn line, named
    assert after.problems == [] and after.records[:len(before.records)] == before.records  # nothing lost
    resumed_starts = [r["key"] for r in after.records[len(before.records):] if r["kind"] == "start"]
    assert not finished & set(resumed_starts)  # finished candidates were not trained again
    assert set(k["in_flight"]) <= set(resumed_starts)  # the interrupted one was
    assert after.last("final")["best"] == reference["journal"].last("final")["best"]
    # The resumed candidate continued from its checkpoint or started over; either way it trained to the end.
    assert all(r["metrics"].get("step", 0) in (0, 1, 3) for r in done_candidates(after).values())


@pytest.mark.slow
def test_ddp_and_concurrent_make_the_same_decisions(killed_and_resumed, reference):
    ref, ddp = reference["journal"], killed_and_resumed["after"]
    assert ref.of_kind("run")[-1]["slots"]["mode"] == "concurrent" and ddp.of_kind("run")[-1]["slots"]["mode"] == "ddp"
    strip = lambda ds: [{k: d[k] for k in ("step", "round", "reference", "options", "best", "gain", "accepted")}  # noqa: E731
                        for d in ds]
    assert strip(ddp.of_kind("decision")[-2:]) == strip(ref.of_kind("decision"))
    a, b = done_candidates(ref), done_candidates(ddp)
    assert set(a) == set(b)
    for key in a:  # not only the decisions: every candidate's trained weights are bit-identical
        assert a[key]["metrics"]["verification"] == b[key]["metrics"]["verification"], a[key]["name"]
        assert weights_sha(a[key]["weights"]) == weights_sha(b[key]["weights"]), a[key]["name"]


@pytest.mark.slow
def test_candidate_trained_by_two_gloo_processes(tiny, reference):
    """ddp on CPU: one candidate, torchrun with 2 processes, half the global batch on each."""
    from fastface.search.driver import load_search_config, load_train
    from fastface.search.replicate_split import Candidate
    from fastface.search.runner import ParallelConfig, ResourceMeter, TrainRunner, resolve_parallel, train_identity

    path, out = write_config(tiny, "gloo", mode="ddp")
    cfg = load_search_config(path, ["parallel.nproc=2"])
    tc = load_train(cfg)
    slots = resolve_parallel(ParallelConfig("ddp", 2, 0, 1), False)
    assert (slots.nproc, slots.workers, slots.threads) == (2, 1, 1)
    j = Journal(os.path.join(out, "journal.jsonl"))
    meter = ResourceMeter(j, measure_latency=False)
    runner = TrainRunner(out, j, cfg.train.config, cfg.train.overrides, tc, slots, "val", meter,
                         train_identity(tc, slots))
    parent = reference["run"].outcome.final  # trained: it has class centres to hand on
    runner.results[parent.key] = reference["run"].outcome.final_result
    child = Candidate("gloo2", "rep5", "replicate", parent.spec.with_replica(5), parent.key, 2, 2, block=5,
                      position=5, origins=parent.origins)
    (res,) = runner([child])
    with open(os.path.join(runner.cand_dir(child), "result.json")) as f:
        done = json.load(f)
    assert done["world_size"] == 2 and res.metrics["step"] == 2 and 0 <= res.accuracy <= 1
    with open(os.path.join(runner.cand_dir(child), "job.json")) as f:
        assert "data.batch_size=4" in json.load(f)["overrides"]  # global batch 8 over 2 ranks
    head = torch.load(res.head, weights_only=True)["weight"]
    assert head.shape == (8, 32)  # both ranks' class-centre shards gathered
    log = open(os.path.join(runner.cand_dir(child), "train.log")).read()
    assert "world 2" in log and "class centres from" in log


@pytest.mark.slow
def test_netadapt_lut_and_report_from_the_cli(tiny, reference, capsys):
    """The CLI handlers in this process (the kill test above runs the CLI as a real subprocess)."""
    from fastface.cli import main
    from fastface.eval.cost import spec_cost
    from fastface.train.checkpoint import load_model

    path = os.path.join(str(tiny["dir"]), "concurrent.yaml")
    out = reference["out"]
    assert main(["search", "netadapt", "--config", path]) == 0
    log = capsys.readouterr().out
    j = Journal(os.path.join(out, "netadapt-mcd", "journal.jsonl"))
    recs = [r["record"] for r in j.of_kind("record")]
    assert j.last("done")["status"] == "met" and len(recs) >= 2
    budget = recs[0]["resources"]["params"] * 0.9
    assert recs[-1]["resources"]["params"] <= budget
    for r in recs[1:]:
        assert all(c["resources"]["params"] <= r["targets"]["params"] for c in r["candidates"])
    for rec, path_pt in zip(recs, [r["weights"] for r in j.of_kind("record")]):
        m = load_model(path_pt)  # a physically smaller network, not masks
        assert sum(p.numel() for p in m.parameters()) == rec["resources"]["params"] == spec_cost(m.spec)[0]
    exports = j.of_kind("export")
    assert exports and all(os.path.getsize(e["onnx"]) > 0 and e["max_abs_diff"] < 1e-3 for e in exports)
    assert "latency LUT" in log
    # Checked at the start and again every lut_check_every (here 1) iterations, each check journaled.
    checks = j.of_kind("lut_check")
    assert "iteration" not in checks[0] and [c["iteration"] for c in checks[1:]] == [r["iteration"] for r in recs[1:]]
    assert all(len(c["measured_ms"]) == 2 and c["action"] in ("ok", "corrected", "fallback") for c in checks)
    # Running it again resumes: nothing is retrained or re-searched.
    assert main(["search", "netadapt", "--config", path]) == 0
    log2 = capsys.readouterr().out
    assert "trained before" in log2 and "resuming after iteration" in log2
    assert [r["record"] for r in Journal(j.path).of_kind("record")] == recs

    lut_path = os.path.join(str(tiny["dir"]), "lut.json")
    spec_path = os.path.join(out, "best.json")
    assert main(["search", "lut", "--spec", spec_path, "--out", lut_path, "--no-sweep", "--check", "2", "--runs", "3",
                 "--rounds", "1"]) == 0
    with open(lut_path) as f:
        lut = json.load(f)
    assert lut["entries"] and lut["checks"] and lut["threads"] == 1

    assert main(["search", "report", out]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["netadapt"]["netadapt-mcd"]["front"] and summary["best"]["from"].startswith("netadapt-mcd")
    assert "replicate_split" in summary["replicate_split"]


@pytest.mark.slow
def test_a_failing_candidate_is_reported_with_its_log(tiny, reference):
    """A training process that dies: the error names the candidate, its exit and its log; nothing else is lost."""
    from fastface.search.driver import load_search_config, load_train
    from fastface.search.replicate_split import Candidate
    from fastface.search.runner import CandidateError, ParallelConfig, ResourceMeter, TrainRunner, resolve_parallel

    path, out = write_config(tiny, "failing")
    cfg = load_search_config(path)
    tc = load_train(cfg)
    slots = resolve_parallel(ParallelConfig("concurrent", 1, 1, 1), False)
    j = Journal(os.path.join(out, "journal.jsonl"))
    bad = list(cfg.train.overrides) + [f"data.path={tiny['dir']}/missing/train.rec"]  # fails inside the worker
    runner = TrainRunner(out, j, cfg.train.config, bad, tc, slots, "val", ResourceMeter(j, measure_latency=False), {})
    parent = reference["run"].outcome.final
    runner.results[parent.key] = reference["run"].outcome.final_result
    child = Candidate("doomed", "r9:rep1", "replicate", parent.spec.with_replica(1), parent.key, 2, 2, block=1)
    with pytest.raises(CandidateError) as e:
        runner([child])
    msg = str(e.value)
    assert "candidate r9:rep1 #doomed failed (exit status 1)" in msg
    assert os.path.join(runner.cand_dir(child), "train.log") in msg and "missing" in msg  # the log's last lines
    assert "run the same command again to resume" in msg
    assert [r["kind"] for r in Journal(j.path)] == ["start"]  # launched, never recorded as done


def test_config_errors_are_named(tiny, tmp_path, capsys):
    from fastface.cli import main

    path, _ = write_config(tiny, "bad")
    assert main(["search", "replicate-split", "--config", path, "replicate_split.max_round=2"]) == 2
    assert "unknown config key 'replicate_split.max_round'" in capsys.readouterr().err
    assert main(["search", "netadapt", "--config", path, "netadapt.constraints={power: 3}"]) == 2
    assert "netadapt.constraints.power: unknown resource" in capsys.readouterr().err
    assert main(["search", "replicate-split", "--config", path, "replicate_split.threshold=-1"]) == 2
    assert "replicate_split.threshold: must be >= 0" in capsys.readouterr().err
    assert main(["search", "replicate-split", "--config", path, "objective.set=lfw"]) == 2
    assert "objective.set: 'lfw' is not among the train config's eval.sets" in capsys.readouterr().err
    assert main(["search", "report", str(tmp_path)]) == 2
    assert "no search journal found" in capsys.readouterr().err
