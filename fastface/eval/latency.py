"""Latency: median wall time of a forward pass (PyTorch, or onnxruntime on the CPU)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Latency:
    """Median and spread of per-call times, in milliseconds, for one batch size."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    batch: int
    runs: int

    @property
    def images_per_s(self) -> float:
        """Throughput implied by the median."""
        return self.batch * 1000.0 / self.median_ms


def _summarise(times: list[float], batch: int) -> Latency:
    times = sorted(t * 1000 for t in times)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Latency(statistics.median(times), q[0], q[-1], batch, len(times))


@torch.no_grad()
def measure(model: torch.nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu", batch: int = 1,
            warmup: int = 5, runs: int = 30, channels_last: bool = False, dtype: torch.dtype = torch.float32,
            min_time_s: float = 0.0) -> Latency:
    """Median latency of model(x) for x of shape (batch, *input_shape) after warm-up."""
    device = torch.device(device)
    was = model.training
    model.eval()
    x = torch.randn(batch, *input_shape, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        for _ in range(warmup):
            model(x)
        sync()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < runs or time.perf_counter() - start < min_time_s:
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was)
    return _summarise(times, batch)


def measure_onnx(path: str, input_shape: tuple[int, ...], batch: int = 1, warmup: int = 5, runs: int = 30,
                 threads: int | None = None) -> Latency:
    """Median latency of an ONNX model under onnxruntime's CPU provider."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return _summarise(times, batch)
