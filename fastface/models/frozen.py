"""`freeze(model)`: an inference-only snapshot of a MobileNetV2 with every layer folded and packed.

A MobileNetV2 in eval mode already runs folded (one `ir_block` per block, one
`conv_bias_act` per dense conv), but on every call each layer re-checks that its cached
folded weights are still current (parameter versions, BN modes, hooks) and each op picks
its backend: about 0.6 ms of Python per batch-1 forward, a quarter of its time on a CPU.
A frozen network folds once, as `torch.jit.freeze` or an ONNX export does, and its forward
is only the op calls (backends resolved once per input signature). It computes the eval
function of the model at the moment of freezing; later changes to the model do not reach
it: freeze again after training.

    net = fastface.models.freeze(model)   # model: MobileNetV2, any mode (BN running statistics are used)
    emb = net(x)
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastface.models.heads import GDCHead, PoolHead
from fastface.models.mobilenetv2 import (
    ConcatMerge, ConvBNAct, InvertedResidual, MobileNetV2, _fold_head, _ir_weights, _packed, _plain_geometry,
    gpu_kernels_pay,
)
from fastface.ops import conv_bias_act, ir_block, ir_block_reference, pack_conv_weight
from fastface.ops.dispatch import FusedOp, forced_backend

Step = tuple[Any, tuple]  # (a FusedOp, or a plain function of the activation; the arguments after it)


def _conv_step(m: ConvBNAct, what: str) -> Step:
    if not isinstance(m.act, (nn.ReLU6, nn.Identity)):
        raise ValueError(f"freeze: {what} has activation {type(m.act).__name__} (ReLU6 or none only)")
    _check_bn(m.bn, what)
    c, relu6 = m.conv, isinstance(m.act, nn.ReLU6)
    if c.groups == 1 and _plain_geometry(c):
        w, b = _packed(m.folded())
        return conv_bias_act, (w, b, c.stride[0], c.padding[0], 1, relu6)
    w, b = m.folded()

    def conv(h, w, b, stride, padding, dilation, groups, relu6):
        y = F.conv2d(h, w, b, stride, padding, dilation, groups)
        return F.relu6(y) if relu6 else y

    return conv, (w, b, c.stride, c.padding, c.dilation, c.groups, relu6)


def _check_bn(bn: nn.Module, what: str) -> None:
    if not bn.affine or bn.running_mean is None:
        raise ValueError(f"freeze: {what} has a BatchNorm without running statistics or affine parameters: "
                         "nothing to fold")


def _block_steps(blocks: list[InvertedResidual], what: str) -> Step:
    for b in blocks:
        for name in ("expand", "dw", "project"):
            m = getattr(b, name)
            if m is not None:
                _check_bn(m.bn, f"{what} ({name})")
    return ir_block, (*_ir_weights(blocks, blocks[0].dw.conv.weight.device), blocks[0].stride, blocks[0].use_res,
                      len(blocks))


def _add_merge(h: torch.Tensor, groups: int, relu6: bool) -> torch.Tensor:
    y = torch.stack(h.chunk(groups, 1)).sum(0)
    return F.relu6(y) if relu6 else y


def _gdc(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (h * w).sum((2, 3))[:, :, None, None]


def _pool(h: torch.Tensor) -> torch.Tensor:
    return h.mean((2, 3), keepdim=True)


def _flatten(h: torch.Tensor) -> torch.Tensor:
    return h.flatten(1)


class FrozenMobileNetV2(nn.Module):
    """The eval function of a MobileNetV2 as a fixed list of folded op calls (see the module docstring)."""

    def __init__(self, model: MobileNetV2):
        super().__init__()
        if not isinstance(model, MobileNetV2):
            raise TypeError(f"freeze takes a fastface MobileNetV2, got {type(model).__name__}")
        self.spec = model.spec
        self.in_channels = model.spec.in_channels
        with torch.no_grad():
            # Own copies (packed strides kept): some folded weights are views of the model's parameters.
            self.steps = [(op, tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args))
                          for op, args in self._build(model)]
        self._resolved: dict[tuple, list[tuple[Callable, tuple]]] = {}

    def _build(self, model: MobileNetV2) -> list[Step]:
        spec, steps = model.spec, []
        if model.branches is not None:
            mods = model.modalities
            stems = [model.branches[m][0] for m in mods]
            for s in stems:
                _check_bn(s.bn, "a branch stem")
            if len({type(s.act) for s in stems}) != 1 or not isinstance(stems[0].act, (nn.ReLU6, nn.Identity)):
                raise ValueError("freeze: the branch stems must share a ReLU6 or no activation")
            if not all(_plain_geometry(s.conv) and s.conv.groups == 1 for s in stems):
                raise ValueError("freeze: branch stems must be dense convs with square kernels and strides")
            wb, bb, ws, bs = model._stems_folded(packed=True)
            c, relu6 = stems[0].conv, isinstance(stems[0].act, nn.ReLU6)
            if spec.split == 1 and model.merge is None:
                steps.append((conv_bias_act, (ws, bs, c.stride[0], c.padding[0], 1, relu6)))
            else:
                steps.append((conv_bias_act, (wb, bb, c.stride[0], c.padding[0], 1, relu6)))
                for j in range(1, spec.split):
                    steps.append(_block_steps(model._branch_blocks(j), f"branch layer {j}"))
                if isinstance(model.merge, ConcatMerge):
                    mc = ConvBNAct(1, 1)  # a ConvBNAct view of the merge's conv + BN, to fold them alike
                    mc.conv, mc.bn, mc.act = model.merge.conv, model.merge.bn, nn.Identity()
                    steps.append(_conv_step(mc, "the concat merge"))
                else:
                    steps.append((_add_merge, (len(mods), False)))  # blocks end linear
        for i, layer in enumerate(model.trunk):
            what = f"trunk layer {i}"
            if isinstance(layer, InvertedResidual):
                steps.append(_block_steps([layer], what))
            elif isinstance(layer, ConvBNAct):
                steps.append(_conv_step(layer, what))
            else:
                raise ValueError(f"freeze: {what} is a {type(layer).__name__}")
        if isinstance(model.last, ConvBNAct):
            steps.append(_conv_step(model.last, "the last conv"))
        head = model.head
        if not isinstance(head, (GDCHead, PoolHead)):
            raise ValueError(f"freeze: head {type(head).__name__} is not foldable (GDC or pool heads only)")
        for bn in [head.bn] + ([head.gdc_bn] if isinstance(head, GDCHead) else []):
            _check_bn(bn, "the head")
        (gdc, w), b = _fold_head(head)
        steps.append((_gdc, (gdc,)) if gdc is not None else (_pool, ()))
        steps += [(conv_bias_act, (w, b, 1, 0, 1, False)), (_flatten, ())]
        return steps

    @property
    def device(self) -> torch.device:
        """Where the folded weights live (a frozen net has no parameters to ask)."""
        for _, args in self.steps:
            for a in args:
                if isinstance(a, torch.Tensor):
                    return a.device
        return torch.device("cpu")

    def _run(self, x: torch.Tensor, key: tuple | None) -> torch.Tensor:
        """A forward that picks each op's backend; remembered under `key` (None: not remembered)."""
        fns, h = [], x
        for op, args in self.steps:
            if op is ir_block and not gpu_kernels_pay(h):
                fn = ir_block_reference  # cuDNN's convs with the folded weights: faster on CUDA (gpu_kernels_pay)
            else:
                fn = op.impls[op.select(h, *args)][0] if isinstance(op, FusedOp) else op
            fns.append((fn, args))
            h = fn(h, *args)
        if key is not None:
            if len(self._resolved) > 64:
                self._resolved.clear()
            self._resolved[key] = fns
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.spec.name} (frozen): expected input N x {self.in_channels} x H x W, got {tuple(x.shape)}")
        if torch.compiler.is_compiling():
            return self._run(x, None)
        key = (x.shape, x.stride(), x.dtype, x.device, forced_backend(), os.environ.get("TRITON_INTERPRET"))
        fns = self._resolved.get(key)
        if fns is None:
            return self._run(x, key)
        h = x
        for fn, args in fns:
            h = fn(h, *args)
        return h

    def _apply(self, fn, *args, **kwargs):
        # The folded tensors live in self.steps, not in parameters or buffers: move them too.
        self.steps = [(op, tuple(fn(a) if isinstance(a, torch.Tensor) else a for a in args)) for op, args in self.steps]
        self._resolved = {}
        return super()._apply(fn, *args, **kwargs)


def freeze(model: MobileNetV2) -> FrozenMobileNetV2:
    """An inference-only snapshot of `model`'s eval function, folded and packed once (see the module docstring)."""
    return FrozenMobileNetV2(model)
