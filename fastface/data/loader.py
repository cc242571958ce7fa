"""``make_loader``: batches of normalised faces and labels, sharded by rank, resumable mid-epoch.

Batches are ``(images, labels)``: images float32 (N, C, S, S) — RGB as (x - 127.5) / 127.5,
depth as (v - 32767.5) / 32767.5 (a hole is -1), channel order R, G, B, D — and labels
int64 (N,). The order of samples is ``fastface.data.sampler.ShardOrder`` and augmentation
parameters come from ``fastface.data.augment``; both are pure functions of (seed, epoch,
position), so ``state_dict()`` (epoch + batches consumed) is all a checkpoint needs to
resume and see exactly the batches an uninterrupted run would. Two backends produce the
same tensors for the same records (bit-exact with augmentation off): ``torch`` (DataLoader
worker processes, OpenCV decoding) and ``dali`` (``fastface.data.dali``).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch

from fastface.data import augment
from fastface.data.codec import DecodeError, decode_depth, decode_rgb
from fastface.data.errors import DataError
from fastface.data.sampler import ShardOrder
from fastface.data.sources import FolderSource, RecordSource, open_source

Batch = tuple[torch.Tensor, torch.Tensor]
CHANNELS = {"rgb": 3, "depth": 1, "rgbd": 4}


@dataclass
class DataConfig:
    """Everything a training loader needs; augmentation knobs are individually switchable."""

    path: str  # a .rec (its .idx beside it), a directory holding train.rec, or an image-folder root
    batch_size: int = 128  # per rank
    backend: str = "auto"  # auto (dali if installed, else torch) | dali | torch
    num_workers: int = 2  # torch: worker processes; dali: pipeline threads
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    channels: str = "auto"  # rgb | depth | rgbd | auto (rgbd when the set has depth)
    image_size: int = 112
    augment: bool = True  # master switch: False means no augmentation whatever the knobs say
    flip: bool = True
    crop_scale: float = 0.0  # random crop side in [1 - crop_scale, 1] of the image, then resize back
    brightness: float = 0.0
    contrast: float = 0.0
    depth_noise: float = 0.0  # sigma of additive Gaussian noise, normalised depth units
    skip_corrupt: bool = False  # skip (and count) bad records instead of raising DataError
    idx_path: str | None = None
    device: str = "auto"  # dali only: gpu (mixed decode + GPU ops) | cpu | auto
    prefetch: int = 2  # batches prepared ahead per worker (torch prefetch_factor; DALI queues prefetch x num_workers)
    pin_memory: bool = True  # torch backend, when CUDA is present

    def aug_settings(self) -> augment.AugSettings:
        """The augmentation actually applied (all off when ``augment`` is False)."""
        if not self.augment:
            return augment.AugSettings(flip=False)
        return augment.AugSettings(self.flip, self.crop_scale, self.brightness, self.contrast, self.depth_noise)

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        """From a dict (e.g. a YAML section); unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown DataConfig keys: {sorted(unknown)}")
        return cls(**d)


def resolve_channels(channels: str, source: RecordSource | FolderSource) -> str:
    """The channel set to load: ``auto`` follows the data; asking for missing depth is an error."""
    if channels == "auto":
        return "rgbd" if source.has_depth else "rgb"
    if channels not in CHANNELS:
        raise ValueError(f"channels must be one of {sorted(CHANNELS)} or auto, got {channels!r}")
    if "d" in channels and not source.has_depth:
        if isinstance(source, FolderSource):
            first = source.lacking_depth[0]
            why = f"{len(source.lacking_depth)} of {len(source)} images have no _depth.png/.pgm (first: {first})"
        else:
            why = "its records carry no depth image"
        raise DataError(source.path, f"channels={channels!r} needs depth, but {why}")
    return channels


