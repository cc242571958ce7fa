"""The search journal: an append-only record of everything a search did, one JSON object a line.

Every line is a record ``{"seq": n, "kind": ..., ..., "crc": ...}``; ``crc`` is the first 16
hex digits of the SHA-256 of the record's canonical JSON without it. Appending rewrites the
whole file into a temp file and renames it over the journal (`fastface.utils.atomic_write_text`),
so a kill at any moment leaves either the old journal or the new one, never a torn line.

Reading checks every line. A line that is not JSON (a truncated copy, another tool writing
into the file), lacks ``seq``/``kind``, fails its checksum, or repeats an earlier ``seq`` is
a *problem*: it is reported naming the file and the line, every complete record is kept,
and the bad lines are copied to ``<journal>.bad`` before the next write drops them from
the journal. ``strict=True`` raises `JournalError` on the first problem instead.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

from fastface.utils import atomic_write_text

Record = dict[str, Any]


class JournalError(ValueError):
    """A journal that cannot be used as it is; the message names the file and the line."""


@dataclass(frozen=True)
class JournalProblem:
    """One unusable line: where it is, why, and its text (kept in <journal>.bad)."""

    path: str
    line: int
    reason: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def _canonical(record: Record) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)


def _json_default(o: Any) -> Any:
    # numpy scalars and the like: plain Python numbers in the journal.
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"journal records must be JSON data, got {type(o).__name__}")


def _crc(record: Record) -> str:
    body = {k: v for k, v in record.items() if k != "crc"}
    return hashlib.sha256(_canonical(body).encode()).hexdigest()[:16]


def _finite(o: Any) -> Any:
    """Non-finite floats become None: JSON has no NaN, and a journal must stay valid JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


class Journal:
    """Records of one search, loaded from and appended to `path` (see the module docstring)."""

    def __init__(self, path: str, strict: bool = False):
        self.path = path
        self.records: list[Record] = []
        self.problems: list[JournalProblem] = []
        self._bad_pending = False
        if os.path.exists(path):
            self._load(strict)

    def _load(self, strict: bool) -> None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                lines = f.read().split("\n")
        except OSError as e:
            raise JournalError(f"{self.path}: cannot read the journal ({e})") from e
        if lines and lines[-1] == "":
            lines.pop()
        last_seq = -1
        for n, text in enumerate(lines, start=1):
            reason = None
            rec: Any = None
            if not text.strip():
                reason = "empty line"
            else:
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    reason = f"not a complete JSON record ({e.msg} at column {e.colno}); truncated or overwritten"
            if reason is None:
                if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int) or not isinstance(rec.get("kind"), str):
                    reason = "not a journal record (needs integer 'seq' and string 'kind')"
                elif rec.get("crc") != _crc(rec):
                    reason = "checksum mismatch: the record was altered after it was written"
                elif rec["seq"] <= last_seq:
                    reason = f"sequence number {rec['seq']} does not follow {last_seq}"
            if reason is not None:
                problem = JournalProblem(self.path, n, reason, text)
                if strict:
                    raise JournalError(str(problem))
                self.problems.append(problem)
                continue
            last_seq = rec["seq"]
            self.records.append(rec)
        self._bad_pending = bool(self.problems)

    # ---- writing --------------------------------------------------------------------------
    def append(self, kind: str, **fields: Any) -> Record:
        """Add a record (atomically rewriting the file) and return it as stored."""
        clash = sorted(set(fields) & {"seq", "kind", "time", "crc"})
        if clash:
            raise ValueError(f"journal record fields {clash} are reserved")
        rec: Record = {"seq": self.records[-1]["seq"] + 1 if self.records else 0, "kind": kind,
                       "time": time.time(), **_finite(fields)}
        rec["crc"] = _crc(rec)
        line = _canonical(rec)  # raises TypeError before anything is written
        if self._bad_pending:
            self._save_bad()
        text = "".join(_canonical(r) + "\n" for r in self.records) + line + "\n"
        atomic_write_text(self.path, text)
        self.records.append(json.loads(line))
        return self.records[-1]

    def _save_bad(self) -> None:
        bad = self.path + ".bad"
        old = ""
        if os.path.exists(bad):
            with open(bad, encoding="utf-8", errors="replace") as f:
                old = f.read()
        new = "".join(f"# {p.path}:{p.line}: {p.reason}\n{p.text}\n" for p in self.problems)
        atomic_write_text(bad, old + new)
        self._bad_pending = False

    # ---- reading --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def of_kind(self, kind: str) -> list[Record]:
        """Records of one kind, in order."""
        return [r for r in self.records if r["kind"] == kind]

    def last(self, kind: str, **match: Any) -> Record | None:
        """The newest record of `kind` whose fields equal `match`, or None."""
        for r in reversed(self.records):
            if r["kind"] == kind and all(r.get(k) == v for k, v in match.items()):
                return r
        return None

    def report(self) -> str:
        """One line per problem found at load (empty when the journal was clean)."""
        if not self.problems:
            return ""
        kept = len(self.records)
        lines = [f"{p}" for p in self.problems]
        lines.append(f"{self.path}: kept the {kept} complete record{'s' if kept != 1 else ''}; the bad line"
                     f"{'s' if len(self.problems) != 1 else ''} will be saved to {self.path}.bad")
        return "\n".join(lines)


__all__ = ["Journal", "JournalError", "JournalProblem", "Record"]
