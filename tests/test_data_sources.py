"""Batch reads (``read_many``) agree with per-sample reads, bad records included; depth codecs."""
from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_helpers import MAGIC
from fastface.data.codec import (DecodeError, check_complete, decode_depth, encode_depth, encode_pgm, encode_rgb, pgm_header,
                                 split_rgbd)
from fastface.data.errors import DataError
from fastface.data.recordio import IRHeader, RecordReader, RecordWriter
from fastface.data.sources import FolderSource, RecordSource

N_CLASSES = 3
MAGIC_B = struct.pack("<I", MAGIC)


def _jpeg_with_magic(jpg: bytes, header_len: int) -> bytes:
    """The JPEG with a comment segment holding the RecordIO magic at a 4-byte-aligned record offset."""
    pad = (-(header_len + 2 + 4)) % 4
    body = b"x" * pad + MAGIC_B + b"yyyy"
    return jpg[:2] + b"\xff\xfe" + (len(body) + 2).to_bytes(2, "big") + body + jpg[2:]


def _records() -> list[tuple[str, IRHeader, bytes]]:
    """(kind, header, payload) of a set mixing every layout and every way a record can be bad."""
    rng = np.random.default_rng(7)
    out = []
    for k in range(14):
        rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        depth = rng.integers(1, 65535, (16, 16), dtype=np.uint16)
        jpg, png, pgm = encode_rgb(rgb), encode_depth(depth), encode_pgm(depth)
        cls = float(k % N_CLASSES)
        out += [
            ("rgbd-pgm", IRHeader(2, (cls, float(len(jpg)))), jpg + pgm),
            ("rgbd-png", IRHeader(2, (cls, float(len(jpg)))), jpg + png),
            ("rgb", IRHeader(0, cls), jpg),
        ]
    jpg, pgm, png = out[2][2], encode_pgm(np.full((16, 16), 999, np.uint16)), encode_depth(np.full((16, 16), 999, np.uint16))
    png_rgb = encode_depth(np.full((16, 16), 5, np.uint16))  # a gray PNG as the "RGB" image
    multi = _jpeg_with_magic(jpg, 8 * 4)
    out += [
        ("multipart", IRHeader(2, (1.0, float(len(multi)))), multi + pgm),
        ("png-rgb", IRHeader(0, 2.0), png_rgb),
        ("bad:truncated jpeg", IRHeader(0, 1.0), jpg[:-40]),
        ("bad:truncated png depth", IRHeader(2, (1.0, float(len(jpg)))), jpg + png[:-20]),
        ("bad:truncated pgm depth", IRHeader(2, (1.0, float(len(jpg)))), jpg + pgm[:-20]),
        ("bad:label out of range", IRHeader(0, float(N_CLASSES + 2)), jpg),
        ("bad:nan label", IRHeader(0, float("nan")), jpg),
        ("bad:fractional label", IRHeader(2, (0.5, float(len(jpg)))), jpg + pgm),
        ("bad:rgb length past payload", IRHeader(2, (1.0, float(len(jpg) + len(pgm) + 9))), jpg + pgm),
        ("bad:empty", IRHeader(0, 1.0), b""),
        ("bad:magic", IRHeader(0, 1.0), jpg),  # its magic is overwritten after writing
    ]
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[RecordSource, list[str]]:
    recs = _records()
    path = str(tmp_path_factory.mktemp("mixed") / "m.rec")
    n = len(recs)
    with RecordWriter(path) as w:
        w.write(0, IRHeader(2, (float(n + 1), float(n + 1 + N_CLASSES))))
        for key, (_, h, payload) in enumerate(recs, 1):
            w.write(key, h, payload)
        for c in range(N_CLASSES):
            w.write(n + 1 + c, IRHeader(2, (1.0, float(n + 1))))
    kinds = [k for k, _, _ in recs]
    with RecordReader(path) as r:
        off = r.offset(1 + kinds.index("bad:magic"))
        lrec = struct.unpack_from("<I", r.buffer(), r.offset(1 + kinds.index("multipart")) + 4)[0]
        assert lrec >> 29 == 1, "the multipart record must really be cut in parts"
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\0\0\0\0")
    src = RecordSource(path)
    assert src.has_depth and src._pgm_head == b"P5\n16 16\n65535\n", "the first record makes PGM the set's fast path"
    return src, kinds


