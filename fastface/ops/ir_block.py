"""A whole inverted-residual block (BN folded) as one op, for G same-shaped branches at once.

    ir_block(x, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj, stride, residual, groups)

Branch g owns channel slice g of x, of every weight and of the output, so the RGB and depth
branches of a split network run as one launch (the branch is just another group):
    h = relu6(conv1x1(x, w_expand) + b_expand)      (skipped when w_expand is None: t = 1)
    h = relu6(depthwise_kxk(h, w_dw, stride, padding k // 2) + b_dw)
    y = conv1x1(h, w_proj) + b_proj  (+ x if residual)
Shapes: x N x (G*Cin) x H x W; w_expand (G*Ce) x Cin; w_dw (G*Ce) x k x k; w_proj (G*Cout) x Ce;
biases one per output channel. The output keeps x's memory layout (channels_last stays so).

`ir_block_reference` below defines the semantics every backend is tested against. The
gradient of the op recomputes the expanded tensors from x in backward instead of storing
them (`ir_block_backward_reference`).

Weight layout: any strides are accepted. The C++ CPU kernel (csrc/cpu/ir_block.cpp) reads
w_expand and w_proj transposed and w_dw channel-last; passing them as views of tensors already
in that layout (`pack_ir_weights`) skips its per-call packing copy, which is what the model
does with its cached folded weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fastface._ext import HAS_EXT, has_op
from fastface.ops._common import like_input
from fastface.ops.dispatch import FusedOp, forced_backend, triton_reasons

OP = "fastface::ir_block"


def _signature(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return (tuple(a.shape), a.dtype, a.device)
    return a


@dataclass
class MemoFusedOp(FusedOp):
    """A FusedOp that remembers its backend choice per call signature.

    The support checks only read shapes, dtypes, devices and scalar arguments, so the choice is
    cached under those (plus the forced backend and TRITON_INTERPRET): a network's forward
    then pays a dict lookup per op instead of ~60 us of Python checks (measured per block at
    batch 1, where a whole block runs in ~50 us). Failed selections are not cached: they raise.
    """

    _memo: dict = field(default_factory=dict, repr=False)

    def register(self, backend, supports):
        """As FusedOp.register; forgets remembered choices."""
        self._memo.clear()
        return super().register(backend, supports)

    def select(self, *args: Any, **kwargs: Any) -> str:
        """The backend that would run this call (remembered per signature)."""
        if kwargs or torch.compiler.is_compiling():
            return super().select(*args, **kwargs)
        key = (forced_backend(), os.environ.get("TRITON_INTERPRET"), *map(_signature, args))
        try:
            return self._memo[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable argument: nothing to remember
            return super().select(*args)
        choice = super().select(*args)
        if len(self._memo) > 4096:
            self._memo.clear()
        self._memo[key] = choice
        return choice


def ir_block_reference(x: torch.Tensor, w_expand: torch.Tensor | None, b_expand: torch.Tensor | None,
                       w_dw: torch.Tensor, b_dw: torch.Tensor, w_proj: torch.Tensor, b_proj: torch.Tensor,
                       stride: int, residual: bool, groups: int) -> torch.Tensor:
    """Plain PyTorch: grouped 1x1 conv + ReLU6, depthwise conv + ReLU6, grouped 1x1 conv (+ x)."""
    h = x
    if w_expand is not None:
        h = F.relu6(F.conv2d(h, w_expand[:, :, None, None], b_expand, groups=groups))
    k = w_dw.shape[-1]
    h = F.relu6(F.conv2d(h, w_dw[:, None], b_dw, stride=stride, padding=k // 2, groups=w_dw.shape[0]))
    y = F.conv2d(h, w_proj[:, :, None, None], b_proj, groups=groups)
    return x + y if residual else y


def ir_block_out_shape(x: torch.Tensor, w_dw: torch.Tensor, w_proj: torch.Tensor, stride: int) -> tuple[int, ...]:
    """N x (G*Cout) x OH x OW of the block's output."""
    k = w_dw.shape[-1]
    p = k // 2
    return (x.shape[0], w_proj.shape[0], (x.shape[2] + 2 * p - k) // stride + 1, (x.shape[3] + 2 * p - k) // stride + 1)


def pack_ir_weights(w_expand: torch.Tensor | None, w_dw: torch.Tensor, w_proj: torch.Tensor
                    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The same weights (same shapes and values) as views in the C++ kernel's native layout."""
    we = w_expand.t().contiguous().t() if w_expand is not None else None
    return we, w_dw.permute(1, 2, 0).contiguous().permute(2, 0, 1), w_proj.t().contiguous().t()


def ir_block_problems(x, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj, stride, residual, groups) -> list[str]:
    """What is wrong with these arguments (an empty list: nothing); every backend checks these."""
    why = []
    if groups < 1:
        return [f"groups must be >= 1, got {groups}"]
    if x.dim() != 4:
        return [f"x must be N x C x H x W, got shape {tuple(x.shape)}"]
    if (w_expand is None) != (b_expand is None):
        why.append("w_expand and b_expand must both be given or both be None")
    if x.shape[1] % groups:
        why.append(f"x has {x.shape[1]} channels, not a multiple of groups={groups}")
    cin = x.shape[1] // groups
    if w_dw.dim() != 3 or w_dw.shape[1] != w_dw.shape[2] or w_dw.shape[1] % 2 == 0:
        why.append(f"w_dw must be (G*Ce) x k x k with odd k, got {tuple(w_dw.shape)}")
    ce_total = w_dw.shape[0]
    if ce_total % groups:
        why.append(f"w_dw has {ce_total} channels, not a multiple of groups={groups}")
    ce = ce_total // groups
    if w_expand is not None:
        if tuple(w_expand.shape) != (ce_total, cin):
            why.append(f"w_expand must be {(ce_total, cin)}, got {tuple(w_expand.shape)}")
        if b_expand is not None and tuple(b_expand.shape) != (ce_total,):
            why.append(f"b_expand must be ({ce_total},), got {tuple(b_expand.shape)}")
    elif ce != cin:
        why.append(f"without an expand conv the depthwise stage needs Ce == Cin, got {ce} and {cin}")
    if tuple(b_dw.shape) != (ce_total,):
        why.append(f"b_dw must be ({ce_total},), got {tuple(b_dw.shape)}")
    if w_proj.dim() != 2 or w_proj.shape[1] != ce or w_proj.shape[0] % groups:
        why.append(f"w_proj must be (G*Cout) x {ce}, got {tuple(w_proj.shape)}")
    elif tuple(b_proj.shape) != (w_proj.shape[0],):
        why.append(f"b_proj must be ({w_proj.shape[0]},), got {tuple(b_proj.shape)}")
    if stride not in (1, 2):
        why.append(f"stride must be 1 or 2, got {stride}")
    if residual and (stride != 1 or w_proj.shape[0] != x.shape[1]):
        why.append(f"residual needs stride 1 and Cout == Cin, got stride {stride}, {w_proj.shape[0]} vs {x.shape[1]}")
    tensors = [t for t in (x, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj) if t is not None]
    if len({t.dtype for t in tensors}) != 1:
        why.append(f"dtypes differ: {sorted({str(t.dtype) for t in tensors})}")
    if len({t.device for t in tensors}) != 1:
        why.append(f"tensors on several devices: {sorted({str(t.device) for t in tensors})}")
    return why


def ir_block_backward_reference(grad: torch.Tensor, inputs: tuple, needs: tuple[bool, ...]) -> tuple:
    """Gradients of ir_block w.r.t. its tensor inputs, recomputing the block from x (nothing stored)."""
    x, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj, stride, residual, groups = inputs
    tensors = (x, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(tensors, needs)]
        y = ir_block_reference(*leaves, stride, residual, groups)
        wanted = [t for t, n in zip(leaves, needs) if t is not None and n]
        got = iter(torch.autograd.grad(y, wanted, grad) if wanted else ())
    return tuple(next(got) if t is not None and n else None for t, n in zip(leaves, needs))


_KERNELS: dict[tuple[str, str], bool] = {}


@torch.compiler.assume_constant_result
def kernel_for(op: str, key: str) -> bool:
    """Whether the extension registered a kernel for `op` (e.g. "fastface::ir_block") under dispatch key `key`."""
    # Registrations happen when fastface._C is imported, before any call: cache the answer. Under
    # torch.compile the answer is a constant (the dispatcher query returns a bool, which dynamo
    # cannot put in a graph: it broke the graph at every block and hit the recompile limit).
    hit = _KERNELS.get((op, key))
    if hit is None:
        name = op.split("::")[1]
        hit = _KERNELS[(op, key)] = has_op(name) and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    return hit


if has_op("ir_block"):

    @torch.library.register_fake(OP)
    def _ir_block_fake(x, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj, stride, residual, groups):
        return like_input(x.new_empty(ir_block_out_shape(x, w_dw, w_proj, stride)), x)

    def _setup_context(ctx, inputs, output):
        tensors = inputs[:7]
        ctx.save_for_backward(*[t if t is not None else None for t in tensors])
        ctx.scalars = inputs[7:]

    def _backward(ctx, grad):
        saved = ctx.saved_tensors
        grads = ir_block_backward_reference(grad, (*saved, *ctx.scalars), ctx.needs_input_grad[:7])
        return (*grads, None, None, None)

    torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


def extension_reasons(name: str, ops: tuple[str, ...], key: str, device_type: str, dtypes: tuple[torch.dtype, ...],
                      x: torch.Tensor) -> list[str]:
    """Why the extension's `key` kernels of `ops` (those of fused op `name`) cannot take x; empty: they can."""
    why = []
    if not HAS_EXT:
        from fastface._ext import EXT_ERROR

        why.append(f"extension not loaded ({EXT_ERROR})")
    elif not all(kernel_for(op, key) for op in ops):
        why.append(f"extension has no {key} kernel for {name}")
    if x.device.type != device_type:
        why.append(f"tensor on {x.device}, not {device_type}")
    if x.dtype not in dtypes:
        why.append(f"dtype {x.dtype} ({'/'.join(str(d).replace('torch.', '') for d in dtypes)} only)")
    return why


def triton_kernel_reasons(problems: list[str], x: torch.Tensor, name: str) -> list[str]:
    """Why fastface.kernels.<name> should not run on x, after the op's own argument `problems`; empty: it can."""
    why = problems + triton_reasons(x)
    why = why or interpreter_reasons(x)
    if not why:
        import importlib.util

        if importlib.util.find_spec(f"fastface.kernels.{name}") is None:
            why.append(f"fastface.kernels has no {name} kernel")
    return why


def _ext_reasons(key: str, device_type: str, dtypes: tuple[torch.dtype, ...]):
    def reasons(x, *rest) -> list[str]:
        why = ir_block_problems(x, *rest) + extension_reasons("ir_block", (OP,), key, device_type, dtypes, x)
        if device_type == "cuda":
            if rest[2].shape[-1] > 7:  # kMaxK in csrc/cuda/ir_block.cu (strides: ir_block_problems)
                why.append(f"kernel size {rest[2].shape[-1]} (CUDA kernel: at most 7)")
        return why

    return reasons


def interpreter_reasons(x: torch.Tensor) -> list[str]:
    """Why Triton should not run on CPU tensors unless forced: TRITON_INTERPRET is for testing
    kernels (numpy, ~1000x slower than the C++ kernels), not for automatic selection."""
    if not x.is_cuda and forced_backend() != "triton":
        return ["CPU tensors run the Triton interpreter only when forced (FASTFACE_BACKEND=triton)"]
    return []


def _triton_reasons(x, *rest) -> list[str]:
    return triton_kernel_reasons(ir_block_problems(x, *rest), x, "ir_block")


ir_block = MemoFusedOp("ir_block")
ir_block.__doc__ = ("Fused inverted-residual block, BN folded, G branches at once: ir_block(x, w_expand, b_expand, "
                    "w_dw, b_dw, w_proj, b_proj, stride, residual, groups).")


@ir_block.register("cuda", _ext_reasons("CUDA", "cuda", (torch.float32, torch.float16, torch.bfloat16)))
@ir_block.register("cpp", _ext_reasons("CPU", "cpu", (torch.float32, torch.float64)))
def _ir_block_ext(x, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj, stride, residual, groups):
    return torch.ops.fastface.ir_block.default(x, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj, stride, residual,
                                               groups)


@ir_block.register("triton", _triton_reasons)
def _ir_block_triton(x, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj, stride, residual, groups):
    from fastface.kernels.ir_block import ir_block_triton

    # The Triton kernel indexes weights as contiguous tensors; a caller may hold the C++ kernel's
    # packed (transposed) views, which need this copy (contiguous weights pass through as they are).
    def c(t):
        return t.contiguous() if t is not None else None

    return ir_block_triton(x, c(w_expand), c(b_expand), c(w_dw), c(b_dw), c(w_proj), c(b_proj), stride, residual,
                           groups)


ir_block.register("reference", ir_block_problems)(ir_block_reference)
