"""NVIDIA DALI pipelines: the ``dali`` loader backend, and DALI's own RecordIO reader.

``DaliLoader`` keeps fastface's order and resume semantics: our ``ShardOrder`` picks each
batch, our RecordIO/folder source hands DALI the encoded bytes and the augmentation
parameters (``fn.external_source``), and DALI decodes, augments and normalises them — on the
GPU (``mixed`` nvJPEG decode, GPU ops) where one exists, or in a CPU-only pipeline
(``device_id=None``) where none does. With augmentation off it returns bit-identical
tensors to the torch backend.

``mxnet_reader_pipeline`` uses ``fn.readers.mxnet`` directly (DALI's C++ reader: its own
sharding and buffer shuffle, so no exact replay on resume); it reads fastface's RecordIO
sets as well as insightface's, depth included.
"""
from __future__ import annotations

import collections
import hashlib
import os
import tempfile
from collections.abc import Iterator

import numpy as np
import torch

from fastface.data import augment
from fastface.data.codec import DecodeError, decode_depth, decode_rgb
from fastface.data.errors import DataError
from fastface.data.loader import Batch, DataConfig, FaceLoader
from fastface.data.recordio import RecordReader
from fastface.data.sources import FolderSource, RecordSource

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline
except ImportError as e:  # pragma: no cover - exercised only where DALI is missing
    raise ImportError("fastface.data.dali needs NVIDIA DALI: pip install 'fastface[dali]'") from e


def dali_device(device: str = "auto") -> int | None:
    """The CUDA device DALI should use (this process's current one), or None for a CPU pipeline."""
    if device == "cpu":
        return None
    if device not in ("auto", "gpu"):
        raise ValueError(f"device must be auto, gpu or cpu, got {device!r}")
    if torch.cuda.is_available():
        return torch.cuda.current_device()
    if device == "gpu":
        raise RuntimeError("DataConfig.device='gpu' but torch sees no CUDA device")
    return None


def _augment_graph(rgb, depth, args: dict, aug: augment.AugSettings, size: int, gpu: bool):
    """The DALI ops after decoding: brightness/contrast, crop-resize, flip + normalise, noise."""
    parts = []
    if rgb is not None:
        if aug.brightness > 0 or aug.contrast > 0:
            rgb = fn.brightness_contrast(rgb, brightness=args["brightness"], contrast=args["contrast"], contrast_center=128.0)
        if aug.crop_scale > 0:
            rgb = fn.resize(rgb, roi_start=args["roi_start"], roi_end=args["roi_end"], roi_relative=True, size=[size, size],
                            interp_type=types.INTERP_LINEAR, antialias=False)
        else:
            rgb = fn.resize(rgb, size=[size, size], interp_type=types.INTERP_LINEAR)
        parts.append(fn.crop_mirror_normalize(rgb, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3, std=[127.5] * 3,
                                              mirror=args["flip"]))
    if depth is not None:
        if aug.crop_scale > 0:
            depth = fn.resize(depth, roi_start=args["roi_start"], roi_end=args["roi_end"], roi_relative=True, size=[size, size],
                              interp_type=types.INTERP_NN)
        else:
            depth = fn.resize(depth, size=[size, size], interp_type=types.INTERP_NN)
        d = fn.crop_mirror_normalize(depth, dtype=types.FLOAT, output_layout="CHW", mean=[32767.5], std=[32767.5], mirror=args["flip"])
        if aug.depth_noise > 0:
            noise = args["noise"].gpu() if gpu else args["noise"]
            d = d + noise
        parts.append(d)
    return fn.cat(*parts, axis=0) if len(parts) > 1 else parts[0]


