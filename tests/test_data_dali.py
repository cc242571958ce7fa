"""DALI: its own mxnet reader reads our files and foreign ones; the dali backend equals torch."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from data_helpers import break_jpeg, mx_pack, tiny_set, write_foreign  # noqa: E402
from fastface.data.codec import decode_depth, decode_rgb, encode_depth, encode_rgb, normalize_depth, normalize_rgb  # noqa: E402
from fastface.data.dali import DaliLoader, mxnet_reader_pipeline  # noqa: E402
from fastface.data.errors import DataError  # noqa: E402
from fastface.data.loader import DataConfig, TorchLoader  # noqa: E402
from fastface.data.recordio import RecordReader  # noqa: E402
from fastface.data.sources import RecordSource  # noqa: E402

AUG = dict(flip=True, crop_scale=0.15, brightness=0.3, contrast=0.3, depth_noise=0.05)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_set(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_png(tmp_path_factory):
    """The same set with its depth stored as PNG (the compact format, and that of older sets)."""
    return tiny_set(tmp_path_factory, folder=False, depth_format="png")


def _cfg(tiny, **kw):
    base = dict(path=os.path.join(tiny, "train.rec"), batch_size=7, num_workers=2, drop_last=False, seed=5, device="cpu")
    return DataConfig(**{**base, **kw})


def _expected(rec: str, channels: str) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    """Our own decode of every image record, keyed by record key."""
    src = RecordSource(rec)
    imgs, labels = {}, {}
    for i, k in enumerate(src.keys):
        label, rgb, depth = src.read(i)
        parts = []
        if channels != "depth":
            parts.append(normalize_rgb(decode_rgb(rgb)))
        if "d" in channels:
            parts.append(normalize_depth(decode_depth(depth)))
        imgs[k] = torch.from_numpy(np.concatenate(parts))
        labels[k] = label
    return imgs, labels


@pytest.mark.parametrize("fmt", ["pgm", "png"])
@pytest.mark.parametrize("channels", ["rgbd", "rgb", "depth"])
def test_dali_mxnet_reader_reads_our_files(tiny, tiny_png, channels, fmt):
    rec = os.path.join(tiny if fmt == "pgm" else tiny_png, "train.rec")
    expect, labels = _expected(rec, channels)
    pipe = mxnet_reader_pipeline(rec, batch_size=16, num_threads=2, channels=channels)
    got = []
    for _ in range(3):  # 48 images, in file order
        images, labs = pipe.run()
        x = torch.from_numpy(np.array(images.as_tensor()))
        lab = np.array(labs.as_tensor())
        got += list(zip(x, lab))
    with RecordReader(rec) as r:
        keys = r.image_keys()
    assert len(got) == len(keys) == 48
    for k, (x, lab) in zip(keys, got):
        assert int(lab[0]) == labels[k]
        if "d" in channels:
            assert lab.shape == (2,)
        assert torch.equal(x, expect[k]), f"record {k} differs"


def test_dali_and_ours_read_a_foreign_file(tmp_path):
    """A set written byte by byte as mxnet does (RGB JPEG records, one split in two parts)."""
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(5)]
    jpgs = [encode_rgb(im) for im in imgs]
    recs = [(0, mx_pack([6.0, 8.0], 0, 0, b""))]
    recs += [(i + 1, mx_pack(float(i // 3), i + 1, 0, jpgs[i])) for i in range(5)]
    recs += [(6, mx_pack([1.0, 4.0], 0, 0, b"")), (7, mx_pack([4.0, 6.0], 0, 0, b""))]
    rec = str(tmp_path / "foreign.rec")
    write_foreign(rec, recs)
    pipe = mxnet_reader_pipeline(rec, batch_size=5, num_threads=1, channels="rgb")
    images, labs = pipe.run()
    x = np.array(images.as_tensor())
    ld = TorchLoader(DataConfig(path=rec, batch_size=5, backend="torch", num_workers=0, augment=False, shuffle=False, drop_last=False))
    y, lab2 = next(iter(ld))
    assert ld.num_classes == 2 and ld.channels == "rgb"
    assert np.array(labs.as_tensor())[:, 0].tolist() == lab2.tolist() == [0, 0, 0, 1, 1]
    assert np.array_equal(x, y.numpy())
    assert np.array_equal(y[0].numpy(), normalize_rgb(decode_rgb(jpgs[0])))


def test_dali_reads_multipart_records(tmp_path):
    """A JPEG with the magic planted in a comment segment at an aligned offset: a 2-part record."""
    jpg = bytearray(encode_rgb(np.full((112, 112, 3), 90, np.uint8)))
    magic = (0xCED7230A).to_bytes(4, "little")
    # COM segment right after SOI; place the magic 4-byte aligned in the record payload
    # (IRHeader is 24 bytes, so payload offset = 24 + position in the JPEG).
    com_body = bytearray(b"x" * 14) + magic + b"yyyy"
    com = b"\xff\xfe" + (len(com_body) + 2).to_bytes(2, "big") + com_body
    data = bytes(jpg[:2]) + com + bytes(jpg[2:])
    payload = mx_pack(0.0, 1, 0, data)
    assert payload.find(magic) % 4 == 0
    rec = str(tmp_path / "mp.rec")
    write_foreign(rec, [(0, payload), (1, mx_pack(0.0, 2, 0, data))])
    raw = open(rec, "rb").read()
    assert (int.from_bytes(raw[4:8], "little") >> 29) == 1, "the test record must really be multi-part"
    pipe = mxnet_reader_pipeline(rec, batch_size=2, num_threads=1, channels="rgb")
    images, _ = pipe.run()
    x = np.array(images.as_tensor())
    ours = normalize_rgb(decode_rgb(RecordReader(rec)[0][1]))
    assert np.array_equal(x[0], ours) and np.array_equal(x[1], ours)


@pytest.mark.parametrize("fmt", ["pgm", "png"])
@pytest.mark.parametrize("channels", ["rgbd", "rgb", "depth"])
def test_backends_equal_without_augmentation(tiny, tiny_png, channels, fmt):
    path = os.path.join(tiny if fmt == "pgm" else tiny_png, "train.rec")
    a = TorchLoader(_cfg(tiny, path=path, backend="torch", augment=False, channels=channels))
    b = DaliLoader(_cfg(tiny, path=path, backend="dali", augment=False, channels=channels))
    assert not b.resize, "a 112x112 set needs no resize"
    for e in (0, 1):
        a.set_epoch(e)
        b.set_epoch(e)
        ba, bb = list(a), list(b)
        assert len(ba) == len(bb) == len(a) == 7
        # Every batch is checked after the epoch: DALI's later batches must not reuse the
        # memory of those handed out before (they come out of DALI without a copy).
        for (xa, ya), (xb, yb) in zip(ba, bb):
            assert torch.equal(ya, yb)
            assert torch.equal(xa, xb)
    a.close()


def test_other_sizes_are_resized_when_met(tmp_path):
    """The first image is 112x112 (no resize built); a 128x128 one later makes the loader add one."""
    import cv2

    rng = np.random.default_rng(4)
    root = tmp_path / "f"
    for person, size in (("a", 112), ("b", 128)):
        (root / person).mkdir(parents=True)
        for n in range(3):
            # Smooth images: OpenCV and DALI resample alike on those (noise would alias).
            rgb = cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)
            depth = cv2.resize(rng.integers(0, 65536, (6, 6), dtype=np.uint16), (size, size), interpolation=cv2.INTER_CUBIC)
            (root / person / f"{n}.jpg").write_bytes(encode_rgb(rgb))
            (root / person / f"{n}_depth.pgm").write_bytes(encode_depth(depth, fmt="pgm"))
    cfg = DataConfig(path=str(root), batch_size=2, num_workers=2, augment=False, shuffle=False, drop_last=False, device="cpu")
    t = list(TorchLoader(DataConfig(**{**cfg.__dict__, "backend": "torch", "num_workers": 0})))
    d = DaliLoader(DataConfig(**{**cfg.__dict__, "backend": "dali"}))
    assert not d.resize
    got = list(d)
    assert d.resize, "meeting a 128x128 image must switch the resize on"
    assert [len(y) for _, y in got] == [2, 2, 2]
    for (xa, ya), (xb, yb) in zip(t, got):
        assert torch.equal(ya, yb) and xb.shape == xa.shape == (2, 4, 112, 112)
        # 112x112 images are identical; resampling differs a little between OpenCV and DALI.
        assert (xa - xb).abs().mean() < 0.02
    assert torch.equal(t[0][0], got[0][0])


def test_backends_share_augmentation(tiny):
    """Same parameters go to both: flips identical, photometric within a grey level, crops close."""
    a = TorchLoader(_cfg(tiny, backend="torch", **AUG))
    b = DaliLoader(_cfg(tiny, backend="dali", **AUG))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        d = (xa - xb).abs()
        # Depth noise is added from the same fields; resampling implementations differ slightly.
        assert d.mean() < 0.02, d.mean()
    a.close()
    fa = TorchLoader(_cfg(tiny, backend="torch", flip=True, brightness=0.3, contrast=0.3))
    fb = DaliLoader(_cfg(tiny, backend="dali", flip=True, brightness=0.3, contrast=0.3))
    for (xa, _), (xb, _) in zip(fa, fb):
        assert (xa - xb).abs().max() <= 1.01 / 127.5
    fa.close()


def test_dali_resume_mid_epoch(tiny):
    cfg = _cfg(tiny, backend="dali", **AUG)
    ref = DaliLoader(cfg)
    ref.set_epoch(2)
    full = list(ref)
    run = DaliLoader(cfg)
    run.set_epoch(2)
    it = iter(run)
    next(it), next(it), next(it)
    state = run.state_dict()
    resumed = DaliLoader(cfg)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 3
    for (a, la), (b, lb) in zip(full[3:], rest):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_dali_sharding_covers_every_record(tiny):
    labels = []
    images = []
    for rank in range(3):
        ld = DaliLoader(_cfg(tiny, backend="dali", augment=False, batch_size=4), rank, 3)
        for x, y in ld:
            images.append(x)
            labels.append(y)
    x = torch.cat(images)
    assert len(x) == 48 and len(torch.unique(x.flatten(1), dim=0)) == 48
    assert torch.bincount(torch.cat(labels)).tolist() == [6] * 8


def test_dali_corrupt_image_raises_or_skips(tiny, tmp_path):
    rec = str(tmp_path / "train.rec")
    shutil.copy(os.path.join(tiny, "train.rec"), rec)
    shutil.copy(os.path.join(tiny, "train.idx"), str(tmp_path / "train.idx"))
    key = 30
    break_jpeg(rec, key)
    cfg = _cfg(tiny, path=rec, backend="dali", augment=False, shuffle=False, batch_size=8)
    with pytest.raises(DataError, match=rf"train\.rec record {key}\b.*undecodable"):
        list(DaliLoader(cfg))
    ld = DaliLoader(DataConfig(**{**cfg.__dict__, "skip_corrupt": True}))
    batches = list(ld)
    assert sum(len(y) for _, y in batches) == 47 and ld.skipped == [f"{rec} record {key}"]
    clean = list(TorchLoader(DataConfig(**{**cfg.__dict__, "path": os.path.join(tiny, "train.rec"), "backend": "torch"})))
    x = torch.cat([b[0] for b in batches])
    ref = torch.cat([b[0] for b in clean])
    keep = [i for i in range(48) if i != key - 1]
    assert torch.equal(x, ref[keep])


def test_rgbd_foreign_depth_8bit(tmp_path):
    """Depth PNGs of other tools may be 8-bit: both backends scale them by 257 the same way."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    d8 = rng.integers(0, 256, (112, 112), dtype=np.uint8)
    import cv2

    png8 = cv2.imencode(".png", d8)[1].tobytes()
    jpg = encode_rgb(rgb)
    root = tmp_path / "f" / "person"
    root.mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpg)
    (root / "a_depth.png").write_bytes(png8)
    (root / "b.jpg").write_bytes(jpg)
    (root / "b_depth.png").write_bytes(encode_depth(d8.astype(np.uint16) * 257))
    t = TorchLoader(DataConfig(path=str(tmp_path / "f"), batch_size=2, num_workers=0, augment=False, shuffle=False, drop_last=False))
    x, _ = next(iter(t))
    assert torch.equal(x[0], x[1])
    dl = DaliLoader(DataConfig(path=str(tmp_path / "f"), batch_size=2, num_workers=1, augment=False, shuffle=False,
                               drop_last=False, device="cpu"))
    y, _ = next(iter(dl))
    assert torch.equal(x, y)


