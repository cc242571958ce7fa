"""Parameters and multiply-accumulates (MACs) of a model or an ArchSpec.

MACs count convolutions and linear layers (BN and activations fold away at inference),
the convention of the published MobileNetV2 figure (~300M at 224x224). Specs are costed
on the meta device: no memory, no arithmetic, a few milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fastface.arch import ArchSpec


@dataclass
class LayerCost:
    """One spec layer (or merge / last conv / head): where it sits and what it costs."""

    name: str
    kind: str
    cin: int
    cout: int
    stride: int
    out_size: tuple[int, int]
    params: int
    macs: int


@dataclass
class Cost:
    """Totals and the per-layer breakdown."""

    params: int
    macs: int
    layers: list[LayerCost] = field(default_factory=list)


def count_params(model: nn.Module) -> int:
    """Trainable and frozen parameters (not buffers)."""
    return sum(p.numel() for p in model.parameters())


def _module_macs(m: nn.Module, out: torch.Tensor) -> int:
    if isinstance(m, nn.Conv2d):
        per_out = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        return (out.numel() // out.shape[0]) * per_out
    if isinstance(m, nn.Linear):
        return (out.numel() // out.shape[0]) * m.in_features
    return 0


def count(model_or_spec: nn.Module | ArchSpec, input_size: int | None = None) -> Cost:
    """Params and per-image MACs, with a per-layer table (for a MobileNetV2 or any nn.Module)."""
    from fastface.models.mobilenetv2 import MobileNetV2, build_model, folded_eval, layer_modules

    if isinstance(model_or_spec, ArchSpec):
        with torch.device("meta"):
            model = build_model(model_or_spec)
        device, dtype = torch.device("meta"), torch.float32
    else:
        model = model_or_spec
        p = next(model.parameters())
        device, dtype = p.device, p.dtype
    spec = getattr(model, "spec", None)
    size = input_size or (spec.input_size if spec is not None else 224)
    cin = spec.in_channels if spec is not None else 3

    macs_by_module: dict[nn.Module, int] = {}
    outs: dict[nn.Module, torch.Tensor] = {}
    hooks = []

    leaf_out: dict[nn.Module, tuple[int, torch.Size]] = {}  # leaf -> (call order, output shape)

    def leaf_hook(m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        macs_by_module[m] = macs_by_module.get(m, 0) + _module_macs(m, out)
        leaf_out[m] = (len(leaf_out), out.shape)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(leaf_hook))
    named = list(layer_modules(model)) if isinstance(model, MobileNetV2) else []
    for _, m in named:
        hooks.append(m.register_forward_hook(lambda mod, _i, o: outs.__setitem__(mod, o)))
    was_training = model.training
    model.eval()  # one image: BN must not need batch statistics
    try:
        with torch.no_grad(), folded_eval(False):  # module hooks must see every conv
            model(torch.zeros(1, cin, size, size, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    total_macs = sum(macs_by_module.values())
    layers = []
    for name, m in named:
        o = outs.get(m)
        shape = o.shape if o is not None else None
        if shape is None:
            # Split branches run grouped (one conv over all modalities) and skip their modules'
            # forward; the layer's own conv still ran, so its last one gives the output shape.
            ran = [leaf_out[sub] for sub in m.modules() if sub in leaf_out]
            shape = max(ran, key=lambda r: r[0])[1] if ran else None
        params = sum(p.numel() for p in m.parameters())
        macs = sum(macs_by_module.get(sub, 0) for sub in m.modules())
        kind = type(m).__name__
        cin_l = getattr(m, "cin", None) or _first_in_channels(m)
        cout_l = shape[1] if shape is not None else 0
        stride = getattr(m, "stride", None) or _first_stride(m)
        osz = tuple(shape[2:]) if shape is not None and len(shape) == 4 else (1, 1)
        layers.append(LayerCost(name, kind, cin_l, cout_l, stride, osz, params, macs))
    return Cost(count_params(model), total_macs, layers)


def _first_in_channels(m: nn.Module) -> int:
    for sub in m.modules():
        if isinstance(sub, nn.Conv2d):
            return sub.in_channels
        if isinstance(sub, nn.Linear):
            return sub.in_features
    return 0


def _first_stride(m: nn.Module) -> int:
    for sub in m.modules():
        if isinstance(sub, nn.Conv2d):
            return max(sub.stride)
    return 1


def spec_cost(spec: ArchSpec) -> tuple[int, int]:
    """(params, MACs) of a spec in closed form: microseconds, for search loops (count() checks it)."""
    def conv(cin: int, cout: int, k: int, size: int, groups: int = 1) -> tuple[int, int]:
        w = cout * (cin // groups) * k * k
        return w + 2 * cout, w * size * size  # + BN weight and bias

    p = m = 0
    layers = spec.layers()
    copies = lambda j: len(spec.inputs) if j < spec.split else 1  # noqa: E731
    for li in layers:
        if li.kind == "stem":
            for cin in (spec.inputs.values() if spec.split > 0 else [spec.in_channels]):
                dp, dm = conv(cin, li.cout, li.k, li.size_out)
                p, m = p + dp, m + dm
            continue
        parts = [conv(li.hidden, li.hidden, li.k, li.size_out, li.hidden), conv(li.hidden, li.cout, 1, li.size_out)]
        if li.expand:
            parts.append(conv(li.cin, li.hidden, 1, li.size_in))
        n = copies(li.index)
        p, m = p + n * sum(a for a, _ in parts), m + n * sum(b for _, b in parts)
    if spec.split > 0 and spec.merge == "concat":
        c = layers[spec.split - 1].cout
        dp, dm = conv(len(spec.inputs) * c, c, 1, layers[spec.split - 1].size_out)
        p, m = p + dp, m + dm
    size, cf = spec.final_size, layers[-1].cout
    if spec.last_channels:
        dp, dm = conv(cf, spec.last_channels, 1, size)
        p, m, cf = p + dp, m + dm, spec.last_channels
    h = spec.head
    if h.kind == "gdc":
        dp, dm = conv(cf, cf, size, 1, cf)
        p, m = p + dp + cf * h.dim + 2 * h.dim, m + dm + cf * h.dim
    elif h.kind == "pool":
        p, m = p + cf * h.dim + 2 * h.dim, m + cf * h.dim
    else:
        p, m = p + cf * h.dim + h.dim, m + cf * h.dim
    return p, m


def params(spec: ArchSpec) -> int:
    """Parameters of the network a spec describes."""
    return spec_cost(spec)[0]


def macs(spec: ArchSpec) -> int:
    """Per-image MACs of the network a spec describes."""
    return spec_cost(spec)[1]


def summary_table(spec: ArchSpec, title: str | None = None):
    """A rich Table of the spec's layers with params and MACs (print it with rich)."""
    from rich.markup import escape
    from rich.table import Table

    c = count(spec)
    t = Table(title=title or spec.describe(), show_lines=False)
    for col, just in (("layer", "left"), ("type", "left"), ("in", "right"), ("out", "right"), ("stride", "right"),
                      ("output", "right"), ("params", "right"), ("MMACs", "right")):
        t.add_column(col, justify=just)
    for lc in c.layers:
        t.add_row(escape(lc.name), lc.kind, str(lc.cin), str(lc.cout), str(lc.stride), "x".join(map(str, lc.out_size)),
                  f"{lc.params:,}", f"{lc.macs / 1e6:.2f}")
    t.add_section()
    t.add_row("total", "", "", "", "", "", f"{c.params:,}", f"{c.macs / 1e6:.2f}")
    return t