class _Feeder:
    """DALI's external source: each call returns the next batch's bytes, labels and parameters."""

    def __init__(self, loader: DaliLoader, epoch: int, start: int):
        self.ld, self.epoch = loader, epoch
        self.batches = loader.order.batches(epoch, start)
        self.k = 0
        self.skipped: collections.deque[list[str]] = collections.deque()
        self.error: BaseException | None = None

    def __call__(self):
        if self.k >= len(self.batches):
            raise StopIteration
        idx = self.batches[self.k]
        self.k += 1
        ld = self.ld
        p = augment.draw(ld.aug, ld.cfg.seed, self.epoch, idx)
        want_rgb, want_depth = ld.channels != "depth", "d" in ld.channels
        cols: dict[str, list] = {n: [] for n in ld.arg_names}
        skipped: list[str] = []
        for j, i in enumerate(idx):
            i = int(i)
            if i in ld.bad:
                skipped.append(ld.source.name(i))
                continue
            try:
                label, rgb, depth = ld.source.read(i)
                if want_depth and depth is None:
                    path, rec = ld.source.locate(i)
                    raise DataError(path, "sample has no depth", rec)
            except DataError as e:
                if not ld.cfg.skip_corrupt:
                    self.error = e
                    raise
                ld.bad.add(i)
                skipped.append(ld.source.name(i))
                continue
            if want_rgb:
                cols["rgb"].append(np.frombuffer(rgb, np.uint8))
            if want_depth:
                cols["depth"].append(np.frombuffer(depth, np.uint8))
            cols["label"].append(np.array([label], np.int64))
            cols["flip"].append(np.array(p.flip[j], np.int32))
            if "roi_start" in cols:
                cols["roi_start"].append(p.roi[j, :2].copy())
                cols["roi_end"].append(p.roi[j, 2:].copy())
            if "brightness" in cols:
                cols["brightness"].append(np.array(p.brightness[j], np.float32))
                cols["contrast"].append(np.array(p.contrast[j], np.float32))
            if "noise" in cols:
                field = augment.noise_field(p.noise_key[j], ld.cfg.image_size) * p.noise_sigma[j]
                cols["noise"].append(field)
        self.skipped.append(skipped)
        return tuple(cols[n] for n in ld.arg_names)


class DaliLoader(FaceLoader):
    """DALI backend of ``make_loader``: DALI decodes and augments what our sampler picks."""

    backend = "dali"

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, source: RecordSource | FolderSource | None = None):
        super().__init__(cfg, rank, world_size, source)
        self.device_id = dali_device(cfg.device)
        self.bad: set[int] = set()
        names = []
        if self.channels != "depth":
            names.append("rgb")
        if "d" in self.channels:
            names.append("depth")
        names += ["label", "flip"]
        if self.aug.crop_scale > 0:
            names += ["roi_start", "roi_end"]
        if self.aug.brightness > 0 or self.aug.contrast > 0:
            names += ["brightness", "contrast"]
        if self.aug.depth_noise > 0 and "d" in self.channels:
            names.append("noise")
        self.arg_names = names

    def _pipeline(self, feeder: _Feeder) -> Pipeline:
        cfg = self.cfg
        gpu = self.device_id is not None
        pipe = Pipeline(batch_size=cfg.batch_size, num_threads=max(1, cfg.num_workers), device_id=self.device_id,
                        prefetch_queue_depth=max(1, cfg.prefetch), seed=cfg.seed)
        with pipe:
            outs = fn.external_source(source=feeder, num_outputs=len(self.arg_names), batch=True)
            args = dict(zip(self.arg_names, outs))
            dec = "mixed" if gpu else "cpu"
            rgb = fn.decoders.image(args["rgb"], device=dec, output_type=types.RGB) if "rgb" in args else None
            depth = fn.decoders.image(args["depth"], device=dec, output_type=types.ANY_DATA, dtype=types.UINT16) if "depth" in args else None
            images = _augment_graph(rgb, depth, args, self.aug, cfg.image_size, gpu)
            pipe.set_outputs(images, args["label"])
        pipe.build()
        return pipe

    def _to_torch(self, images, labels) -> Batch:
        lab = torch.from_numpy(np.array(labels.as_tensor()).reshape(-1).astype(np.int64))
        if len(lab) == 0:
            c = self.in_channels
            s = self.cfg.image_size
            dev = torch.device("cuda", self.device_id) if self.device_id is not None else torch.device("cpu")
            return torch.empty((0, c, s, s), dtype=torch.float32, device=dev), lab.to(dev)
        if self.device_id is None:
            return torch.from_numpy(np.array(images.as_tensor())), lab
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = images.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.float32, device=torch.device("cuda", self.device_id))
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device_id))
        return out, lab.to(out.device, non_blocking=True)

    def _find_undecodable(self, epoch: int, k: int) -> list[int]:
        """Samples of batch k (and the prefetched ones after it) that OpenCV cannot decode either."""
        found = []
        for b in self.order.batches(epoch, k)[: max(1, self.cfg.prefetch) + 1]:
            for i in b:
                i = int(i)
                if i in self.bad:
                    continue
                try:
                    _, rgb, depth = self.source.read(i)
                    if self.channels != "depth":
                        decode_rgb(rgb)
                    if "d" in self.channels and depth is not None:
                        decode_depth(depth)
                except (DecodeError, DataError):
                    found.append(i)
            if found:
                break
        return found

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        k = start
        while k < len(self.order):
            feeder = _Feeder(self, epoch, k)
            pipe = self._pipeline(feeder)
            try:
                while True:
                    try:
                        images, labels = pipe.run()
                    except StopIteration:
                        return
                    except Exception as e:
                        if feeder.error is not None:
                            raise feeder.error from None
                        culprits = self._find_undecodable(epoch, k)
                        if not culprits:
                            raise DataError(self.source.path, f"DALI failed on batch {k} of epoch {epoch}: {e}") from e
                        if not self.cfg.skip_corrupt:
                            path, rec = self.source.locate(culprits[0])
                            raise DataError(path, f"undecodable image (DALI: {str(e).splitlines()[-1] if str(e) else e})", rec) from None
                        self.bad.update(culprits)
                        break  # rebuild the pipeline from batch k without them
                    skipped = feeder.skipped.popleft()
                    if skipped:
                        self._note_skipped(skipped)
                    k += 1
                    yield self._to_torch(images, labels)
            finally:
                del pipe