def test_batch_skipped_whole_is_handed_out_empty(tiny, tmp_path):
    """Batch 1 holds only bad records (one undecodable, one with a broken frame): both backends give it empty."""
    rec = str(tmp_path / "train.rec")
    shutil.copy(os.path.join(tiny, "train.rec"), rec)
    shutil.copy(os.path.join(tiny, "train.idx"), str(tmp_path / "train.idx"))
    break_jpeg(rec, 3)
    with RecordReader(rec) as r:
        off = r.offset(4)
    with open(rec, "r+b") as f:
        f.seek(off)
        f.write(b"\0\0\0\0")
    cfg = _cfg(tiny, path=rec, augment=False, shuffle=False, batch_size=2, skip_corrupt=True)
    t = TorchLoader(DataConfig(**{**cfg.__dict__, "backend": "torch", "num_workers": 0}))
    d = DaliLoader(DataConfig(**{**cfg.__dict__, "backend": "dali"}))
    a, b = list(t), list(d)
    assert [len(y) for _, y in b] == [len(y) for _, y in a] == [2, 0] + [2] * 22
    assert b[1][0].shape == (0, 4, 112, 112)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert sorted(d.skipped) == sorted(t.skipped) == [f"{rec} record 3", f"{rec} record 4"]
    # Resuming right after the empty batch starts at batch 2.
    d2 = DaliLoader(DataConfig(**{**cfg.__dict__, "backend": "dali"}))
    it = iter(d2)
    next(it), next(it)
    state = d2.state_dict()
    assert state["batch"] == 2
    d3 = DaliLoader(DataConfig(**{**cfg.__dict__, "backend": "dali"}))
    d3.load_state_dict(state)
    rest = list(d3)
    assert len(rest) == 22 and torch.equal(rest[0][0], b[2][0])


