"""Architecture search: the replicate / split search and NetAdaptV2 (CBC super-network, MCD, SCD),
the latency lookup table, the resumable journal and the driver that trains candidates with
fastface's Trainer (`fastface search replicate-split|netadapt|lut|report`)."""
from __future__ import annotations

from fastface.models.supernet import (
    Supernet, WidthError, WidthSpace, load_subnet, recalibrate, slice_model, slice_subnet, train_supernet,
)
from fastface.search.journal import Journal, JournalError
from fastface.search.lut import LatencyLUT, LUTCheck, build_lut, check, layer_entries, sweep_specs
from fastface.search.netadapt import (
    Finetuner, NetAdaptConfig, NetAdaptResult, macs, mcd, params, pareto_front, record_model, scd,
    verification_score,
)
from fastface.search.replicate_split import Candidate, Outcome, ReplicateSplitConfig, Result, search, transfer

__all__ = [
    "Candidate", "Finetuner", "Journal", "JournalError", "LUTCheck", "LatencyLUT", "NetAdaptConfig", "NetAdaptResult",
    "Outcome", "ReplicateSplitConfig", "Result", "Supernet", "WidthError", "WidthSpace", "build_lut", "check",
    "layer_entries", "load_subnet", "macs", "mcd", "params", "pareto_front", "recalibrate", "record_model", "scd",
    "search", "slice_model", "slice_subnet", "sweep_specs", "train_supernet", "transfer", "verification_score",
]
