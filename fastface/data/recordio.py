"""MXNet RecordIO (``.rec`` + ``.idx``) reading and writing, without mxnet.

Framing (dmlc-core ``RecordIOWriter``): every part is ``magic (0xced7230a, uint32 LE)``,
``lrec (uint32 LE: upper 3 bits cflag, lower 29 bits length)``, ``length`` bytes, zero padding
to 4 bytes. A payload that contains the magic at a 4-byte-aligned offset is cut there into
parts (cflag 1 start, 2 middle, 3 end; 0 whole record) and the magic is dropped; readers put
it back between parts. The ``.idx`` is text, one ``key\\toffset`` line per record.

Payload (mxnet ``recordio.pack``): ``IRHeader`` ``<IfQQ`` (flag, label, id, id2); flag > 0
means ``flag`` float32 labels follow the header (and the scalar label is 0), then the image.

insightface convention: record 0 is a header with an empty image and label
``(N + 1, N + 1 + C)``: images are keys 1..N, and keys N+1..N+C are one record per identity
whose label is the image key range ``[start, end)``.

fastface RGB-D records: flag 2, label ``(class, rgb_len)``, payload ``JPEG ‖ 16-bit depth``
with the depth a PGM or PNG (see ``fastface.data.codec``). Readers that take ``label[0]`` as the class (insightface,
DALI users) get the right class, and JPEG decoders ignore the trailing depth image. Plain RGB
records (flag 0, scalar label, JPEG) are written and read as before.
"""
from __future__ import annotations

import mmap
import os
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fastface.data.errors import DataError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
MAX_PART = (1 << 29) - 1
CFLAG_WHOLE, CFLAG_START, CFLAG_MIDDLE, CFLAG_END = 0, 1, 2, 3


class RecordIOError(DataError):
    """A RecordIO file, index or record that cannot be read; names the file and record key."""

    def __init__(self, path: str, reason: str, key: int | None = None, offset: int | None = None):
        super().__init__(path, reason, key, offset)

    @property
    def key(self) -> int | None:
        """The record key (as in the .idx), if the error is about one record."""
        return self.record  # type: ignore[return-value]


@dataclass(frozen=True)
class IRHeader:
    """The image-record header: flag, label (scalar, or a tuple when flag > 0), id, id2."""

    flag: int
    label: float | tuple[float, ...]
    id: int = 0
    id2: int = 0

    @property
    def class_label(self) -> float:
        """The class as insightface reads it: the scalar label, or label[0] of a vector."""
        return self.label[0] if isinstance(self.label, tuple) else self.label


def pack(header: IRHeader | tuple, payload: bytes = b"") -> bytes:
    """A record payload from a header and image bytes (mxnet ``recordio.pack``)."""
    h = header if isinstance(header, IRHeader) else IRHeader(*header)
    if isinstance(h.label, (tuple, list, np.ndarray)):
        labels = np.asarray(h.label, dtype="<f4")
        return struct.pack(IR_FORMAT, labels.size, 0.0, h.id, h.id2) + labels.tobytes() + bytes(payload)
    return struct.pack(IR_FORMAT, 0, float(h.label), h.id, h.id2) + bytes(payload)


def unpack(record: bytes | memoryview, path: str = "<bytes>", key: int | None = None) -> tuple[IRHeader, bytes]:
    """(header, image bytes) of a record payload (mxnet ``recordio.unpack``)."""
    if len(record) < IR_SIZE:
        raise RecordIOError(path, f"record of {len(record)} bytes is shorter than the {IR_SIZE}-byte IRHeader", key)
    flag, label, id1, id2 = struct.unpack_from(IR_FORMAT, record, 0)
    if flag > 0:
        end = IR_SIZE + 4 * flag
        if end > len(record):
            raise RecordIOError(path, f"header declares {flag} labels but the record has {len(record)} bytes", key)
        labels = tuple(float(x) for x in np.frombuffer(record, "<f4", flag, IR_SIZE))
        return IRHeader(flag, labels, id1, id2), bytes(record[end:])
    return IRHeader(0, float(label), id1, id2), bytes(record[IR_SIZE:])


