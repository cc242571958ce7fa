"""MobileNetV2 built from an ArchSpec, with split input branches and function-preserving
replicate / re-split operators (weight transfer from a trained parent).

Exactness of the operators (eval mode, BN running statistics):
- `replicate(model, i)`: exact at any position and split. The copy is a stride-1 residual
  block (c -> c); its weights come from block i when shapes agree, else from the nearest
  block of the same shape, else a fresh init; its project BN has gamma = beta = 0, so the
  copy adds exactly zero to its residual input at first.
- `resplit(model, 1)` from a fused model (split 0) with merge "add": exact. The stem conv is
  split by input channel; the first modality keeps the BN shift, the others get mean = beta = 0,
  so the branch stems' BN outputs sum to the fused stem's (BN in eval is affine).
- `resplit(model, 0)` from split 1 with merge "add": exact (the inverse: each branch's BN
  scale is folded into its conv slice, the shifts are summed).
- Any other move of the split position is a warm start, not exact: a layer that mixed all
  modalities in the parent cannot be rewritten as per-modality branches. Branch layers are
  copied from the parent's layer at the same depth (the same modality's branch where the
  parent has one, else its shared layer); shared layers copied from a parent branch take
  the first modality's; a new concat merge starts as the branch average.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastface.arch import ArchSpec, LayerInfo
from fastface.models.heads import make_head
from fastface.ops import dwconv2d


_FOLDED_EVAL = [True]


@contextlib.contextmanager
def folded_eval(enabled: bool) -> Iterator[None]:
    """Turn the folded-BN fast path of blocks in eval mode on or off inside the block."""
    _FOLDED_EVAL.append(enabled)
    try:
        yield
    finally:
        _FOLDED_EVAL.pop()


class ConvBNAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU6 (or no activation)."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6() if act else nn.Identity()

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        """Output before the activation."""
        return self.bn(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the conv with the BN (running statistics) folded in."""
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        w = self.conv.weight * scale.reshape(-1, 1, 1, 1)
        return w, bn.bias - bn.running_mean * scale


