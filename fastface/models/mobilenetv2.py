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

Fused paths (fastface.ops; each computes the same function as the plain modules, to rounding):
- eval (`folded_eval`, on by default): BN is folded into the convs; an inverted-residual block
  is one `ir_block` call, a ConvBNAct one conv. Folded weights are cached (in the packed layout
  of the C++ kernel on the CPU) and recomputed when a parameter or BN buffer changes (version
  counters), on train()/eval() and on .to(); never cached while autograd records or tracing.
  Writes through `.data` bypass version counters: call .eval() again after such a write.
- training (`fused_train`, on by default), eager CPU: every ConvBNAct's BN (batch statistics) and
  activation run as one `bn_act` call after ATen's conv, with the inverted-residual add (project
  BN + x) and the split stems' "add" merge (bn_1(z_1) + bn_2(z_2), then ReLU6: a chain of bn_act
  calls, no stacked copy) folded into the same calls; running statistics updated as
  nn.BatchNorm2d does. A block's expand BN + ReLU6 is folded into its 3x3 depthwise conv instead
  (`BNActDwConvFunction`: the expanded activation is never stored; on maps where it pays, with
  the expand conv too, `ExpandDwConvFunction`: the BN's statistics and backward from the 1x1
  conv's algebra, no pass over the expanded map), other depthwise convs run
  `DwConvFunction` (fastface's C++ kernels where they were measured faster); the depthwise BN +
  ReLU6 after any of them is `DwBNActFunction` where the C++ forward runs (its batch statistics reduced
  by the conv as it writes its output: one pass over that output instead of two), and a GDC head's
  global depthwise conv is one weighted sum per channel. Channels_last tensors only (NCHW: the
  plain modules).
- training elsewhere (GPU, torch.compile, or `cpu_bn_act(False)`): a depthwise ConvBNAct whose BN
  is in training mode runs `dwconv_bn_act` (conv + batch-statistics BN + ReLU6 in one op whose
  backward recomputes the conv); the other layers are the plain modules (inductor fuses them).
- on a CUDA device the model keeps cuDNN (folded convs in eval, the plain modules in training):
  fastface's CUDA and Triton kernels were measured slower there (`gpu_kernels_pay`,
  bench/results/gpu_check_NVIDIA-H200.md). FASTFACE_BACKEND=cuda|triton (or
  fastface.ops.use_backend) makes the model use them.
- split networks: the per-modality copies of layers 1 .. split-1 (same shapes by construction)
  run as one grouped call per layer (branch = group): `ir_block(groups=G)` in eval, grouped
  1x1 convs + one `dwconv_bn_act` over the concatenated channels in training (eager CPU: grouped
  convs, each followed by one `bn_act` over the concatenated channels, the expand BN folded into
  the depthwise conv as above). In eval the
  branch stems are one conv too (block-diagonal weight; for split = 1 with the "add" merge,
  the summed stems are exactly one stem conv).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastface._ext import has_op
from fastface.arch import ArchSpec, LayerInfo
from fastface.models.heads import GDCHead, PoolHead, make_head
from fastface.ops import (bn_act, bn_add_act, conv_bias_act, dwconv_bn_act, ir_block, pack_conv_weight, pack_ir_weights,
                          stems_bn_add_act)
from fastface.ops.dispatch import forced_backend
from fastface.ops.dwconv_train import (BNActDwConvFunction, DwBNActFunction, DwConvFunction, bn_act_dwconv_pays,
                                       dw_bn_act_problems, dwconv_forward_pays, dwconv_kernel_problems)
from fastface.ops.conv1x1 import conv1x1
from fastface.ops.expand_dwconv import ExpandDwConvFunction, expand_dwconv_pays, expand_dwconv_problems


_FOLDED_EVAL = [True]
_FUSED_TRAIN = [True]
_CPU_BN_ACT = [True]


@contextlib.contextmanager
def folded_eval(enabled: bool) -> Iterator[None]:
    """Turn the folded-BN fast path (fused blocks, folded convs) in eval mode on or off inside the block."""
    _FOLDED_EVAL.append(enabled)
    try:
        yield
    finally:
        _FOLDED_EVAL.pop()


@contextlib.contextmanager
def fused_train(enabled: bool) -> Iterator[None]:
    """Turn the fused training path (dwconv_bn_act, grouped branches) on or off inside the block."""
    _FUSED_TRAIN.append(enabled)
    try:
        yield
    finally:
        _FUSED_TRAIN.pop()


@contextlib.contextmanager
def cpu_bn_act(enabled: bool) -> Iterator[None]:
    """Inside the block, whether the fused training path on eager CPU runs bn_act after ATen's convs (on, the
    default: measured fastest) or the GPU's choice (dwconv_bn_act for depthwise stages; for tests)."""
    _CPU_BN_ACT.append(enabled)
    try:
        yield
    finally:
        _CPU_BN_ACT.pop()


def _cached(module: nn.Module, slot: str, tensors: Sequence[torch.Tensor], make: Callable[[], Any]) -> Any:
    """make(), remembered on `module` until one of `tensors` changes (data pointer or version)."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return make()  # autograd must see the folding; a trace must record it
    key = tuple((t.data_ptr(), t._version) for t in tensors)
    cache = module.__dict__.setdefault("_fold_cache", {})
    hit = cache.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = make()
    cache[slot] = (key, value)
    return value


class _FoldCacheOwner(nn.Module):
    """Drops cached folded weights on train()/eval() and device or dtype moves."""

    def train(self, mode: bool = True):
        self.__dict__.pop("_fold_cache", None)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_fold_cache", None)
        return super()._apply(fn, *args, **kwargs)


def _bn_tensors(bn: nn.Module) -> list[torch.Tensor]:
    # Straight from the module dicts: nn.Module.__getattr__ costs ~1 us a lookup, and the
    # eval fast path checks these on every call (a 7x7 block runs in ~40 us at batch 1).
    p, b = bn._parameters, bn._buffers
    return [p["weight"], p["bias"], b["running_mean"], b["running_var"]]


def _convbn_tensors(m: nn.Module) -> list[torch.Tensor]:
    mods = m._modules
    return [mods["conv"]._parameters["weight"], *_bn_tensors(mods["bn"])]


def _bn_folds(bn: nn.BatchNorm2d) -> bool:
    """True if BN is an affine map of its input (eval mode with running statistics)."""
    return not bn.training and bn.running_mean is not None and bn.affine


def _bn_trains(bn: nn.BatchNorm2d) -> bool:
    """True if BN normalises with batch statistics (what dwconv_bn_act computes)."""
    return bn.affine and (bn.training or bn.running_mean is None)


def _update_running_stats(bns: Sequence[nn.BatchNorm2d], mean: torch.Tensor, invstd: torch.Tensor, count: int) -> None:
    """Running statistics of consecutive channel slices, updated as nn.BatchNorm2d does (running = (1 - f) running
    + f batch, the variance unbiased). Few ops per BN: this runs ~50 times a training step."""
    with torch.no_grad():
        inv_sq = None
        off = 0
        cpp = mean.device.type == "cpu" and has_op("bn_update_running") and not torch.compiler.is_compiling()
        if cpp:
            mean, invstd = mean.contiguous(), invstd.contiguous()
        for bn in bns:
            c = bn.num_features
            if bn.track_running_stats and bn.running_mean is not None:
                rm, rv = bn.running_mean, bn.running_var
                if cpp and rm.device.type == "cpu":
                    # One call instead of a dozen tiny ops (their dispatch was ~2 % of a step on 2 threads).
                    momentum = -1.0 if bn.momentum is None else bn.momentum  # < 0: nn's None, a cumulative average
                    torch.ops.fastface.bn_update_running(rm, rv, bn.num_batches_tracked, mean, invstd, off, bn.eps,
                                                         count / (count - 1), momentum)
                else:
                    bn.num_batches_tracked.add_(1)
                    f = bn.momentum if bn.momentum is not None else bn.num_batches_tracked.to(rm.dtype).reciprocal()
                    if inv_sq is None:  # biased variance + eps of every slice, from invstd = 1/sqrt(var + eps), float64
                        inv_sq = invstd.double().pow(-2)
                    one = len(bns) == 1
                    var = (inv_sq if one else inv_sq[off:off + c]) - bn.eps
                    rm.lerp_((mean if one else mean[off:off + c]).to(rm.dtype), f)
                    rv.lerp_(var.clamp_min_(0).mul_(count / (count - 1)).to(rv.dtype), f)
            off += c


def gpu_kernels_pay(x: torch.Tensor) -> bool:
    """Whether fastface's fused kernels (ir_block, dwconv_bn_act) should run on x's device rather than cuDNN's modules.

    Measured on an H200 at batch 64 (bench/gpu_check.sh, bench/results/gpu_check_NVIDIA-H200.md):
    the fused inverted-residual block ran at 0.02-0.7x eager cuDNN on most face blocks (CUDA and
    Triton alike; up to 1.3-2.6x only on a few stride-2 and grouped shapes), the depthwise conv +
    BN + ReLU6 training op at 0.13-0.86x on inputs of 14 x 14 and more, and on 7 x 7 x 960 between
    0.65x and 2.2x over two runs: nowhere a dependable win, so a CUDA device keeps cuDNN unless a
    GPU backend is forced (FASTFACE_BACKEND=cuda|triton or fastface.ops.use_backend). True off CUDA
    (the CPU paths have their own measured routing).
    """
    return x.device.type != "cuda" or forced_backend() in ("cuda", "triton")


def _fused_input(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused training kernels take x as it comes: same dtype as the weights, no autocast,
    and not a CUDA device where cuDNN is faster (gpu_kernels_pay).

    Under autocast the plain modules run the convolutions in the low precision (the fused kernels
    are fp32/fp64 on the CPU and would change the numerics), so the plain path is kept there.
    """
    return x.dtype == weight.dtype and not torch.is_autocast_enabled(x.device.type) and gpu_kernels_pay(x)


def _check_batch(shape: Sequence[int]) -> int:
    # The same check (and message) as F.batch_norm in training.
    count = shape[0] * shape[2] * shape[3]
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(shape)}")
    return count