def frame(payload: bytes) -> bytes:
    """The on-disk bytes of one record: parts split at aligned magics, headers, padding."""
    data = bytes(payload)
    n = len(data)
    cuts = []
    if MAGIC_BYTES in data:
        arr = np.frombuffer(data, np.uint8, (n // 4) * 4)
        words = arr.view("<u4")
        cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
    out = bytearray()
    start = 0
    for c in cuts:
        size = c - start
        if size > MAX_PART:
            raise ValueError(f"record part of {size} bytes exceeds the RecordIO limit of 2^29 - 1")
        out += MAGIC_BYTES + struct.pack("<I", ((CFLAG_START if start == 0 else CFLAG_MIDDLE) << 29) | size)
        out += data[start:c]
        start = c + 4
    size = n - start
    if size > MAX_PART:
        raise ValueError(f"record part of {size} bytes exceeds the RecordIO limit of 2^29 - 1")
    out += MAGIC_BYTES + struct.pack("<I", ((CFLAG_END if cuts else CFLAG_WHOLE) << 29) | size)
    out += data[start:]
    out += b"\x00" * (-size % 4)
    return bytes(out)


def read_framed(buf: bytes | mmap.mmap | memoryview, offset: int, path: str = "<bytes>", key: int | None = None) -> tuple[bytes, int]:
    """(payload, offset past the record) of the record framed at ``offset``."""
    size = len(buf)
    parts: list[bytes] = []
    pos = offset
    expect_continuation = False
    while True:
        if pos + 8 > size:
            raise RecordIOError(path, f"truncated record: part header at {pos} runs past the end of the file ({size} bytes)", key, offset)
        magic, lrec = struct.unpack_from("<II", buf, pos)
        if magic != MAGIC:
            raise RecordIOError(path, f"bad magic 0x{magic:08x} at {pos} (expected 0x{MAGIC:08x})", key, offset)
        cflag, length = lrec >> 29, lrec & MAX_PART
        if cflag > CFLAG_END:
            raise RecordIOError(path, f"invalid part flag {cflag} at {pos}", key, offset)
        if expect_continuation != (cflag in (CFLAG_MIDDLE, CFLAG_END)):
            state = "a continuation part" if expect_continuation else "a new record"
            raise RecordIOError(path, f"part flag {cflag} at {pos} where {state} was expected", key, offset)
        end = pos + 8 + length
        if end > size:
            raise RecordIOError(path, f"truncated record: {length}-byte part at {pos} runs past the end of the file ({size} bytes)", key, offset)
        parts.append(bytes(buf[pos + 8 : end]))
        pos = end + (-length % 4)
        if cflag in (CFLAG_WHOLE, CFLAG_END):
            return (MAGIC_BYTES.join(parts), pos)
        expect_continuation = True


def read_index(idx_path: str) -> tuple[list[int], list[int]]:
    """(keys, offsets) of a ``.idx`` file, in file order."""
    keys, offsets = [], []
    with open(idx_path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2:
                raise RecordIOError(idx_path, f"line {lineno}: expected 'key<TAB>offset', got {line[:60]!r}")
            try:
                keys.append(int(fields[0]))
                offsets.append(int(fields[1]))
            except ValueError:
                raise RecordIOError(idx_path, f"line {lineno}: key and offset must be integers, got {line[:60]!r}") from None
    return keys, offsets


def scan_offsets(rec_path: str) -> list[int]:
    """Offsets of every record of a ``.rec``, by walking the framing (for a missing index)."""
    offsets = []
    with open(rec_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = 0
            while pos < size:
                offsets.append(pos)
                _, pos = read_framed(mm, pos, rec_path, len(offsets) - 1)
    return offsets


def _publish(tmp: str, path: str) -> None:
    # mkstemp makes 0600 files; a data set should be readable like any other file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _atomic_text(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RecordReader:
    """Random access to an indexed RecordIO file: ``reader[key] -> (IRHeader, image bytes)``.

    Keys are those of the ``.idx`` (insightface: 0 is the header record). Without an index
    (``idx_path`` missing) the file is scanned and the index rebuilt (written next to the
    ``.rec`` when ``write_index``), and a note says so on stderr.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None, write_index: bool = True, quiet: bool = False):
        self.path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else os.path.splitext(self.path)[0] + ".idx"
        if not os.path.exists(self.path):
            raise RecordIOError(self.path, "no such RecordIO file")
        self._file = open(self.path, "rb")
        self.size = os.fstat(self._file.fileno()).st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        if os.path.exists(self.idx_path):
            keys, offsets = read_index(self.idx_path)
            self.index_rebuilt = False
        else:
            offsets = scan_offsets(self.path)
            keys = list(range(len(offsets)))
            self.index_rebuilt = True
            written = ""
            if write_index:
                try:
                    _atomic_text(self.idx_path, "".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets)))
                    written = f", written to {self.idx_path}"
                except OSError as e:
                    written = f" (could not write {self.idx_path}: {e})"
            if not quiet:
                print(f"fastface: {self.path} has no index; rebuilt it by scanning ({len(keys)} records){written}", file=sys.stderr)
        self.keys: list[int] = keys
        self._offset = dict(zip(keys, offsets))
        if len(self._offset) != len(keys):
            raise RecordIOError(self.idx_path, "duplicate keys in the index")
        self._header0: IRHeader | None = None
        self._arr: np.ndarray | None = None

    def buffer(self) -> np.ndarray:
        """The whole file as a read-only uint8 array over the memory map (no copy)."""
        if self._arr is None:
            self._arr = np.frombuffer(self._mm, np.uint8) if self.size else np.zeros(0, np.uint8)
        return self._arr

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        return key in self._offset

    def offset(self, key: int) -> int:
        """File offset of record ``key``."""
        try:
            return self._offset[key]
        except KeyError:
            raise RecordIOError(self.path, "no such key in the index", key) from None

    def read_raw(self, key: int) -> bytes:
        """The payload (header + image) of record ``key``, parts joined."""
        off = self.offset(key)
        if off < 0 or off >= self.size:
            raise RecordIOError(self.path, f"index offset {off} points past the end of the file ({self.size} bytes)", key, off)
        payload, _ = read_framed(self._mm, off, self.path, key)
        return payload

    def __getitem__(self, key: int) -> tuple[IRHeader, bytes]:
        return unpack(self.read_raw(key), self.path, key)

    def __iter__(self) -> Iterator[tuple[IRHeader, bytes]]:
        for key in self.keys:
            yield self[key]

    def items(self) -> Iterator[tuple[int, IRHeader, bytes]]:
        """(key, header, image bytes) of every record, in index order."""
        for key in self.keys:
            h, p = self[key]
            yield key, h, p

    @property
    def header0(self) -> IRHeader | None:
        """Record 0 when it is an insightface header record (flag > 0, empty image), else None."""
        if self._header0 is None and 0 in self._offset:
            h, payload = self[0]
            if h.flag >= 2 and not payload:
                self._header0 = h
        return self._header0

    def image_keys(self) -> list[int]:
        """Keys of the image records: 1..N per the header record, else every key."""
        h = self.header0
        if h is None:
            return list(self.keys)
        end = int(h.label[0])
        keys = list(range(1, end))
        missing = [k for k in keys if k not in self._offset]
        if missing:
            raise RecordIOError(self.idx_path, f"header record names images 1..{end - 1} but {len(missing)} keys are missing from the index (first: {missing[0]})")
        return keys

    def identity_ranges(self) -> list[tuple[int, int]]:
        """[start, end) image-key ranges of each identity (insightface id records), if present."""
        h = self.header0
        if h is None or len(h.label) < 2:
            return []
        out = []
        for key in range(int(h.label[0]), int(h.label[1])):
            ih, _ = self[key]
            if not isinstance(ih.label, tuple) or len(ih.label) < 2:
                raise RecordIOError(self.path, "identity record has no (start, end) label", key)
            out.append((int(ih.label[0]), int(ih.label[1])))
        return out

    def close(self) -> None:
        """Release the memory map and file."""
        self._arr = None
        if isinstance(self._mm, mmap.mmap):
            try:
                self._mm.close()
            except BufferError:
                # Views from buffer() are still alive somewhere: the map closes when they go.
                pass
        self._file.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # Worker processes reopen the file: an mmap does not pickle.
        return {"path": self.path, "idx_path": self.idx_path, "keys": self.keys, "offset": self._offset}

    def __setstate__(self, st: dict) -> None:
        self.path, self.idx_path, self.keys, self._offset = st["path"], st["idx_path"], st["keys"], st["offset"]
        self._file = open(self.path, "rb")
        self.size = os.fstat(self._file.fileno()).st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        self.index_rebuilt = False
        self._header0 = None
        self._arr = None


class RecordWriter:
    """Writes an indexed RecordIO file; both files appear (renamed from temp names) on close.

    An exception inside ``with RecordWriter(...)`` leaves no partial files behind.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None):
        self.path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else os.path.splitext(self.path)[0] + ".idx"
        d = os.path.dirname(os.path.abspath(self.path)) or "."
        os.makedirs(d, exist_ok=True)
        fd, self._tmp_rec = tempfile.mkstemp(prefix=".tmp-", suffix=".rec", dir=d)
        self._rec = os.fdopen(fd, "wb")
        fd, self._tmp_idx = tempfile.mkstemp(prefix=".tmp-", suffix=".idx", dir=os.path.dirname(os.path.abspath(self.idx_path)))
        self._idx = os.fdopen(fd, "w")
        self._keys: set[int] = set()
        self._pos = 0
        self.closed = False

    def write_raw(self, key: int, payload: bytes) -> int:
        """Write a record payload (header already packed) under ``key``; returns its offset."""
        if self.closed:
            raise ValueError(f"{self.path}: writer is closed")
        if key in self._keys:
            raise ValueError(f"{self.path}: key {key} written twice")
        data = frame(payload)
        off = self._pos
        self._rec.write(data)
        self._idx.write(f"{key}\t{off}\n")
        self._pos += len(data)
        self._keys.add(key)
        return off

    def write(self, key: int, header: IRHeader | tuple, image: bytes = b"") -> int:
        """Write an image record (header + image bytes) under ``key``; returns its offset."""
        return self.write_raw(key, pack(header, image))

    def close(self) -> None:
        """Flush and move both files into place."""
        if self.closed:
            return
        self._rec.flush()
        os.fsync(self._rec.fileno())
        self._rec.close()
        self._idx.close()
        _publish(self._tmp_rec, self.path)
        _publish(self._tmp_idx, self.idx_path)
        self.closed = True

    def abort(self) -> None:
        """Discard everything written."""
        if self.closed:
            return
        self._rec.close()
        self._idx.close()
        for p in (self._tmp_rec, self._tmp_idx):
            if os.path.exists(p):
                os.unlink(p)
        self.closed = True

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class FaceRecordWriter:
    """Streams an insightface-layout face set: header record 0, images 1..N, identity records.

    Images must arrive grouped by class, classes in order 0..C-1 (the identity records are key
    ranges); the counts are declared up front because record 0 is written first.
    """

    def __init__(self, rec_path: str, n_images: int, n_classes: int, idx_path: str | None = None):
        self.n_images, self.n_classes = int(n_images), int(n_classes)
        self._w = RecordWriter(rec_path, idx_path)
        self._w.write(0, IRHeader(2, (float(self.n_images + 1), float(self.n_images + 1 + self.n_classes))))
        self._count = 0
        self._ranges: list[list[int]] = []

    def add(self, label: int, rgb: bytes, depth: bytes | None = None) -> int:
        """Append one image of class ``label`` (RGB bytes, optional depth PGM/PNG); returns its key."""
        label = int(label)
        if self._count >= self.n_images:
            raise ValueError(f"{self._w.path}: more than the declared {self.n_images} images")
        if not self._ranges or label != len(self._ranges) - 1:
            if label != len(self._ranges):
                raise ValueError(f"{self._w.path}: class {label} arrived after class {len(self._ranges) - 1}; images must be grouped by class in order")
            self._ranges.append([self._count + 1, self._count + 1])
        key = self._count + 1
        if depth is None:
            self._w.write(key, IRHeader(0, float(label), key, 0), rgb)
        else:
            self._w.write(key, IRHeader(2, (float(label), float(len(rgb))), key, 0), rgb + depth)
        self._ranges[-1][1] = key + 1
        self._count += 1
        return key

    def close(self) -> None:
        """Write the identity records and move the files into place."""
        if self._count != self.n_images or len(self._ranges) != self.n_classes:
            self._w.abort()
            raise ValueError(f"{self._w.path}: declared {self.n_images} images / {self.n_classes} classes, got {self._count} / {len(self._ranges)}")
        for c, (a, b) in enumerate(self._ranges):
            self._w.write(self.n_images + 1 + c, IRHeader(2, (float(a), float(b))))
        self._w.close()

    def abort(self) -> None:
        """Discard everything written."""
        self._w.abort()

    def __enter__(self) -> FaceRecordWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_property(path: str, n_classes: int, height: int = 112, width: int = 112) -> None:
    """The insightface ``property`` file: ``num_classes,h,w``."""
    _atomic_text(path, f"{n_classes},{height},{width}\n")


def convert_depth(src: str, dst: str, fmt: str = "pgm", src_idx: str | None = None, dst_idx: str | None = None) -> int:
    """Rewrite an RGB-D RecordIO set with its depth maps in ``fmt`` (pgm or png); returns how many.

    Lossless for what the loaders see (8-bit depth becomes the 16-bit values they would
    scale it to). Keys, headers, RGB bytes and every other record are copied unchanged; the
    new ``.idx`` is written beside ``dst``. Use it to give an older PNG-depth set the faster
    PGM depth (``fastface.data.codec``).
    """
    from fastface.data.codec import DecodeError, decode_depth, encode_depth

    n = 0
    with RecordReader(src, src_idx) as r, RecordWriter(dst, dst_idx) as w:
        for key in r.keys:
            h, payload = r[key]
            if isinstance(h.label, tuple) and len(h.label) >= 2 and 0 < h.label[1] < len(payload):
                cut = int(h.label[1])
                try:
                    depth = encode_depth(decode_depth(payload[cut:]), fmt=fmt)
                except DecodeError as e:
                    raise RecordIOError(src, f"depth image: {e}", key) from None
                w.write(key, h, payload[:cut] + depth)
                n += 1
            else:
                w.write(key, h, payload)
    return n
