"""ONNX export with a dynamic batch axis, checked against PyTorch with onnxruntime."""
from __future__ import annotations

import os

import numpy as np
import torch

from fastface.ops import use_backend


def export_onnx(model: torch.nn.Module, path: str, input_size: int | None = None, opset: int = 17,
                check: bool = True, atol: float = 1e-4) -> float | None:
    """Write model to ONNX (dynamic batch); with check, return onnxruntime's max abs deviation.

    Fused fastface ops have no ONNX form: the export traces the reference backend, which
    computes the same function with standard operators.
    """
    spec = getattr(model, "spec", None)
    size = input_size or (spec.input_size if spec is not None else 112)
    cin = spec.in_channels if spec is not None else 3
    was = model.training
    model = model.eval()
    p = next(model.parameters())
    x = torch.randn(2, cin, size, size, device=p.device, dtype=p.dtype)
    tmp = path + ".tmp"
    try:
        with use_backend("reference"), torch.no_grad():
            torch.onnx.export(model, (x,), tmp, input_names=["input"], output_names=["embedding"],
                              dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        model.train(was)
    if not check:
        return None
    return check_onnx(model, path, input_size=size, atol=atol)


@torch.no_grad()
def check_onnx(model: torch.nn.Module, path: str, input_size: int, batch: int = 3, atol: float = 1e-4) -> float:
    """Max abs difference between onnxruntime and PyTorch at a batch size unseen at export."""
    import onnxruntime as ort

    spec = getattr(model, "spec", None)
    cin = spec.in_channels if spec is not None else 3
    was = model.training
    model.eval()
    try:
        x = torch.randn(batch, cin, input_size, input_size)
        ref = model(x.to(next(model.parameters()))).float().cpu().numpy()
    finally:
        model.train(was)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    err = float(np.abs(out - ref).max())
    if err > atol * max(1.0, float(np.abs(ref).max())):
        raise AssertionError(f"ONNX export {path}: onnxruntime differs from PyTorch by {err:.3e}")
    return err