def test_auto_backend_is_dali_where_installed(tiny):
    from fastface.data import dali_status
    from fastface.data.loader import make_loader

    assert dali_status() == (True, None)
    ld = make_loader(_cfg(tiny, backend="auto", augment=False))
    assert isinstance(ld, DaliLoader) and ld.backend == "dali"


def test_pipeline_reuse_across_epochs_and_after_abandoning(tiny):
    """Epochs after a finished one reuse the pipeline; one left mid-epoch is not reused (it holds prefetched batches)."""
    cfg = _cfg(tiny, backend="dali", **AUG)
    ref = {}
    for e in (0, 1, 2):
        fresh = DaliLoader(cfg)
        fresh.set_epoch(e)
        ref[e] = list(fresh)
    ld = DaliLoader(cfg)
    ld.set_epoch(0)
    got0 = list(ld)
    kept = ld._idle
    assert kept is not None
    ld.set_epoch(1)
    it = iter(ld)
    first = next(it)
    assert ld._idle is None, "the running epoch owns the pipeline"
    del it  # abandoned with batches in flight
    assert ld._idle is None
    ld.set_epoch(2)
    got2 = list(ld)
    for got, e in ((got0, 0), ([first], 1), (got2, 2)):
        for (a, la), (b, lb) in zip(got, ref[e]):
            assert torch.equal(a, b) and torch.equal(la, lb)
    ld.set_epoch(0)
    again = list(ld)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(again, ref[0]))


