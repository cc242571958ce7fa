"""Models built from an ArchSpec: MobileNetV2 with split branches, replicate / re-split operators."""
from __future__ import annotations

from typing import Any, Callable

from fastface.arch import ArchSpec
from fastface.models.mobilenetv2 import (
    ConcatMerge, ConvBNAct, InvertedResidual, MobileNetV2, build_model, folded_eval, fused_train, layer_modules, replicate,
    resplit, split,
    transfer_weights,
)
from fastface.models.frozen import FrozenMobileNetV2, freeze

_REGISTRY: dict[str, Callable[..., ArchSpec]] = {}


def register_spec(name: str) -> Callable[[Callable[..., ArchSpec]], Callable[..., ArchSpec]]:
    """Decorator: make a spec factory available to create_model / spec_by_name under `name`."""
    def deco(fn: Callable[..., ArchSpec]) -> Callable[..., ArchSpec]:
        _REGISTRY[name] = fn
        return fn
    return deco


register_spec("mobilenetv2")(ArchSpec.mobilenetv2)
register_spec("mobilenetv2_face")(ArchSpec.face)
register_spec("mobilenetv2_face_rgb")(lambda **kw: ArchSpec.face(inputs={"rgb": 3}, **kw))


def spec_by_name(name: str, **kwargs: Any) -> ArchSpec:
    """A registered preset spec (e.g. "mobilenetv2_face", split=1)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def create_model(name: str, **kwargs: Any) -> MobileNetV2:
    """timm-style: build a registered preset by name."""
    return build_model(spec_by_name(name, **kwargs))


def list_models() -> list[str]:
    """Names of the registered presets."""
    return sorted(_REGISTRY)


__all__ = [
    "ConcatMerge", "ConvBNAct", "FrozenMobileNetV2", "InvertedResidual", "MobileNetV2", "build_model", "create_model",
    "folded_eval", "freeze", "fused_train",
    "layer_modules",
    "list_models", "register_spec", "replicate", "resplit", "spec_by_name", "split", "transfer_weights",
]