def _eager_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the training BN layers after this input run fastface.ops.bn_act (eager CPU).

    On the CPU in eager mode the convolutions stay ATen's (oneDNN) and every BatchNorm (batch
    statistics) + residual add + ReLU6 that follows one runs as one bn_act call: measured faster
    than both the plain modules and dwconv_bn_act (bench/test_bench_train.py, fastface_fused vs
    fastface_unfused). Under torch.compile the plain modules stay (inductor fuses BN + ReLU6
    itself, and bn_act would be an opaque call to it); on a GPU the depthwise stage keeps
    dwconv_bn_act (CUDA/Triton kernels) and bn_act has no GPU kernel.
    """
    return (_CPU_BN_ACT[-1] and x.device.type == "cpu" and _fused_input(x, weight)
            and not torch.compiler.is_compiling())


def _affine(bns: Sequence[nn.BatchNorm2d]) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma, beta) of BNs over consecutive channel slices, concatenated (one BN's own, uncopied)."""
    if len(bns) == 1:
        return bns[0].weight, bns[0].bias
    return torch.cat([bn.weight for bn in bns]), torch.cat([bn.bias for bn in bns])


def _bn_act_train(bns: Sequence[nn.BatchNorm2d], z: torch.Tensor, residual: torch.Tensor | None,
                  relu6: bool) -> torch.Tensor:
    """act(BN(z) + residual) in training for BNs over consecutive channel slices of z (same eps and momentum),
    through fastface.ops.bn_act; the running statistics are updated as nn.BatchNorm2d does.

    z (and the residual) not channels_last: the plain modules (the kernel's fast layout is NHWC;
    ATen's NCHW batch norm is fast already).
    """
    cl = torch.channels_last  # (N x C x 1 x 1 maps count: their memory is the same matrix either way)
    if not (z.is_contiguous(memory_format=cl) and (residual is None or residual.is_contiguous(memory_format=cl))
            and z.dtype in (torch.float32, torch.float64)):
        y = bns[0](z) if len(bns) == 1 else _grouped_bn_train(bns, z)
        if residual is not None:
            y = y + residual
        return F.relu6(y) if relu6 else y
    bn0 = bns[0]
    count = _check_batch(z.shape)
    w, b = _affine(bns)
    y, mean, invstd = bn_act(z, w, b, residual, bn0.eps, relu6)
    if bn0.training:
        _update_running_stats(bns, mean, invstd, count)
    return y


