"""Architecture search: NetAdaptV2 (CBC super-network, MCD, SCD) and the latency lookup table."""
from __future__ import annotations

from fastface.models.supernet import (
    Supernet, WidthError, WidthSpace, load_subnet, recalibrate, slice_model, slice_subnet, train_supernet,
)
from fastface.search.lut import LatencyLUT, LUTCheck, build_lut, check, layer_entries, sweep_specs
from fastface.search.netadapt import (
    Finetuner, NetAdaptConfig, NetAdaptResult, macs, mcd, params, pareto_front, record_model, scd,
    verification_score,
)

__all__ = [
    "Finetuner", "LUTCheck", "LatencyLUT", "NetAdaptConfig", "NetAdaptResult", "Supernet", "WidthError", "WidthSpace",
    "build_lut", "check", "layer_entries", "load_subnet", "macs", "mcd", "params", "pareto_front", "recalibrate",
    "record_model", "scd", "slice_model", "slice_subnet", "sweep_specs", "train_supernet", "verification_score",
]
