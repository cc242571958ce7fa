"""NVIDIA DALI pipelines: the ``dali`` loader backend, and DALI's own RecordIO reader.

``DaliLoader`` keeps fastface's order and resume semantics: our ``ShardOrder`` picks each
batch, our RecordIO/folder source hands DALI the encoded bytes and the augmentation
parameters (``fn.external_source``), and DALI decodes, augments and normalises them — on the
GPU (``mixed`` nvJPEG decode, GPU ops) where one exists, or in a CPU-only pipeline
(``device_id=None``) where none does. With augmentation off it returns bit-identical
tensors to the torch backend.

Where the CPU time goes, and what keeps it low (profile: bench/results/data_backends.json
and the data section of the README): the Python side does no per-sample decoding (the
batch's records are checked with numpy and passed as views of the mapped file, parameters
are drawn for the whole batch, labels never enter DALI); decoding is libjpeg-turbo for RGB,
and the default PGM depth skips DALI's decoder altogether on a CPU pipeline: the set's own
16-bit PGMs are raw big-endian samples behind one known header, which the feeder byte-swaps
into a uint16 (N, H, W, 1) batch while copying it (~3-6 µs a map on the main thread, against
~15 µs of DALI's PGM decode per map plus its per-sample parsing on an executor thread; any
other depth in the set is decoded with OpenCV, as the torch backend does). One
``crop_mirror_normalize`` does flip + normalise + HWC→CHW + cast; no resize is built for
images already at the output size; RGB is written padded to 4 channels; and the output
leaves DALI without a copy (DLPack, dynamic executor). Where only a flip touches depth (no
crop, noise or resize: the default), DALI gets no depth at all: the main thread mirrors the
batch's raw maps (one OpenCV flip for all mirrored ones) and normalises them into the
padding, with ``augment.apply``'s arithmetic (``DaliLoader.host_depth``); otherwise a second
``crop_mirror_normalize`` does depth and the host copies it into the padding.

On a CPU, ``num_workers`` pipelines of one thread each share an epoch (batch k goes to
pipeline k mod n, as the torch backend deals batches to its worker processes), not one
pipeline of ``num_workers`` threads: a DALI CPU pipeline runs its operators one after another,
and between two of them its worker threads sleep until its executor thread has set up the
next (per-sample image parsing, output allocation; perf sched: most of their sleeps end with
an executor's wake-up), which left a fifth to a quarter of two cores idle with one pipeline
of two threads. With one pipeline per worker thread the same number of worker threads
decode and normalise, and one pipeline's set-up overlaps the other's work. The batches in
flight stay those of the torch backend: ``prefetch`` per pipeline.

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

import cv2
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


def _augment_graph(rgb, depth, args: dict, aug: augment.AugSettings, size: int, gpu: bool, resize: bool = True, join: bool = True,
                   pad: bool = False):
    """The DALI ops after decoding: brightness/contrast, crop-resize, flip + normalise, noise.

    Returns the (C, S, S) float image node, or with ``join=False`` and both modalities, the
    pair (RGB padded to 4 channels with a zero depth channel, depth (1, S, S)) for the caller
    to fill channel 3 in place: a float concatenation in DALI costs ~40 µs per RGB-D sample
    on a CPU, copying depth into the padding ~8 µs. ``pad=True`` pads RGB to 4 channels without
    a depth node (the caller writes channel 3 itself). ``resize=False`` leaves images at their
    decoded size when no crop is drawn: DALI's CPU resize costs ~250 µs per 112x112 RGB-D
    sample even when it changes nothing.
    """
    crop = aug.crop_scale > 0
    if rgb is not None:
        if aug.brightness > 0 or aug.contrast > 0:
            rgb = fn.brightness_contrast(rgb, brightness=args["brightness"], contrast=args["contrast"], contrast_center=128.0)
        if crop:
            rgb = fn.resize(rgb, roi_start=args["roi_start"], roi_end=args["roi_end"], roi_relative=True, size=[size, size],
                            interp_type=types.INTERP_LINEAR, antialias=False)
        elif resize:
            rgb = fn.resize(rgb, size=[size, size], interp_type=types.INTERP_LINEAR)
        # One fused op: flip, (x - 127.5) * (1 / 127.5), HWC -> CHW, uint8 -> float.
        rgb = fn.crop_mirror_normalize(rgb, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3, std=[127.5] * 3,
                                       mirror=args["flip"], pad_output=pad or (depth is not None and not join))
    if depth is not None:
        if crop:
            depth = fn.resize(depth, roi_start=args["roi_start"], roi_end=args["roi_end"], roi_relative=True, size=[size, size],
                              interp_type=types.INTERP_NN)
        elif resize:
            depth = fn.resize(depth, size=[size, size], interp_type=types.INTERP_NN)
        depth = fn.crop_mirror_normalize(depth, dtype=types.FLOAT, output_layout="CHW", mean=[32767.5], std=[32767.5],
                                         mirror=args["flip"])
        if "noise" in args:
            depth = depth + (args["noise"].gpu() if gpu else args["noise"])
    if rgb is None or depth is None:
        return rgb if depth is None else depth
    return fn.cat(rgb, depth, axis=0) if join else (rgb, depth)


class _Feeder:
    """DALI's external source: each call hands over the next batch's encoded bytes and parameters.

    No per-sample decoding in Python on the common path: the source reads the whole batch as
    views of the mapped file (``read_many``), the augmentation parameters are drawn for the
    whole batch at once, and raw PGM depth is one byte-swapping numpy copy per map. Labels
    and skipped names do not go through DALI: they wait in ``pending``, in batch order, for
    the batch DALI returns.
    """

    def __init__(self, loader: DaliLoader, epoch: int, start: int, stride: int = 1, offset: int = 0):
        self.ld = loader
        # Whether this feeder's pipeline leaves depth to the host (``DaliLoader.host_depth``):
        # then the depth maps, already flipped, wait in ``pending`` with the labels.
        self.host = loader.host_depth
        self.names = [n for n in loader.arg_names if not (self.host and n == "depth")]
        self.pending: collections.deque[tuple[torch.Tensor, list[str], np.ndarray | list[np.ndarray] | None]] = collections.deque()
        self.start(epoch, start, stride, offset)

    def start(self, epoch: int, start: int, stride: int = 1, offset: int = 0) -> None:
        """Feed batches ``start + offset``, then every ``stride``-th after it, of ``epoch`` from the next call on."""
        self.epoch = epoch
        self.batches = self.ld.order.batches(epoch, start)[offset::stride]
        self.k = 0
        self.pending.clear()
        self.error: BaseException | None = None

    def __call__(self):
        while True:
            if self.k >= len(self.batches):
                raise StopIteration
            idx = self.batches[self.k]
            self.k += 1
            ld = self.ld
            pos = np.arange(len(idx))
            skipped: list[str] = []
            if ld.bad:
                known = np.isin(idx, np.fromiter(ld.bad, np.int64, len(ld.bad)))
                skipped = [ld.source.name(int(i)) for i in idx[known]]
                pos = pos[~known]
            got = ld.source.read_many(idx[pos], rgb=ld.channels != "depth", depth="d" in ld.channels)
            if got.errors:
                if not ld.cfg.skip_corrupt:
                    self.error = got.errors[0][1]
                    raise self.error
                for j, _ in got.errors:
                    i = int(idx[pos[j]])
                    ld.bad.add(i)
                    skipped.append(ld.source.name(i))
            pos = pos[got.kept]
            depth = got.depth
            p = augment.draw(ld.aug, ld.cfg.seed, self.epoch, idx[pos])
            if ld.raw_depth and len(pos):
                depth, bad = self._raw_depth(got, idx[pos], p.flip if self.host else None)
                if bad:
                    if not ld.cfg.skip_corrupt:
                        self.error = next(iter(bad.values()))
                        raise self.error
                    ld.bad.update(int(idx[pos[j]]) for j in bad)
                    self.k -= 1  # read the batch again, without them
                    continue
            if len(pos):
                break
            # DALI takes no empty batch: this one is handed out as empty without DALI.
            self.pending.append((torch.zeros(0, dtype=torch.int64), skipped, None))
        self.pending.append((torch.from_numpy(got.labels), skipped, depth if self.host else None))
        out: dict[str, object] = {"rgb": got.rgb, "depth": depth, "flip": p.flip}
        if "roi_start" in ld.arg_names:
            out["roi_start"], out["roi_end"] = np.ascontiguousarray(p.roi[:, :2]), np.ascontiguousarray(p.roi[:, 2:])
        if "brightness" in ld.arg_names:
            out["brightness"], out["contrast"] = p.brightness, p.contrast
        if "noise" in ld.arg_names:
            s = ld.cfg.image_size
            noise = np.empty((len(pos), 1, s, s), np.float32)
            for j in range(len(pos)):
                noise[j] = augment.noise_field(p.noise_key[j], s) * p.noise_sigma[j]
            out["noise"] = noise
        return tuple(out[n] for n in self.names)

    def _raw_depth(self, got, idx: np.ndarray, flip: np.ndarray | None = None) -> tuple[np.ndarray | list[np.ndarray], dict[int, DataError]]:
        """The batch's depth maps as uint16 (H, W, 1) arrays, for a pipeline without a depth decoder.

        The set's own 16-bit PGMs (``got.pgm``) are raw big-endian samples after a known header:
        numpy's assignment from the big-endian view swaps the bytes into one (N, H, W, 1) array
        as it copies (~6 µs a map, against ~15 µs for DALI's PGM decoder plus its per-sample
        parsing). Any other depth (a PNG, another PGM header) is decoded here with OpenCV, as the
        torch backend does; an undecodable one is returned, by its position in the batch, as the
        error naming its record. With ``flip`` (per sample, 1 = mirror) the maps come out
        mirrored where it says so, for a pipeline that leaves depth to the host.
        """
        src, views = self.ld.source, got.depth
        k, h, w = src.pgm_layout
        if got.pgm is not None and got.pgm.all():
            out = np.empty((len(views), h * w), np.uint16)
            for j, v in enumerate(views):
                out[j] = v[k:].view(">u2")
            out = out.reshape(len(views), h, w, 1)
            f = np.flatnonzero(flip) if flip is not None else ()
            if len(f):
                # All mirrored maps in one OpenCV call (its rows are theirs): a numpy copy through a
                # reversed view, or byte-swapping through one, costs ~10x more.
                out[f] = cv2.flip(out[f].reshape(-1, w), 1).reshape(len(f), h, w, 1)
            return out, {}
        maps, bad = [], {}
        for j, v in enumerate(views):
            if got.pgm is not None and got.pgm[j]:
                m = v[k:].view(">u2").reshape(h, w)
                maps.append((m[:, ::-1] if flip is not None and flip[j] else m).astype(np.uint16)[:, :, None])
                continue
            try:
                m = decode_depth(v)
                maps.append((m[:, ::-1] if flip is not None and flip[j] else m)[:, :, None])
            except DecodeError as e:
                path, rec = src.locate(int(idx[j]))
                bad[j] = DataError(path, str(e), rec)
        return maps, bad


def _native_size(source: RecordSource | FolderSource, channels: str, size: int) -> bool:
    """Whether the set's first sample already has the output size (then no resize is built)."""
    try:
        _, rgb, depth = source.read(0)
        if channels != "depth" and decode_rgb(rgb).shape[:2] != (size, size):
            return False
        if "d" in channels and (depth is None or decode_depth(depth).shape != (size, size)):
            return False
    except (DataError, DecodeError):
        return False
    return True