class FaceLoader:
    """Shared epoch/resume logic; backends implement ``_batches(epoch, start)``."""

    backend = "?"

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, source: RecordSource | FolderSource | None = None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.source = source if source is not None else open_source(cfg.path, cfg.idx_path, cfg.skip_corrupt)
        self.channels = resolve_channels(cfg.channels, self.source)
        self.order = ShardOrder(len(self.source), cfg.batch_size, rank, world_size, cfg.seed, cfg.shuffle, cfg.drop_last)
        self.aug = cfg.aug_settings()
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        self._pos = 0
        self.skipped: list[str] = list(getattr(self.source, "dropped_at_open", []))
        for name in self.skipped:
            print(f"fastface: skipping {name}: index points past the end of the file", file=sys.stderr)

    @property
    def num_classes(self) -> int:
        """Number of identities of the training set."""
        return self.source.num_classes

    @property
    def num_samples(self) -> int:
        """Number of images of the training set (all ranks)."""
        return len(self.source)

    @property
    def in_channels(self) -> int:
        """C of the image batches."""
        return CHANNELS[self.channels]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration runs (its order and augmentation)."""
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Batch]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        return self.iter_from(start)

    def iter_from(self, start: int) -> Iterator[Batch]:
        """Batches ``start``, ``start + 1``, ... of the current epoch."""
        if not 0 <= start <= len(self):
            raise ValueError(f"batch {start} is outside the epoch's {len(self)} batches")
        self._pos = start
        for batch in self._batches(self.epoch, start):
            # Counted as consumed when handed out: a checkpoint taken after training on it
            # resumes at the next one.
            self._pos += 1
            yield batch

    def state_dict(self) -> dict:
        """Where the loader stands: epoch, batches consumed, and what the order depends on."""
        return {"epoch": self.epoch, "batch": self._pos, "seed": self.cfg.seed, "world_size": self.world_size,
                "rank": self.rank, "batch_size": self.cfg.batch_size, "num_samples": len(self.source),
                "shuffle": self.cfg.shuffle, "drop_last": self.cfg.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration of ``state['epoch']`` starts at batch ``state['batch']``."""
        mine = self.state_dict()
        for k in ("seed", "world_size", "batch_size", "num_samples", "shuffle", "drop_last"):
            if k in state and state[k] != mine[k]:
                raise ValueError(f"cannot resume: the checkpoint's data {k} is {state[k]!r}, this loader's is {mine[k]!r} (the batches would differ)")
        self.epoch = int(state["epoch"])
        self._pos = int(state["batch"])
        self._resume = (self.epoch, self._pos)

    def _note_skipped(self, names: list[str]) -> None:
        for n in names:
            print(f"fastface: skipped corrupt sample {n}", file=sys.stderr)
        self.skipped.extend(names)

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers and pipelines."""


# ------------------------------------------------------------------------------- torch backend


def _shared_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor in shared memory: a worker's batch then reaches the main
    process without the copy into shared memory that sending a private tensor costs (the
    way default_collate builds its batches)."""
    try:
        storage = torch.empty(0)._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
    except (AttributeError, TypeError):  # private API: fall back to a private tensor
        return torch.empty(shape)
    return torch.empty(0).new(storage).view(shape)


