"""Fused ops with several backends (CUDA, Triton, C++ CPU) and a PyTorch reference each."""
from __future__ import annotations

from fastface.ops.bn_act import (
    BNActFunction, BNAddActFunction, bn_act, bn_act_backward, bn_act_backward_reference, bn_act_reference, bn_add_act,
    bn_add_act_backward_reference, bn_add_act_reference,
)
from fastface.ops.conv_bias_act import conv_bias_act, conv_bias_act_reference, pack_conv_weight
from fastface.ops.cpu_cache import (
    CpuCacheInfo, cpu_cache, cpu_cache_info, empty_cpu_cache, set_cpu_cache_enabled, set_cpu_cache_limit,
)
from fastface.ops.dispatch import BACKENDS, BackendUnavailable, FusedOp, forced_backend, use_backend
from fastface.ops.dwconv import dwconv2d, dwconv2d_reference
from fastface.ops.dwconv_bn_act import (
    DwConvBNActFunction, dwconv_bn_act, dwconv_bn_act_backward, dwconv_bn_act_backward_reference,
    dwconv_bn_act_reference,
)
from fastface.ops.ir_block import MemoFusedOp, ir_block, ir_block_reference, pack_ir_weights
from fastface.ops.sched import SchedParams, sched_step, sched_step_reference
from fastface.ops.stems_bn_add_act import (
    StemsBNAddActFunction, stems_bn_add_act, stems_bn_add_act_backward_reference, stems_bn_add_act_reference,
)

__all__ = [
    "BACKENDS", "BackendUnavailable", "FusedOp", "MemoFusedOp", "forced_backend", "use_backend",
    "BNActFunction", "bn_act", "bn_act_backward", "bn_act_backward_reference", "bn_act_reference",
    "BNAddActFunction", "bn_add_act", "bn_add_act_backward_reference", "bn_add_act_reference",
    "conv_bias_act", "conv_bias_act_reference", "pack_conv_weight",
    "CpuCacheInfo", "cpu_cache", "cpu_cache_info", "empty_cpu_cache", "set_cpu_cache_enabled", "set_cpu_cache_limit",
    "dwconv2d", "dwconv2d_reference",
    "DwConvBNActFunction", "dwconv_bn_act", "dwconv_bn_act_backward", "dwconv_bn_act_backward_reference",
    "dwconv_bn_act_reference",
    "ir_block", "ir_block_reference", "pack_ir_weights",
    "SchedParams", "sched_step", "sched_step_reference",
    "StemsBNAddActFunction", "stems_bn_add_act", "stems_bn_add_act_backward_reference", "stems_bn_add_act_reference",
]
