"""Training-set sources: index → (class, RGB bytes, depth PNG/PGM bytes or None), for any backend.

Two layouts: an insightface RecordIO set (``train.rec`` + ``train.idx``, see
``fastface.data.recordio``) and an image folder ``root/<identity>/<name>.{jpg,jpeg,png}``
with an optional 16-bit ``<name>_depth.png`` (or ``_depth.pgm``) next to each image. Both
loaders (torch and DALI) read encoded bytes through this interface and decode them
themselves; ``read_many`` reads a whole batch (for RecordIO: views of the mapped file).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fastface.data.codec import PGM_MAGIC, PNG_IEND, PNG_SIGNATURE, DecodeError, check_complete, pgm_header
from fastface.data.errors import DataError
from fastface.data.recordio import IR_SIZE, MAGIC, MAX_PART, RecordIOError, RecordReader

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
DEPTH_SUFFIXES = ("_depth.png", "_depth.pgm")


@dataclass
class BatchBytes:
    """Encoded samples of one batch as ``read_many`` found them: what was read, what failed."""

    kept: np.ndarray  # positions (into the requested indices) that were read, in order
    labels: np.ndarray  # int64 class of each kept sample
    rgb: list[np.ndarray]  # uint8 encoded RGB of each kept sample ([] when not asked for)
    depth: list[np.ndarray]  # uint8 encoded depth of each kept sample ([] when not asked for)
    errors: list[tuple[int, DataError]]  # (position, why) of each sample that could not be read
    # Per kept sample, whether its depth is the set's own 16-bit PGM (``RecordSource.pgm_layout``:
    # same header, exact length), i.e. raw big-endian samples at a known offset; None when not known.
    pgm: np.ndarray | None = None


def _read_each(src: Source, idx: np.ndarray, rgb: bool, depth: bool) -> BatchBytes:
    """``read_many`` by calling ``read`` per sample (and for the records the fast path declines)."""
    kept, labels, rgbs, depths, errors = [], [], [], [], []
    for j, i in enumerate(np.asarray(idx, np.int64).tolist()):
        try:
            label, rgb_b, depth_b = src.read(i)
            if depth and depth_b is None:
                path, rec = src.locate(i)
                raise DataError(path, "sample has no depth", rec)
        except DataError as e:
            errors.append((j, e))
            continue
        kept.append(j)
        labels.append(label)
        if rgb:
            rgbs.append(np.frombuffer(rgb_b, np.uint8))
        if depth:
            depths.append(np.frombuffer(depth_b, np.uint8))
    return BatchBytes(np.array(kept, np.int64), np.array(labels, np.int64), rgbs, depths, errors)


class Source(Protocol):
    """What a loader needs from a training set."""

    path: str
    has_depth: bool
    num_classes: int

    def __len__(self) -> int: ...

    def read(self, i: int) -> tuple[int, bytes, bytes | None]: ...

    def name(self, i: int) -> str: ...

    def locate(self, i: int) -> tuple[str, int | None]: ...

    def read_many(self, idx: np.ndarray, rgb: bool = True, depth: bool = False) -> BatchBytes: ...


class RecordSource:
    """Image records of an insightface RecordIO set (header and identity records excluded)."""

    def __init__(self, rec_path: str, idx_path: str | None = None, skip_corrupt: bool = False):
        self.path = os.fspath(rec_path)
        self.reader = RecordReader(self.path, idx_path)
        self.skip_corrupt = skip_corrupt
        keys = self.reader.image_keys()
        # An index that points past the end is caught here, before any epoch starts.
        bad = [k for k in keys if self.reader.offset(k) >= self.reader.size or self.reader.offset(k) < 0]
        if bad and not skip_corrupt:
            k = bad[0]
            raise RecordIOError(self.path, f"index {self.reader.idx_path} points past the end of the file ({self.reader.size} bytes); {len(bad)} such records", k, self.reader.offset(k))
        bad_set = set(bad)
        self.keys = [k for k in keys if k not in bad_set]
        self.dropped_at_open = [self.name_key(k) for k in bad]
        if not self.keys:
            raise DataError(self.path, "no image records")
        self.num_classes = self._num_classes()
        self._offsets = np.array([self.reader.offset(k) for k in self.keys], np.int64)
        self._pgm_head: bytes | None = None  # the PGM depth header of this set, for read_many
        self._pgm_bytes = 0
        # (header bytes, height, width) of that PGM: its samples follow the header as raw big-endian uint16
        self.pgm_layout: tuple[int, int, int] | None = None
        self.has_depth = self._probe_depth()

    def _num_classes(self) -> int:
        h = self.reader.header0
        if h is not None and len(h.label) >= 2 and h.label[1] > h.label[0]:
            return int(h.label[1] - h.label[0])
        prop = os.path.join(os.path.dirname(self.path), "property")
        if os.path.exists(prop):
            with open(prop) as f:
                first = f.read().strip().split(",")[0]
            if first.isdigit():
                return int(first)
        # No header and no property file: the classes are whatever the records say.
        return int(max(self._label(k, self.reader[k][0]) for k in self.keys)) + 1

    def _probe_depth(self) -> bool:
        for k in self.keys[:8]:
            try:
                h, payload = self.reader[k]
            except RecordIOError:
                continue
            if isinstance(h.label, tuple) and len(h.label) >= 2:
                n = int(h.label[1])
                if payload[n : n + 2] == PGM_MAGIC:
                    try:
                        w, hh, maxval, start = pgm_header(payload[n:])
                    except DecodeError:
                        return True  # the error surfaces, with the record named, when it is read
                    if maxval == 65535:
                        self._pgm_head, self._pgm_bytes = payload[n : n + start], start + 2 * w * hh
                        self.pgm_layout = (start, hh, w)
                    return True
                return payload[n : n + 8] == PNG_SIGNATURE
            return False
        return False

    def __len__(self) -> int:
        return len(self.keys)

    def name_key(self, key: int) -> str:
        """'<rec path> record <key>'."""
        return f"{self.path} record {key}"

    def name(self, i: int) -> str:
        """Human-readable location of sample ``i``."""
        return self.name_key(self.keys[i])

    def locate(self, i: int) -> tuple[str, int | None]:
        """(file, record key) of sample ``i``, for errors."""
        return self.path, self.keys[i]

    def _label(self, key: int, h) -> int:
        lab = h.class_label
        if not math.isfinite(lab) or lab != int(lab) or lab < 0:
            raise RecordIOError(self.path, f"label {lab!r} is not a class index", key)
        n = getattr(self, "num_classes", None)
        if n is not None and lab >= n:
            raise RecordIOError(self.path, f"label {int(lab)} is outside the {n} classes of the set", key)
        return int(lab)

    def read(self, i: int) -> tuple[int, bytes, bytes | None]:
        """(class, RGB bytes, depth PNG/PGM bytes or None) of sample ``i``; DataError names the record."""
        key = self.keys[i]
        h, payload = self.reader[key]
        label = self._label(key, h)
        rgb, depth = payload, None
        if isinstance(h.label, tuple) and len(h.label) >= 2:
            n = h.label[1]
            if n != int(n) or not 0 < n <= len(payload):
                raise RecordIOError(self.path, f"RGB length {n!r} in the header does not fit the {len(payload)}-byte payload", key)
            n = int(n)
            rgb, depth = payload[:n], (payload[n:] or None)
        try:
            check_complete(rgb)
            if depth is not None:
                check_complete(depth)
        except DecodeError as e:
            raise RecordIOError(self.path, str(e), key) from None
        return label, rgb, depth

    def read_many(self, idx: np.ndarray, rgb: bool = True, depth: bool = False) -> BatchBytes:
        """Samples ``idx`` as zero-copy views of the mapped file: one vectorised pass over the batch.

        Checks the same things as ``read`` (framing, label, RGB length, complete JPEG/PNG,
        complete depth) with numpy on the whole batch; a record that does not pass plainly
        (multi-part, odd format, or bad) goes through ``read``, which names what is wrong.
        ``depth=True`` makes a sample without depth an error.
        """
        idx = np.asarray(idx, np.int64)
        n = len(idx)
        if n == 0:
            return BatchBytes(np.zeros(0, np.int64), np.zeros(0, np.int64), [], [], [])
        arr = self.reader.buffer()
        size = arr.size
        offs = self._offsets[idx]
        # Frame header (magic, lrec), IRHeader (flag, label, id, id2) and two float labels.
        ok = (offs >= 0) & (offs + 40 <= size)
        o = np.where(ok, offs, 0)
        g = arr[o[:, None] + np.arange(40)]
        words, floats = g.view("<u4"), g.view("<f4")
        length, flag = words[:, 1] & MAX_PART, words[:, 2].astype(np.int64)
        ok &= (words[:, 0] == MAGIC) & (words[:, 1] >> 29 == 0) & (flag <= 8)
        ps = offs + 8 + IR_SIZE + 4 * flag
        pe = offs + 8 + length
        ok &= (pe >= ps) & (pe <= size)
        with np.errstate(invalid="ignore"):
            lab = np.where(flag == 0, floats[:, 3], floats[:, 8]).astype(np.float64)
            ok &= np.isfinite(lab) & (lab == np.floor(lab)) & (lab >= 0) & (lab < self.num_classes)
            two = flag >= 2
            rl = np.where(two, floats[:, 9], 0).astype(np.float64)
            ok &= ~two | (np.isfinite(rl) & (rl == np.floor(rl)) & (rl > 0) & (rl <= pe - ps))
        re = np.where(two & ok, ps + np.where(ok, rl, 0).astype(np.int64), pe)
        # Complete RGB: JPEG SOI ... EOI or PNG signature ... IEND (anything else: read()).
        ok &= re - ps >= 8
        s0, s1 = np.where(ok, ps, 0), np.where(ok, re - 8, 0)
        head, tail = arr[s0[:, None] + np.arange(8)], arr[s1[:, None] + np.arange(8)]
        jpeg = (head[:, 0] == 0xFF) & (head[:, 1] == 0xD8) & (tail[:, 6] == 0xFF) & (tail[:, 7] == 0xD9)
        sig, iend = np.frombuffer(PNG_SIGNATURE, np.uint8), np.frombuffer(PNG_IEND, np.uint8)
        png = (head == sig).all(1) & (tail == iend).all(1)
        ok &= jpeg | png
        # Complete depth when there is some: PNG signature ... IEND, or this set's PGM header + samples.
        has_d = two & (pe > re)
        same = None
        dl = pe - re
        chk = ok & has_d & (dl >= 8)
        d0, d1 = np.where(chk, re, 0), np.where(chk, pe - 8, 0)
        dhead, dtail = arr[d0[:, None] + np.arange(8)], arr[d1[:, None] + np.arange(8)]
        d_ok = (dhead == sig).all(1) & (dtail == iend).all(1)
        if self._pgm_head is not None:
            k = len(self._pgm_head)
            ph = arr[np.where(chk, re, 0)[:, None] + np.arange(min(k, 8))]
            same = (ph == np.frombuffer(self._pgm_head[:8], np.uint8)).all(1) & (dl == self._pgm_bytes)
            if k > 8 and same.any():
                rest = arr[np.where(same, re, 0)[:, None] + np.arange(8, k)]
                same &= (rest == np.frombuffer(self._pgm_head[8:], np.uint8)).all(1)
            d_ok |= same
        ok &= ~has_d | (chk & d_ok)
        labels = np.where(ok, lab, 0).astype(np.int64)
        if ok.all() and (not depth or has_d.all()):
            rs, rend, de = ps.tolist(), re.tolist(), pe.tolist()
            return BatchBytes(np.arange(n, dtype=np.int64), labels,
                              [arr[a:b] for a, b in zip(rs, rend)] if rgb else [],
                              [arr[a:b] for a, b in zip(rend, de)] if depth else [], [],
                              same & has_d if depth and same is not None else None)
        kept, labs, rgbs, depths, errors = [], [], [], [], []
        for j in range(n):
            if not ok[j]:
                one = _read_each(self, idx[j : j + 1], rgb, depth)
                if one.errors:
                    errors.append((j, one.errors[0][1]))
                    continue
                kept.append(j)
                labs.append(int(one.labels[0]))
                rgbs += one.rgb
                depths += one.depth
                continue
            if depth and not has_d[j]:
                errors.append((j, DataError(self.path, "sample has no depth", self.keys[int(idx[j])])))
                continue
            kept.append(j)
            labs.append(int(labels[j]))
            if rgb:
                rgbs.append(arr[int(ps[j]) : int(re[j])])
            if depth:
                depths.append(arr[int(re[j]) : int(pe[j])])
        pgm = None
        if depth and self._pgm_head is not None:
            pgm = np.array([self.is_pgm(d) for d in depths], bool)
        return BatchBytes(np.array(kept, np.int64), np.array(labs, np.int64), rgbs, depths, errors, pgm)

    def is_pgm(self, depth: np.ndarray | bytes) -> bool:
        """Whether encoded ``depth`` is this set's 16-bit PGM (``pgm_layout``): same header, exact length."""
        head = self._pgm_head
        return head is not None and len(depth) == self._pgm_bytes and bytes(depth[: len(head)]) == head


