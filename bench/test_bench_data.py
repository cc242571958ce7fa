"""Loader throughput: images/s of each backend on the same RecordIO set, 2 workers each.

Backends: ``torch`` (DataLoader, 2 worker processes, OpenCV decode), ``dali`` (our sampler +
DALI CPU pipeline, 2 threads: fastface's default where DALI is installed), ``dali-mxnet``
(DALI's own fn.readers.mxnet, 2 threads; no exact resume). Same set, batch 128, flip on,
everything else off. The ratio to the torch DataLoader measured in the same run is printed
and saved to bench/results/data_backends.json. Target: dali >= 1.5x torch.

``pytest bench/test_bench_data.py --benchmark-only -s``. The machine is shared: the load
average before and after is saved with the numbers.
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
BATCH, BATCHES, WORKERS, ROUNDS = 128, 20, 2, 3
_measured: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def bench_rec() -> str:
    """A 4,000-image RGB-D set (demo generator, 100 identities), made once and reused."""
    out = os.path.join(ROOT, "data", "synth-bench")
    generate(preset("demo", n_ids=100, samples_per_id=40, val_ids=4, val_pairs=4, test_ids=4, test_pairs=4), out, progress=False)
    return os.path.join(out, "train.rec")


def _loader(backend: str, rec: str, channels: str):
    cfg = DataConfig(path=rec, batch_size=BATCH, backend=backend, num_workers=WORKERS, channels=channels, flip=True,
                     drop_last=True, device="cpu", seed=0)
    if backend == "torch":
        return TorchLoader(cfg)
    from fastface.data.dali import DaliLoader

    return DaliLoader(cfg)


def _mxnet_iter(rec: str, channels: str):
    import numpy as np
    import torch

    from fastface.data.dali import mxnet_reader_pipeline

    pipe = mxnet_reader_pipeline(rec, batch_size=BATCH, num_threads=WORKERS, channels=channels, random_shuffle=True, flip=True)

    def batches():
        while True:
            images, labels = pipe.run()
            yield torch.from_numpy(np.array(images.as_tensor())), torch.from_numpy(np.array(labels.as_tensor())[:, 0].astype("int64"))

    return batches()


@pytest.mark.parametrize("channels", ["rgbd", "rgb"])
@pytest.mark.parametrize("backend", ["torch", "dali", "dali-mxnet"])
def test_loader_throughput(benchmark, bench_rec, backend, channels):
    if backend != "torch" and not dali_status()[0]:
        pytest.skip(dali_status()[1])
    epoch = [0]
    if backend == "dali-mxnet":
        it = _mxnet_iter(bench_rec, channels)
        next(it)  # builds and warms the pipeline

        def run():
            for _ in range(BATCHES):
                x, y = next(it)
            return x
    else:
        ld = _loader(backend, bench_rec, channels)
        assert len(ld) >= BATCHES + 2
        warm = iter(ld)
        next(warm)  # starts workers / builds the pipeline
        del warm

        def run():
            epoch[0] += 1
            ld.set_epoch(epoch[0])
            it = iter(ld)
            for _ in range(BATCHES):
                x, y = next(it)
            del it
            return x

    load0 = os.getloadavg()[0]
    x = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert x.shape == (BATCH, 4 if channels == "rgbd" else 3, 112, 112)
    ips = BATCH * BATCHES / benchmark.stats.stats.mean
    benchmark.extra_info["images_per_second"] = ips
    _measured.setdefault(channels, {})[backend] = ips
    _measured.setdefault("_load", {})[f"{backend}/{channels}"] = (load0, os.getloadavg()[0])
    print(f"\n{backend:10s} {channels:5s} {ips:8.0f} img/s")
    if backend != "dali-mxnet":
        ld.close()


def test_ratio_report():
    """Print and save the ratios to the torch DataLoader measured above."""
    if not any(k in _measured for k in ("rgbd", "rgb")):
        pytest.skip("run together with test_loader_throughput")
    out = {"batch": BATCH, "batches_per_round": BATCHES, "rounds": ROUNDS, "workers": WORKERS, "augmentation": "flip",
           "cpus": os.cpu_count(), "machine": platform.platform(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "load_average_before_after": _measured.get("_load", {}), "images_per_second": {}, "ratio_to_torch": {}}
    for ch in ("rgbd", "rgb"):
        m = _measured.get(ch, {})
        if "torch" not in m:
            continue
        out["images_per_second"][ch] = {k: round(v, 1) for k, v in m.items()}
        out["ratio_to_torch"][ch] = {k: round(v / m["torch"], 2) for k, v in m.items() if k != "torch"}
        print(f"{ch}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in m.items()) + " | ratio to torch: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in out["ratio_to_torch"][ch].items()))
    os.makedirs(RESULTS, exist_ok=True)
    tmp = os.path.join(RESULTS, ".data_backends.json.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, os.path.join(RESULTS, "data_backends.json"))
