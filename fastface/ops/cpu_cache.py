"""A caching CPU allocator for training steps (csrc/cpu/cpu_cache.cpp): large blocks are kept when freed.

PyTorch has no CPU caching allocator: glibc returns every large block to the kernel on free, so
each training step page-faults its activations and gradients in again. Inside ``cpu_cache()``
blocks of 64 KiB or more are kept when freed and reused for the same size, the way CUDA's caching
allocator works; smaller ones, and everything outside the scope, use PyTorch's allocator
unchanged. The idle blocks stay with the process until ``empty_cpu_cache()`` (at most
``FASTFACE_CPU_CACHE_MB`` MiB, default a quarter of physical memory; ``set_cpu_cache_limit``).

    with fastface.ops.cpu_cache():
        loss = step(batch)
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fastface._ext import EXT_ERROR, has_op


@dataclass(frozen=True)
class CpuCacheInfo:
    """The cache's state: idle and live bytes through it, reuse counts, limit."""

    available: bool
    reason: str  # why it is unavailable ("" when available)
    enabled: bool = False
    installed: bool = False
    cached_bytes: int = 0  # idle blocks kept for reuse
    cached_blocks: int = 0
    live_bytes: int = 0  # blocks handed out through the cache and not yet freed
    peak_cached_bytes: int = 0
    hits: int = 0  # allocations served from an idle block
    misses: int = 0  # allocations that took fresh memory
    limit_bytes: int = 0
    min_bytes: int = 0  # smaller allocations are never cached


def available() -> bool:
    """True when the extension (and so the cache) is built."""
    return has_op("cpu_cache_enable")


def _unavailable_reason() -> str:
    return f"the fastface C++ extension is not loaded ({EXT_ERROR})" if EXT_ERROR else "the extension lacks cpu_cache"


def enabled() -> bool:
    """Whether caching is on now."""
    return available() and bool(torch.ops.fastface.cpu_cache_stats()[0])


def cpu_cache_info() -> CpuCacheInfo:
    """The cache's counters (all zero before it is first enabled)."""
    if not available():
        return CpuCacheInfo(available=False, reason=_unavailable_reason())
    s = torch.ops.fastface.cpu_cache_stats()
    return CpuCacheInfo(True, "", bool(s[0]), bool(s[1]), *s[2:])


def set_cpu_cache_enabled(on: bool) -> bool:
    """Turns caching on or off process-wide; returns the previous state (False without the extension)."""
    if not available():
        if on:
            raise RuntimeError(f"fastface CPU cache unavailable: {_unavailable_reason()}")
        return False
    return bool(torch.ops.fastface.cpu_cache_enable(bool(on)))


@contextlib.contextmanager
def cpu_cache(enabled: bool = True) -> Iterator[None]:
    """Caches large CPU blocks inside the scope (a no-op without the extension); restores the previous state after."""
    if not available():
        yield
        return
    prev = set_cpu_cache_enabled(enabled)
    try:
        yield
    finally:
        set_cpu_cache_enabled(prev)


def empty_cpu_cache() -> int:
    """Releases every idle block to the system; returns the bytes released."""
    return int(torch.ops.fastface.cpu_cache_empty()) if available() else 0


def set_cpu_cache_limit(nbytes: int) -> int:
    """Keeps at most nbytes of idle blocks (evicting now); returns the previous limit."""
    if not available():
        raise RuntimeError(f"fastface CPU cache unavailable: {_unavailable_reason()}")
    return int(torch.ops.fastface.cpu_cache_set_limit(int(nbytes)))