class BatchDataset(torch.utils.data.Dataset):
    """Builds whole batches in the worker: fewer, larger messages than per-sample collation."""

    def __init__(self, source: RecordSource | FolderSource, channels: str, aug: augment.AugSettings, seed: int, size: int, skip_corrupt: bool):
        self.source, self.channels, self.aug, self.seed, self.size, self.skip = source, channels, aug, seed, size, skip_corrupt

    def __len__(self) -> int:
        return len(self.source)

    def load(self, i: int) -> tuple[int, np.ndarray | None, np.ndarray | None]:
        """(label, uint8 RGB or None, uint16 depth or None) of sample ``i``; DataError names it."""
        label, rgb_b, depth_b = self.source.read(i)
        try:
            rgb = decode_rgb(rgb_b) if self.channels != "depth" else None
            depth = decode_depth(depth_b) if "d" in self.channels and depth_b is not None else None
        except DecodeError as e:
            path, rec = self.source.locate(i)
            raise DataError(path, str(e), rec) from None
        if "d" in self.channels and depth is None:
            path, rec = self.source.locate(i)
            raise DataError(path, "sample has no depth", rec)
        return label, rgb, depth

    def __getitem__(self, item: tuple[int, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        epoch, idx = item
        p = augment.draw(self.aug, self.seed, epoch, idx)
        c = CHANNELS[self.channels]
        shape = (len(idx), c, self.size, self.size)
        images = _shared_empty(shape) if torch.utils.data.get_worker_info() is not None else torch.empty(shape)
        out = images.numpy()
        labels = np.empty(len(idx), np.int64)
        skipped: list[str] = []
        n = 0
        for j, i in enumerate(idx):
            try:
                label, rgb, depth = self.load(int(i))
            except DataError:
                if not self.skip:
                    raise
                skipped.append(self.source.name(int(i)))
                continue
            augment.apply(rgb, depth, p, j, self.size, out=out[n])
            labels[n] = label
            n += 1
        return images[:n], torch.from_numpy(labels[:n]), skipped


class _EpochBatches(torch.utils.data.Sampler):
    """Yields (epoch, indices) of the loader's current epoch from its start batch (main process)."""

    def __init__(self, loader: TorchLoader):
        self.loader = loader

    def __iter__(self):
        ld = self.loader
        for b in ld.order.batches(ld.epoch, ld._start):
            yield (ld.epoch, b)

    def __len__(self) -> int:
        return len(self.loader.order) - self.loader._start


def _worker_context():
    """The start method for loader workers: forkserver where the platform has it (POSIX), else the default."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return None
    ctx = mp.get_context("forkserver")
    # The server imports this module (and torch) once, so workers start fast; and not the
    # caller's __main__ (the default), so a script without a main guard is not run again.
    ctx.set_forkserver_preload(["fastface.data.loader"])
    return ctx


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class TorchLoader(FaceLoader):
    """torch DataLoader backend: worker processes decode with OpenCV and augment in numpy."""

    backend = "torch"

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, source: RecordSource | FolderSource | None = None):
        super().__init__(cfg, rank, world_size, source)
        self.dataset = BatchDataset(self.source, self.channels, self.aug, cfg.seed, cfg.image_size, cfg.skip_corrupt)
        self._start = 0
        w = cfg.num_workers
        self._dl = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=_EpochBatches(self), num_workers=w,
            pin_memory=cfg.pin_memory and torch.cuda.is_available(), worker_init_fn=_worker_init if w else None,
            persistent_workers=w > 0, prefetch_factor=cfg.prefetch if w else None,
            # forkserver, not fork: a process that already runs DALI, OpenMP or our kernels' thread
            # pools can hold one of their locks at fork time, and a forked worker then waits on it
            # forever (seen as a hung worker in a futex wait); the server forks from a clean process.
            multiprocessing_context=_worker_context() if w else None,
        )

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        self._start = start
        for images, labels, skipped in self._dl:
            if skipped:
                self._note_skipped(skipped)
            yield images, labels

    def close(self) -> None:
        """Stop the worker processes."""
        it = getattr(self._dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._dl._iterator = None


def make_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> FaceLoader:
    """The loader of ``cfg`` for ``rank`` of ``world_size``; ``backend='auto'`` prefers DALI."""
    backend = cfg.backend
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"backend must be auto, dali or torch, got {backend!r}")
    if backend == "auto":
        from fastface.data import dali_status

        backend = "dali" if dali_status()[0] else "torch"
    if backend == "dali":
        from fastface.data.dali import DaliLoader

        return DaliLoader(cfg, rank, world_size)
    return TorchLoader(cfg, rank, world_size)
