"""NetAdaptV2 super-network: channel-level bypass connections (CBC), ordered dropout, slicing
to a physically smaller MobileNetV2, and BN recalibration.

The search space (a `WidthSpace`) is a *widths vector*: a dict name -> int, JSON-ready.
Layers are numbered as in fastface.arch (0 = stem, j = blocks[j-1]). The names are:

- ``"c{j}"``: the output channels of a *tied group*. A group starts at a layer whose output is
  not added to its input (the stem, or a block that changes channels or stride) and takes in
  every following residual block, because a residual add ties a block's output channels to
  its input's. One width for the whole group: all its layers output the first w channels.
  Choices: multiples of g below the full count, and the full count (never 0).
- ``"e{j}"``: the hidden (expanded) width of block j, for blocks with an expand conv (t != 1).
  Choices: multiples of g below the full width, and the full width; a residual block may also
  take 0 = *bypass*: the block becomes exactly the identity (CBC: every output channel is the
  input channel passed through), and slicing removes it. Not bypassable: non-residual blocks
  (they change shape) and, with a split, the last branch layer (the merge needs it).
  Blocks with t = 1 have no expand conv: their hidden width is their input group's width.
- ``"last"``: channels of the 1x1 conv before the head (when head.last_c > 0), min g.
Not searchable: input channels, the embedding dimension, kernel sizes, strides.

Masking semantics (so one set of weights holds every sub-network): a layer at width w keeps
its first w output channels and zeroes the rest *after the activation* (after BN for the linear
block output), so BN always sees full width; a zeroed channel contributes nothing downstream,
which is what makes the masked network equal the prefix-sliced one. For a residual block the
masked channels of its branch add zero, so those output channels are the input passed through
(the CBC rule); at hidden width 0 the whole branch is zero and the block is the identity.

Widths may be one int per name for the whole batch, or a LongTensor of shape (B,) per name:
per-sample widths (ordered dropout) — one forward/backward trains up to B sub-networks.

Representability: a stride-1 block that changes channels (e.g. MobileNetV2's first block,
32 -> 16) would become a residual block in fastface.arch if both its groups took the same
width, so such widths cannot be sliced; the space treats them as invalid (`problems`), and
`shrink` steps over them.
"""
from __future__ import annotations

import hashlib
from random import Random
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Union

import torch
from torch import nn

from fastface.arch import ArchSpec, BlockSpec, LayerInfo, StemSpec
from fastface.models.heads import GDCHead
from fastface.models.mobilenetv2 import ConvBNAct, InvertedResidual, MobileNetV2, build_model

Widths = dict[str, int]
WidthValue = Union[int, torch.Tensor]
BatchWidths = Mapping[str, WidthValue]


class WidthError(ValueError):
    """A widths vector the space cannot take; the message names the entry and the reason."""


@dataclass(frozen=True)
class WidthVar:
    """One searchable width: what it sets (kind, layers), its full value and allowed values."""

    name: str
    kind: str  # "out" (tied output channels) | "hidden" (expanded channels) | "last" (1x1 conv before head)
    layers: tuple[int, ...]
    full: int
    choices: tuple[int, ...]  # ascending; contains full

    @property
    def bypassable(self) -> bool:
        """Whether width 0 (the block is the identity) is allowed."""
        return self.choices[0] == 0


def _choices(full: int, g: int, zero: bool) -> tuple[int, ...]:
    vals = list(range(g, full, g)) + [full]
    return tuple(([0] if zero else []) + vals)


