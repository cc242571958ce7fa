"""RecordIO: round trips, byte-exact agreement with dmlc-core's layout, foreign files, bad input."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_helpers import MAGIC, dmlc_frame, mx_pack, write_foreign
from fastface.data.codec import encode_depth, encode_rgb
from fastface.data.recordio import (FaceRecordWriter, IRHeader, RecordIOError, RecordReader, RecordWriter, frame, pack,
                                    read_framed, unpack)

MAGIC_B = struct.pack("<I", MAGIC)


def _payloads():
    # Payloads with the magic planted at aligned and unaligned places: multi-part records.
    chunk = st.one_of(st.binary(max_size=300), st.just(MAGIC_B), st.just(b"\x00" + MAGIC_B))
    return st.lists(chunk, max_size=6).map(b"".join)


labels = st.one_of(
    st.integers(0, 2**24).map(float),
    st.lists(st.floats(-1e6, 1e6, width=32, allow_nan=False), min_size=1, max_size=5).map(tuple),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(labels, st.integers(0, 2**64 - 1), _payloads()), min_size=1, max_size=12))
def test_round_trip(tmp_path, recs):
    rec = str(tmp_path / "t.rec")
    with RecordWriter(rec) as w:
        for key, (label, id1, payload) in enumerate(recs):
            w.write(key, IRHeader(0, label, id1, 7), payload)
    with RecordReader(rec) as r:
        assert len(r) == len(recs)
        for key, (label, id1, payload) in enumerate(recs):
            h, p = r[key]
            assert p == payload
            assert h.id == id1 and h.id2 == 7
            if isinstance(label, tuple):
                assert h.flag == len(label) and h.label == label
            else:
                assert h.flag == 0 and h.label == label
    # Our framing is byte for byte what dmlc-core writes.
    expect = b"".join(dmlc_frame(pack(IRHeader(0, lab, i1, 7), p)) for lab, i1, p in recs)
    assert open(rec, "rb").read() == expect


def test_multipart_flags_on_disk():
    payload = b"abcd" + MAGIC_B + b"efgh" + MAGIC_B + b"ij"
    data = frame(payload)
    flags = []
    pos = 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == MAGIC
        flags.append(lrec >> 29)
        pos += 8 + (lrec & ((1 << 29) - 1))
        pos += -(lrec & ((1 << 29) - 1)) % 4
    assert flags == [1, 2, 3]
    assert read_framed(data, 0)[0] == payload


def test_foreign_file_read(tmp_path):
    """A file laid out exactly as mxnet's recordio.pack + MXIndexedRecordIO write it."""
    jpg = encode_rgb(np.full((16, 16, 3), 200, np.uint8))
    recs = [(0, mx_pack([4.0, 6.0], 0, 0, b"")),
            (1, mx_pack(0.0, 1, 0, jpg)),
            (2, mx_pack(1.0, 2, 0, jpg + MAGIC_B + b"tail")),  # magic inside: split into parts
            (3, mx_pack(1.0, 3, 0, jpg)),
            (4, mx_pack([1.0, 2.0], 0, 0, b"")),
            (5, mx_pack([2.0, 4.0], 0, 0, b""))]
    write_foreign(str(tmp_path / "f.rec"), recs)
    with RecordReader(str(tmp_path / "f.rec")) as r:
        assert r.image_keys() == [1, 2, 3]
        assert r.identity_ranges() == [(1, 2), (2, 4)]
        assert r[2][1] == jpg + MAGIC_B + b"tail"
        assert r[3][0].class_label == 1.0


