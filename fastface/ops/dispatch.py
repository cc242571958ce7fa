"""Backend selection for fused ops: CUDA -> Triton -> C++ CPU -> reference.

Each backend of an op declares what it supports through a function returning the reasons
it cannot run a call (empty: it can). `FASTFACE_BACKEND=reference|cpp|triton|cuda` (or the
`use_backend` context manager) forces one; a forced backend that cannot run raises an error
listing every backend and why not. An op with no implementation of the forced backend at all
keeps its automatic choice, so that a whole model runs with, say, its CUDA kernels forced
(conv_bias_act has no CUDA kernel: cuDNN's convs are the GPU path).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

BACKENDS = ("cuda", "triton", "cpp", "reference")
_forced: list[str] = []


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this call (the message lists each backend and why not)."""


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force `name` for ops called inside the block (None: automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    _forced.append(name or "")
    try:
        yield
    finally:
        _forced.pop()


def forced_backend() -> str | None:
    """The backend forced by use_backend or FASTFACE_BACKEND, else None."""
    if _forced and _forced[-1]:
        return _forced[-1]
    env = os.environ.get("FASTFACE_BACKEND", "").strip().lower()
    if env and env not in BACKENDS:
        raise ValueError(f"FASTFACE_BACKEND={env!r} is not one of {BACKENDS}")
    return env or None


def triton_reasons(*tensors: torch.Tensor) -> list[str]:
    """Why Triton cannot run on these tensors (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    from fastface.kernels import triton_available

    ok, why = triton_available()
    if not ok:
        return [why]
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    reasons = []
    for t in tensors:
        if t.is_cuda:
            continue
        if not (interp and t.device.type == "cpu"):
            reasons.append(f"tensor on {t.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)")
            break
        if t.dtype not in (torch.float32, torch.float16):
            reasons.append(f"{t.dtype} under the Triton interpreter (float32/float16 only)")
            break
    return reasons


@dataclass
class FusedOp:
    """One op with several backends; call it like the function it stands for."""

    name: str
    impls: dict[str, tuple[Callable[..., Any], Callable[..., list[str]]]] = field(default_factory=dict)

    def register(self, backend: str, supports: Callable[..., list[str]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: add `fn` as `backend`; `supports(*args)` returns reasons it cannot run."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.impls[backend] = (fn, supports)
            return fn

        return deco

    def reasons(self, *args: Any, **kwargs: Any) -> dict[str, list[str]]:
        """For each backend, why it cannot run this call (an empty list: it can)."""
        out = {}
        for b in BACKENDS:
            if b not in self.impls:
                out[b] = [f"{self.name} has no {b} implementation"]
            else:
                out[b] = list(self.impls[b][1](*args, **kwargs))
        return out

    def select(self, *args: Any, **kwargs: Any) -> str:
        """The backend that would run this call."""
        forced = forced_backend()
        if forced is not None and forced in self.impls:
            if not self.impls[forced][1](*args, **kwargs):
                return forced
            lines = "\n".join(f"  {b}: {'; '.join(r) or 'ok'}" for b, r in self.reasons(*args, **kwargs).items())
            raise BackendUnavailable(f"{self.name}: forced backend {forced!r} cannot run this call:\n{lines}")
        for b in BACKENDS:
            if b in self.impls and not self.impls[b][1](*args, **kwargs):
                return b
        lines = "\n".join(f"  {b}: {'; '.join(r)}" for b, r in self.reasons(*args, **kwargs).items())
        raise BackendUnavailable(f"{self.name}: no backend can run this call:\n{lines}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.impls[self.select(*args, **kwargs)][0](*args, **kwargs)
