"""Per-layer latency lookup table (NetAdapt): measure each layer of a network on the target
device once per configuration, predict a network's latency as the sum, and check the sum
against whole-network measurements.

A layer's key is its full configuration (kind, channels in / hidden / out, kernel, stride,
input size; the LUT itself fixes device, batch, dtype and threads), so equal layers of any
network are measured once. Every layer is timed as the same module the network runs
(ConvBNAct, InvertedResidual, the merge, the head) with fastface.eval.latency.measure, in
eval mode (folded BN), at its input shape. A time is the 10th percentile of the runs (`stat`,
or the median), and with `rounds` > 1 the smallest of several rounds spread in time: on a
shared machine other processes otherwise stretch some layers and not others.

Per-call overhead correction: timing one module call includes a fixed cost (the Python call
and the timer) that a whole-network forward pays once, not once per layer. The LUT times an
nn.Identity call and predicts sum_i (t_i - t_call) + t_call. What remains (the network's own
Python glue, cache effects) is what `check` measures: it compares predictions with measured
whole networks, and when the relative error exceeds the tolerance (10 %) it fits
measured ~= scale * predicted on those networks (`offset_ms` stays for a future fit, now 0);
if the corrected (leave-one-out) error is still over the tolerance the LUT falls back to
measuring whole networks directly, each timed in turn with the first checked network as a
reference and scaled by that ratio, so that load drifting between calls cancels.

On a shared machine the load changes from one second to the next, so a table measured first
and networks measured later can disagree by 20-60 % through load alone. `measure_with_networks`
times the layers and the checking networks round-robin in the same rounds (least disturbed of
each); measured that way on this 2-core CPU box (tiny networks, one thread) the raw sums run
3-12 % above the networks, idle or with both cores busy, and a scale absorbs the bias.
`fastface search lut` and a table built by the NetAdapt driver are checked that way; a table
loaded from a file, and the periodic checks during a search, compare it as it stands.

The number of configurations a search can reach grows with every width choice, so the table
is filled on demand (`measure_missing`, on by default) and by `build_lut` for given networks
(e.g. `sweep_specs`: every width of every layer, the others full — all NetAdapt-v1 candidates).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from fastface.arch import ArchSpec
from fastface.eval.latency import measure
from fastface.models.heads import make_head
from fastface.models.mobilenetv2 import ConcatMerge, ConvBNAct, InvertedResidual, build_model
from fastface.utils import atomic_write_text

LUT_VERSION = 1
# p10: the time the hardware delivers undisturbed; on a shared machine it is far steadier than the
# median (other processes stretch long calls more than short ones, which biases LUT sums).
STATS = ("p10", "median")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _MergeAdd(nn.Module):
    """The add merge as timed: the branch outputs (stacked on channels) summed, then the activation."""

    def __init__(self, branches: int, act: bool):
        super().__init__()
        self.branches, self.act = branches, nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(torch.stack(x.chunk(self.branches, 1)).sum(0))


class _MergeConcat(nn.Module):
    """The concat merge as timed: the branch outputs (stacked on channels) through ConcatMerge."""

    def __init__(self, branches: int, channels: int):
        super().__init__()
        self.merge = ConcatMerge(branches, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(list(x.chunk(self.merge.branches, 1)))


@dataclass(frozen=True)
class LayerEntry:
    """One timed unit of a network: its key, how to build it, its input shape (no batch), how many copies run."""

    key: str
    build: Callable[[], nn.Module] = field(compare=False, repr=False)
    shape: tuple[int, ...]
    copies: int = 1


def layer_entries(spec: ArchSpec) -> list[LayerEntry]:
    """The timed units of a spec's network in order: stems / blocks (per branch copy), merge, last conv, head."""
    infos = spec.layers()
    out: list[LayerEntry] = []
    k = spec.split
    for li in infos:
        if li.index < k:
            cins = list(spec.inputs.values()) if li.kind == "stem" else [li.cin] * len(spec.inputs)
        else:
            cins = [li.cin]
        for cin in sorted(set(cins)):
            n = cins.count(cin)
            if li.kind == "stem":
                key = f"stem:cin={cin},cout={li.cout},k={li.k},s={li.stride},size={li.size_in}"
                out.append(LayerEntry(key, lambda c=cin, li=li: ConvBNAct(c, li.cout, li.k, li.stride),
                                      (cin, li.size_in, li.size_in), n))
            else:
                key = (f"block:cin={li.cin},hid={li.hidden},cout={li.cout},k={li.k},s={li.stride},"
                       f"exp={int(li.expand)},res={int(li.residual)},size={li.size_in}")
                out.append(LayerEntry(key, lambda li=li: InvertedResidual(li), (li.cin, li.size_in, li.size_in), n))
        if k > 0 and li.index == k - 1:
            nb, c, size = len(spec.inputs), li.cout, li.size_out
            if spec.merge == "concat":
                out.append(LayerEntry(f"merge:concat,n={nb},c={c},size={size}", lambda nb=nb, c=c: _MergeConcat(nb, c),
                                      (nb * c, size, size)))
            else:
                act = li.kind == "stem"
                out.append(LayerEntry(f"merge:add,n={nb},c={c},act={int(act)},size={size}",
                                      lambda nb=nb, act=act: _MergeAdd(nb, act), (nb * c, size, size)))
    cf, size = infos[-1].cout, spec.final_size
    if spec.last_channels:
        lc = spec.last_channels
        out.append(LayerEntry(f"last:cin={cf},cout={lc},size={size}", lambda cf=cf, lc=lc: ConvBNAct(cf, lc, 1),
                              (cf, size, size)))
        cf = lc
    h = spec.head
    out.append(LayerEntry(f"head:{h.kind},c={cf},dim={h.dim},size={size}",
                          lambda h=h, cf=cf, size=size: make_head(h, cf, size), (cf, size, size)))
    return out


