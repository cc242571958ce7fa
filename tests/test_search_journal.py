"""The search journal: atomic appends, every record read back, corrupt or truncated lines
reported by file and line with the complete records kept, strict mode, non-JSON values."""
from __future__ import annotations

import json
import os

import pytest

from fastface.search.journal import Journal, JournalError


def fill(path: str, n: int = 4) -> Journal:
    j = Journal(path)
    for i in range(n):
        j.append("candidate", key=f"k{i}", accuracy=0.5 + i / 10, resources={"params": 1000 * i})
    return j


def test_records_round_trip_in_order(tmp_path):
    path = str(tmp_path / "journal.jsonl")
    j = fill(path)
    again = Journal(path)
    assert [r["key"] for r in again] == ["k0", "k1", "k2", "k3"]
    assert [r["seq"] for r in again] == [0, 1, 2, 3]
    assert again.records == j.records and not again.problems
    assert again.last("candidate", key="k2")["accuracy"] == pytest.approx(0.7)
    assert again.last("candidate", key="nope") is None
    # Appending after a reload continues the sequence; nothing else is left in the folder.
    again.append("final", best="k3")
    assert Journal(path).records[-1]["seq"] == 4
    assert sorted(os.listdir(tmp_path)) == ["journal.jsonl"]


def test_nan_is_stored_as_null_and_objects_are_refused(tmp_path):
    j = Journal(str(tmp_path / "j.jsonl"))
    j.append("x", value=float("nan"), nested={"a": [float("inf"), 1.0]})
    assert Journal(j.path).records[0]["value"] is None
    assert Journal(j.path).records[0]["nested"] == {"a": [None, 1.0]}
    with pytest.raises(TypeError, match="JSON data"):
        j.append("x", value=object())
    with pytest.raises(ValueError, match="reserved"):
        j.append("x", seq=5)
    assert len(Journal(j.path)) == 1  # the failed append wrote nothing


def test_truncated_last_line_is_reported_and_complete_records_kept(tmp_path):
    path = str(tmp_path / "journal.jsonl")
    fill(path)
    with open(path) as f:
        text = f.read()
    cut = text[: len(text) - 25]  # the last record loses its end (as a torn copy would)
    with open(path, "w") as f:
        f.write(cut)
    j = Journal(path)
    assert [r["key"] for r in j] == ["k0", "k1", "k2"]
    assert len(j.problems) == 1 and j.problems[0].line == 4
    assert f"{path}:4: not a complete JSON record" in j.report()
    assert "kept the 3 complete records" in j.report()
    # The next write saves the bad line aside and drops it from the journal.
    j.append("candidate", key="k3-again")
    clean = Journal(path)
    assert not clean.problems and [r["key"] for r in clean][-1] == "k3-again"
    with open(path + ".bad") as f:
        bad = f.read()
    assert f"{path}:4:" in bad and cut.splitlines()[-1] in bad


def test_altered_and_foreign_lines_are_named(tmp_path):
    path = str(tmp_path / "journal.jsonl")
    fill(path)
    with open(path) as f:
        lines = f.read().splitlines()
    rec = json.loads(lines[1])
    rec["accuracy"] = 0.99  # edited after writing: the checksum no longer matches
    lines[1] = json.dumps(rec)
    lines.insert(3, '["not", "a", "record"]')
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    j = Journal(path)
    assert [p.line for p in j.problems] == [2, 4]
    assert "checksum mismatch" in j.problems[0].reason and "not a journal record" in j.problems[1].reason
    assert [r["key"] for r in j] == ["k0", "k2", "k3"]  # complete records on both sides are kept
    with pytest.raises(JournalError, match=r"journal.jsonl:2: checksum mismatch"):
        Journal(path, strict=True)


def test_repeated_sequence_number_is_flagged(tmp_path):
    path = str(tmp_path / "journal.jsonl")
    fill(path, 2)
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(lines + [lines[0]]) + "\n")  # a duplicated line (e.g. a bad merge)
    j = Journal(path)
    assert len(j) == 2 and j.problems[0].line == 3 and "does not follow" in j.problems[0].reason