def _one_by_one(src, idx, rgb: bool, depth: bool) -> list:
    out = []
    for i in idx:
        try:
            label, r, d = src.read(int(i))
            if depth and d is None:
                path, rec = src.locate(int(i))
                raise DataError(path, "sample has no depth", rec)
            out.append((label, r if rgb else None, d if depth else None))
        except DataError as e:
            out.append(str(e))
    return out


def _batched(src, idx, rgb: bool, depth: bool) -> list:
    b = src.read_many(np.asarray(idx, np.int64), rgb=rgb, depth=depth)
    out: list = [None] * len(idx)
    for j, e in b.errors:
        out[j] = str(e)
    for n, j in enumerate(b.kept.tolist()):
        out[j] = (int(b.labels[n]), bytes(b.rgb[n]) if rgb else None, bytes(b.depth[n]) if depth else None)
    assert len(b.kept) + len(b.errors) == len(idx) and all(o is not None for o in out)
    assert b.labels.dtype == np.int64 and len(b.labels) == len(b.kept)
    # The raw-depth mask of a RecordIO set with PGM depth: set for the set's own 16-bit PGMs,
    # clear for anything else (PNG); None where depth is not read or the source has no such layout.
    if depth and len(b.kept) and getattr(src, "pgm_layout", None) is not None:
        assert b.pgm is not None and b.pgm.dtype == bool and len(b.pgm) == len(b.kept)
        assert b.pgm.tolist() == [bytes(d)[:2] == b"P5" and src.is_pgm(d) for d in b.depth]
    elif not depth or getattr(src, "pgm_layout", None) is None:
        assert b.pgm is None
    return out


def test_every_bad_record_is_caught_and_named(mixed):
    src, kinds = mixed
    got = _batched(src, np.arange(len(src)), True, True)
    for k, (kind, res) in enumerate(zip(kinds, got), 1):
        if kind.startswith("bad:") or kind in ("rgb", "png-rgb"):
            assert isinstance(res, str), f"{kind} was not reported"
            assert re.search(rf"m\.rec record {k}\b", res), res
        else:
            assert not isinstance(res, str), f"{kind}: {res}"
    # Without depth wanted, plain RGB records are fine and a bad depth still is not.
    got = _batched(src, np.arange(len(src)), True, False)
    for kind, res in zip(kinds, got):
        assert isinstance(res, str) == kind.startswith("bad:"), (kind, res)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_many_equals_read(mixed, data):
    src, _ = mixed
    idx = data.draw(st.lists(st.integers(0, len(src) - 1), min_size=0, max_size=24))
    rgb, depth = data.draw(st.sampled_from([(True, False), (True, True), (False, True)]))
    assert _batched(src, idx, rgb, depth) == _one_by_one(src, idx, rgb, depth)


def test_pgm_layout_and_mask(mixed):
    """The set's PGM layout is known (header length, height, width); read_many marks those depths."""
    src, kinds = mixed
    assert src.pgm_layout == (len(b"P5\n16 16\n65535\n"), 16, 16)
    idx = [i for i, k in enumerate(kinds) if k in ("rgbd-pgm", "rgbd-png", "multipart")]
    b = src.read_many(np.array(idx), rgb=True, depth=True)
    assert not b.errors
    assert b.pgm.tolist() == [kinds[i] in ("rgbd-pgm", "multipart") for i in idx]
    # Every marked depth is its header then raw big-endian samples: what decode_depth reads.
    k, h, w = src.pgm_layout
    for d, raw in zip(b.depth, b.pgm):
        if raw:
            assert np.array_equal(np.frombuffer(bytes(d)[k:], ">u2").reshape(h, w), decode_depth(d))
    pngs = [i for i, k in enumerate(kinds) if k == "rgbd-png"]
    assert not src.read_many(np.array(pngs), rgb=False, depth=True).pgm.any()
    assert src.read_many(np.array(idx), rgb=True, depth=False).pgm is None
    assert not src.is_pgm(b"P5\n16 16\n65535\n") and not src.is_pgm(b"")