class FolderSource:
    """``root/<identity>/<name>.{jpg,jpeg,png}`` (+ ``<name>_depth.png|pgm``); identities sorted by name."""

    def __init__(self, root: str, skip_corrupt: bool = False):
        self.path = os.fspath(root)
        if not os.path.isdir(self.path):
            raise DataError(self.path, "not a directory")
        self.skip_corrupt = skip_corrupt
        ids = sorted(d for d in os.listdir(self.path) if os.path.isdir(os.path.join(self.path, d)))
        self.identities = ids
        self.files: list[tuple[int, str, str | None]] = []
        self.lacking_depth: list[str] = []
        for label, ident in enumerate(ids):
            d = os.path.join(self.path, ident)
            names = sorted(os.listdir(d))
            present = set(names)
            for f in names:
                stem, ext = os.path.splitext(f)
                if ext.lower() not in IMAGE_EXTS or f.endswith(DEPTH_SUFFIXES):
                    continue
                dep = next((stem + sfx for sfx in DEPTH_SUFFIXES if stem + sfx in present), None)
                if dep is None:
                    self.lacking_depth.append(os.path.join(d, f))
                self.files.append((label, os.path.join(d, f), os.path.join(d, dep) if dep else None))
        if not self.files:
            raise DataError(self.path, "no images found (expected <root>/<identity>/<name>.jpg|png)")
        self.num_classes = len(ids)
        self.has_depth = not self.lacking_depth
        self.dropped_at_open: list[str] = []

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        """The image file of sample ``i``."""
        return self.files[i][1]

    def locate(self, i: int) -> tuple[str, int | None]:
        """(image file, None) of sample ``i``, for errors."""
        return self.files[i][1], None

    def read(self, i: int) -> tuple[int, bytes, bytes | None]:
        """(class, RGB bytes, depth PNG/PGM bytes or None) of sample ``i``."""
        label, img, dep = self.files[i]
        try:
            with open(img, "rb") as f:
                rgb = f.read()
            check_complete(rgb)
            depth = None
            if dep is not None:
                with open(dep, "rb") as f:
                    depth = f.read()
                check_complete(depth)
        except (OSError, DecodeError) as e:
            raise DataError(img, str(e)) from None
        return label, rgb, depth

    def read_many(self, idx: np.ndarray, rgb: bool = True, depth: bool = False) -> BatchBytes:
        """Samples ``idx`` (one file read per image); errors are collected, not raised."""
        return _read_each(self, idx, rgb, depth)


def open_source(path: str, idx_path: str | None = None, skip_corrupt: bool = False) -> RecordSource | FolderSource:
    """A RecordSource for a ``.rec`` (or a directory holding ``train.rec``), else a FolderSource."""
    p = os.fspath(path)
    if os.path.isdir(p) and os.path.exists(os.path.join(p, "train.rec")):
        p = os.path.join(p, "train.rec")
    if p.endswith(".rec"):
        return RecordSource(p, idx_path, skip_corrupt)
    return FolderSource(p, skip_corrupt)