def _mixed_depth_set(tmp_path, broken: int | None = None) -> tuple[str, list[np.ndarray]]:
    """112x112 RGB-D records whose depth is mostly the set's 16-bit PGM, with PNGs, an 8-bit PGM and a
    PGM with another header among them; depth values use both bytes (big-endian order matters).
    ``broken``: the key of a record whose depth PNG fails its CRC (complete, but undecodable)."""
    from fastface.data.recordio import IRHeader, RecordWriter

    rng = np.random.default_rng(11)
    n, classes = 20, 4
    path = str(tmp_path / "mixed.rec")
    depths = []
    with RecordWriter(path) as w:
        w.write(0, IRHeader(2, (float(n + 1), float(n + 1 + classes))))
        for key in range(1, n + 1):
            rgb = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            d = rng.integers(0, 65536, (112, 112), dtype=np.uint16)
            d[0, :4] = [0x0102, 0x0201, 0xFF00, 0x00FF]
            if key in (3, 11, broken):
                dep = bytearray(encode_depth(d))
                if key == broken:
                    at = dep.find(b"IDAT")
                    dep[at + 40 : at + 80] = b"\0" * 40
                dep = bytes(dep)
            elif key == 7:
                d = (d >> 8).astype(np.uint8)
                dep = b"P5\n112 112\n255\n" + d.tobytes()
                d = d.astype(np.uint16) * 257
            elif key == 15:
                dep = b"P5 112 112 65535\n" + d.astype(">u2").tobytes()
            else:
                dep = encode_depth(d, fmt="pgm")
            jpg = encode_rgb(rgb)
            w.write(key, IRHeader(2, (float(key % classes), float(len(jpg)))), jpg + dep)
            depths.append(d)
        for c in range(classes):
            w.write(n + 1 + c, IRHeader(2, (1.0, float(n + 1))))
    return path, depths


