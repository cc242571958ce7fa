"""Verification pair sets: .bin round trip, insightface's Python 2 pickles, RGB-D entries, errors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from fastface.data.codec import encode_depth, encode_png, encode_rgb, jpeg_end, split_rgbd
from fastface.data.verification import VerificationFileError, decode_entry, load_pairs, read_bin, write_bin


def _images(n, depth=True, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rgb = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        d = rng.integers(0, 65536, (112, 112), dtype=np.uint16)
        out.append((rgb, d))
    return out


def test_round_trip_rgbd(tmp_path):
    imgs = _images(6)
    bins = [encode_png(rgb) if i == 0 else encode_rgb(rgb) for i, (rgb, _) in enumerate(imgs)]
    bins = [b + encode_depth(d) for b, (_, d) in zip(bins, imgs)]
    same = [True, False, True]
    p = str(tmp_path / "v.bin")
    write_bin(p, bins, same)
    assert read_bin(p) == (bins, same)
    x, s = load_pairs(p)
    assert x.shape == (6, 4, 112, 112) and x.dtype == torch.float32
    assert s.tolist() == same and s.dtype == torch.bool
    # PNG RGB is lossless: exact values; depth is lossless everywhere.
    rgb0, d0 = imgs[0]
    assert torch.equal(x[0, :3], torch.from_numpy((rgb0.astype(np.float32) - 127.5) * np.float32(1 / 127.5)).permute(2, 0, 1))
    for i, (_, d) in enumerate(imgs):
        assert torch.equal(x[i, 3], torch.from_numpy((d.astype(np.float32) - 32767.5) * np.float32(1 / 32767.5)))
    assert load_pairs(p, "depth")[0].shape == (6, 1, 112, 112)
    assert torch.equal(load_pairs(p, "rgb")[0], x[:, :3])


def test_python2_style_pickle_and_rgb_only(tmp_path):
    imgs = _images(4, seed=1)
    bins = [encode_rgb(rgb) for rgb, _ in imgs]
    p = str(tmp_path / "lfw.bin")
    with open(p, "wb") as f:
        pickle.dump((bins, [True, False]), f, protocol=2)
    x, s = load_pairs(p)
    assert x.shape == (4, 3, 112, 112) and s.tolist() == [True, False]
    with pytest.raises(VerificationFileError, match=r"lfw\.bin image 0: channels='rgbd' needs depth"):
        load_pairs(p, "rgbd")


def test_split_rgbd_walks_the_jpeg():
    rgb = _images(1, seed=2)[0][0]
    jpg = encode_rgb(rgb)
    assert jpeg_end(jpg) == len(jpg)
    png = encode_depth(np.arange(112 * 112, dtype=np.uint16).reshape(112, 112))
    assert split_rgbd(jpg + png) == (jpg, png)
    assert split_rgbd(jpg) == (jpg, None)
    a, d = decode_entry(jpg + png)
    assert d is not None and d[0, 5] == 5


def test_bad_bins(tmp_path):
    p = str(tmp_path / "bad.bin")
    with open(p, "wb") as f:
        pickle.dump(([b"x"] * 3, [True]), f)
    with pytest.raises(VerificationFileError, match=r"bad\.bin: 3 images for 1 pairs"):
        read_bin(p)
    with open(p, "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(VerificationFileError, match="not a pickled pair set"):
        read_bin(p)
    with open(p, "wb") as f:
        pickle.dump(([b"garbage", b"garbage"], [True]), f)
    with pytest.raises(VerificationFileError, match=r"bad\.bin image 0: undecodable"):
        load_pairs(p)
    with pytest.raises(ValueError, match="2 per pair"):
        write_bin(p, [b"a"], [True])