@dataclass
class LUTCheck:
    """Result of `check`: per-network measured / predicted ms, errors before and after correction."""

    measured_ms: list[float]
    predicted_ms: list[float]  # before any fitted correction
    raw_error: list[float]  # |pred - meas| / meas
    corrected_error: list[float]  # after the fitted correction (leave-one-out with >= 3 networks)
    scale: float
    offset_ms: float
    action: str  # "ok" | "corrected" | "fallback"
    tolerance: float

    @property
    def max_raw_error(self) -> float:
        """Worst relative error of the plain LUT sums."""
        return max(self.raw_error)

    @property
    def max_error(self) -> float:
        """Worst relative error of what the LUT now answers (corrected, or 0 for direct measurement)."""
        if self.action == "ok":
            return self.max_raw_error
        return max(self.corrected_error) if self.action == "corrected" else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for logs and journals."""
        return {k: getattr(self, k) for k in ("measured_ms", "predicted_ms", "raw_error", "corrected_error", "scale",
                                              "offset_ms", "action", "tolerance")}


class LatencyLUT:
    """Per-layer latency table for one device / batch / dtype / thread count; callable as a resource (spec -> ms)."""

    def __init__(self, device: str = "cpu", batch: int = 1, dtype: str = "float32", threads: int | None = None,
                 warmup: int = 5, runs: int = 30, measure_missing: bool = True, stat: str = "p10", rounds: int = 1):
        if dtype not in DTYPES:
            raise ValueError(f"LatencyLUT: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if stat not in STATS:
            raise ValueError(f"LatencyLUT: stat {stat!r} is not one of {', '.join(STATS)}")
        if batch < 1 or runs < 1 or warmup < 0 or rounds < 1:
            raise ValueError(f"LatencyLUT: need batch, runs, rounds >= 1 and warmup >= 0; got {batch}, {runs}, "
                             f"{rounds}, {warmup}")
        self.rounds = rounds
        self.device, self.batch, self.dtype, self.threads = str(device), batch, dtype, threads
        self.warmup, self.runs, self.measure_missing, self.stat = warmup, runs, measure_missing, stat
        self.entries: dict[str, float] = {}
        self.call_overhead_ms: float | None = None
        self.scale, self.offset_ms, self.fallback = 1.0, 0.0, False
        self.direct: dict[str, float] = {}  # spec digest -> measured whole-network ms (fallback)
        # Fallback measurements are taken relative to a reference network (spec JSON, its ms at check time).
        self.reference: tuple[str, float] | None = None
        self.checks: list[dict[str, Any]] = []
        self.meta = {"device": self.device, "machine": platform.machine(), "processor": platform.processor(),
                     "torch": torch.__version__, "threads": threads if threads is not None else torch.get_num_threads()}

    # ---- measuring ----------------------------------------------------------------------------
    def _time(self, module: nn.Module, shape: tuple[int, ...]) -> float:
        module = module.to(device=self.device, dtype=DTYPES[self.dtype]).eval()
        with _threads(self.threads):
            lat = measure(module, shape, self.device, self.batch, warmup=self.warmup, runs=self.runs,
                          dtype=DTYPES[self.dtype])
        return lat.p10_ms if self.stat == "p10" else lat.median_ms

    def _ensure_overhead(self) -> float:
        if self.call_overhead_ms is None:
            self.call_overhead_ms = self._time(nn.Identity(), (1,))
        return self.call_overhead_ms

    def measure_spec(self, spec: ArchSpec) -> int:
        """Time every layer of spec that the table lacks; returns how many were measured.

        With rounds > 1 every layer is timed once per round, the rounds spread over the whole
        network, and the least disturbed (smallest) time is kept.
        """
        self._ensure_overhead()
        todo = {e.key: e for e in layer_entries(spec) if e.key not in self.entries}
        mods = {k: e.build() for k, e in todo.items()}
        times: dict[str, list[float]] = {k: [] for k in todo}
        for _ in range(self.rounds):
            for k, e in todo.items():
                times[k].append(self._time(mods[k], e.shape))
        self.entries.update({k: min(v) for k, v in times.items()})
        return len(todo)

    def missing(self, spec: ArchSpec) -> list[str]:
        """Keys of spec's layers not in the table."""
        return [e.key for e in layer_entries(spec) if e.key not in self.entries]

    # ---- predicting ---------------------------------------------------------------------------
    def predict_raw(self, spec: ArchSpec) -> float:
        """Sum of per-layer times, the per-call overhead counted once (no fitted correction)."""
        gone = self.missing(spec)
        if gone:
            if not self.measure_missing:
                raise KeyError(f"latency LUT has no entry for {gone[0]} (and {len(gone) - 1} more); build it for "
                               f"this network or enable measure_missing")
            self.measure_spec(spec)
        ovh = self._ensure_overhead()
        return sum(e.copies * (self.entries[e.key] - ovh) for e in layer_entries(spec)) + ovh

    def predict(self, spec: ArchSpec) -> float:
        """Predicted latency (ms) of spec: corrected LUT sum."""
        return self.scale * self.predict_raw(spec) + self.offset_ms

    def measure_network(self, spec: ArchSpec) -> float:
        """Whole-network latency (ms) measured directly, under the table's device / batch / dtype / threads."""
        return self.measure_networks([spec])[0]

    def measure_networks(self, specs: Sequence[ArchSpec]) -> list[float]:
        """Whole-network latencies (ms), the rounds taken in turn over all networks so they see the same load."""
        models = [(self._network(s), (s.in_channels, s.input_size, s.input_size)) for s in specs]
        times: list[list[float]] = [[] for _ in models]
        for _ in range(self.rounds):
            for i, (m, shape) in enumerate(models):
                times[i].append(self._time(m, shape))
        return [min(t) for t in times]

    def measure_with_networks(self, specs: Sequence[ArchSpec], rounds: int | None = None) -> list[float]:
        """Time every layer of specs and the whole networks round-robin; returns the networks' ms.

        Each round times every layer configuration of the networks, then every network, so
        layers and networks see the same load; each keeps its smallest time over the rounds
        (default: the table's `rounds`), and a layer already in the table keeps the smaller of
        its old and new times (the least disturbed measurement of the same configuration). On
        a shared machine a burst of load from another process then spoils a number only if it
        hits every round, where timing layers first and networks later let one burst skew
        either side. Use it to build a table together with the networks that check it.
        """
        rounds = rounds if rounds is not None else self.rounds
        if rounds < 1:
            raise ValueError(f"measure_with_networks: rounds must be >= 1, got {rounds}")
        ents: dict[str, LayerEntry] = {}
        for s in specs:
            for e in layer_entries(s):
                ents.setdefault(e.key, e)
        mods = {k: e.build() for k, e in ents.items()}
        nets = [(self._network(s), (s.in_channels, s.input_size, s.input_size)) for s in specs]
        layer_t: dict[str, list[float]] = {k: [] for k in ents}
        net_t: list[list[float]] = [[] for _ in nets]
        overhead: list[float] = []
        for _ in range(rounds):
            overhead.append(self._time(nn.Identity(), (1,)))
            for k, e in ents.items():
                layer_t[k].append(self._time(mods[k], e.shape))
            for i, (m, shape) in enumerate(nets):
                net_t[i].append(self._time(m, shape))
        ovh = min(overhead)
        self.call_overhead_ms = ovh if self.call_overhead_ms is None else min(self.call_overhead_ms, ovh)
        for k, v in layer_t.items():
            self.entries[k] = min(v) if k not in self.entries else min(self.entries[k], min(v))
        return [min(t) for t in net_t]

    def _network(self, spec: ArchSpec) -> nn.Module:
        with torch.device("meta"):
            model = build_model(spec)
        model = model.to_empty(device=self.device)
        _fill_random(model)
        return model

    def __call__(self, spec: ArchSpec) -> float:
        if not self.fallback:
            return self.predict(spec)
        key = hashlib.sha256(spec.to_json().encode()).hexdigest()
        if key not in self.direct:
            self.direct[key] = self._measure_relative(spec)
        return self.direct[key]

    def _measure_relative(self, spec: ArchSpec) -> float:
        """Whole-network ms, timed in turn with the reference network and scaled by its ratio to it.

        On a shared machine the load drifts between calls made minutes apart; timing the reference
        alongside (the same rounds, the same load) and keeping only the ratio cancels that drift.
        """
        if self.reference is None:
            return self.measure_network(spec)
        ref_json, ref_ms = self.reference
        ref_now, t = self.measure_networks([ArchSpec.from_json(ref_json), spec])
        return t / ref_now * ref_ms

    # ---- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready contents."""
        return {"version": LUT_VERSION, "device": self.device, "batch": self.batch, "dtype": self.dtype,
                "threads": self.threads, "warmup": self.warmup, "runs": self.runs, "stat": self.stat,
                "rounds": self.rounds, "meta": self.meta,
                "call_overhead_ms": self.call_overhead_ms, "scale": self.scale, "offset_ms": self.offset_ms,
                "fallback": self.fallback, "entries": self.entries, "direct": self.direct, "checks": self.checks,
                "reference": list(self.reference) if self.reference else None}

    def save(self, path: str) -> None:
        """Write the table as JSON atomically (temp file + rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str, measure_missing: bool = True) -> "LatencyLUT":
        """Read a table written by save."""
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a latency LUT (bad JSON: {e})") from e
        if not isinstance(d, dict) or d.get("version") != LUT_VERSION:
            raise ValueError(f"{path}: not a version-{LUT_VERSION} latency LUT")
        try:
            lut = cls(d["device"], d["batch"], d["dtype"], d["threads"], d["warmup"], d["runs"], measure_missing,
                      d["stat"], d["rounds"])
            lut.meta = d["meta"]
            lut.call_overhead_ms, lut.scale, lut.offset_ms = d["call_overhead_ms"], d["scale"], d["offset_ms"]
            lut.fallback, lut.entries, lut.direct, lut.checks = d["fallback"], d["entries"], d["direct"], d["checks"]
            ref = d.get("reference")  # absent in tables written before it existed
            lut.reference = (ref[0], float(ref[1])) if ref else None
        except KeyError as e:
            raise ValueError(f"{path}: latency LUT lacks field {e.args[0]!r}") from e
        return lut


@torch.no_grad()
def _fill_random(model: nn.Module) -> None:
    # Latency does not depend on the values, but uninitialised memory may hold denormals / NaNs.
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.dtype == torch.long:
            t.zero_()
        elif "running_var" in name:
            t.fill_(1.0)
        else:
            t.normal_(0, 0.1)


def build_lut(specs: Iterable[ArchSpec], lut: LatencyLUT | None = None, **kwargs: Any) -> LatencyLUT:
    """Measure every layer of the given networks (a new LatencyLUT(**kwargs) unless one is given)."""
    lut = lut if lut is not None else LatencyLUT(**kwargs)
    for s in specs:
        lut.measure_spec(s)
    return lut


def sweep_specs(space: Any) -> list[ArchSpec]:
    """The full network and, for every searchable width and each of its values, the network with only it changed.

    `space` is a fastface.models.supernet.WidthSpace; invalid (unsliceable) points are skipped.
    """
    full = space.full()
    out, seen = [space.spec_at(full)], {space.spec_at(full).to_json()}
    for n in space.names:
        for v in space.choices(n):
            w = dict(full, **{n: v})
            if space.problems(w):
                continue
            s = space.spec_at(w)
            if s.to_json() not in seen:
                seen.add(s.to_json())
                out.append(s)
    return out


def _fit(pred: Sequence[float], meas: Sequence[float]) -> tuple[float, float]:
    """The correction meas ~= scale * pred: the median ratio (one disturbed measurement cannot move it).

    A free offset was tried and dropped: over the narrow latency range of related networks it
    is ill-conditioned, and leave-one-out it extrapolated the extreme networks 40 % off.
    """
    return statistics.median(m / p for p, m in zip(pred, meas)), 0.0


def check(lut: LatencyLUT, specs: Sequence[ArchSpec], tolerance: float = 0.10, apply: bool = True,
          measured: Sequence[float] | None = None) -> LUTCheck:
    """Measure whole networks, compare with the LUT's raw sums; correct or fall back above `tolerance`.

    `measured`: the networks' ms measured already (e.g. by `LatencyLUT.measure_with_networks`,
    together with the table's layers); otherwise they are measured now.
    With apply, the LUT is updated: "ok" resets any correction, "corrected" stores the fitted
    scale and offset, "fallback" makes the LUT measure whole networks from now on.
    """
    specs = list(specs)
    if not specs:
        raise ValueError("check: give at least one network to measure")
    if measured is not None and len(measured) != len(specs):
        raise ValueError(f"check: {len(measured)} measured times for {len(specs)} networks")
    pred = [lut.predict_raw(s) for s in specs]
    meas = list(measured) if measured is not None else lut.measure_networks(specs)
    raw = [abs(p - m) / m for p, m in zip(pred, meas)]
    scale, offset = 1.0, 0.0
    corrected = list(raw)
    if max(raw) <= tolerance:
        action = "ok"
    elif len(specs) < 2:
        action = "fallback"  # one network cannot tell a correction from noise
    else:
        scale, offset = _fit(pred, meas)
        if len(specs) >= 3:
            corrected = []
            for i in range(len(specs)):
                a, b = _fit(pred[:i] + pred[i + 1:], meas[:i] + meas[i + 1:])
                corrected.append(abs(a * pred[i] + b - meas[i]) / meas[i])
        else:
            corrected = [abs(scale * p + offset - m) / m for p, m in zip(pred, meas)]
        action = "corrected" if max(corrected) <= tolerance else "fallback"
    result = LUTCheck(meas, pred, raw, corrected, scale, offset, action, tolerance)
    if apply:
        lut.scale, lut.offset_ms = (scale, offset) if action == "corrected" else (1.0, 0.0)
        lut.fallback = action == "fallback"
        lut.reference = (specs[0].to_json(), meas[0]) if lut.fallback else None
        lut.checks.append(result.as_dict())
    return result


__all__ = ["LUTCheck", "LatencyLUT", "LayerEntry", "build_lut", "check", "layer_entries", "sweep_specs"]

