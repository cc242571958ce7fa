"""Loader throughput: images/s of each backend on the same RecordIO set, 2 workers each.

Backends: ``torch`` (DataLoader, 2 worker processes, OpenCV decode), ``dali`` (our sampler +
DALI CPU pipelines, 2 worker threads in all: one single-threaded pipeline per worker,
fastface's default where DALI is installed; the PGM set's depth is read raw and, with only a
flip to apply, flipped and normalised on the main thread; PNG depth through DALI's decoder), ``dali-mxnet``
(DALI's own fn.readers.mxnet, 2 threads; no exact resume). Same records, batch 128, flip on,
everything else off, normalised float N x C x 112 x 112 out. A round is one whole epoch
(31 batches), as training reads them: restarting each epoch (torch: the sampler and the
workers' queues; dali: a new pipeline) is part of the cost, abandoning prefetched work is not. Sets: ``rgbd`` (the synth
default: JPEG + 16-bit PGM depth), ``rgbd-pngdepth`` (the same images with PNG depth, as
older sets store it) and ``rgb`` (the RGB channels of the first set).

Each backend's CPU time per image (its process, plus the worker processes for torch) is
saved too: it does not depend on what else runs on the machine the way images/s does.
The ratio to the torch DataLoader measured in the same run is printed and saved to
bench/results/data_backends.json. Target: dali >= 1.5x torch.

``pytest bench/test_bench_data.py --benchmark-only -s``. The machine is shared: the load
average before and after each measurement is saved with the numbers.
"""
from __future__ import annotations

import json
import os
import platform
import time

import pytest

pytest.importorskip("pytest_benchmark")

from fastface.data import dali_status  # noqa: E402
from fastface.data.loader import DataConfig, TorchLoader  # noqa: E402
from fastface.data.synth import generate, preset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
BATCH, WORKERS, ROUNDS = 128, 2, 5
BATCHES = 4000 // BATCH  # one epoch of the bench sets (drop_last)
SETS = {"rgbd": ("pgm", "rgbd"), "rgbd-pngdepth": ("png", "rgbd"), "rgb": ("pgm", "rgb")}
BACKENDS = ["torch", "dali", "dali-mxnet"]
_measured: dict[str, dict] = {}


@pytest.fixture(scope="module")
def bench_sets() -> dict[str, str]:
    """4,000-image RGB-D sets (demo generator, 100 identities), PGM and PNG depth; made once, reused."""
    out = {}
    for fmt in ("pgm", "png"):
        d = os.path.join(ROOT, "data", f"synth-bench-{fmt}")
        generate(preset("demo", n_ids=100, samples_per_id=40, val_ids=4, val_pairs=4, test_ids=4, test_pairs=4, depth_format=fmt),
                 d, progress=False)
        out[fmt] = os.path.join(d, "train.rec")
    return out


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of this process and of ``pids`` (Linux /proc; 0 for those elsewhere)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def _loader(backend: str, rec: str, channels: str):
    cfg = DataConfig(path=rec, batch_size=BATCH, backend=backend, num_workers=WORKERS, channels=channels, flip=True,
                     drop_last=True, device="cpu", seed=0)
    if backend == "torch":
        return TorchLoader(cfg)
    from fastface.data.dali import DaliLoader

    return DaliLoader(cfg)


def _mxnet_iter(rec: str, channels: str):
    import torch

    from fastface.data.dali import mxnet_reader_pipeline

    pipe = mxnet_reader_pipeline(rec, batch_size=BATCH, num_threads=WORKERS, channels=channels, random_shuffle=True, flip=True)

    def batches():
        while True:
            images, labels = pipe.run()
            # Zero-copy hand-over, as the dali backend does (DALI's dynamic executor owns nothing after).
            yield torch.from_dlpack(images.as_tensor()), torch.from_dlpack(labels.as_tensor())[:, 0].long()

    return batches()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("data", list(SETS))
