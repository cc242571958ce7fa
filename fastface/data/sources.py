"""Training-set sources: index → (class, RGB bytes, depth PNG bytes or None), for any backend.

Two layouts: an insightface RecordIO set (``train.rec`` + ``train.idx``, see
``fastface.data.recordio``) and an image folder ``root/<identity>/<name>.{jpg,jpeg,png}``
with an optional 16-bit ``<name>_depth.png`` next to each image. Both loaders (torch and
DALI) read encoded bytes through this interface and decode them themselves.
"""
from __future__ import annotations

import math
import os
from typing import Protocol

from fastface.data.codec import DecodeError, PNG_SIGNATURE, check_complete
from fastface.data.errors import DataError
from fastface.data.recordio import RecordIOError, RecordReader

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
DEPTH_SUFFIX = "_depth.png"


class Source(Protocol):
    """What a loader needs from a training set."""

    path: str
    has_depth: bool
    num_classes: int

    def __len__(self) -> int: ...

    def read(self, i: int) -> tuple[int, bytes, bytes | None]: ...

    def name(self, i: int) -> str: ...

    def locate(self, i: int) -> tuple[str, int | None]: ...


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
        """(class, RGB bytes, depth PNG bytes or None) of sample ``i``; DataError names the record."""
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


class FolderSource:
    """``root/<identity>/<name>.{jpg,jpeg,png}`` (+ ``<name>_depth.png``); identities sorted by name."""

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
                if ext.lower() not in IMAGE_EXTS or f.endswith(DEPTH_SUFFIX):
                    continue
                dep = stem + DEPTH_SUFFIX
                has = dep in present
                if not has:
                    self.lacking_depth.append(os.path.join(d, f))
                self.files.append((label, os.path.join(d, f), os.path.join(d, dep) if has else None))
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
        """(class, RGB bytes, depth PNG bytes or None) of sample ``i``."""
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


def open_source(path: str, idx_path: str | None = None, skip_corrupt: bool = False) -> RecordSource | FolderSource:
    """A RecordSource for a ``.rec`` (or a directory holding ``train.rec``), else a FolderSource."""
    p = os.fspath(path)
    if os.path.isdir(p) and os.path.exists(os.path.join(p, "train.rec")):
        p = os.path.join(p, "train.rec")
    if p.endswith(".rec"):
        return RecordSource(p, idx_path, skip_corrupt)
    return FolderSource(p, skip_corrupt)