def test_raw_pgm_depth_equals_decoded_depth(tmp_path):
    """The set's PGMs go in raw (byte-swapped from big-endian), other depths through OpenCV: the
    tensors equal the torch backend's, and the DALI decoder's, augmentation on or off."""
    path, depths = _mixed_depth_set(tmp_path)
    src = RecordSource(path)
    assert src.pgm_layout == (len(b"P5\n112 112\n65535\n"), 112, 112)
    cfg = dict(path=path, batch_size=6, num_workers=2, drop_last=False, seed=3, device="cpu", channels="rgbd")
    raw = DaliLoader(DataConfig(backend="dali", augment=False, shuffle=False, **cfg))
    assert raw.raw_depth and not raw.resize
    x = torch.cat([b for b, _ in raw])
    for i, d in enumerate(depths):
        assert torch.equal(x[i, 3:], torch.from_numpy(normalize_depth(d))), f"record {i + 1}"
    t = TorchLoader(DataConfig(backend="torch", augment=False, shuffle=False, **{**cfg, "num_workers": 0}))
    assert torch.equal(x, torch.cat([b for b, _ in t]))
    for aug in (dict(flip=True), AUG):
        a = DaliLoader(DataConfig(backend="dali", **aug, **cfg))
        b = DaliLoader(DataConfig(backend="dali", **aug, **cfg))
        b.raw_depth = False  # DALI's own decoder, as before
        for e in (0, 1):
            a.set_epoch(e)
            b.set_epoch(e)
            for (xa, ya), (xb, yb) in zip(a, b, strict=True):
                assert torch.equal(ya, yb) and torch.equal(xa, xb)
        if aug == dict(flip=True):
            ta = TorchLoader(DataConfig(backend="torch", **aug, **{**cfg, "num_workers": 0}))
            ta.set_epoch(1)
            for (xa, _), (xt, _) in zip(a, ta, strict=True):
                assert torch.equal(xa, xt)


def test_raw_depth_only_for_a_pgm_set_on_the_cpu(tiny, tiny_png):
    assert DaliLoader(_cfg(tiny, backend="dali", channels="rgbd")).raw_depth
    assert DaliLoader(_cfg(tiny, backend="dali", channels="depth")).raw_depth
    assert not DaliLoader(_cfg(tiny, backend="dali", channels="rgb")).raw_depth
    assert not DaliLoader(_cfg(tiny, path=os.path.join(tiny_png, "train.rec"), backend="dali", channels="rgbd")).raw_depth


def test_raw_depth_undecodable_depth_raises_or_skips(tmp_path):
    """A depth PNG that fails its CRC in a PGM set: the record is named, or skipped like any other."""
    path, _ = _mixed_depth_set(tmp_path, broken=9)
    cfg = dict(path=path, batch_size=6, num_workers=2, drop_last=False, device="cpu", augment=False, shuffle=False)
    with pytest.raises(DataError, match=r"mixed\.rec record 9\b.*undecodable depth"):
        list(DaliLoader(DataConfig(backend="dali", **cfg)))
    ld = DaliLoader(DataConfig(backend="dali", skip_corrupt=True, **cfg))
    got = list(ld)
    t = TorchLoader(DataConfig(backend="torch", skip_corrupt=True, **{**cfg, "num_workers": 0}))
    ref = list(t)
    assert [len(y) for _, y in got] == [len(y) for _, y in ref] == [6, 5, 6, 2]
    assert ld.skipped == t.skipped == [f"{path} record 9"]
    for (xa, ya), (xb, yb) in zip(got, ref):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # The next epoch knows the record is bad and skips it without reading it again.
    ld.set_epoch(1)
    assert [len(y) for _, y in ld] == [6, 5, 6, 2] and ld.skipped.count(f"{path} record 9") == 2