class InvertedResidual(nn.Module):
    """1x1 expand (if t != 1) -> k x k depthwise -> 1x1 linear project, + input when shapes match.

    In eval mode the BN layers are folded and the depthwise stage runs through
    fastface.ops.dwconv2d (C++/CUDA kernels where available).
    """

    def __init__(self, info: LayerInfo):
        super().__init__()
        self.cin, self.cout, self.stride, self.k = info.cin, info.cout, info.stride, info.k
        self.hidden = info.hidden
        self.use_res = info.residual
        self.expand = ConvBNAct(info.cin, info.hidden, 1) if info.expand else None
        self.dw = ConvBNAct(info.hidden, info.hidden, info.k, info.stride, groups=info.hidden)
        self.project = ConvBNAct(info.hidden, info.cout, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and _FOLDED_EVAL[-1]:
            return self.forward_folded(x)
        h = self.expand(x) if self.expand is not None else x
        y = self.project(self.dw(h))
        return x + y if self.use_res else y

    def forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """Inference with BN folded into the convs (the same function as forward in eval mode)."""
        h = x
        if self.expand is not None:
            w, b = self.expand.folded()
            h = F.relu6(F.conv2d(h, w, b))
        w, b = self.dw.folded()
        h = dwconv2d(h, w, b, self.stride, self.k // 2, True)
        w, b = self.project.folded()
        y = F.conv2d(h, w, b)
        return x + y if self.use_res else y

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks end linear: the pre-activation output is the output."""
        return self.forward(x)

    @property
    def act(self) -> nn.Module:
        """No activation after a block (linear bottleneck)."""
        return nn.Identity()


class ConcatMerge(nn.Module):
    """Concatenate branch outputs, then a 1x1 conv + BN back to `channels`."""

    def __init__(self, branches: int, channels: int):
        super().__init__()
        self.branches = branches
        self.conv = nn.Conv2d(branches * channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.bn(self.conv(torch.cat(xs, 1)))

    @torch.no_grad()
    def init_average(self) -> None:
        """Start as the mean of the branches (a neutral warm start for weight transfer)."""
        c = self.bn.num_features
        eye = torch.eye(c, dtype=self.conv.weight.dtype, device=self.conv.weight.device) / self.branches
        self.conv.weight.copy_(eye.repeat(1, self.branches).reshape(c, self.branches * c, 1, 1))
        _bn_identity(self.bn)


def _make_layer(info: LayerInfo, cin: int | None = None) -> nn.Module:
    if info.kind == "stem":
        return ConvBNAct(cin if cin is not None else info.cin, info.cout, info.k, info.stride)
    return InvertedResidual(info)


class MobileNetV2(nn.Module):
    """The network an ArchSpec describes; forward(x: N x C x H x W) -> embeddings (or logits)."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        layers = spec.layers()
        k = spec.split
        self.modalities = list(spec.inputs)
        self.in_splits = list(spec.inputs.values())
        if k > 0:
            self.branches = nn.ModuleDict({
                m: nn.Sequential(*[_make_layer(info, c if info.index == 0 else None) for info in layers[:k]])
                for m, c in spec.inputs.items()})
            self.merge = ConcatMerge(len(spec.inputs), layers[k - 1].cout) if spec.merge == "concat" else None
        else:
            self.branches = None
            self.merge = None
        self.trunk = nn.Sequential(*[_make_layer(info) for info in layers[k:]])
        cfeat = layers[-1].cout
        self.last = ConvBNAct(cfeat, spec.last_channels, 1) if spec.last_channels else nn.Identity()
        self.head = make_head(spec.head, spec.feature_channels, spec.final_size)
        _init_weights(self)

    def layer(self, index: int, modality: str | None = None) -> nn.Module:
        """Layer `index` (0 = stem); inside the split, the copy of `modality`."""
        k = self.spec.split
        if index < k:
            if modality is None:
                raise ValueError(f"layer {index} is split (split={k}): name a modality of {self.modalities}")
            return self.branches[modality][index]
        return self.trunk[index - k]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map after the last 1x1 conv (before the head)."""
        if x.dim() != 4 or x.shape[1] != self.spec.in_channels:
            raise ValueError(f"{self.spec.name}: expected input N x {self.spec.in_channels} x H x W "
                             f"({'+'.join(f'{m}:{c}' for m, c in self.spec.inputs.items())}), got {tuple(x.shape)}")
        if self.branches is not None:
            outs = []
            for m, xm in zip(self.modalities, torch.split(x, self.in_splits, dim=1)):
                branch = self.branches[m]
                for layer in branch[:-1]:
                    xm = layer(xm)
                outs.append(branch[-1](xm) if self.merge is not None else branch[-1].preact(xm))
            if self.merge is not None:
                x = self.merge(outs)
            else:
                # Summed before the last branch layer's activation: see fastface.arch.
                x = self.branches[self.modalities[0]][-1].act(torch.stack(outs).sum(0))
        x = self.trunk(x)
        return self.last(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(spec: ArchSpec) -> MobileNetV2:
    """The nn.Module for an ArchSpec (embedding model, or classifier for head kind "classifier")."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"build_model takes an ArchSpec, got {type(spec).__name__}")
    return MobileNetV2(spec)


def _init_weights(model: nn.Module) -> None:
    # torchvision's MobileNetV2 initialisation.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _bn_identity(bn: nn.BatchNorm2d) -> None:
    # running_var = 1 - eps makes the eval-mode BN exactly the identity.
    with torch.no_grad():
        bn.weight.fill_(1)
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1 - bn.eps)


# ---- weight transfer ---------------------------------------------------------------------


def _copy_module(dst: nn.Module, src: nn.Module) -> bool:
    """Copy src's parameters and buffers into dst if all shapes agree; report whether it did."""
    ds, ss = dst.state_dict(), src.state_dict()
    if ds.keys() != ss.keys() or any(ds[k].shape != ss[k].shape for k in ds):
        return False
    dst.load_state_dict(ss)
    return True


@torch.no_grad()
def _split_stem(dst: ConvBNAct, src: ConvBNAct, channels: slice, first: bool) -> None:
    """A branch stem from a fused stem: its input-channel slice; only the first branch keeps the BN shift."""
    dst.conv.weight.copy_(src.conv.weight[:, channels])
    dst.bn.load_state_dict(src.bn.state_dict())
    if not first:
        dst.bn.running_mean.zero_()
        dst.bn.bias.zero_()


@torch.no_grad()
def _merge_stems(dst: ConvBNAct, srcs: list[ConvBNAct]) -> None:
    """A fused stem from branch stems: fold each branch's BN scale into its slice, sum the shifts."""
    ws, shift = [], 0
    for s in srcs:
        scale = s.bn.weight * torch.rsqrt(s.bn.running_var + s.bn.eps)
        ws.append(s.conv.weight * scale.reshape(-1, 1, 1, 1))
        shift = shift + s.bn.bias - s.bn.running_mean * scale
    dst.conv.weight.copy_(torch.cat(ws, 1))
    _bn_identity(dst.bn)
    dst.bn.bias.copy_(shift)


@torch.no_grad()
def transfer_weights(parent: MobileNetV2, child: MobileNetV2, layer_map: dict[int, int | None] | None = None) -> list[str]:
    """Move a trained parent's weights into child; returns the child layers left at fresh init.

    layer_map: child layer index -> parent layer index (None: no source); identity by default.
    See the module docstring for which moves are exact.
    """
    ps, cs = parent.spec, child.spec
    if ps.inputs != cs.inputs:
        raise ValueError(f"weight transfer needs the same inputs, got {ps.inputs} and {cs.inputs}")
    mods = list(cs.inputs)
    offsets, o = {}, 0
    for m, c in cs.inputs.items():
        offsets[m] = slice(o, o + c)
        o += c
    fresh = []
    for j in range(cs.num_layers):
        src = layer_map.get(j, j) if layer_map is not None else j
        if src is None or src >= ps.num_layers:
            fresh.append(f"layer {j}")
            continue
        child_in_branch, parent_in_branch = j < cs.split, src < ps.split
        if child_in_branch:
            for i, m in enumerate(mods):
                dst = child.layer(j, m)
                if parent_in_branch:
                    ok = _copy_module(dst, parent.layer(src, m))
                elif j == 0:
                    _split_stem(dst, parent.layer(0), offsets[m], first=i == 0)
                    ok = True
                else:
                    ok = _copy_module(dst, parent.layer(src))
                if not ok:
                    fresh.append(f"layer {j} ({m})")
        else:
            dst = child.layer(j)
            if parent_in_branch:
                if j == 0:
                    _merge_stems(dst, [parent.layer(0, m) for m in mods])
                    ok = True
                else:
                    ok = _copy_module(dst, parent.layer(src, mods[0]))
            else:
                ok = _copy_module(dst, parent.layer(src))
            if not ok:
                fresh.append(f"layer {j}")
    if child.merge is not None:
        # Same channel count at the merge: the parent's merge fits (exact when replication only
        # shifted the split index); otherwise start from the branch average.
        if not (parent.merge is not None and _copy_module(child.merge, parent.merge)):
            child.merge.init_average()
    for name in ("last", "head"):
        if not _copy_module(getattr(child, name), getattr(parent, name)):
            fresh.append(name)
    return fresh


def _same_shaped_block(model: MobileNetV2, info: LayerInfo, modality: str | None) -> nn.Module | None:
    """The nearest block of `model` whose weights fit a c -> c stride-1 copy of `info`."""
    spec = model.spec
    cands = [li for li in spec.layers() if li.kind == "block" and li.cin == info.cout and li.cout == info.cout
             and li.stride == 1 and li.k == info.k and li.expand == info.expand]
    if not cands:
        return None
    best = min(cands, key=lambda li: abs(li.index - info.index))
    return model.layer(best.index, modality if best.index < spec.split else None)


def replicate(model_or_spec: MobileNetV2 | ArchSpec, block_index: int) -> MobileNetV2 | ArchSpec:
    """Insert a copy of block `block_index` after it; on a model, exactly function-preserving."""
    if isinstance(model_or_spec, ArchSpec):
        return model_or_spec.with_replica(block_index)
    parent = model_or_spec
    cs = parent.spec.with_replica(block_index)
    child = build_model(cs).to(**_device_dtype(parent))
    new = block_index + 2  # layer index of the copy
    layer_map = {j: (j if j < new else (None if j == new else j - 1)) for j in range(cs.num_layers)}
    transfer_weights(parent, child, layer_map)
    info = cs.layers()[new]
    for m in (list(cs.inputs) if new < cs.split else [None]):
        dst = child.layer(new, m)
        src = _same_shaped_block(parent, info, m)
        if src is not None and src.hidden == dst.hidden:
            _copy_module(dst, src)
        with torch.no_grad():
            dst.project.bn.weight.zero_()
            dst.project.bn.bias.zero_()
    child.train(parent.training)
    return child


def resplit(model: MobileNetV2, position: int, merge: str | None = None) -> MobileNetV2:
    """The same network split at `position` (0: fused), weights moved from model (see module doc)."""
    cs = model.spec.with_split(position, merge)
    child = build_model(cs).to(**_device_dtype(model))
    transfer_weights(model, child)
    child.train(model.training)
    return child


def split(spec: ArchSpec, position: int, merge: str | None = None) -> ArchSpec:
    """The spec with the input split at `position` (0: one fused stem)."""
    return spec.with_split(position, merge)


def _device_dtype(model: nn.Module) -> dict:
    p = next(model.parameters())
    return {"device": p.device, "dtype": p.dtype}


def layer_modules(model: MobileNetV2) -> Iterable[tuple[str, nn.Module]]:
    """(name, module) for each spec layer copy, the merge, the last conv and the head, in order."""
    spec = model.spec
    for j in range(spec.num_layers):
        kind = "stem" if j == 0 else f"block{j - 1}"
        if j < spec.split:
            for m in spec.inputs:
                yield f"{kind}[{m}]", model.layer(j, m)
        else:
            yield kind, model.layer(j)
        if j == spec.split - 1 and model.merge is not None:
            yield "merge", model.merge
    if not isinstance(model.last, nn.Identity):
        yield "last", model.last
    yield "head", model.head