# ------------------------------------------------------------------ DALI's own RecordIO reader


def image_index(rec_path: str, idx_path: str | None = None) -> str:
    """An index of only the image records of an insightface set, for ``fn.readers.mxnet``.

    DALI decodes every record its index lists; insightface's header and identity records
    have no image, so they must be left out. Written beside the ``.rec`` when possible.
    """
    with RecordReader(rec_path, idx_path, quiet=True) as r:
        keys = r.image_keys()
        lines = "".join(f"{k}\t{r.offset(k)}\n" for k in keys)
        src_idx = r.idx_path
    stem = os.path.splitext(rec_path)[0]
    out = stem + ".images.idx"
    if os.path.exists(out) and os.path.getmtime(out) >= max(os.path.getmtime(rec_path), os.path.getmtime(src_idx)):
        return out
    d = os.path.dirname(os.path.abspath(out))
    if not os.access(d, os.W_OK):
        h = hashlib.sha1(os.path.abspath(rec_path).encode()).hexdigest()[:16]
        out = os.path.join(tempfile.gettempdir(), f"fastface-{h}.images.idx")
        d = os.path.dirname(out)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".idx", dir=d)
    with os.fdopen(fd, "w") as f:
        f.write(lines)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out


def mxnet_reader_pipeline(rec_path: str, idx_path: str | None = None, batch_size: int = 128, num_threads: int = 2,
                          device_id: int | None = None, channels: str = "rgb", shard_id: int = 0, num_shards: int = 1,
                          random_shuffle: bool = False, seed: int = 0, image_size: int = 112, flip: bool = False,
                          initial_fill: int = 1024) -> Pipeline:
    """A DALI pipeline on ``fn.readers.mxnet`` → (images float CHW normalised, labels float (N, L)).

    RGB-D records (label ``(class, rgb_len)``) are split inside DALI at ``rgb_len``;
    ``labels[:, 0]`` is the class either way. ``flip`` mirrors at random (DALI's own RNG).
    """
    index = image_index(rec_path, idx_path)
    gpu = device_id is not None
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, prefetch_queue_depth=2)
    with pipe:
        data, labels = fn.readers.mxnet(path=[rec_path], index_path=[index], shard_id=shard_id, num_shards=num_shards,
                                        random_shuffle=random_shuffle, initial_fill=initial_fill, pad_last_batch=False,
                                        name="Reader")
        dec = "mixed" if gpu else "cpu"
        rgb = depth = None
        if "d" in channels:
            n = fn.cast(labels[1], dtype=types.INT64)
            if channels != "depth":
                rgb = fn.decoders.image(data[0:n], device=dec, output_type=types.RGB)
            depth = fn.decoders.image(data[n:], device=dec, output_type=types.ANY_DATA, dtype=types.UINT16)
        else:
            rgb = fn.decoders.image(data, device=dec, output_type=types.RGB)
        mirror = fn.random.coin_flip(probability=0.5) if flip else 0
        aug = augment.AugSettings(flip=flip)
        images = _augment_graph(rgb, depth, {"flip": mirror}, aug, image_size, gpu)
        pipe.set_outputs(images, labels)
    pipe.build()
    return pipe
