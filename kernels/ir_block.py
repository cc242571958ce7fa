"""Fused inverted-residual block (BN folded), G same-shaped branches per launch, as a Triton kernel.

Semantics: fastface.ops.ir_block.ir_block_reference. One program computes one output tile
(TH x TW pixels of one image, one branch, a block of output channels) in one pass:

    for each chunk of BLOCK_CE expanded channels:
        E = relu6(x[halo] @ w_expand + b_expand)     tl.dot, [BLOCK_HP, BLOCK_CE], on chip
        D = relu6(sum_tap gather(E, tap) * w_dw + b)  [BLOCK_P, BLOCK_CE]
        acc += D @ w_proj                              tl.dot, [BLOCK_P, BLOCK_COUT]
    y = acc + b_proj (+ x)

The expanded tensor never leaves the chip. With `halo=True` (the default) the expand runs once
on the tile plus its depthwise halo and each tap reads it with tl.gather (lowered through shared
memory); the halo costs (BLOCK_HP / (TH*TW)) x the expand FLOPs, about 1.5-2x for 3x3 tiles picked
below. `halo=False` recomputes the expand for each of the k*k taps instead (k^2 x the expand
FLOPs, no gather): the fallback where tl.gather is unavailable or slow.

Works on both memory layouts through strides (tuned for channels_last, the training layout);
the output keeps x's layout. Accumulation is fp32; for fp32 inputs the dots run in IEEE fp32.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastface.ops._common import is_channels_last


@triton.jit
def _expand_rows(x_base, iy, ix, ok, g, ce, ce_ok, we_ptr, be_ptr, H, W, CIN, CE, sxc, sxh, sxw,
                 HAS_EXPAND: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_CIN: tl.constexpr,
                 BLOCK_CE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """h at the given input pixels for one chunk of expanded channels, fp32, zero outside the image."""
    pix = iy * sxh + ix * sxw
    if HAS_EXPAND:
        e = tl.zeros((BLOCK_ROWS, BLOCK_CE), dtype=tl.float32)
        for ci0 in range(0, CIN, BLOCK_CIN):
            ci = ci0 + tl.arange(0, BLOCK_CIN)
            ci_ok = ci < CIN
            xs = tl.load(x_base + pix[:, None] + ci[None, :] * sxc, mask=ok[:, None] & ci_ok[None, :], other=0.0)
            we = tl.load(we_ptr + (g * CE + ce)[None, :] * CIN + ci[:, None], mask=ci_ok[:, None] & ce_ok[None, :],
                         other=0.0)
            e = tl.dot(xs, we, e, input_precision=DOT_PRECISION)
        be = tl.load(be_ptr + g * CE + ce, mask=ce_ok, other=0.0).to(tl.float32)
        e = tl.minimum(tl.maximum(e + be[None, :], 0.0), 6.0)
        # The depthwise conv zero-pads h, the expand's output, not x: relu6(b) must not leak in.
        e = tl.where(ok[:, None], e, 0.0)
    else:
        e = tl.load(x_base + pix[:, None] + ce[None, :] * sxc, mask=ok[:, None] & ce_ok[None, :],
                    other=0.0).to(tl.float32)
    return e


@triton.jit
def _ir_block_kernel(x_ptr, we_ptr, be_ptr, wd_ptr, bd_ptr, wp_ptr, bp_ptr, y_ptr,
                     H, W, OH, OW, CIN, CE, COUT, tiles_h, tiles_w,
                     sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                     STRIDE: tl.constexpr, K: tl.constexpr, HAS_EXPAND: tl.constexpr, RESIDUAL: tl.constexpr,
                     HALO: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_HP: tl.constexpr, BLOCK_CIN: tl.constexpr, BLOCK_CE: tl.constexpr,
                     BLOCK_COUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    PAD: tl.constexpr = K // 2
    HH: tl.constexpr = (TH - 1) * STRIDE + K  # halo rows/cols of h needed by one output tile
    HW: tl.constexpr = (TW - 1) * STRIDE + K
    pid = tl.program_id(0)
    g = tl.program_id(1)
    pid_co = tl.program_id(2)
    n = pid // (tiles_h * tiles_w)
    t = pid % (tiles_h * tiles_w)
    oy0 = (t // tiles_w) * TH
    ox0 = (t % tiles_w) * TW

    p = tl.arange(0, BLOCK_P)
    py = p // TW
    px = p % TW
    oy = oy0 + py
    ox = ox0 + px
    p_ok = (p < TH * TW) & (oy < OH) & (ox < OW)
    co = pid_co * BLOCK_COUT + tl.arange(0, BLOCK_COUT)
    co_ok = co < COUT
    x_base = x_ptr + n.to(tl.int64) * sxn + (g * CIN) * sxc

    if HALO:
        hq = tl.arange(0, BLOCK_HP)
        hiy = oy0 * STRIDE - PAD + hq // HW
        hix = ox0 * STRIDE - PAD + hq % HW
        h_ok = (hq < HH * HW) & (hiy >= 0) & (hiy < H) & (hix >= 0) & (hix < W)

    acc = tl.zeros((BLOCK_P, BLOCK_COUT), dtype=tl.float32)
    for ce0 in range(0, CE, BLOCK_CE):
        ce = ce0 + tl.arange(0, BLOCK_CE)
        ce_ok = ce < CE
        d = tl.zeros((BLOCK_P, BLOCK_CE), dtype=tl.float32)
        if HALO:
            e = _expand_rows(x_base, hiy, hix, h_ok, g, ce, ce_ok, we_ptr, be_ptr, H, W, CIN, CE, sxc, sxh, sxw,
                             HAS_EXPAND, BLOCK_HP, BLOCK_CIN, BLOCK_CE, DOT_PRECISION)
            # A runtime tap loop: unrolled, LICM hoists all k*k index tiles out of the channel loop
            # and they take ~150 registers a thread (ptxas, sm_90).
            for tap in range(K * K):
                rows = (py * STRIDE + tap // K) * HW + px * STRIDE + tap % K
                rows = tl.where(p < TH * TW, rows, 0)  # padding lanes of the tile read row 0, then are dropped
                et = tl.gather(e, tl.broadcast_to(rows[:, None], (BLOCK_P, BLOCK_CE)), axis=0)
                wt = tl.load(wd_ptr + (g * CE + ce) * (K * K) + tap, mask=ce_ok, other=0.0).to(tl.float32)
                d += et * wt[None, :]
        else:
            for tap in range(K * K):
                iy = oy * STRIDE - PAD + tap // K
                ix = ox * STRIDE - PAD + tap % K
                ok = p_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                et = _expand_rows(x_base, iy, ix, ok, g, ce, ce_ok, we_ptr, be_ptr, H, W, CIN, CE, sxc, sxh, sxw,
                                  HAS_EXPAND, BLOCK_P, BLOCK_CIN, BLOCK_CE, DOT_PRECISION)
                wt = tl.load(wd_ptr + (g * CE + ce) * (K * K) + tap, mask=ce_ok, other=0.0).to(tl.float32)
                d += et * wt[None, :]
        bd = tl.load(bd_ptr + g * CE + ce, mask=ce_ok, other=0.0).to(tl.float32)
        h = tl.minimum(tl.maximum(d + bd[None, :], 0.0), 6.0)
        wp = tl.load(wp_ptr + (g * COUT + co)[None, :] * CE + ce[:, None], mask=ce_ok[:, None] & co_ok[None, :],
                     other=0.0)
        # h is rounded to the input dtype here, as an unfused network rounds it between layers.
        acc = tl.dot(h.to(wp.dtype), wp, acc, input_precision=DOT_PRECISION)

    bp = tl.load(bp_ptr + g * COUT + co, mask=co_ok, other=0.0).to(tl.float32)
    out = acc + bp[None, :]
    pix_ok = p_ok[:, None] & co_ok[None, :]
    if RESIDUAL:
        res = tl.load(x_base + (oy * sxh + ox * sxw)[:, None] + co[None, :] * sxc, mask=pix_ok, other=0.0)
        out += res.to(tl.float32)
    y_off = n.to(tl.int64) * syn + (oy * syh + ox * syw)[:, None] + (g * COUT + co)[None, :] * syc
    tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=pix_ok)


def _pow2(v: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, v)))


# Register budget: fp32 tiles (the expanded chunk, the output accumulator) of at most 4096
# elements each keep every face-block launch free of spills at sm_90 (ptxas, fp16/bf16).
_ACC_ELEMS = 4096


@functools.lru_cache(maxsize=256)
def pick_tile(oh: int, ow: int, stride: int, k: int, cin: int, cout: int, has_expand: bool, halo: bool
              ) -> tuple[int, int, int, int, int]:
    """(TH, TW, BLOCK_P, BLOCK_HP, BLOCK_COUT): the tile with the least padded work per image."""
    best = None
    for max_hp in (128, 256, 512):
        for th in range(1, 17):
            for tw in range(1, 17):
                bp = _pow2(th * tw)
                if bp > 64:
                    continue
                hh, hw = (th - 1) * stride + k, (tw - 1) * stride + k
                bhp = _pow2(hh * hw)
                if halo and bhp > max_hp:
                    continue
                bcout = min(_pow2(cout), _ACC_ELEMS // bp)
                cout_blocks = -(-cout // bcout)
                tiles = -(-oh // th) * -(-ow // tw)
                # Padded GEMM rows (expand and depthwise run again for each block of output channels).
                expand_rows = (bhp if halo else bp * k * k) if has_expand else 0
                cost = tiles * (cout_blocks * (expand_rows * cin + bp * k * k) + bp * cout_blocks * bcout)
                key = (cost, -bp, th, tw)
                if best is None or key < best[0]:
                    best = (key, (th, tw, bp, bhp, bcout))
        if best is not None:
            return best[1]
    raise ValueError(f"no tile for a {k}x{k} stride-{stride} block")


def launch_config(oh: int, ow: int, stride: int, k: int, cin: int, ce: int, cout: int, has_expand: bool,
                  residual: bool, halo: bool, dtype: torch.dtype) -> tuple[dict, int, int]:
    """(constexpr arguments, num_warps, output-channel blocks) of one launch of the kernel."""
    th, tw, block_p, block_hp, block_cout = pick_tile(oh, ow, stride, k, cin, cout, has_expand, halo)
    rows = block_hp if halo else block_p
    meta = dict(STRIDE=stride, K=k, HAS_EXPAND=has_expand, RESIDUAL=residual, HALO=halo, TH=th, TW=tw,
                BLOCK_P=block_p, BLOCK_HP=block_hp, BLOCK_CIN=min(_pow2(cin), 32),
                BLOCK_CE=min(_pow2(ce), 32, max(16, _ACC_ELEMS // rows)), BLOCK_COUT=block_cout,
                DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
    # 4 warps spill (ptxas, sm_90) once the halo tile or the accumulator reaches 128 rows/columns.
    num_warps = 8 if rows >= 128 or block_cout >= 128 else 4
    return meta, num_warps, -(-cout // block_cout)


def ir_block_triton(x: torch.Tensor, w_expand: torch.Tensor | None, b_expand: torch.Tensor | None, w_dw: torch.Tensor,
                    b_dw: torch.Tensor, w_proj: torch.Tensor, b_proj: torch.Tensor, stride: int, residual: bool,
                    groups: int, *, halo: bool | None = None) -> torch.Tensor:
    """fastface::ir_block on CUDA tensors (or CPU ones under TRITON_INTERPRET=1); output in x's layout."""
    if halo is None:
        halo = hasattr(tl, "gather")  # tl.gather arrived in Triton 3.2; older ones recompute per tap
    if x.dim() != 4 or w_dw.dim() != 3 or w_proj.dim() != 2:
        raise ValueError(f"ir_block_triton: bad shapes x {tuple(x.shape)}, w_dw {tuple(w_dw.shape)}, "
                         f"w_proj {tuple(w_proj.shape)}")
    n, c_in_total, h, w = x.shape
    k = w_dw.shape[-1]
    cin = c_in_total // groups
    ce = w_dw.shape[0] // groups
    cout = w_proj.shape[0] // groups
    has_expand = w_expand is not None
    if stride not in (1, 2) or k % 2 == 0 or groups * cin != c_in_total or w_proj.shape[1] != ce:
        raise ValueError(f"ir_block_triton: unsupported arguments (stride {stride}, k {k}, groups {groups}, "
                         f"x {tuple(x.shape)}, w_proj {tuple(w_proj.shape)})")
    if not has_expand and ce != cin:
        raise ValueError(f"ir_block_triton: without an expand conv Ce must equal Cin, got {ce} and {cin}")
    if residual and (stride != 1 or cout != cin):
        raise ValueError("ir_block_triton: residual needs stride 1 and Cout == Cin")
    p = k // 2
    oh, ow = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    y = torch.empty((n, groups * cout, oh, ow), device=x.device, dtype=x.dtype, memory_format=fmt)
    if y.numel() == 0:
        return y

    we = w_expand.contiguous() if has_expand else w_dw  # placeholder pointers, never read
    be = b_expand.contiguous() if has_expand else b_dw
    wd, bd = w_dw.contiguous(), b_dw.contiguous()
    wp, bp = w_proj.contiguous(), b_proj.contiguous()
    meta, num_warps, cout_blocks = launch_config(oh, ow, stride, k, cin, ce, cout, has_expand, bool(residual), halo,
                                                 x.dtype)
    tiles_h, tiles_w = triton.cdiv(oh, meta["TH"]), triton.cdiv(ow, meta["TW"])
    _ir_block_kernel[(n * tiles_h * tiles_w, groups, cout_blocks)](
        x, we, be, wd, bd, wp, bp, y, h, w, oh, ow, cin, ce, cout, tiles_h, tiles_w, *x.stride(), *y.stride(), **meta,
        num_warps=num_warps, num_stages=2)
    return y
