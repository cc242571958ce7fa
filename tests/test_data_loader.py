"""The torch loader backend: sharding, resume, augmentation replay, folders, corrupt records."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from data_helpers import break_jpeg, tiny_set
from fastface.data import augment
from fastface.data.errors import DataError
from fastface.data.loader import DataConfig, TorchLoader, make_loader
from fastface.data.recordio import RecordReader
from fastface.data.sampler import ShardOrder

AUG = dict(flip=True, crop_scale=0.15, brightness=0.3, contrast=0.3, depth_noise=0.05)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_set(tmp_path_factory)


def _cfg(tiny, **kw):
    base = dict(path=os.path.join(tiny, "train.rec"), batch_size=5, backend="torch", num_workers=0, drop_last=False, seed=3)
    return DataConfig(**{**base, **kw})


@pytest.mark.parametrize("n,world", [(48, 4), (48, 5), (7, 3), (10, 1)])
def test_shards_cover_every_sample(n, world):
    for drop_last in (False, True):
        orders = [ShardOrder(n, 4, r, world, seed=1, drop_last=drop_last) for r in range(world)]
        for epoch in (0, 1):
            got = np.concatenate([o.indices(epoch) for o in orders])
            sizes = {len(o.indices(epoch)) for o in orders}
            assert len(sizes) == 1, "ranks must get equal shards"
            assert len({len(o) for o in orders}) == 1, "ranks must get equal batch counts"
            counts = np.bincount(got, minlength=n)
            if not drop_last:
                assert counts.min() >= 1 and counts.sum() == -(-n // world) * world
                if n % world == 0:
                    assert (counts == 1).all()
            else:
                assert counts.max() == 1 and counts.sum() == (n // world) * world
    a, b = ShardOrder(n, 4, 0, world, seed=1), ShardOrder(n, 4, 0, world, seed=1)
    assert np.array_equal(a.indices(2), b.indices(2))
    if n > 5:
        assert not np.array_equal(a.indices(0), a.indices(1)), "shuffle must change per epoch"


def test_loader_ranks_see_every_record_once(tiny):
    labels_by_rank = []
    seen = []
    for rank in range(4):
        ld = make_loader(_cfg(tiny, augment=False, batch_size=4), rank, 4)
        ld.set_epoch(1)
        imgs, labs = zip(*ld)
        seen.append(torch.cat(imgs))
        labels_by_rank.append(torch.cat(labs))
    allimg = torch.cat(seen)
    assert len(allimg) == 48
    # Every record exactly once: all 48 images distinct, labels as in the file.
    flat = allimg.flatten(1)
    assert len(torch.unique(flat, dim=0)) == 48
    assert torch.bincount(torch.cat(labels_by_rank)).tolist() == [6] * 8


def test_labels_match_records(tiny):
    ld = make_loader(_cfg(tiny, augment=False, shuffle=False, batch_size=48, channels="rgb"))
    x, y = next(iter(ld))
    with RecordReader(os.path.join(tiny, "train.rec")) as r:
        expect = [int(r[k][0].class_label) for k in r.image_keys()]
    assert y.tolist() == expect
    assert x.shape == (48, 3, 112, 112) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -1.0 <= x.min() and x.max() <= 1.0


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_replays_exactly(tiny, workers):
    cfg = _cfg(tiny, num_workers=workers, **AUG)
    ref = TorchLoader(cfg)
    full = {}
    for e in (0, 1):
        ref.set_epoch(e)
        full[e] = list(ref)
    ref.close()
    assert len(full[0]) == len(ref) == 10
    # Killed after 4 batches of epoch 0.
    run = TorchLoader(cfg)
    run.set_epoch(0)
    it = iter(run)
    for _ in range(4):
        next(it)
    state = run.state_dict()
    run.close()
    assert state["epoch"] == 0 and state["batch"] == 4
    resumed = TorchLoader(cfg)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the trainer's loop calls this again: the position survives
    rest = list(resumed)
    resumed.set_epoch(1)
    nxt = list(resumed)
    resumed.close()
    assert len(rest) == 6
    for (a, la), (b, lb) in zip(full[0][4:], rest):
        assert torch.equal(a, b) and torch.equal(la, lb)
    for (a, la), (b, lb) in zip(full[1], nxt):
        assert torch.equal(a, b) and torch.equal(la, lb)
    # Augmentation really is on and differs between epochs.
    assert not torch.equal(full[0][0][0], TorchLoader(_cfg(tiny, augment=False)).iter_from(0).__next__()[0])


def test_resume_refuses_other_layout(tiny):
    a = TorchLoader(_cfg(tiny))
    b = TorchLoader(_cfg(tiny, batch_size=6))
    with pytest.raises(ValueError, match="batch_size"):
        b.load_state_dict(a.state_dict())


def test_augmentation_parameters():
    s = augment.AugSettings(flip=True, crop_scale=0.2, brightness=0.2, contrast=0.1, depth_noise=0.1)
    idx = np.arange(1000)
    p = augment.draw(s, 0, 0, idx)
    assert 0.4 < p.flip.mean() < 0.6
    side = p.roi[:, 2] - p.roi[:, 0]
    assert side.min() >= 0.8 - 1e-6 and side.max() <= 1 + 1e-6 and (p.roi[:, 2:] <= 1 + 1e-6).all()
    assert np.allclose(side, p.roi[:, 3] - p.roi[:, 1])
    assert 0.8 <= p.brightness.min() and p.brightness.max() <= 1.2
    q = augment.draw(s, 0, 0, idx[500:])
    assert np.array_equal(p.roi[500:], q.roi), "a sample's parameters must not depend on its batch"
    r = augment.draw(s, 0, 1, idx)
    assert not np.array_equal(p.roi, r.roi)
    off = augment.draw(augment.AugSettings(flip=False), 0, 0, idx)
    assert not off.flip.any() and not off.crop.any() and (off.brightness == 1).all() and (off.noise_sigma == 0).all()


def test_config_switches(tiny):
    off = DataConfig(path="x", augment=False, flip=True, crop_scale=0.3)
    assert not off.aug_settings().active
    on = DataConfig(path="x", flip=False, crop_scale=0.3)
    assert on.aug_settings() == augment.AugSettings(flip=False, crop_scale=0.3)
    with pytest.raises(ValueError, match="unknown DataConfig keys"):
        DataConfig.from_dict({"path": "x", "batchsize": 3})


def test_folder_equals_records(tiny):
    a = make_loader(_cfg(tiny, augment=False, shuffle=False, batch_size=16))
    b = make_loader(_cfg(tiny, path=os.path.join(tiny, "train"), augment=False, shuffle=False, batch_size=16))
    assert b.num_classes == a.num_classes == 8 and b.channels == "rgbd"
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_folder_without_depth(tiny, tmp_path):
    root = tmp_path / "f"
    shutil.copytree(os.path.join(tiny, "train"), root)
    os.unlink(root / "000003" / "0002_depth.pgm")
    ld = make_loader(_cfg(tiny, path=str(root), augment=False))
    assert ld.channels == "rgb"
    with pytest.raises(DataError, match=r"1 of 48 images have no _depth.png/.pgm \(first: .*000003/0002.jpg\)"):
        make_loader(_cfg(tiny, path=str(root), channels="rgbd"))


def _corrupt_copy(tiny, tmp_path, key, how):
    rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
    shutil.copy(os.path.join(tiny, "train.rec"), rec)
    shutil.copy(os.path.join(tiny, "train.idx"), idx)
    if how == "magic":
        with RecordReader(rec) as r:
            off = r.offset(key)
        with open(rec, "r+b") as f:
            f.seek(off)
            f.write(b"\xde\xad\xbe\xef")
    else:
        break_jpeg(rec, key)
    return rec


@pytest.mark.parametrize("how", ["magic", "image"])
def test_corrupt_record_raises_or_skips(tiny, tmp_path, how):
    key = 17
    rec = _corrupt_copy(tiny, tmp_path, key, how)
    cfg = _cfg(tiny, path=rec, augment=False, shuffle=False, batch_size=48, channels="rgbd")
    with pytest.raises(DataError, match=rf"train\.rec record {key}\b"):
        list(make_loader(cfg))
    ld = make_loader(DataConfig(**{**cfg.__dict__, "skip_corrupt": True}))
    x, y = next(iter(ld))
    assert len(y) == 47 and ld.skipped == [f"{rec} record {key}"]
    with RecordReader(rec) as r:
        expect = [int(r[k][0].class_label) for k in r.image_keys() if k != key] if how == "image" else None
    if expect is not None:
        assert y.tolist() == expect
    # The other 47 are exactly the clean images.
    clean = next(iter(make_loader(DataConfig(**{**cfg.__dict__, "path": os.path.join(tiny, "train.rec")}))))
    keep = [i for i in range(48) if i != key - 1]
    assert torch.equal(x, clean[0][keep]) and torch.equal(y, clean[1][keep])


def test_index_past_end_raises_or_drops(tiny, tmp_path):
    rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
    shutil.copy(os.path.join(tiny, "train.rec"), rec)
    lines = open(os.path.join(tiny, "train.idx")).read().splitlines()
    lines[5] = "5\t99999999"
    open(idx, "w").write("\n".join(lines) + "\n")
    cfg = _cfg(tiny, path=rec, augment=False, batch_size=48)
    with pytest.raises(DataError, match=r"train\.rec record 5\b.*past the end"):
        make_loader(cfg)
    ld = make_loader(DataConfig(**{**cfg.__dict__, "skip_corrupt": True}))
    assert ld.num_samples == 47 and ld.skipped == [f"{rec} record 5"]


def test_auto_backend_falls_back_to_torch_without_dali(tiny):
    """With nvidia.dali unimportable, 'auto' gives the torch loader and fastface.info says why."""
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
from fastface import info
from fastface.data import dali_status
from fastface.data.loader import DataConfig, TorchLoader, make_loader
ok, why = dali_status()
assert not ok and "blocked for the test" in why and "torch DataLoader backend is used" in why, why
st = info.runtime_backends()["dali"]
assert not st["usable"] and st["why_not"] == why, st
ld = make_loader(DataConfig(path={os.path.join(tiny, "train.rec")!r}, batch_size=4, num_workers=0))
assert isinstance(ld, TorchLoader), type(ld)
x, y = next(iter(ld))
assert x.shape == (4, 4, 112, 112)
print("ok")
"""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