def test_missing_index_is_rebuilt(tmp_path, capsys):
    rec = str(tmp_path / "a.rec")
    with RecordWriter(rec) as w:
        for k in range(5):
            w.write(k, IRHeader(0, float(k)), bytes([k]) * (k * 3) + MAGIC_B * (k % 2))
    idx = str(tmp_path / "a.idx")
    original = open(idx).read()
    os.unlink(idx)
    with RecordReader(rec) as r:
        assert r.index_rebuilt and len(r) == 5
        assert [r[k][0].label for k in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert "no index" in capsys.readouterr().err
    assert open(idx).read() == original


def test_writer_is_atomic(tmp_path):
    rec = str(tmp_path / "x.rec")
    with pytest.raises(RuntimeError):
        with RecordWriter(rec) as w:
            w.write(0, IRHeader(0, 0.0), b"abc")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_face_writer_layout(tmp_path):
    rec = str(tmp_path / "train.rec")
    jpg = encode_rgb(np.zeros((8, 8, 3), np.uint8))
    png = encode_depth(np.full((8, 8), 1234, np.uint16))
    with FaceRecordWriter(rec, 3, 2) as w:
        w.add(0, jpg, png)
        w.add(0, jpg, png)
        w.add(1, jpg)
    with RecordReader(rec) as r:
        h0 = r.header0
        assert h0.label == (4.0, 6.0)
        assert r.image_keys() == [1, 2, 3]
        assert r.identity_ranges() == [(1, 3), (3, 4)]
        h, p = r[1]
        assert h.label == (0.0, float(len(jpg))) and p == jpg + png
        h, p = r[3]
        assert h.flag == 0 and h.label == 1.0 and p == jpg
    with pytest.raises(ValueError, match="grouped by class"):
        with FaceRecordWriter(str(tmp_path / "b.rec"), 2, 2) as w:
            w.add(1, jpg)


# ----------------------------------------------------------------------------- bad input


def _small_rec(tmp_path, n=4):
    rec = str(tmp_path / "s.rec")
    with RecordWriter(rec) as w:
        for k in range(n):
            w.write(k, IRHeader(0, float(k)), bytes(range(40)))
    return rec


def test_bad_magic_names_file_and_record(tmp_path):
    rec = _small_rec(tmp_path)
    with RecordReader(rec) as r:
        off = r.offset(2)
    with open(rec, "r+b") as f:
        f.seek(off)
        f.write(b"\x00\x00\x00\x00")
    with RecordReader(rec) as r:
        assert r[1][0].label == 1.0
        with pytest.raises(RecordIOError, match=r"s\.rec record 2 .*bad magic") as e:
            r[2]
        assert e.value.key == 2 and e.value.path == rec


def test_truncated_file(tmp_path):
    rec = _small_rec(tmp_path)
    size = os.path.getsize(rec)
    with open(rec, "r+b") as f:
        f.truncate(size - 10)
    with RecordReader(rec) as r:
        r[2]
        with pytest.raises(RecordIOError, match=r"record 3\b.*truncated"):
            r[3]


def test_index_past_end(tmp_path):
    rec = _small_rec(tmp_path)
    idx = str(tmp_path / "s.idx")
    lines = open(idx).read().splitlines()
    lines[1] = "1\t999999"
    open(idx, "w").write("\n".join(lines) + "\n")
    with RecordReader(rec) as r:
        with pytest.raises(RecordIOError, match=r"record 1\b.*past the end"):
            r[1]


def test_bad_part_flag_and_label_count(tmp_path):
    with pytest.raises(RecordIOError, match="part flag 2 .*where a new record was expected"):
        read_framed(MAGIC_B + struct.pack("<I", (2 << 29) | 0), 0, "x.rec", 5)
    bad = struct.pack("<IfQQ", 1000, 0.0, 0, 0) + b"1234"
    with pytest.raises(RecordIOError, match="declares 1000 labels"):
        unpack(bad, "x.rec", 3)


def test_loader_source_rejects_bad_labels(tmp_path):
    from fastface.data.sources import RecordSource

    jpg = encode_rgb(np.zeros((8, 8, 3), np.uint8))
    rec = str(tmp_path / "l.rec")
    write_foreign(rec, [(0, mx_pack([3.0, 5.0], 0, 0, b"")), (1, mx_pack(0.0, 0, 0, jpg)), (2, mx_pack(0.5, 0, 0, jpg)),
                        (3, mx_pack([0.0, 1.0], 0, 0, b"")), (4, mx_pack([1.0, 3.0], 0, 0, b""))])
    src = RecordSource(rec)
    assert src.read(0)[0] == 0
    with pytest.raises(RecordIOError, match=r"record 2\b.*not a class index"):
        src.read(1)