def test_loader_throughput(benchmark, bench_sets, backend, data):
    if backend != "torch" and not dali_status()[0]:
        pytest.skip(dali_status()[1])
    fmt, channels = SETS[data]
    rec = bench_sets[fmt]
    epoch = [0]
    pids: list[int] = []
    if backend == "dali-mxnet":
        it = _mxnet_iter(rec, channels)
        next(it)  # builds and warms the pipeline

        def run():
            for _ in range(BATCHES):
                x, y = next(it)
            return x
    else:
        ld = _loader(backend, rec, channels)
        assert len(ld) == BATCHES
        for _ in ld:  # starts the workers / loads DALI's plugins
            pass
        if backend == "torch":
            pids = [w.pid for w in ld._dl._iterator._workers]
        else:  # equal worker threads: DALI's, over all its pipelines, are torch's worker processes
            assert sum(p.num_threads for p, _ in ld._idle[0]) == WORKERS

        def run():
            epoch[0] += 1
            ld.set_epoch(epoch[0])
            n = 0
            for x, y in ld:
                n += len(y)
            assert n == BATCHES * BATCH
            return x

    load0 = os.getloadavg()[0]
    cpu0 = _cpu_seconds(pids)
    x = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    # CPU of every round, the warm-up round included.
    cpu = (_cpu_seconds(pids) - cpu0) / ((ROUNDS + 1) * BATCHES * BATCH)
    assert x.shape == (BATCH, 4 if channels == "rgbd" else 3, 112, 112) and x.dtype.is_floating_point
    ips = BATCH * BATCHES / benchmark.stats.stats.median
    benchmark.extra_info["images_per_second"] = ips
    benchmark.extra_info["cpu_us_per_image"] = cpu * 1e6
    m = _measured.setdefault(data, {})
    m[backend] = {"images_per_second": ips, "cpu_us_per_image": cpu * 1e6, "load_before_after": (load0, os.getloadavg()[0])}
    print(f"\n{backend:10s} {data:13s} {ips:8.0f} img/s  {cpu * 1e6:6.0f} CPU µs/img  load {load0:.2f}")
    if backend != "dali-mxnet":
        ld.close()
    # The last measurement of a full run writes the report (a pytest test of its own would
    # be skipped by --benchmark-only); a partial run (-k) only prints.
    if sum(len(m) for m in _measured.values()) == len(SETS) * len(BACKENDS):
        _report()


def _report() -> None:
    """Print and save the ratios to the torch DataLoader measured in this run."""
    out = {"batch": BATCH, "batches_per_round": BATCHES, "round": "one epoch", "rounds": ROUNDS, "statistic": "median round",
           "workers": WORKERS,
           "augmentation": "flip", "cpus": os.cpu_count(), "machine": platform.platform(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "sets": {k: f"{v[1]}, depth stored as {v[0]}" if v[1] == "rgbd" else "rgb channels of the pgm set" for k, v in SETS.items()},
           "results": {}, "ratio_to_torch": {}, "cpu_ratio_torch_over": {}}
    for data, m in _measured.items():
        out["results"][data] = {k: {n: (round(x, 1) if not isinstance(x, tuple) else [round(v, 2) for v in x]) for n, x in v.items()}
                                for k, v in m.items()}
        if "torch" not in m:
            continue
        t = m["torch"]
        out["ratio_to_torch"][data] = {k: round(v["images_per_second"] / t["images_per_second"], 2) for k, v in m.items() if k != "torch"}
        out["cpu_ratio_torch_over"][data] = {k: round(t["cpu_us_per_image"] / v["cpu_us_per_image"], 2) for k, v in m.items() if k != "torch"}
        print(f"{data}: " + ", ".join(f"{k} {v['images_per_second']:.0f} img/s" for k, v in m.items()) + " | ratio to torch: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in out["ratio_to_torch"][data].items()) + " | CPU per image, torch / backend: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in out["cpu_ratio_torch_over"][data].items()))
    os.makedirs(RESULTS, exist_ok=True)
    tmp = os.path.join(RESULTS, ".data_backends.json.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, os.path.join(RESULTS, "data_backends.json"))