class WidthSpace:
    """The searchable widths of an ArchSpec at granularity g (see the module docstring)."""

    def __init__(self, spec: ArchSpec, g: int = 8):
        if not isinstance(g, int) or g < 1:
            raise ValueError(f"WidthSpace: granularity g must be a positive integer, got {g!r}")
        self.spec, self.g = spec, g
        self.infos: list[LayerInfo] = spec.layers()
        self.group_of: list[str] = []  # layer -> name of its output group
        self.hidden_of: list[str | None] = []  # layer -> name of its hidden width (None: fixed / follows input)
        groups: dict[str, list[int]] = {}
        for li in self.infos:
            if li.kind == "block" and li.residual:
                name = self.group_of[li.index - 1]
            else:
                name = f"c{li.index}"
            groups.setdefault(name, []).append(li.index)
            self.group_of.append(name)
            self.hidden_of.append(f"e{li.index}" if li.kind == "block" and li.expand else None)
        vars_: list[WidthVar] = []
        for li in self.infos:
            gname = self.group_of[li.index]
            if groups[gname][0] == li.index:
                vars_.append(WidthVar(gname, "out", tuple(groups[gname]), li.cout, _choices(li.cout, g, False)))
            if self.hidden_of[li.index] is not None:
                bypass = li.residual and not (spec.split > 0 and li.index == spec.split - 1)
                vars_.append(WidthVar(f"e{li.index}", "hidden", (li.index,), li.hidden,
                                      _choices(li.hidden, g, bypass)))
        if spec.last_channels:
            vars_.append(WidthVar("last", "last", (), spec.last_channels, _choices(spec.last_channels, g, False)))
        self.vars: dict[str, WidthVar] = {v.name: v for v in vars_}
        # Stride-1 blocks that change channels: their in/out groups must not get equal widths.
        self.conflicts: list[tuple[int, str, str]] = [
            (li.index, self.group_of[li.index - 1], self.group_of[li.index]) for li in self.infos
            if li.kind == "block" and not li.residual and li.stride == 1]

    # ---- basic views -----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Searchable names in layer order."""
        return list(self.vars)

    def full(self) -> Widths:
        """Every width at its full value (the super-network itself)."""
        return {n: v.full for n, v in self.vars.items()}

    def choices(self, name: str) -> tuple[int, ...]:
        """Allowed values of one name, ascending."""
        return self._var(name).choices

    def _var(self, name: str) -> WidthVar:
        if name not in self.vars:
            raise WidthError(f"unknown width {name!r}; this space has {', '.join(self.vars)}")
        return self.vars[name]

    def complete(self, widths: Mapping[str, Any] | None) -> dict[str, Any]:
        """All names, missing ones at full width; unknown names are errors."""
        out: dict[str, Any] = self.full()
        for n, w in (widths or {}).items():
            self._var(n)
            out[n] = w
        return out

    def problems(self, widths: Mapping[str, int]) -> list[str]:
        """Why a batch-wide widths vector cannot be sliced (empty: it can)."""
        w = self.complete(widths)
        out = []
        for n, v in w.items():
            if not isinstance(v, int) or isinstance(v, bool):
                out.append(f"{n}={v!r}: must be an int")
            elif v not in self.vars[n].choices:
                out.append(f"{n}={v}: not one of {self.vars[n].choices}")
        for j, a, b in self.conflicts:
            if w[a] == w[b]:
                out.append(f"{a}={w[a]} equals {b}={w[b]}: stride-1 block {j - 1} (layer {j}) would become residual")
        return out

    def check(self, widths: Mapping[str, int]) -> Widths:
        """The completed widths, or WidthError naming every problem."""
        bad = self.problems(widths)
        if bad:
            raise WidthError("widths cannot be sliced: " + "; ".join(bad))
        return self.complete(widths)

    # ---- search moves ----------------------------------------------------------------------
    def can_shrink(self, widths: Mapping[str, int], name: str) -> bool:
        """Whether `shrink` has a lower valid value for name."""
        return self.shrink(widths, name) is not None

    def shrink(self, widths: Mapping[str, int], name: str, steps: int = 1) -> Widths | None:
        """Lower `name` by `steps` choices (skipping values that cannot be sliced); None at the bottom."""
        w = self.complete(widths)
        ch = self.vars[name].choices
        i = ch.index(w[name])
        while i - steps >= 0:
            i -= steps
            cand = dict(w, **{name: ch[i]})
            if not self.problems(cand):
                return cand
            steps = 1
        return None

    def random(self, rng: Random) -> Widths:
        """A uniformly drawn valid widths vector (redrawn until it can be sliced)."""
        for _ in range(1000):
            w = {n: rng.choice(v.choices) for n, v in self.vars.items()}
            if not self.problems(w):
                return w
        raise WidthError("could not draw a valid widths vector in 1000 tries")

    def sample(self, batch: int, full_share: float = 0.25, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Ordered dropout: per-sample widths (B,) per name, uniform over choices; a share of rows at full width."""
        if not (0.0 <= full_share <= 1.0):
            raise ValueError(f"full_share must be in [0, 1], got {full_share}")
        out = {}
        for n, v in self.vars.items():
            ch = torch.tensor(v.choices, dtype=torch.long)
            out[n] = ch[torch.randint(len(ch), (batch,), generator=generator)]
        n_full = int(round(full_share * batch))
        if n_full:
            rows = torch.randperm(batch, generator=generator)[:n_full]
            for n, v in self.vars.items():
                out[n][rows] = v.full
        return {n: t.to(device) for n, t in out.items()}

    # ---- resolution to layers ----------------------------------------------------------------
    def resolve(self, widths: BatchWidths | None) -> "LayerWidths":
        """Per-layer (hidden, out) widths, the last-conv width and the head's feature width."""
        w = self.complete(widths)
        hid, out = [], []
        for li in self.infos:
            out.append(w[self.group_of[li.index]])
            hn = self.hidden_of[li.index]
            if hn is not None:
                hid.append(w[hn])
            elif li.kind == "block":
                hid.append(out[li.index - 1])  # t = 1: the depthwise runs on the input channels
            else:
                hid.append(out[-1])
        last = w.get("last")
        return LayerWidths(hid, out, last, last if last is not None else out[-1])

    def kept_layers(self, widths: Mapping[str, int]) -> list[int]:
        """Layer indices that survive slicing (bypassed blocks are removed)."""
        w = self.complete(widths)
        return [li.index for li in self.infos if not (self.hidden_of[li.index] and w[self.hidden_of[li.index]] == 0)]

    def spec_at(self, widths: Mapping[str, int]) -> ArchSpec:
        """The physically smaller ArchSpec of a widths vector: bypassed blocks removed, widths absolute."""
        w = self.check(widths)
        spec, r = self.spec, self.resolve(w)
        kept = self.kept_layers(w)
        blocks = []
        for j in kept[1:]:
            b = spec.blocks[j - 1]
            blocks.append(BlockSpec(t=b.t, c=r.out[j], s=b.s, k=b.k, e=r.hid[j] if b.t != 1 else None))
        head = spec.head
        if spec.last_channels:
            head = type(head)(head.kind, head.dim, r.last, head.dropout)
        split = sum(1 for j in kept if j < spec.split)
        # width = 1: every channel count above is already absolute.
        return spec.replace(stem=StemSpec(r.out[0], spec.stem.k, spec.stem.s), blocks=tuple(blocks), split=split,
                            head=head, width=1.0)


@dataclass
class LayerWidths:
    """Resolved widths per layer: hidden[j], out[j], the last conv's width, the head's input width."""

    hid: list[WidthValue]
    out: list[WidthValue]
    last: WidthValue | None
    feat: WidthValue


def _mask(x: torch.Tensor, w: WidthValue | None, alive: WidthValue | None = None) -> torch.Tensor:
    """Zero channels >= w (per sample when w is a tensor); `alive` = 0 zeroes the whole row (bypass)."""
    c = x.shape[1]
    if not isinstance(w, torch.Tensor) and not isinstance(alive, torch.Tensor):
        if alive is not None and alive == 0:
            return torch.zeros_like(x)
        return x if w is None or w >= c else x * _prefix_mask(c, w, x)
    idx = torch.arange(c, device=x.device)
    wt = w if isinstance(w, torch.Tensor) else torch.full((x.shape[0],), c if w is None else w, device=x.device)
    m = idx.unsqueeze(0) < wt.to(x.device).unsqueeze(1)
    if alive is not None:
        at = alive if isinstance(alive, torch.Tensor) else torch.full((x.shape[0],), alive, device=x.device)
        m = m & (at.to(x.device) > 0).unsqueeze(1)
    return x * m.to(x.dtype).reshape(x.shape[0], c, *([1] * (x.dim() - 2)))


def _prefix_mask(c: int, w: int, x: torch.Tensor) -> torch.Tensor:
    m = (torch.arange(c, device=x.device) < w).to(x.dtype)
    return m.reshape(1, c, *([1] * (x.dim() - 2)))


def _is_zero(w: WidthValue) -> bool:
    return not isinstance(w, torch.Tensor) and w == 0


class Supernet(nn.Module):
    """A CBC super-network over an ArchSpec: forward(x, widths) runs the sub-network `widths` by masking.

    The weights live in `self.net`, an ordinary MobileNetV2 of the full spec (so a trained model
    can be wrapped with `Supernet.from_model`); widths=None is exactly that network.
    """

    def __init__(self, spec: ArchSpec, g: int = 8, net: MobileNetV2 | None = None):
        super().__init__()
        self.spec = spec
        self.space = WidthSpace(spec, g)
        self.net = net if net is not None else build_model(spec)
        if self.net.spec != spec:
            raise ValueError("Supernet: the wrapped model was built from a different spec")

    @classmethod
    def from_model(cls, model: MobileNetV2, g: int = 8) -> "Supernet":
        """Wrap a (trained) MobileNetV2; the modules are shared, not copied."""
        return cls(model.spec, g, model)

    def forward(self, x: torch.Tensor, widths: BatchWidths | None = None) -> torch.Tensor:
        if widths is None:
            return self.net(x)
        return self._head(self.features(x, widths), self.space.resolve(widths))

    def features(self, x: torch.Tensor, widths: BatchWidths | None) -> torch.Tensor:
        """Masked feature map after the last 1x1 conv (before the head)."""
        net, spec = self.net, self.spec
        r = self.space.resolve(widths)
        if x.dim() != 4 or x.shape[1] != spec.in_channels:
            raise ValueError(f"Supernet: expected input N x {spec.in_channels} x H x W, got {tuple(x.shape)}")
        for v in (widths or {}).values():
            if isinstance(v, torch.Tensor) and v.shape != (x.shape[0],):
                raise WidthError(f"per-sample widths must have shape ({x.shape[0]},), got {tuple(v.shape)}")
        k = spec.split
        if net.branches is not None:
            outs = []
            for m, xm in zip(net.modalities, torch.split(x, net.in_splits, dim=1)):
                branch = net.branches[m]
                for j, layer in enumerate(branch):
                    xm = self._layer(layer, j, xm, r, preact=j == k - 1 and net.merge is None)
                outs.append(xm)
            if net.merge is not None:
                x = _mask(net.merge(outs), r.out[k - 1])
            else:
                # Summed before the last branch layer's activation, as MobileNetV2.features does.
                x = _mask(net.branches[net.modalities[0]][-1].act(torch.stack(outs).sum(0)), r.out[k - 1])
        for j, layer in enumerate(net.trunk, start=k):
            x = self._layer(layer, j, x, r)
        if isinstance(net.last, ConvBNAct):
            x = _mask(net.last(x), r.last)
        return x

    def layer_forward(self, index: int, x: torch.Tensor, widths: BatchWidths | None = None,
                      modality: str | None = None) -> torch.Tensor:
        """Layer `index` alone (its copy for `modality` inside a split), masked at `widths`."""
        return self._layer(self.net.layer(index, modality), index, x, self.space.resolve(widths))

    def _layer(self, layer: nn.Module, j: int, x: torch.Tensor, r: LayerWidths, preact: bool = False) -> torch.Tensor:
        if isinstance(layer, ConvBNAct):  # the stem
            return layer.preact(x) if preact else _mask(layer(x), r.out[j])
        assert isinstance(layer, InvertedResidual)
        hid, out = r.hid[j], r.out[j]
        if _is_zero(hid):
            return x  # CBC at width 0: exactly the identity (only residual blocks may take 0)
        h = x
        if layer.expand is not None:
            h = _mask(layer.expand(h), hid)
        h = _mask(layer.dw(h), hid)
        # Per-sample hidden width 0 must zero the whole branch: BN's shift would leak otherwise.
        y = _mask(layer.project(h), out, hid if isinstance(hid, torch.Tensor) else None)
        return x + y if layer.use_res else y

    def _head(self, x: torch.Tensor, r: LayerWidths) -> torch.Tensor:
        head = self.net.head
        if isinstance(head, GDCHead):
            # The GDC's BN shift would refill masked channels: mask again before the linear layer.
            z = _mask(head.gdc_bn(head.gdc(x)), r.feat).flatten(1)
            return head.bn(head.fc(head.dropout(z)))
        return head(x)  # pooling keeps zero channels zero

    def sample_widths(self, batch: int, full_share: float = 0.25, generator: torch.Generator | None = None
                      ) -> dict[str, torch.Tensor]:
        """Ordered-dropout widths for a batch on this network's device."""
        return self.space.sample(batch, full_share, generator, device=next(self.parameters()).device)


# ---- slicing -----------------------------------------------------------------------------------


def _narrow_to(src: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if src.dim() != len(shape):
        raise ValueError(f"cannot prefix-slice a tensor of shape {tuple(src.shape)} to {tuple(shape)}")
    for d, n in enumerate(shape):
        src = src.narrow(d, 0, n)
    return src


@torch.no_grad()
def _prefix_copy(dst: nn.Module, src: nn.Module, reverse: bool = False) -> None:
    """dst <- prefix slices of src's tensors (reverse: write dst's tensors into src's prefixes)."""
    ds, ss = dst.state_dict(), src.state_dict()
    if ds.keys() != ss.keys():
        raise ValueError(f"slicing: modules differ ({type(dst).__name__} vs {type(src).__name__})")
    for k, t in ds.items():
        part = _narrow_to(ss[k], t.shape)
        (part.copy_(t) if reverse else t.copy_(part))


@torch.no_grad()
def _merge_copy(dst: nn.Module, src: nn.Module, branches: int, reverse: bool = False) -> None:
    """A concat merge: the conv's input channels are per-branch blocks, each prefix-sliced."""
    c, w = src.bn.num_features, dst.bn.num_features
    idx = torch.cat([torch.arange(b * c, b * c + w) for b in range(branches)]).to(src.conv.weight.device)
    if reverse:
        src.conv.weight[:w].index_copy_(1, idx, dst.conv.weight)
    else:
        dst.conv.weight.copy_(src.conv.weight[:w].index_select(1, idx))
    _prefix_copy(dst.bn, src.bn, reverse)


def _pairs(supernet: Supernet, sub: MobileNetV2, widths: Mapping[str, int]) -> Iterable[tuple[nn.Module, nn.Module]]:
    """(sub-network module, super-network module) pairs for every kept layer copy, last conv and head."""
    kept = supernet.space.kept_layers(widths)
    big = supernet.net
    for new, old in enumerate(kept):
        mods = list(supernet.spec.inputs) if old < supernet.spec.split else [None]
        for m in mods:
            yield sub.layer(new, m), big.layer(old, m)
    if isinstance(big.last, ConvBNAct):
        yield sub.last, big.last
    yield sub.head, big.head


def slice_model(supernet: Supernet, widths: Mapping[str, int]) -> MobileNetV2:
    """The physically smaller MobileNetV2 of a widths vector, weights = prefix slices (no masks)."""
    spec = supernet.space.spec_at(widths)
    p = next(supernet.parameters())
    with torch.device("meta"):
        sub = build_model(spec)  # no init work: every tensor is overwritten below
    sub = sub.to_empty(device=p.device).to(p.dtype)
    for dst, src in _pairs(supernet, sub, widths):
        _prefix_copy(dst, src)
    if sub.merge is not None:
        _merge_copy(sub.merge, supernet.net.merge, len(spec.inputs))
    sub.train(supernet.training)
    return sub


def slice_subnet(supernet: Supernet, widths: Mapping[str, int]) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
    """(ArchSpec, state_dict) of the sliced network: build_model(spec).load_state_dict(sd) reproduces it."""
    sub = slice_model(supernet, widths)
    return sub.spec, sub.state_dict()


def load_subnet(supernet: Supernet, widths: Mapping[str, int], sub: MobileNetV2) -> None:
    """Write a (fine-tuned) sliced network's weights back into the super-network's prefixes."""
    expected = supernet.space.spec_at(widths)
    if sub.spec != expected:
        raise ValueError("load_subnet: the network's spec is not the slice of these widths")
    for dst, src in _pairs(supernet, sub, widths):
        _prefix_copy(dst, src, reverse=True)
    if sub.merge is not None:
        _merge_copy(sub.merge, supernet.net.merge, len(expected.inputs), reverse=True)


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, shapes, dtypes, bytes): identifies a weight state."""
    h = hashlib.sha256()
    for k, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- BN recalibration ----------------------------------------------------------------------------


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[Any], widths: BatchWidths | None = None,
                num_batches: int | None = None) -> nn.Module:
    """Reset every BN's running statistics and re-estimate them (cumulative average) on training batches.

    `model` is a sliced MobileNetV2 (widths=None) or a Supernet (at `widths`); batches are image
    tensors or (images, labels). Returns the model, in the mode it was in.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    was = model.training
    model.train()
    p = next(model.parameters())
    seen = 0
    try:
        for i, b in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            x = _images(b).to(device=p.device, dtype=p.dtype)
            model(x) if widths is None else model(x, widths)
            seen += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was)
    if seen == 0:
        raise ValueError("recalibrate: no batches given")
    return model