def test_read_many_views_are_zero_copy(mixed):
    src, kinds = mixed
    i = kinds.index("rgbd-pgm")
    b = src.read_many(np.array([i]), rgb=True, depth=True)
    assert not b.errors and b.depth[0].base is not None and not b.depth[0].flags.writeable
    assert bytes(b.depth[0])[:2] == b"P5" and decode_depth(b.depth[0]).shape == (16, 16)


def test_folder_read_many_matches_read(tmp_path):
    root = tmp_path / "f" / "alice"
    root.mkdir(parents=True)
    d = np.arange(256, dtype=np.uint16).reshape(16, 16) * 200
    jpg = encode_rgb(np.zeros((16, 16, 3), np.uint8))
    (root / "a.jpg").write_bytes(jpg)
    (root / "a_depth.pgm").write_bytes(encode_pgm(d))
    (root / "b.jpg").write_bytes(jpg)
    (root / "b_depth.png").write_bytes(encode_depth(d))
    (root / "c.jpg").write_bytes(jpg[:-30])
    (root / "c_depth.png").write_bytes(encode_depth(d))
    src = FolderSource(str(tmp_path / "f"))
    assert src.has_depth and len(src) == 3
    assert _batched(src, [0, 1, 2], True, True) == _one_by_one(src, [0, 1, 2], True, True)
    b = src.read_many(np.array([0, 1]), rgb=False, depth=True)
    assert np.array_equal(decode_depth(b.depth[0]), decode_depth(b.depth[1]))


# ------------------------------------------------------------------------------- depth codecs


def test_pgm_round_trip_and_header():
    d = np.random.default_rng(0).integers(0, 65536, (20, 30), dtype=np.uint16)
    buf = encode_pgm(d)
    assert pgm_header(buf) == (30, 20, 65535, len(buf) - 20 * 30 * 2)
    assert np.array_equal(decode_depth(buf), d)
    check_complete(buf)
    # Comments and other whitespace are legal Netpbm.
    other = b"P5 # made elsewhere\n30\t20\r\n65535\n" + d.astype(">u2").tobytes()
    assert pgm_header(other)[:3] == (30, 20, 65535) and np.array_equal(decode_depth(other), d)
    eight = b"P5\n30 20\n255\n" + (d >> 8).astype(np.uint8).tobytes()
    assert np.array_equal(decode_depth(eight), (d >> 8).astype(np.uint16) * 257)
    jpg = encode_rgb(np.zeros((8, 8, 3), np.uint8))
    assert split_rgbd(jpg + buf) == (jpg, buf)


@pytest.mark.parametrize("bad,why", [
    (b"P5\n30 20\n65535\n" + b"\0" * 100, "truncated PGM"),
    (b"P5\n30 20\n4095\n" + b"\0" * 1200, "maxval 4095"),
    (b"P5\n30\n", "malformed PGM header"),
    (b"P5\n0 20\n65535\n", "out of range"),
])
def test_bad_pgm_is_rejected(bad, why):
    with pytest.raises(DecodeError, match=why):
        check_complete(bad)


def test_convert_depth_keeps_everything_but_the_format(tmp_path_factory, tmp_path):
    from data_helpers import tiny_set
    from fastface.data.loader import DataConfig, TorchLoader
    from fastface.data.recordio import convert_depth

    png_set = tiny_set(tmp_path_factory, folder=False, depth_format="png")
    src = f"{png_set}/train.rec"
    dst = str(tmp_path / "train.rec")
    assert convert_depth(src, dst, "pgm") == 48
    with RecordReader(src) as a, RecordReader(dst) as b:
        assert a.keys == b.keys and a.identity_ranges() == b.identity_ranges()
        for k in a.keys:
            (ha, pa), (hb, pb) = a[k], b[k]
            assert ha == hb
            if k in a.image_keys():
                cut = int(ha.label[1])
                assert pa[:cut] == pb[:cut] and pb[cut : cut + 2] == b"P5"
                assert np.array_equal(decode_depth(pa[cut:]), decode_depth(pb[cut:]))
    cfg = dict(batch_size=48, num_workers=0, augment=False, shuffle=False, drop_last=False)
    x, y = next(iter(TorchLoader(DataConfig(path=src, **cfg))))
    x2, y2 = next(iter(TorchLoader(DataConfig(path=dst, **cfg))))
    assert torch.equal(x, x2) and torch.equal(y, y2)
