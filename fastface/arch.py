"""ArchSpec: the one description of a network. Models are built only from it, the search
only emits it, checkpoints store it; it round-trips through JSON unchanged.

Layers are numbered 0 = stem, i = blocks[i-1]. With `split = k > 0` every input modality
runs its own copy of layers [0, k) and the branches merge before layer k:
- `merge="add"`: the branches' last layers are summed *before* their final activation
  (the stem's ReLU6; inverted-residual blocks end linear, so for them it is a plain sum).
  This makes splitting a fused network at k = 1 exactly function-preserving.
- `merge="concat"`: the branch outputs are concatenated, then a 1x1 conv + BN maps them
  back to the channel count of layer k - 1.
After the blocks: a 1x1 conv to `head.last_c` channels (+BN+ReLU6) and the head.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterator

SPEC_VERSION = 1
MERGES = ("add", "concat")
HEADS = ("gdc", "pool", "classifier")

# MobileNetV2 (Sandler et al. 2018), Table 2: expansion t, channels c, repeats n, stride s.
MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))


class ArchSpecError(ValueError):
    """An invalid ArchSpec; the message names the field and the bad value."""


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of `divisor`, never below 90 % of v (as torchvision)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class StemSpec:
    """The first conv + BN + ReLU6."""

    c: int = 32
    k: int = 3
    s: int = 2


@dataclass(frozen=True)
class BlockSpec:
    """An inverted-residual block: 1x1 expand (t != 1) -> k x k depthwise (stride s) -> 1x1 project.

    `e` fixes the expanded channels directly (NetAdapt-sliced networks); otherwise they are
    round(c_in * t). Channels given by `e` are absolute: the width multiplier does not scale them.
    """

    t: float
    c: int
    s: int = 1
    k: int = 3
    e: int | None = None

    def to_str(self) -> str:
        """timm-style block string, e.g. ir_k3_s2_e6_c24 (plus _x<e> for explicit expanded channels)."""
        t = int(self.t) if float(self.t).is_integer() else self.t
        return f"ir_k{self.k}_s{self.s}_e{t}_c{self.c}" + (f"_x{self.e}" if self.e is not None else "")


@dataclass(frozen=True)
class HeadSpec:
    """Head after the blocks: 1x1 conv to last_c (0: none), then an embedding or a classifier.

    kind: "gdc" (global depthwise conv -> linear -> BN1d, MobileFaceNet style), "pool" (average
    pool -> linear -> BN1d) or "classifier" (average pool -> dropout -> linear with bias).
    `dim` is the embedding dimension, or the number of classes for "classifier".
    """

    kind: str = "gdc"
    dim: int = 512
    last_c: int = 1280
    dropout: float = 0.0


@dataclass(frozen=True)
class LayerInfo:
    """A resolved layer: concrete channels, stride and spatial sizes (derived from a spec)."""

    index: int
    kind: str  # "stem" | "block"
    cin: int
    cout: int
    stride: int
    k: int
    hidden: int  # expanded channels of a block (= cout for the stem)
    expand: bool
    residual: bool
    size_in: int
    size_out: int


def _conv_out(size: int, k: int, s: int) -> int:
    return (size + 2 * (k // 2) - k) // s + 1


@dataclass(frozen=True)
class ArchSpec:
    """A complete network: inputs, stem, blocks, split position, merge, head, width."""

    inputs: dict[str, int] = field(default_factory=lambda: {"rgb": 3, "depth": 1})
    stem: StemSpec = field(default_factory=StemSpec)
    blocks: tuple[BlockSpec, ...] = ()
    split: int = 0
    merge: str = "add"
    head: HeadSpec = field(default_factory=HeadSpec)
    width: float = 1.0
    input_size: int = 112
    name: str = "mobilenetv2"

    def __post_init__(self) -> None:
        # Accept lists/dicts from JSON or callers; store immutable forms.
        object.__setattr__(self, "inputs", dict(self.inputs) if isinstance(self.inputs, dict) else self.inputs)
        if isinstance(self.stem, dict):
            object.__setattr__(self, "stem", _from_fields(StemSpec, self.stem, "stem"))
        if isinstance(self.head, dict):
            object.__setattr__(self, "head", _from_fields(HeadSpec, self.head, "head"))
        if isinstance(self.blocks, (list, tuple)):
            object.__setattr__(self, "blocks", tuple(
                _from_fields(BlockSpec, b, f"blocks[{i}]") if isinstance(b, dict) else b
                for i, b in enumerate(self.blocks)))
        self.validate()

    def __hash__(self) -> int:
        return hash(self.to_json())

    # ---- presets -------------------------------------------------------------------------
    @staticmethod
    def mobilenetv2_blocks() -> tuple[BlockSpec, ...]:
        """The standard 17 inverted-residual blocks of MobileNetV2."""
        return tuple(BlockSpec(t=t, c=c, s=s if i == 0 else 1) for t, c, n, s in MOBILENETV2_SETTINGS
                     for i in range(n))

    @classmethod
    def mobilenetv2(cls, width: float = 1.0, num_classes: int = 1000, input_size: int = 224,
                    inputs: dict[str, int] | None = None, dropout: float = 0.2) -> "ArchSpec":
        """Standard ImageNet MobileNetV2 (3,504,872 parameters at width 1.0, 1000 classes)."""
        return cls(inputs=inputs or {"rgb": 3}, stem=StemSpec(32, 3, 2), blocks=cls.mobilenetv2_blocks(),
                   head=HeadSpec("classifier", num_classes, 1280, dropout), width=width,
                   input_size=input_size, name="mobilenetv2")

    @classmethod
    def face(cls, width: float = 1.0, split: int = 0, merge: str = "add", embedding: int = 512,
             inputs: dict[str, int] | None = None, head: str = "gdc", input_size: int = 112) -> "ArchSpec":
        """MobileNetV2 face model: 112x112 RGB-D input, 512-d embedding, GDC head."""
        return cls(inputs=inputs or {"rgb": 3, "depth": 1}, stem=StemSpec(32, 3, 2),
                   blocks=cls.mobilenetv2_blocks(), split=split, merge=merge,
                   head=HeadSpec(head, embedding, 1280, 0.0), width=width, input_size=input_size,
                   name="mobilenetv2_face")

    # ---- derived -------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        """Channels of the stacked input tensor (modalities concatenated in `inputs` order)."""
        return sum(self.inputs.values())

    @property
    def num_layers(self) -> int:
        """Stem + blocks."""
        return 1 + len(self.blocks)

    def channels(self, c: int) -> int:
        """Concrete channels of a nominal count under the width multiplier."""
        return c if self.width == 1.0 else make_divisible(c * self.width, 8)

    @property
    def last_channels(self) -> int:
        """Channels of the 1x1 conv before the head (never shrunk below 1280 x 1 by width < 1)."""
        if self.head.last_c == 0:
            return 0
        return self.channels(self.head.last_c) if self.width > 1.0 else self.head.last_c

    def layers(self) -> list[LayerInfo]:
        """Resolved layers (stem, then blocks) with concrete channels and spatial sizes."""
        out = []
        size = self.input_size
        c0 = self.channels(self.stem.c)
        s_out = _conv_out(size, self.stem.k, self.stem.s)
        out.append(LayerInfo(0, "stem", self.in_channels, c0, self.stem.s, self.stem.k, c0, False, False, size, s_out))
        cin, size = c0, s_out
        for i, b in enumerate(self.blocks):
            cout = self.channels(b.c)
            expand = b.t != 1
            hidden = b.e if b.e is not None else (int(round(cin * b.t)) if expand else cin)
            s_out = _conv_out(size, b.k, b.s)
            out.append(LayerInfo(i + 1, "block", cin, cout, b.s, b.k, hidden, expand, b.s == 1 and cin == cout,
                                 size, s_out))
            cin, size = cout, s_out
        return out

    @property
    def final_size(self) -> int:
        """Spatial size of the last feature map (the GDC kernel size)."""
        return self.layers()[-1].size_out

    @property
    def feature_channels(self) -> int:
        """Channels entering the head (after the last 1x1 conv, if any)."""
        return self.last_channels or self.layers()[-1].cout

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ArchSpecError naming the field and bad value of the first problem found."""
        def bad(path: str, value: Any, why: str) -> None:
            raise ArchSpecError(f"ArchSpec.{path}: {why}, got {value!r}")

        if not isinstance(self.inputs, dict) or not self.inputs:
            bad("inputs", self.inputs, "must be a non-empty mapping modality -> channels")
        for m, c in self.inputs.items():
            if not isinstance(m, str) or not m.isidentifier():
                bad(f"inputs[{m!r}]", m, "modality names must be identifiers")
            if not _is_int(c) or c < 1:
                bad(f"inputs[{m!r}]", c, "channels must be a positive integer")
        if not _is_int(self.input_size) or self.input_size < 8:
            bad("input_size", self.input_size, "must be an integer >= 8")
        if not isinstance(self.width, (int, float)) or isinstance(self.width, bool) or not (0 < self.width <= 4):
            bad("width", self.width, "must be a number in (0, 4]")
        if not isinstance(self.stem, StemSpec):
            bad("stem", self.stem, "must be a StemSpec")
        _check_conv("stem", self.stem.c, self.stem.k, self.stem.s, bad)
        if not isinstance(self.blocks, tuple):
            bad("blocks", self.blocks, "must be a sequence of BlockSpec")
        for i, b in enumerate(self.blocks):
            p = f"blocks[{i}]"
            if not isinstance(b, BlockSpec):
                bad(p, b, "must be a BlockSpec")
            if not isinstance(b.t, (int, float)) or isinstance(b.t, bool) or not (0 < b.t <= 16):
                bad(f"{p}.t", b.t, "expansion must be in (0, 16]")
            _check_conv(p, b.c, b.k, b.s, bad)
            if b.e is not None and (not _is_int(b.e) or b.e < 1):
                bad(f"{p}.e", b.e, "explicit expanded channels must be a positive integer or null")
        if b_t1 := [i for i, b in enumerate(self.blocks) if b.t == 1 and b.e is not None]:
            i = b_t1[0]
            cin = self.channels(self.stem.c) if i == 0 else self.channels(self.blocks[i - 1].c)
            if self.blocks[i].e != cin:
                bad(f"blocks[{i}].e", self.blocks[i].e, f"a block with t=1 has no expand conv, so e must equal its "
                                                        f"input channels {cin}")
        if not _is_int(self.split) or not (0 <= self.split <= self.num_layers):
            bad("split", self.split, f"must be an integer in [0, {self.num_layers}] (0 = fused input)")
        if self.split > 0 and len(self.inputs) < 2:
            bad("split", self.split, "a split needs at least two input modalities")
        if self.merge not in MERGES:
            bad("merge", self.merge, f"must be one of {MERGES}")
        if not isinstance(self.head, HeadSpec):
            bad("head", self.head, "must be a HeadSpec")
        if self.head.kind not in HEADS:
            bad("head.kind", self.head.kind, f"must be one of {HEADS}")
        if not _is_int(self.head.dim) or self.head.dim < 1:
            bad("head.dim", self.head.dim, "must be a positive integer")
        if not _is_int(self.head.last_c) or self.head.last_c < 0:
            bad("head.last_c", self.head.last_c, "must be a non-negative integer (0: no 1x1 conv)")
        if not isinstance(self.head.dropout, (int, float)) or not (0 <= self.head.dropout < 1):
            bad("head.dropout", self.head.dropout, "must be in [0, 1)")
        if not isinstance(self.name, str):
            bad("name", self.name, "must be a string")

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (with a format version)."""
        d = asdict(self)
        d["blocks"] = [asdict(b) for b in self.blocks]
        return {"version": SPEC_VERSION, **d}

    def to_json(self, indent: int | None = None) -> str:
        """JSON text; ArchSpec.from_json(spec.to_json()) == spec."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchSpec":
        """Build from a dict; unknown keys are errors naming the key."""
        if not isinstance(d, dict):
            raise ArchSpecError(f"ArchSpec: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise ArchSpecError(f"ArchSpec.version: unsupported version, got {version!r} (this fastface reads "
                                f"{SPEC_VERSION})")
        spec = _from_fields(cls, d, "")
        return spec

    @classmethod
    def from_json(cls, text: str) -> "ArchSpec":
        """Parse JSON text (see to_json)."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ArchSpecError(f"ArchSpec: not valid JSON: {e}") from e

    def save(self, path: str) -> None:
        """Write JSON atomically (temp file + rename)."""
        from fastface.utils import atomic_write_text

        atomic_write_text(path, self.to_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str) -> "ArchSpec":
        """Read a spec written by save (or any JSON in the same layout)."""
        with open(path) as f:
            try:
                return cls.from_json(f.read())
            except ArchSpecError as e:
                raise ArchSpecError(f"{path}: {e}") from e

    # ---- edits (return new specs) --------------------------------------------------------
    def replace(self, **changes: Any) -> "ArchSpec":
        """A copy with fields replaced (validated)."""
        return replace(self, **changes)

    def with_split(self, position: int, merge: str | None = None) -> "ArchSpec":
        """The same network with the input split at `position` (0: fused)."""
        return self.replace(split=position, merge=merge or self.merge)

    def with_replica(self, block_index: int) -> "ArchSpec":
        """Insert a copy of block `block_index` right after it (a stride-1, in = out residual block).

        A split position after the block moves with it, so the branches keep the same layers.
        """
        if not (0 <= block_index < len(self.blocks)):
            raise ArchSpecError(f"ArchSpec.blocks: no block {block_index} to replicate (have {len(self.blocks)})")
        b = self.blocks[block_index]
        # The copy maps c -> c at stride 1; an explicit expanded width carries over (t = 1
        # blocks have none: their hidden width is their input width).
        copy = BlockSpec(t=b.t, c=b.c, s=1, k=b.k, e=b.e if b.t != 1 else None)
        blocks = self.blocks[:block_index + 1] + (copy,) + self.blocks[block_index + 1:]
        split = self.split + 1 if 0 < self.split and block_index + 1 < self.split else self.split
        return self.replace(blocks=blocks, split=split)

    def describe(self) -> str:
        """One line: inputs, split, merge, block strings, head."""
        mods = "+".join(f"{m}{c}" for m, c in self.inputs.items())
        return (f"{self.name} [{mods} @{self.input_size}] split={self.split} merge={self.merge} width={self.width} "
                f"blocks={len(self.blocks)} head={self.head.kind}{self.head.dim}")

    def iter_blocks(self) -> Iterator[tuple[int, BlockSpec]]:
        """(index, block) pairs."""
        return enumerate(self.blocks)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_conv(path: str, c: Any, k: Any, s: Any, bad: Any) -> None:
    if not _is_int(c) or c < 1:
        bad(f"{path}.c", c, "channels must be a positive integer")
    if not _is_int(k) or k < 1 or k % 2 == 0 or k > 11:
        bad(f"{path}.k", k, "kernel size must be an odd integer in [1, 11]")
    if not _is_int(s) or s not in (1, 2):
        bad(f"{path}.s", s, "stride must be 1 or 2")


def _from_fields(cls: type, d: Any, path: str) -> Any:
    """Instantiate a dataclass from a dict, naming unknown or missing keys."""
    where = f"ArchSpec.{path}" if path else "ArchSpec"
    if not isinstance(d, dict):
        raise ArchSpecError(f"{where}: expected an object, got {d!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ArchSpecError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    try:
        return cls(**d)
    except TypeError as e:
        raise ArchSpecError(f"{where}: {e}") from e


def total_stride(spec: ArchSpec) -> int:
    """Product of all strides (input_size / final_size for exact divisions)."""
    return spec.stem.s * math.prod(b.s for b in spec.blocks)