def _update_each_running_stats(count: int, *bn_stats: tuple[nn.BatchNorm2d, torch.Tensor, torch.Tensor]) -> None:
    """Each training BN's running statistics from its own (mean, invstd): the BNs of an add merge, each over its own
    input."""
    for bn, mean, invstd in bn_stats:
        if bn.training:
            _update_running_stats([bn], mean, invstd, count)


def _bn_add_act_fuses(bns: Sequence[nn.BatchNorm2d], zs: Sequence[torch.Tensor]) -> bool:
    """Whether _bn_add_act_train takes these two BNs' inputs (channels_last float, one eps, one shape)."""
    cl = torch.channels_last
    return (bns[0].eps == bns[1].eps and zs[0].shape == zs[1].shape and zs[0].dtype == zs[1].dtype
            and zs[0].dtype in (torch.float32, torch.float64) and all(z.is_contiguous(memory_format=cl) for z in zs))


def _bn_add_act_train(bns: Sequence[nn.BatchNorm2d], zs: Sequence[torch.Tensor], relu6: bool) -> torch.Tensor:
    """act(bns[0](zs[0]) + bns[1](zs[1])) in training through fastface.ops.bn_add_act (neither BN's output
    stored); both BNs' running statistics updated as nn.BatchNorm2d does."""
    count = _check_batch(zs[0].shape)
    (a, b) = bns
    y, mean_b, invstd_b, mean_a, invstd_a = bn_add_act(zs[1], b.weight, b.bias, zs[0], a.weight, a.bias, a.eps, relu6)
    _update_each_running_stats(count, (a, mean_a, invstd_a), (b, mean_b, invstd_b))
    return y


def _stems_fuse(stems: Sequence[nn.Module], x: torch.Tensor) -> bool:
    """Whether _stems_bn_add_act_train computes these branch stems' add merge exactly: two 3x3 stems (padding 1, no
    bias, one stride) straight on the network input (which needs no gradient), one BN eps, float CPU tensors."""
    if len(stems) != 2 or x.requires_grad or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    for m in stems:
        c = m.conv
        if not (c.kernel_size == (3, 3) and c.padding == (1, 1) and c.dilation == (1, 1) and c.groups == 1
                and c.bias is None and c.padding_mode == "zeros" and c.weight.dtype == x.dtype
                and c.stride[0] == c.stride[1] == stems[0].conv.stride[0]
                and c.out_channels == stems[0].conv.out_channels):
            return False
    return stems[0].bn.eps == stems[1].bn.eps and sum(m.conv.in_channels for m in stems) == x.shape[1]


def _stems_bn_add_act_train(stems: Sequence["ConvBNAct"], x: torch.Tensor) -> torch.Tensor:
    """act(bn_a(conv_a(x_a)) + bn_b(conv_b(x_b))) for the two branch stems in training through
    fastface.ops.stems_bn_add_act (neither conv output stored, x read in its own layout: no split copies);
    both BNs' running statistics updated as nn.BatchNorm2d does."""
    a, b = stems
    y, mean_a, invstd_a, mean_b, invstd_b = stems_bn_add_act(
        x, a.conv.weight, a.bn.weight, a.bn.bias, b.conv.weight, b.bn.weight, b.bn.bias, a.conv.stride[0], a.bn.eps,
        isinstance(a.act, nn.ReLU6))
    count = _check_batch(y.shape)
    _update_each_running_stats(count, (a.bn, mean_a, invstd_a), (b.bn, mean_b, invstd_b))
    return y


