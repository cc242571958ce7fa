"""Shared pieces of the data tests: the tiny synthetic set and a spec-level RecordIO writer."""
from __future__ import annotations

import os
import struct

MAGIC = 0xCED7230A


def tiny_set(tmp_path_factory, folder: bool = True, depth_format: str = "pgm") -> str:
    """The 'tiny' preset (8 ids x 6 + pairs), made once per session (generate() caches by manifest)."""
    from fastface.data import synth

    out = str(tmp_path_factory.getbasetemp() / f"synth-tiny-data-{depth_format}")
    synth.generate(synth.preset("tiny", depth_format=depth_format), out, workers=1, folder=folder, progress=False)
    return out


def dmlc_frame(buf: bytes) -> bytes:
    """A record as dmlc-core's RecordIOWriter::WriteRecord lays it out (written from its C++)."""
    magic = struct.pack("<I", MAGIC)
    n = len(buf)
    lower, upper = (n >> 2) << 2, ((n + 3) >> 2) << 2
    out = b""
    dptr = 0
    for i in range(0, lower, 4):
        if buf[i : i + 4] == magic:
            out += magic + struct.pack("<I", ((1 if dptr == 0 else 2) << 29) | (i - dptr)) + buf[dptr:i]
            dptr = i + 4
    out += magic + struct.pack("<I", ((3 if dptr != 0 else 0) << 29) | (n - dptr)) + buf[dptr:]
    return out + b"\x00" * (upper - n)


def mx_pack(flag_label, id1: int, id2: int, payload: bytes) -> bytes:
    """mxnet.recordio.pack: 'IfQQ' header; a label list becomes flag=len, label=0, floats first."""
    if isinstance(flag_label, (list, tuple)):
        labels = struct.pack(f"<{len(flag_label)}f", *flag_label)
        return struct.pack("<IfQQ", len(flag_label), 0.0, id1, id2) + labels + payload
    return struct.pack("<IfQQ", 0, float(flag_label), id1, id2) + payload


def write_foreign(rec_path: str, records: list[tuple[int, bytes]]) -> str:
    """An indexed .rec/.idx pair as MXIndexedRecordIO.write_idx writes them; returns the .idx path."""
    idx_path = os.path.splitext(rec_path)[0] + ".idx"
    pos = 0
    with open(rec_path, "wb") as rec, open(idx_path, "w") as idx:
        for key, payload in records:
            framed = dmlc_frame(payload)
            rec.write(framed)
            idx.write(f"{key}\t{pos}\n")
            pos += len(framed)
    return idx_path


def break_jpeg(rec_path: str, key: int) -> None:
    """Make record ``key``'s JPEG undecodable inside a valid frame: its Huffman table turns to 0xFF.

    (Noise in the entropy-coded data is not enough: libjpeg decodes that with a warning.)
    """
    from fastface.data.recordio import RecordReader

    with RecordReader(rec_path) as r:
        off = r.offset(key)
    with open(rec_path, "r+b") as f:
        f.seek(off)
        head = f.read(4096)
        dht = head.find(b"\xff\xc4")
        assert dht > 0
        f.seek(off + dht + 4)
        f.write(b"\xff" * 32)