# ---- ordered-dropout training ----------------------------------------------------------------------


def _cycle(batches: Iterable[Any]) -> Iterable[Any]:
    while True:
        n = 0
        for b in batches:
            n += 1
            yield b
        if n == 0:
            raise ValueError("train_supernet: the batch source is empty")


def train_supernet(supernet: Supernet, batches: Iterable[Any], loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                   steps: int, full_share: float = 0.25, distill: float = 0.0, seed: int = 0,
                   scheduler: Any = None) -> list[float]:
    """Train with ordered dropout for `steps` steps; returns the loss of every step.

    Each sample draws its own width per searchable layer (a `full_share` of samples at full
    width), so one forward/backward trains many prefix sub-networks. `loss_fn(embeddings,
    labels)` is the face objective (e.g. PartialFC(arcface(), dim, classes)); its parameters
    must be in `optimizer`. With `distill` > 0 (in-place distillation) each batch runs twice in
    one forward: a full-width copy, trained by loss_fn and whose detached embeddings are the
    targets, and a random-width copy trained by loss_fn plus distill * (1 - cos) to the target.
    """
    gen = torch.Generator().manual_seed(seed)
    supernet.train()
    loss_fn.train()
    p = next(supernet.parameters())
    losses = []
    source = iter(_cycle(batches))
    for _ in range(steps):
        x, y = next(source)
        x, y = x.to(device=p.device, dtype=p.dtype), y.to(p.device)
        b = x.shape[0]
        if distill > 0:
            sub = supernet.space.sample(b, 0.0, gen, p.device)
            full = supernet.space.full()
            widths = {n: torch.cat([torch.full((b,), full[n], dtype=torch.long, device=p.device), t])
                      for n, t in sub.items()}
            emb = supernet(torch.cat([x, x]), widths)
            target = emb[:b].detach()
            kd = (1 - nn.functional.cosine_similarity(emb[b:], target, dim=1)).mean()
            loss = loss_fn(emb, torch.cat([y, y])) + distill * kd
        else:
            emb = supernet(x, supernet.space.sample(b, full_share, gen, p.device))
            loss = loss_fn(emb, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


__all__ = ["BatchWidths", "LayerWidths", "Supernet", "WidthError", "WidthSpace", "WidthVar", "Widths",
           "load_subnet", "recalibrate", "slice_model", "slice_subnet", "train_supernet", "weights_digest"]