class DaliLoader(FaceLoader):
    """DALI backend of ``make_loader``: DALI decodes and augments what our sampler picks.

    Images come out of DALI without a copy (DLPack; the dynamic executor hands over
    ownership). A set whose first image has the output size is read without a resize; a
    batch that then comes out another size makes the loader rebuild with one and redo it.
    Pipelines that ran to the end of their epoch serve the next epoch too. On a CPU there is
    one single-threaded pipeline per worker (``num_pipelines``), and a RecordIO set with 16-bit
    PGM depth has its depth fed as raw uint16 maps (``raw_depth``), with no DALI decoder for
    it, or, with nothing but a flip to apply to it, kept out of DALI (``host_depth``).
    """

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
        names.append("flip")
        if self.aug.crop_scale > 0:
            names += ["roi_start", "roi_end"]
        if self.aug.brightness > 0 or self.aug.contrast > 0:
            names += ["brightness", "contrast"]
        if self.aug.depth_noise > 0 and "d" in self.channels:
            names.append("noise")
        self.arg_names = names
        # The set's own 16-bit PGM depth goes into a CPU pipeline as raw uint16 maps, not through
        # DALI's decoder (see _Feeder._raw_depth).
        self.raw_depth = "d" in self.channels and self.device_id is None and getattr(self.source, "pgm_layout", None) is not None
        self.resize = not _native_size(self.source, self.channels, cfg.image_size)
        # Pipelines whose epoch ran to its end, kept for the next one (no rebuild, no refill
        # from empty): ([(pipeline, its feeder)], whether they resize).
        self._idle: tuple[list[tuple[Pipeline, _Feeder]], bool] | None = None

    @property
    def host_depth(self) -> bool:
        """Whether the next pipeline leaves the raw PGM depth to the host (RGB-D, no resize, crop or noise).

        Then DALI decodes and normalises only RGB, into 4 channels, and the main thread writes
        the depth (mirrored while byte-swapped, then normalised with ``augment.apply``'s
        arithmetic) into channel 3 of DALI's output: one operator fewer for DALI's threads,
        whose time between operators goes idle, and no copy of a normalised depth map.
        """
        s = self.cfg.image_size
        return (self.raw_depth and self.channels == "rgbd" and not self.resize and self.aug.crop_scale == 0
                and self.aug.depth_noise == 0 and tuple(self.source.pgm_layout[1:]) == (s, s))

    @property
    def num_pipelines(self) -> int:
        """How many DALI pipelines share the epoch: one per worker thread on a CPU, one on a GPU.

        A CPU pipeline runs its operators one after another, and between two of them its worker
        threads wait while the executor sets up the next one (per-sample image parsing, output
        allocation): with two threads in one pipeline a fifth to a quarter of two cores went idle.
        ``num_workers`` pipelines of one thread each (batches dealt out in turn, as the torch
        backend deals them to its worker processes) keep the same number of worker threads busy
        with whole batches, and one pipeline's set-up overlaps the others' work.
        """
        return max(1, self.cfg.num_workers) if self.device_id is None else 1

    def _take_pipelines(self, epoch: int, start: int) -> list[tuple[Pipeline, _Feeder]]:
        """The idle pipelines restarted at batch ``start`` of ``epoch``, or new ones.

        Pipeline j of n is fed batches ``start + j``, ``start + j + n``, ...
        """
        idle, self._idle = self._idle, None
        n = self.num_pipelines
        if idle is not None and idle[1] == self.resize and len(idle[0]) == n and all(f.host == self.host_depth for _, f in idle[0]):
            for j, (pipe, feeder) in enumerate(idle[0]):
                feeder.start(epoch, start, n, j)
                pipe.reset()
            return idle[0]
        del idle
        out = []
        for j in range(n):
            feeder = _Feeder(self, epoch, start, n, j)
            out.append((self._pipeline(feeder, n), feeder))
        return out

    def _pipeline(self, feeder: _Feeder, n: int = 1) -> Pipeline:
        cfg = self.cfg
        gpu = self.device_id is not None
        # As many batches in flight as the torch backend keeps (prefetch per worker): the slack
        # that lets the pipeline ride out moments when the feeding thread does not get a CPU.
        workers = max(1, cfg.num_workers)
        queue = max(1, cfg.prefetch) * workers // n
        pipe = Pipeline(batch_size=cfg.batch_size, num_threads=max(1, workers // n), device_id=self.device_id,
                        prefetch_queue_depth=queue, seed=cfg.seed, exec_dynamic=True)
        with pipe:
            layouts = ["HWC" if n == "depth" and self.raw_depth else "" for n in feeder.names]
            outs = fn.external_source(source=feeder, num_outputs=len(feeder.names), batch=True, parallel=False, layout=layouts)
            args = dict(zip(feeder.names, outs))
            dec = "mixed" if gpu else "cpu"
            rgb = fn.decoders.image(args["rgb"], device=dec, output_type=types.RGB) if "rgb" in args else None
            depth = args.get("depth")
            if depth is not None and not self.raw_depth:
                depth = fn.decoders.image(depth, device=dec, output_type=types.ANY_DATA, dtype=types.UINT16)
            images = _augment_graph(rgb, depth, args, self.aug, cfg.image_size, gpu, self.resize, join=False, pad=feeder.host)
            pipe.set_outputs(*(images if isinstance(images, tuple) else (images,)))
        pipe.build()
        return pipe

    def _to_torch(self, outputs: tuple, labels: torch.Tensor, depth: np.ndarray | list[np.ndarray] | None = None) -> Batch | None:
        """The batch as torch tensors (no copy of the images), or None when they are not (n, C, S, S).

        ``depth``: the host's depth maps (uint16 (H, W, 1) each, already mirrored), normalised
        here into channel 3 of DALI's padded RGB.
        """
        c, s = self.in_channels, self.cfg.image_size
        dev = torch.device("cuda", self.device_id) if self.device_id is not None else torch.device("cpu")
        if len(labels) == 0:
            return torch.empty((0, c, s, s), dtype=torch.float32, device=dev), labels.to(dev)
        try:
            ts = [o.as_tensor() for o in outputs]
        except RuntimeError:  # samples of different shapes: only possible without a resize
            return None
        # With the dynamic executor DALI hands its output buffers over: DLPack, no copy.
        x = torch.from_dlpack(ts[0])
        if tuple(x.shape) != (len(labels), c, s, s):
            return None
        if depth is not None:
            if isinstance(depth, list):
                if any(m.shape != (s, s, 1) for m in depth):
                    return None
                depth = np.stack(depth)
            if depth.shape != (len(labels), s, s, 1):
                return None
            # augment.apply's arithmetic, on the whole batch: bit-identical to the torch backend.
            d = x.numpy()[:, 3]
            np.subtract(depth[..., 0], np.float32(32767.5), out=d, dtype=np.float32)
            np.multiply(d, np.float32(1 / 32767.5), out=d)
        elif len(ts) == 2:
            d = torch.from_dlpack(ts[1])
            if tuple(d.shape) != (len(labels), 1, s, s):
                return None
            if x.is_cuda:
                x[:, 3:].copy_(d)
            else:
                # numpy's copy: torch's would wake its OpenMP pool, whose spinning threads
                # take the CPU from DALI's workers.
                x.numpy()[:, 3:] = d.numpy()
        return x, labels.to(dev, non_blocking=True)

    def _find_undecodable(self, epoch: int, k: int) -> list[int]:
        """Samples of batch k (and the prefetched ones after it) that OpenCV cannot decode either."""
        found = []
        for b in self.order.batches(epoch, k)[: max(1, self.cfg.prefetch) * max(1, self.cfg.num_workers) + 1]:
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
            pipes = self._take_pipelines(epoch, k)
            n, base = len(pipes), k
            # Per pipeline, its batches that are out of DALI but not yet handed out, in order:
            # (labels, skipped names, host depth, DALI outputs or None for a batch skipped whole).
            ready: list[collections.deque] = [collections.deque() for _ in pipes]
            dry = [False] * n  # pipelines whose run() said StopIteration
            finished = False
            try:
                while True:
                    if k >= len(self.order):
                        # The epoch is out: make sure every pipeline ran dry, so that it can be reused.
                        for j, (pipe, feeder) in enumerate(pipes):
                            if not dry[j] and not ready[j]:
                                try:
                                    pipe.run()
                                except StopIteration:
                                    dry[j] = True
                        finished = all(dry) and not any(ready) and not any(f.pending for _, f in pipes)
                        return
                    j = (k - base) % n
                    pipe, feeder = pipes[j]
                    if not ready[j]:
                        try:
                            outputs = pipe.run()
                        except StopIteration:
                            outputs = None
                            dry[j] = True
                        except Exception as e:
                            if feeder.error is not None:
                                raise feeder.error from None
                            culprits = self._find_undecodable(epoch, k)
                            if not culprits and not self.resize:
                                self.resize = True  # e.g. RGB and depth of different sizes: retry with a resize
                                break
                            if not culprits:
                                raise DataError(self.source.path, f"DALI failed on batch {k} of epoch {epoch}: {e}") from e
                            if not self.cfg.skip_corrupt:
                                path, rec = self.source.locate(culprits[0])
                                raise DataError(path, f"undecodable image (DALI: {str(e).splitlines()[-1] if str(e) else e})", rec) from None
                            self.bad.update(culprits)
                            break  # rebuild the pipelines from batch k without them
                        # The feeder's queue up to this output: batches skipped whole (not in DALI's
                        # output), then the one DALI returned; at the end of the epoch, skipped ones only.
                        while feeder.pending:
                            labels, skipped, depth = feeder.pending.popleft()
                            empty = len(labels) == 0
                            ready[j].append((labels, skipped, depth, None if empty else outputs))
                            if not empty:
                                break
                        if not ready[j]:
                            raise DataError(self.source.path, f"DALI pipeline {j} ran out before batch {k} of epoch {epoch}")
                    labels, skipped, depth, outputs = ready[j].popleft()
                    if outputs is None:
                        batch = self._to_torch((), labels)
                    else:
                        batch = self._to_torch(outputs, labels, depth)
                        if batch is None:
                            if self.resize:
                                raise DataError(self.source.path, f"DALI returned batch {k} of epoch {epoch} in an unexpected shape")
                            self.resize = True  # images of other sizes: rebuild with a resize, redo batch k
                            break
                    if skipped:
                        self._note_skipped(skipped)
                    k += 1
                    yield batch
            finally:
                # Only pipelines that ran dry are clean; ones left mid-epoch hold prefetched batches.
                if finished:
                    self._idle = (pipes, self.resize)
                del pipes

    def close(self) -> None:
        """Release the idle pipelines (their threads and buffers)."""
        self._idle = None


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
                          initial_fill: int = 1024, resize: bool | None = None, prefetch: int = 2) -> Pipeline:
    """A DALI pipeline on ``fn.readers.mxnet`` → (images float CHW normalised, labels float (N, L)).

    RGB-D records (label ``(class, rgb_len)``) are split inside DALI at ``rgb_len``;
    ``labels[:, 0]`` is the class either way. ``flip`` mirrors at random (DALI's own RNG).
    ``resize=None`` resizes only when the first image record is not ``image_size`` square
    (insightface sets are all 112x112); pass True for a set of mixed sizes.
    """
    index = image_index(rec_path, idx_path)
    if resize is None:
        src = RecordSource(rec_path, idx_path)
        resize = not _native_size(src, channels, image_size)
        src.reader.close()
    gpu = device_id is not None
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, prefetch_queue_depth=prefetch,
                    exec_dynamic=True)
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
        images = _augment_graph(rgb, depth, {"flip": mirror}, aug, image_size, gpu, resize)
        pipe.set_outputs(images, labels)
    pipe.build()
    return pipe