def test_host_depth_only_without_crop_noise_or_resize(tiny, tiny_png):
    """The CPU pipeline leaves the set's raw PGM depth to the host only where nothing but a flip touches it."""
    assert DaliLoader(_cfg(tiny, backend="dali", channels="rgbd", flip=True, brightness=0.3)).host_depth
    assert not DaliLoader(_cfg(tiny, backend="dali", channels="rgbd", crop_scale=0.1)).host_depth
    assert not DaliLoader(_cfg(tiny, backend="dali", channels="rgbd", depth_noise=0.05)).host_depth
    assert not DaliLoader(_cfg(tiny, backend="dali", channels="depth")).host_depth
    assert not DaliLoader(_cfg(tiny, path=os.path.join(tiny_png, "train.rec"), backend="dali", channels="rgbd")).host_depth
    ld = DaliLoader(_cfg(tiny, backend="dali", channels="rgbd"))
    ld.resize = True
    assert not ld.host_depth


class _DaliDepthInDali(DaliLoader):
    """The dali backend with its depth normalised and flipped by DALI, as before the host took it over."""

    host_depth = property(lambda self: False)


def test_host_depth_equals_torch_and_dali_depth(tiny):
    """Flipped and normalised on the host, depth is bit-identical to the torch backend's and to DALI's own."""
    cfg = _cfg(tiny, channels="rgbd", flip=True, brightness=0.2, contrast=0.2)
    t = TorchLoader(DataConfig(**{**cfg.__dict__, "backend": "torch"}))
    d = DaliLoader(DataConfig(**{**cfg.__dict__, "backend": "dali"}))
    o = _DaliDepthInDali(DataConfig(**{**cfg.__dict__, "backend": "dali"}))
    assert d.host_depth and not o.host_depth
    flipped = 0
    for e in (0, 1):
        for ld in (t, d, o):
            ld.set_epoch(e)
        for (xt, yt), (xd, yd), (xo, yo) in zip(t, d, o, strict=True):
            assert torch.equal(yt, yd) and torch.equal(yd, yo)
            assert torch.equal(xd[:, 3], xt[:, 3]) and torch.equal(xd[:, 3], xo[:, 3])
            assert torch.equal(xd, xo)
            flipped += int((xd[:, 3] != xd[:, 3].flip(-1)).any(dim=(1, 2)).sum())
    assert flipped > 0
    t.close()


@pytest.mark.parametrize("workers", [1, 3])
def test_pipelines_deal_batches_in_turn(tiny, tmp_path, workers):
    """One CPU pipeline per worker, batches dealt in turn: same batches, in order, as the torch backend,
    with batches skipped whole in the middle and at the end of the epoch, across epochs and on resume."""
    rec = str(tmp_path / "train.rec")
    shutil.copy(os.path.join(tiny, "train.rec"), rec)
    shutil.copy(os.path.join(tiny, "train.idx"), str(tmp_path / "train.idx"))
    for key in (3, 4, 47, 48):  # batches 1 and 23 of 24
        break_jpeg(rec, key)
    cfg = _cfg(tiny, path=rec, shuffle=False, batch_size=2, skip_corrupt=True, num_workers=workers, flip=True)
    t = TorchLoader(DataConfig(**{**cfg.__dict__, "backend": "torch", "num_workers": 0}))
    d = DaliLoader(DataConfig(**{**cfg.__dict__, "backend": "dali"}))
    assert d.num_pipelines == workers
    for e in (0, 1):
        t.set_epoch(e)
        d.set_epoch(e)
        a, b = list(t), list(d)
        assert [len(y) for _, y in b] == [len(y) for _, y in a] == [2, 0] + [2] * 21 + [0]
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert d._idle is not None and len(d._idle[0]) == workers, "pipelines that ran dry are kept"
    r = DaliLoader(DataConfig(**{**cfg.__dict__, "backend": "dali"}))
    r.load_state_dict({**d.state_dict(), "epoch": 1, "batch": 5})
    rest = list(r)
    assert len(rest) == 19
    for (xa, ya), (xb, yb) in zip(a[5:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Resumed at the last batch (skipped whole): the other pipelines get nothing to do.
    r.load_state_dict({**d.state_dict(), "epoch": 1, "batch": 23})
    last = list(r)
    assert [len(y) for _, y in last] == [0] and r.skipped[-2:] == [f"{rec} record 47", f"{rec} record 48"]
    assert r._idle is not None