class ConvBNAct(_FoldCacheOwner):
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
        if self.training:
            if _FUSED_TRAIN[-1] and self._bn_act_fuses() and _eager_cpu(x, self.conv.weight):
                return self.forward_bn_act(x)
            if _FUSED_TRAIN[-1] and self._fuses_dw() and _fused_input(x, self.conv.weight):
                return self.forward_fused(x)
        elif (_FOLDED_EVAL[-1] and _bn_folds(self.bn) and isinstance(self.act, (nn.ReLU6, nn.Identity))
              and self.conv.padding_mode == "zeros"):
            c = self.conv
            if c.groups == 1 and _plain_geometry(c):
                # Dense convs (the stem, the last 1x1): one conv_bias_act, on the fused blocks' threads.
                w, b = _cached(self, "folded_packed", _convbn_tensors(self), lambda: _packed(self.folded()))
                return conv_bias_act(x, w, b, c.stride[0], c.padding[0], 1, isinstance(self.act, nn.ReLU6))
            w, b = _cached(self, "folded", _convbn_tensors(self), self.folded)
            y = F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)
            # In place: y is this call's own temporary (and a conv's backward never reads its output).
            return F.relu6(y, inplace=True) if isinstance(self.act, nn.ReLU6) else y
        return self.act(self.bn(self.conv(x)))

    def _bn_act_fuses(self) -> bool:
        """Whether forward_bn_act computes this module's training forward exactly."""
        return _bn_trains(self.bn) and isinstance(self.act, (nn.ReLU6, nn.Identity))

    def forward_bn_act(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """act(bn(conv(x)) [+ residual]) in training: the conv, then fastface.ops.bn_act (BN with batch
        statistics, the residual add and ReLU6 in one op; running statistics updated as nn.BatchNorm2d).
        A channels_last depthwise conv takes its gradients from DwConvFunction (fastface's one-pass C++
        backward where it pays)."""
        c = self.conv
        relu6 = isinstance(self.act, nn.ReLU6)
        if c.groups == c.in_channels == c.out_channels and residual is None:
            return _dw_bn_act_train(x, c.weight, c, [self.bn], relu6)
        if c.groups == c.in_channels == c.out_channels:
            z = _depthwise(x, c.weight, c)
        elif _is_pointwise(c):
            z = conv1x1(x, c.weight)
        else:
            z = c(x)
        return _bn_act_train([self.bn], z, residual, relu6)

    def _fuses_dw(self) -> bool:
        """Whether forward_fused computes this module's training forward exactly."""
        c, k = self.conv, self.conv.kernel_size[0]
        return (c.groups == c.in_channels == c.out_channels and c.bias is None and c.kernel_size == (k, k)
                and k % 2 == 1 and c.padding == (k // 2, k // 2) and c.dilation == (1, 1)
                and c.stride[0] == c.stride[1] and c.padding_mode == "zeros" and _bn_trains(self.bn)
                and isinstance(self.act, (nn.ReLU6, nn.Identity)))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward of a depthwise conv + BN (batch statistics) + act through fastface.ops.dwconv_bn_act."""
        bn = self.bn
        count = _check_batch((x.shape[0], x.shape[1], *_out_hw(x, self.conv)))
        y, mean, invstd = dwconv_bn_act(x, self.conv.weight[:, 0], bn.weight, bn.bias, self.conv.stride[0], bn.eps,
                                        isinstance(self.act, nn.ReLU6))
        if bn.training:
            _update_running_stats([bn], mean, invstd, count)
        return y

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the conv with the BN (running statistics) folded in."""
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        w = self.conv.weight * scale.reshape(-1, 1, 1, 1)
        return w, bn.bias - bn.running_mean * scale


def _is_pointwise(c: nn.Conv2d) -> bool:
    """Whether c is a plain 1x1 conv (groups 1, no bias, stride 1, zero padding): conv1x1's case."""
    return (c.kernel_size == (1, 1) and c.groups == 1 and c.bias is None and c.stride == (1, 1)
            and c.padding == (0, 0) and c.dilation == (1, 1))


def _pointwise(h: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped block's 1x1 conv in training: conv1x1 (fastface's one-pass backward where it pays) for one
    group, else F.conv2d."""
    return conv1x1(h, w) if groups == 1 else F.conv2d(h, w, None, 1, 0, 1, groups)


def _depthwise(x: torch.Tensor, weight: torch.Tensor, c: nn.Conv2d) -> torch.Tensor:
    """The depthwise conv `c` (its geometry; `weight` may be several branches' weights concatenated) on x in
    training: through DwConvFunction (fastface's one-pass backward) for channels_last input, else F.conv2d."""
    if (c.bias is None and c.dilation == (1, 1) and c.padding_mode == "zeros" and c.stride[0] == c.stride[1]
            and isinstance(c.padding, tuple) and c.padding[0] == c.padding[1]
            and x.is_contiguous(memory_format=torch.channels_last)):
        return DwConvFunction.apply(x, weight, c.stride[0], c.padding[0])
    if c.padding_mode == "zeros":
        return F.conv2d(x, weight, c.bias, c.stride, c.padding, c.dilation, x.shape[1])
    return c._conv_forward(x, weight, c.bias)  # its padding_mode (weight is then c's own)


def _dw_bn_act_train(x: torch.Tensor, weight: torch.Tensor, c: nn.Conv2d, dw_bns: Sequence[nn.BatchNorm2d],
                     relu6: bool) -> torch.Tensor:
    """act(BN_dw(depthwise conv c of x)) in training (weight: c's own or several branches' concatenated): under
    DwBNActFunction where it takes them (_dw_bn_act_fuses), else _depthwise then bn_act."""
    if _dw_bn_act_fuses(relu6, x, weight, c):
        return _stage_bn_act_train(DwConvFunction, (x, weight, c.stride[0], 1), None, 0, dw_bns)
    return _bn_act_train(dw_bns, _depthwise(x, weight, c), None, relu6)


def _dw_bn_act_fuses(relu6: bool, x: torch.Tensor, weight: torch.Tensor, c: nn.Conv2d) -> bool:
    """Whether DwBNActFunction takes a training BN + ReLU6 after DwConvFunction's conv `c` of x (channels_last,
    3 x 3, padding 1, stride 1 or 2, no bias, the C++ forward serving and paying on x: dwconv_forward_pays)."""
    return (relu6 and c.bias is None and c.dilation == (1, 1) and c.padding_mode == "zeros" and c.kernel_size == (3, 3)
            and c.padding == (1, 1) and c.stride[0] == c.stride[1] and not dw_bn_act_problems(x, weight, c.stride[0])
            and dwconv_forward_pays(x, c.stride[0]))


def _stage_bn_act_train(stage: type, inputs: tuple, stage_bns: Sequence[nn.BatchNorm2d] | None, stage_count: int,
                        dw_bns: Sequence[nn.BatchNorm2d]) -> torch.Tensor:
    """relu6(BN_dw(z)) in training through DwBNActFunction, z = stage(*inputs); the running statistics of the dw
    BNs, and of the stage's own BNs (stage_bns, over stage_count values a channel) when it has them, updated as
    nn.BatchNorm2d does."""
    g, b = _affine(dw_bns)
    y, mean, invstd, *stats = DwBNActFunction.apply(stage, g, b, dw_bns[0].eps, *inputs)
    if dw_bns[0].training:
        _update_running_stats(dw_bns, mean, invstd, _check_batch(y.shape))
    if stage_bns and stage_bns[0].training:
        _update_running_stats(stage_bns, stats[0], stats[1], stage_count)
    return y


def _stats_stage_train(stage: type, inputs: tuple, bns: Sequence[nn.BatchNorm2d], count: int,
                       dw_bns: Sequence[nn.BatchNorm2d], dw_relu6: bool, fuses: bool) -> torch.Tensor:
    """act(BN_dw(z)) for a stage with its own BNs' statistics (BNActDwConvFunction, ExpandDwConvFunction): under
    DwBNActFunction when `fuses`, else the stage then bn_act; running statistics of both as nn.BatchNorm2d."""
    if fuses:
        return _stage_bn_act_train(stage, inputs, bns, count, dw_bns)
    z, mean, invstd = stage.apply(*inputs)
    if bns[0].training:
        _update_running_stats(bns, mean, invstd, count)
    return _bn_act_train(dw_bns, z, None, dw_relu6)


def _act_dw_fuses(expand: "ConvBNAct", dw: "ConvBNAct", e: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether _bn_act_dwconv_train computes act(bn(e)) -> dw's conv exactly here: an expand BN (batch statistics)
    with ReLU6, a 3 x 3 depthwise conv (padding 1, stride 1 or 2, no bias; `weight` its own or several branches'
    concatenated), a channels_last CPU input the C++ kernels take, and a map where they pay (bn_act_dwconv_pays)."""
    return (_act_dw_modules_fuse(expand, dw) and e.is_contiguous(memory_format=torch.channels_last)
            and not dwconv_kernel_problems(e, weight, dw.conv.stride[0], 1) and bn_act_dwconv_pays(e, dw.conv.stride[0]))


def _act_dw_modules_fuse(expand: "ConvBNAct", dw: "ConvBNAct") -> bool:
    """The modules' half of _act_dw_fuses: an expand BN (batch statistics) with ReLU6 and a 3 x 3 depthwise conv
    (padding 1, square stride, no bias, no dilation)."""
    c = dw.conv
    return (expand._bn_act_fuses() and isinstance(expand.act, nn.ReLU6) and c.groups == c.in_channels == c.out_channels
            and c.bias is None and c.dilation == (1, 1) and c.padding_mode == "zeros" and c.kernel_size == (3, 3)
            and c.stride[0] == c.stride[1] and c.padding == (1, 1))


def _bn_act_dwconv_train(bns: Sequence[nn.BatchNorm2d], e: torch.Tensor, weight: torch.Tensor,
                         stride: int, dw_bns: Sequence[nn.BatchNorm2d], dw_relu6: bool) -> torch.Tensor:
    """act(BN_dw(dwconv3x3(relu6(BN(e))))) in training for BNs over consecutive channel slices of e, through
    BNActDwConvFunction (the activation never stored), under DwBNActFunction with the dw BNs (dw_bns) where it
    takes them; the running statistics updated as nn.BatchNorm2d does."""
    bn0 = bns[0]
    count = _check_batch(e.shape)
    g, b = _affine(bns)
    fuses = dw_relu6 and not dw_bn_act_problems(e, weight, stride)
    return _stats_stage_train(BNActDwConvFunction, (e, g, b, weight, stride, bn0.eps), bns, count, dw_bns, dw_relu6,
                              fuses)


def _expand_dw_fuses(expand: "ConvBNAct", dw: "ConvBNAct", x: torch.Tensor, w_expand: torch.Tensor,
                     weight: torch.Tensor, groups: int = 1) -> bool:
    """Whether _expand_dwconv_train computes dw's conv of act(bn(conv1x1(x, w_expand, groups))) exactly here and
    pays: expand's conv a plain 1x1 (no bias, stride 1), the conditions of _act_dw_fuses on its output, and a map
    where folding the BN into the conv's algebra beat BNActDwConvFunction (expand_dwconv_pays)."""
    c = expand.conv
    if not (c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0) and c.dilation == (1, 1)
            and c.bias is None and c.padding_mode == "zeros" and expand_dwconv_pays(x)
            and _act_dw_modules_fuse(expand, dw) and bn_act_dwconv_pays(x, dw.conv.stride[0])):
        return False
    return not expand_dwconv_problems(x, w_expand, groups, weight, dw.conv.stride[0])


def _expand_dwconv_train(bns: Sequence[nn.BatchNorm2d], x: torch.Tensor, w_expand: torch.Tensor, groups: int,
                         weight: torch.Tensor, stride: int, dw_bns: Sequence[nn.BatchNorm2d],
                         dw_relu6: bool) -> torch.Tensor:
    """act(BN_dw(dwconv3x3(relu6(BN(conv1x1(x)))))) in training through ExpandDwConvFunction (the BN's statistics
    and backward folded into the 1x1 conv's algebra, the activation never stored), under DwBNActFunction with the
    dw BNs where it takes them; running statistics as nn.BatchNorm2d."""
    bn0 = bns[0]
    count = _check_batch((x.shape[0], w_expand.shape[0], x.shape[2], x.shape[3]))
    g, b = _affine(bns)
    e_like = x.new_empty((1, w_expand.shape[0], 1, 1))  # e's channels, dtype and device (never computed here)
    fuses = dw_relu6 and not dw_bn_act_problems(e_like, weight, stride)
    return _stats_stage_train(ExpandDwConvFunction, (x, w_expand, groups, g, b, weight, stride, bn0.eps), bns, count,
                              dw_bns, dw_relu6, fuses)


def _plain_geometry(conv: nn.Conv2d) -> bool:
    """Square kernel and stride, the same padding on every side, no dilation: what conv_bias_act takes."""
    return (conv.kernel_size[0] == conv.kernel_size[1] and conv.stride[0] == conv.stride[1]
            and isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1]
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros")


def _packed(wb: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A folded (weight, bias) with the weight in conv_bias_act's CPU layout (unchanged elsewhere)."""
    w, b = wb
    return (pack_conv_weight(w) if w.device.type == "cpu" else w), b


def _out_hw(x: torch.Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return (x.shape[2] + 2 * p - k) // s + 1, (x.shape[3] + 2 * p - k) // s + 1


def _ir_weights(blocks: Sequence["InvertedResidual"], device: torch.device) -> tuple:
    """ir_block's weight arguments for same-shaped blocks run as groups (BN folded, branch g = slice g)."""
    def cat(ts):
        return ts[0] if len(ts) == 1 else torch.cat(ts, 0)

    we = be = None
    if blocks[0].expand is not None:
        folded = [b.expand.folded() for b in blocks]
        we, be = cat([w.flatten(1) for w, _ in folded]), cat([b for _, b in folded])
    folded = [b.dw.folded() for b in blocks]
    wd, bd = cat([w[:, 0] for w, _ in folded]), cat([b for _, b in folded])
    folded = [b.project.folded() for b in blocks]
    wp, bp = cat([w.flatten(1) for w, _ in folded]), cat([b for _, b in folded])
    if device.type == "cpu":
        # The C++ kernel's native layout: packed once here instead of on every call.
        we, wd, wp = pack_ir_weights(we, wd, wp)
    return we, be, wd, bd, wp, bp


def _block_tensors(blocks: Sequence["InvertedResidual"]) -> list[torch.Tensor]:
    out = []
    for b in blocks:
        for m in b._modules.values():
            if m is not None:
                out += _convbn_tensors(m)
    return out


def _blocks_fold(blocks: Sequence["InvertedResidual"]) -> bool:
    for b in blocks:
        if b.training:
            return False
        for m in b._modules.values():
            if m is not None and (m.training or not _bn_folds(m._modules["bn"])):
                return False
    return True


def _grouped_bn_train(bns: Sequence[nn.BatchNorm2d], h: torch.Tensor) -> torch.Tensor:
    """Training-mode BN of several same-configured BNs over their concatenated channels."""
    bn0 = bns[0]
    w, b = torch.cat([bn.weight for bn in bns]), torch.cat([bn.bias for bn in bns])
    if not (bn0.training and bn0.track_running_stats):
        return F.batch_norm(h, None, None, w, b, True, 0.0, bn0.eps)
    with torch.no_grad():
        for bn in bns:
            bn.num_batches_tracked.add_(1)
    f = bn0.momentum if bn0.momentum is not None else 1.0 / float(bn0.num_batches_tracked)
    rm, rv = torch.cat([bn.running_mean for bn in bns]), torch.cat([bn.running_var for bn in bns])
    y = F.batch_norm(h, rm, rv, w, b, True, f, bn0.eps)
    with torch.no_grad():
        off = 0
        for bn in bns:
            c = bn.num_features
            bn.running_mean.copy_(rm[off:off + c])
            bn.running_var.copy_(rv[off:off + c])
            off += c
    return y


def _groupable_bns(bns: Sequence[nn.BatchNorm2d]) -> bool:
    bn0 = bns[0]
    if not all(_bn_trains(bn) and bn.training == bn0.training and bn.eps == bn0.eps and bn.momentum == bn0.momentum
               and bn.track_running_stats == bn0.track_running_stats for bn in bns):
        return False
    # A cumulative average (momentum None) weights batches by count: the counts must agree.
    return bn0.momentum is not None or len({int(bn.num_batches_tracked) for bn in bns}) == 1


def _blocks_train_grouped(blocks: Sequence["InvertedResidual"]) -> bool:
    b0 = blocks[0]
    for b in blocks:
        if not (b.training and b.dw.training and b.dw._fuses_dw() and b.project.training):
            return False
        if not isinstance(b.project.act, nn.Identity) or (b.expand is not None and not isinstance(b.expand.act, nn.ReLU6)):
            return False
        if b.dw.conv.stride != b0.dw.conv.stride or isinstance(b.dw.act, nn.ReLU6) != isinstance(b0.dw.act, nn.ReLU6):
            return False
    return all(_groupable_bns([getattr(b, name).bn for b in blocks])
               for name in ("expand", "dw", "project") if getattr(b0, name) is not None)


def _grouped_block_train(blocks: Sequence["InvertedResidual"], x: torch.Tensor) -> torch.Tensor:
    """Training forward of G same-shaped blocks on their concatenated channels (branch g = slice g)."""
    g, b0 = len(blocks), blocks[0]
    if _eager_cpu(x, b0.project.conv.weight):
        return _grouped_block_train_bn_act(blocks, x)
    h = x
    if b0.expand is not None:
        w = torch.cat([b.expand.conv.weight for b in blocks])
        h = F.relu6(_grouped_bn_train([b.expand.bn for b in blocks], F.conv2d(h, w, None, 1, 0, 1, g)))
    dws = [b.dw for b in blocks]
    count = _check_batch((h.shape[0], h.shape[1], *_out_hw(h, b0.dw.conv)))
    h, mean, invstd = dwconv_bn_act(h, torch.cat([d.conv.weight[:, 0] for d in dws]),
                                    torch.cat([d.bn.weight for d in dws]), torch.cat([d.bn.bias for d in dws]),
                                    b0.dw.conv.stride[0], b0.dw.bn.eps, isinstance(b0.dw.act, nn.ReLU6))
    if b0.dw.bn.training:
        _update_running_stats([d.bn for d in dws], mean, invstd, count)
    w = torch.cat([b.project.conv.weight for b in blocks])
    y = _grouped_bn_train([b.project.bn for b in blocks], F.conv2d(h, w, None, 1, 0, 1, g))
    return x + y if b0.use_res else y


def _grouped_block_train_bn_act(blocks: Sequence["InvertedResidual"], x: torch.Tensor) -> torch.Tensor:
    """_grouped_block_train on eager CPU: grouped convs, each followed by one bn_act call."""
    g, b0 = len(blocks), blocks[0]
    h = x
    c = b0.dw.conv
    wd = torch.cat([b.dw.conv.weight for b in blocks])
    dw_bns, relu6 = [b.dw.bn for b in blocks], isinstance(b0.dw.act, nn.ReLU6)
    if b0.expand is not None:
        w = torch.cat([b.expand.conv.weight for b in blocks])
        ex_bns = [b.expand.bn for b in blocks]
        if _expand_dw_fuses(b0.expand, b0.dw, h, w, wd, g):
            h = _expand_dwconv_train(ex_bns, h, w, g, wd, c.stride[0], dw_bns, relu6)
        else:
            e = _pointwise(h, w, g)
            if _act_dw_fuses(b0.expand, b0.dw, e, wd):
                h = _bn_act_dwconv_train(ex_bns, e, wd, c.stride[0], dw_bns, relu6)
            else:
                h = _dw_bn_act_train(_bn_act_train(ex_bns, e, None, True), wd, c, dw_bns, relu6)
    else:
        h = _dw_bn_act_train(h, wd, c, dw_bns, relu6)
    w = torch.cat([b.project.conv.weight for b in blocks])
    return _bn_act_train([b.project.bn for b in blocks], _pointwise(h, w, g), x if b0.use_res else None, False)


class InvertedResidual(_FoldCacheOwner):
    """1x1 expand (if t != 1) -> k x k depthwise -> 1x1 linear project, + input when shapes match.

    In eval mode the BN layers are folded and the whole block runs as one fastface.ops.ir_block
    call (C++/Triton/CUDA kernels where available); in training the depthwise stage runs
    fastface.ops.dwconv_bn_act (see the module docstring).
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
        if not self.training and _FOLDED_EVAL[-1] and _blocks_fold([self]) and gpu_kernels_pay(x):
            return self.forward_folded(x)
        ex, dw = self.expand, self.dw
        if (self.training and ex is not None and ex.training and dw.training and _FUSED_TRAIN[-1]
                and dw._bn_act_fuses() and _eager_cpu(x, ex.conv.weight)):
            # Expand BN + ReLU6 folded into the depthwise conv's input: the activation is never stored.
            relu6 = isinstance(dw.act, nn.ReLU6)
            if _expand_dw_fuses(ex, dw, x, ex.conv.weight, dw.conv.weight):
                h = _expand_dwconv_train([ex.bn], x, ex.conv.weight, 1, dw.conv.weight, dw.conv.stride[0], [dw.bn],
                                         relu6)
            else:
                e = conv1x1(x, ex.conv.weight) if _is_pointwise(ex.conv) else ex.conv(x)
                if _act_dw_fuses(ex, dw, e, dw.conv.weight):
                    h = _bn_act_dwconv_train([ex.bn], e, dw.conv.weight, dw.conv.stride[0], [dw.bn], relu6)
                else:
                    h = dw(_bn_act_train([ex.bn], e, None, isinstance(ex.act, nn.ReLU6)) if ex._bn_act_fuses() else
                           ex.act(ex.bn(e)))
        else:
            h = self.expand(x) if ex is not None else x
            h = self.dw(h)
        p = self.project
        if (self.use_res and self.training and p.training and _FUSED_TRAIN[-1] and p._bn_act_fuses()
                and isinstance(p.act, nn.Identity) and _eager_cpu(h, p.conv.weight)):
            return p.forward_bn_act(h, x)  # bn(conv(h)) + x in one pass
        y = p(h)
        return x + y if self.use_res else y

    def forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """Inference with BN folded into the convs (the same function as forward in eval mode)."""
        args = _cached(self, "ir", _block_tensors([self]), lambda: _ir_weights([self], x.device))
        return ir_block(x, *args, self.stride, self.use_res, 1)

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
        return self.forward_cat(torch.cat(xs, 1))

    def forward_cat(self, x: torch.Tensor) -> torch.Tensor:
        """The merge of branch outputs already concatenated along channels."""
        return self.bn(self.conv(x))

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


class MobileNetV2(_FoldCacheOwner):
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
        if self.branches is not None and self._branches_grouped(x):
            x = self._grouped_branches(x)
        elif self.branches is not None:
            outs = []
            ins = []
            lasts = [self.branches[m][-1] for m in self.modalities]
            # The "add" merge of ConvBNAct branch ends (split = 1: the stems) in training on eager CPU:
            # act(bn_1(z_1) + ... + bn_G(z_G)) as a chain of bn_act calls (each adds the previous
            # sum as its residual, the last applies the act): no stacked copy, no separate sum.
            chain = (self.merge is None and self.training and _FUSED_TRAIN[-1] and _eager_cpu(x, lasts[0].conv.weight)
                     and all(isinstance(m, ConvBNAct) and m.training and m._bn_act_fuses() for m in lasts)
                     and all(type(m.act) is type(lasts[0].act) for m in lasts))
            # Two stems on the input of a channels_last model (stems_bn_add_act's output layout): one op, convs
            # included.
            if chain and self.spec.split == 1 and _stems_fuse(lasts, x) and self._nhwc(x):
                return self.last(self.trunk(_stems_bn_add_act_train(lasts, x)))
            for m, xm in zip(self.modalities, self._branch_inputs(x)):
                branch = self.branches[m]
                for layer in branch[:-1]:
                    xm = layer(xm)
                if chain:
                    ins.append(xm)
                else:
                    outs.append(branch[-1](xm) if self.merge is not None else branch[-1].preact(xm))
            if chain:
                zs = [m.conv(xm) for m, xm in zip(lasts, ins)]
                relu6 = isinstance(lasts[0].act, nn.ReLU6)
                if len(lasts) == 2 and _bn_add_act_fuses([m.bn for m in lasts], zs):
                    x = _bn_add_act_train([m.bn for m in lasts], zs, relu6)
                else:
                    x = None
                    for i, (m, z) in enumerate(zip(lasts, zs)):
                        x = _bn_act_train([m.bn], z, x, relu6 and i == len(lasts) - 1)
            elif self.merge is not None:
                x = self.merge(outs)
            else:
                # Summed before the last branch layer's activation: see fastface.arch.
                x = self.branches[self.modalities[0]][-1].act(_sum(outs))
        x = self.trunk(x)
        return self.last(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if not self.training and _FOLDED_EVAL[-1] and _head_folds(self.head, f):
            w, b = _cached(self, "head", _head_tensors(self.head), lambda: _fold_head(self.head))
            if isinstance(self.head, GDCHead):
                f = (f * w[0]).sum((2, 3))  # the global depthwise conv: one weighted sum per channel
            else:
                f = f.mean((2, 3))
            # The linear layer as a 1x1 conv on a 1x1 map: on the fused blocks' threads, no BLAS pool.
            return conv_bias_act(f[:, :, None, None], w[1], b, 1, 0, 1, False).flatten(1)
        if (self.training and _FUSED_TRAIN[-1] and isinstance(self.head, GDCHead) and self.head.gdc.bias is None
                and tuple(f.shape[-2:]) == tuple(self.head.gdc.kernel_size) and _eager_cpu(f, self.head.gdc.weight)):
            return _gdc_head_train(self.head, f)
        return self.head(f)

    def _branch_blocks(self, j: int) -> list[InvertedResidual]:
        return [self.branches[m][j] for m in self.modalities]

    @property
    def splits_input(self) -> bool:
        """Whether the input is split by modality into branches (which then take it in any memory format)."""
        return self.branches is not None

    def _branch_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x split into the branches' channels, each dense in the model's memory format (its stems' weights').

        A channel slice of a batch is strided in either layout, so a stem conv would copy it in the forward
        and again in the backward (its weight gradient); one copy here serves both, and from an NCHW batch
        it is the only conversion (the trainer leaves a splitting model's batch as the loader gives it).
        """
        fmt = torch.channels_last if self._nhwc(x) else torch.contiguous_format
        return [xm.contiguous(memory_format=fmt) for xm in torch.split(x, self.in_splits, dim=1)]

    def _nhwc(self, x: torch.Tensor) -> bool:
        """Whether a splitting model runs channels_last: the layout of a stem weight with more than one input channel
        (a 1-channel weight is both NCHW- and NHWC-contiguous); with none, the input's."""
        cl = torch.channels_last
        ws = [self.branches[m][0].conv.weight for m in self.modalities]
        wide = [w for w in ws if w.dim() == 4 and w.shape[1] > 1]
        return (wide[0].is_contiguous(memory_format=cl) and not wide[0].is_contiguous()) if wide else \
            (x.is_contiguous(memory_format=cl) and not x.is_contiguous())

    def _branches_grouped(self, x: torch.Tensor) -> bool:
        """Whether the branches run as grouped calls (see the module docstring)."""
        k = self.spec.split
        blocks = [self._branch_blocks(j) for j in range(1, k)]
        if not self.training:
            stems = [self.branches[m][0] for m in self.modalities]
            return (_FOLDED_EVAL[-1] and gpu_kernels_pay(x) and all(_blocks_fold(bs) for bs in blocks)
                    and all(not s.training and _bn_folds(s.bn) and s.conv.padding_mode == "zeros" for s in stems)
                    and len({type(s.act) for s in stems}) == 1 and isinstance(stems[0].act, (nn.ReLU6, nn.Identity)))
        return (k >= 2 and _FUSED_TRAIN[-1] and _fused_input(x, self.branches[self.modalities[0]][0].conv.weight)
                and all(_blocks_train_grouped(bs) for bs in blocks))

    def _stems_folded(self, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All branch stems as one conv over the stacked input (eval, BN folded).

        Block-diagonal weight (branch g's output channels see only modality g's input channels):
        the stems' outputs concatenated, in one call and without a concat copy. Also the
        input-channel concatenation with summed biases: the stems' pre-activations summed (the
        "add" merge right after the stems, split = 1), which is exactly the fused network's stem.
        """
        stems = [self.branches[m][0] for m in self.modalities]
        folded = [s.folded() for s in stems]
        w0 = folded[0][0]
        c0, cin, k = w0.shape[0], self.spec.in_channels, w0.shape[-1]
        block = w0.new_zeros((len(stems) * c0, cin, k, k))
        off = 0
        for g, ((w, _), c) in enumerate(zip(folded, self.in_splits)):
            block[g * c0:(g + 1) * c0, off:off + c] = w
            off += c
        summed = torch.cat([w for w, _ in folded], 1)
        fmt = torch.channels_last if stems[0].conv.weight.is_contiguous(memory_format=torch.channels_last) else None
        if packed and block.device.type == "cpu":  # conv_bias_act's layout (see ConvBNAct.forward)
            block, summed = pack_conv_weight(block), pack_conv_weight(summed)
        elif fmt is not None:  # keep the layout the convolution backends pick fast kernels for
            block, summed = block.contiguous(memory_format=fmt), summed.contiguous(memory_format=fmt)
        return block, torch.cat([b for _, b in folded]), summed, torch.stack([b for _, b in folded]).sum(0)

    def _grouped_branches(self, x: torch.Tensor) -> torch.Tensor:
        """Branches (stems, then grouped blocks) and the merge."""
        g = len(self.modalities)
        if self.training:
            h = torch.cat([self.branches[m][0](xm) for m, xm in zip(self.modalities, self._branch_inputs(x))], 1)
        else:
            stems = [self.branches[m][0] for m in self.modalities]
            wb, bb, ws, bs = _cached(self, "stems", [t for s in stems for t in _convbn_tensors(s)],
                                     lambda: self._stems_folded(packed=True))
            c = stems[0].conv
            relu6 = isinstance(stems[0].act, nn.ReLU6)
            if self.spec.split == 1 and self.merge is None:
                return conv_bias_act(x, ws, bs, c.stride[0], c.padding[0], 1, relu6)
            h = conv_bias_act(x, wb, bb, c.stride[0], c.padding[0], 1, relu6)
        for j in range(1, self.spec.split):
            blocks = self._branch_blocks(j)
            if self.training:
                h = _grouped_block_train(blocks, h)
            else:
                args = _cached(self, f"branch{j}", _block_tensors(blocks), lambda: _ir_weights(blocks, h.device))
                h = ir_block(h, *args, blocks[0].stride, blocks[0].use_res, g)
        if self.merge is not None:
            return self.merge.forward_cat(h)
        return self.branches[self.modalities[0]][-1].act(_sum(h.chunk(g, 1)))


def _sum(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """t_0 + t_1 + ... in order (what torch.stack(ts).sum(0) computes, without the stacked copy; the
    result keeps the inputs' memory layout, so a channels_last net stays channels_last)."""
    out = ts[0]
    for t in ts[1:]:
        out = out + t
    return out


def _gdc_head_train(head: GDCHead, f: torch.Tensor) -> torch.Tensor:
    """GDCHead's forward on a channels_last map in training, its global depthwise conv as one weighted sum per
    channel over the pixels (oneDNN's depthwise backward for a kernel the size of the map took ~2x longer)."""
    n, c, h, w = f.shape
    pixels = f.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view of the channels_last memory
    # The weight as a contiguous (h*w, c) matrix: with the transposed view the product's backward came out NCHW,
    # and the last BN's backward (bn_act) then copied f's gradient to channels_last (~1.2 ms a step at batch 64).
    g = (pixels * head.gdc.weight.reshape(c, h * w).t().contiguous()).sum(1)
    g = head.gdc_bn(g.reshape(n, c, 1, 1)).flatten(1)
    return head.bn(head.fc(head.dropout(g)))


def _head_folds(head: nn.Module, f: torch.Tensor) -> bool:
    """Whether the head is affine in eval (GDC or pooling, BNs with running statistics): foldable."""
    if head.training or not isinstance(head, (GDCHead, PoolHead)):
        return False
    if isinstance(head, GDCHead) and tuple(f.shape[-2:]) != tuple(head.gdc.kernel_size):
        return False  # the plain head decides what a mismatched feature map means (an error)
    bns = [head.bn] + ([head.gdc_bn] if isinstance(head, GDCHead) else [])
    return all(not bn.training and bn.running_mean is not None and bn.affine for bn in bns)


def _head_tensors(head: nn.Module) -> list[torch.Tensor]:
    out = [head.fc.weight, *_bn_tensors(head.bn)]
    if isinstance(head, GDCHead):
        out += [head.gdc.weight, *_bn_tensors(head.gdc_bn)]
    return out


def _fold_head(head: nn.Module) -> tuple[tuple[torch.Tensor | None, torch.Tensor], torch.Tensor]:
    """((gdc weight C x k x k or None, linear weight), bias) of the eval head: BN1d folded into the
    linear layer, the GDC's BN into both (bn(fc(s * z + t)) = (s2 W s) z + s2 (W t - mean) + beta)."""
    bn = head.bn
    s2 = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    w = head.fc.weight * s2[:, None]
    b = bn.bias - bn.running_mean * s2
    gdc = None
    if isinstance(head, GDCHead):
        g = head.gdc_bn
        s1 = g.weight * torch.rsqrt(g.running_var + g.eps)
        t1 = g.bias - g.running_mean * s1
        b = b + w @ t1
        w = w * s1[None, :]
        gdc = head.gdc.weight[:, 0]
    w = w[:, :, None, None]
    return (gdc, pack_conv_weight(w) if w.device.type == "cpu" else w), b


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

