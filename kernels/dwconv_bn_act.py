"""Training path of the depthwise stage, depthwise conv -> BatchNorm (batch statistics) -> ReLU6, in Triton.

Semantics: fastface.ops.dwconv_bn_act (dwconv_bn_act_reference, dwconv_bn_act_backward_reference).
The conv output z is never stored; every pass recomputes it from x (k*k loads per element that
hit in cache). All reductions are deterministic: programs write per-chunk partials to a small
fp32 buffer and one program per channel block combines them in a fixed order.

forward (3 launches):
    _stats     per (pixel chunk, channel block): Welford (count, mean, M2) of z over the chunk,
               tile by tile, merged with Chan's formula (no sum-of-squares cancellation)
    _finalize  per channel block: merge the chunk partials in order -> mean, invstd, and the fp32
               affine (scale = gamma*invstd, shift = beta - mean*scale) that the next pass uses
    _normalize per (pixel tile, channel block): y = act(z*scale + shift)
backward (4 launches):
    _bwd_sums    per chunk: sum(g) and sum(g*zhat), g = grad_y masked by the ReLU6 window
    _bwd_finalize grad_beta, grad_gamma and the fp32 coefficients of dz =
                 gamma*invstd*(g - sum(g)/M - zhat*sum(g*zhat)/M)
    _bwd_grad    per (input tiles, channel block): dz on the tile's output halo (z recomputed),
                 grad_x by a transposed conv that reads dz through tl.gather, and the program's
                 partial grad_w over the outputs its tiles own (each output owned once)
    _reduce_gw   grad_w = ordered sum of the per-program partials

Pixels are flattened over (N, OH, OW) and channels are the second tile axis, so both layouts work
through strides (channels_last, the training layout, gives coalesced channel rows); outputs keep
x's layout. mean/invstd are returned in x's dtype (as the reference does), grads of gamma/beta in
gamma's dtype, of the weight in the weight's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastface.ops._common import is_channels_last

_BLOCK_PIX = 64
_BLOCK_C = 32
# 8 warps: about 5 registers per tile element (the tap loop unrolls), ~100 a thread at sm_90.
_WARPS = 8
# Programs of the reduction passes (and so partials per channel); a constant, not the device's
# SM count, so results are bitwise reproducible across devices.
_TARGET_PROGRAMS = 1024


@triton.jit
def _conv_tile(x_ptr, w_ptr, n, oy, ox, p_ok, c, c_ok, H, W, sxn, sxc, sxh, sxw, STRIDE: tl.constexpr,
               K: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """z = depthwise conv (no bias) at the given output pixels, fp32 [ROWS, BLOCK_C]."""
    PAD: tl.constexpr = K // 2
    base = x_ptr + n.to(tl.int64) * sxn
    z = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    # Runtime tap loops throughout: unrolled, the k*k pointer tiles are all live at once and
    # spill (ptxas, sm_90: ~900 bytes for k = 3).
    for tap in range(K * K):
        iy = oy * STRIDE - PAD + tap // K
        ix = ox * STRIDE - PAD + tap % K
        ok = p_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xv = tl.load(base[:, None] + (iy * sxh + ix * sxw)[:, None] + c[None, :] * sxc,
                     mask=ok[:, None] & c_ok[None, :], other=0.0)
        wv = tl.load(w_ptr + c * (K * K) + tap, mask=c_ok, other=0.0)
        z += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return z


@triton.jit
def _pixels(q, NP, OHW, OW):
    ok = q < NP
    n = q // OHW
    r = q % OHW
    return n, r // OW, r % OW, ok


@triton.jit
def _merge_moments(cnt, shift, s1, m2, cnt_b, mean_b, m2_b):
    """Chan's merge of a part (count, mean, M2) into running moments whose mean is kept as a sum around
    `shift` (s1 = sum of count * (part mean - shift)): a running `mean += delta * frac` rounds at the
    mean's own scale every merge, ~3x torch's error over a 56 x 56 x 8 batch on an H200."""
    delta = mean_b - (shift + s1 / tl.maximum(cnt, 1.0))
    frac = cnt_b / tl.maximum(cnt + cnt_b, 1.0)
    return cnt + cnt_b, s1 + cnt_b * (mean_b - shift), m2 + (m2_b + delta * delta * cnt * frac)


@triton.jit
def _stats_kernel(x_ptr, w_ptr, part_mean_ptr, part_m2_ptr, NP, C, H, W, OW, OHW, tiles_per_chunk,
                  sxn, sxc, sxh, sxw, STRIDE: tl.constexpr, K: tl.constexpr, BLOCK_PIX: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    cnt = 0.0  # the moments of the tiles so far, the mean as a sum around the first tile's (_merge_moments)
    shift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(tiles_per_chunk):
        q = (chunk * tiles_per_chunk + i) * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
        n, oy, ox, p_ok = _pixels(q, NP, OHW, OW)
        z = _conv_tile(x_ptr, w_ptr, n, oy, ox, p_ok, c, c_ok, H, W, sxn, sxc, sxh, sxw, STRIDE, K, BLOCK_PIX,
                       BLOCK_C)
        valid = p_ok[:, None] & c_ok[None, :]
        cnt_t = tl.sum(p_ok.to(tl.float32), axis=0)
        mean_t = tl.sum(tl.where(valid, z, 0.0), axis=0) / tl.maximum(cnt_t, 1.0)
        dev = tl.where(valid, z - mean_t[None, :], 0.0)
        m2_t = tl.sum(dev * dev, axis=0)
        shift = tl.where(cnt == 0.0, mean_t, shift)
        cnt, s1, m2 = _merge_moments(cnt, shift, s1, m2, cnt_t, mean_t, m2_t)
    mean = shift + s1 / tl.maximum(cnt, 1.0)
    tl.store(part_mean_ptr + chunk * C + c, mean, mask=c_ok)
    tl.store(part_m2_ptr + chunk * C + c, m2, mask=c_ok)


@triton.jit
def _finalize_kernel(part_mean_ptr, part_m2_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, affine_ptr, NP, C,
                     n_chunks, chunk_pix, eps, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    cnt = 0.0
    shift = tl.load(part_mean_ptr + c, mask=c_ok, other=0.0)  # the first chunk's mean (_merge_moments)
    s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j in range(n_chunks):
        cnt_b = tl.minimum(tl.maximum(NP - j * chunk_pix, 0), chunk_pix).to(tl.float32)
        mean_b = tl.load(part_mean_ptr + j * C + c, mask=c_ok, other=0.0)
        m2_b = tl.load(part_m2_ptr + j * C + c, mask=c_ok, other=0.0)
        cnt, s1, m2 = _merge_moments(cnt, shift, s1, m2, cnt_b, mean_b, m2_b)
    mean = shift + s1 / cnt
    invstd = 1.0 / tl.sqrt(m2 / cnt + eps)
    gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    scale = gamma * invstd
    tl.store(mean_ptr + c, mean.to(mean_ptr.dtype.element_ty), mask=c_ok)
    tl.store(invstd_ptr + c, invstd.to(invstd_ptr.dtype.element_ty), mask=c_ok)
    tl.store(affine_ptr + c, scale, mask=c_ok)
    tl.store(affine_ptr + C + c, beta - mean * scale, mask=c_ok)


@triton.jit
def _normalize_kernel(x_ptr, w_ptr, affine_ptr, y_ptr, NP, C, H, W, OW, OHW, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                      STRIDE: tl.constexpr, K: tl.constexpr, RELU6: tl.constexpr, BLOCK_PIX: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    q = tl.program_id(0) * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n, oy, ox, p_ok = _pixels(q, NP, OHW, OW)
    z = _conv_tile(x_ptr, w_ptr, n, oy, ox, p_ok, c, c_ok, H, W, sxn, sxc, sxh, sxw, STRIDE, K, BLOCK_PIX, BLOCK_C)
    scale = tl.load(affine_ptr + c, mask=c_ok, other=0.0)
    shift = tl.load(affine_ptr + C + c, mask=c_ok, other=0.0)
    y = z * scale[None, :] + shift[None, :]
    if RELU6:
        y = tl.minimum(tl.maximum(y, 0.0), 6.0)
    off = n.to(tl.int64)[:, None] * syn + (oy * syh + ox * syw)[:, None] + c[None, :] * syc
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def _masked_grad(gy, z, mean, invstd, gamma, beta, valid, RELU6: tl.constexpr):
    """(g, zhat): grad_y through the ReLU6 window, and the normalised conv output."""
    zhat = (z - mean[None, :]) * invstd[None, :]
    g = tl.where(valid, gy, 0.0)
    if RELU6:
        pre = zhat * gamma[None, :] + beta[None, :]
        g = tl.where((pre > 0.0) & (pre < 6.0), g, 0.0)
    return g, zhat


@triton.jit
def _bwd_sums_kernel(gy_ptr, x_ptr, w_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, part_ptr, NP, C, H, W, OW, OHW,
                     tiles_per_chunk, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, STRIDE: tl.constexpr, K: tl.constexpr,
                     RELU6: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0)
    n_chunks = tl.num_programs(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gz = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(tiles_per_chunk):
        q = (chunk * tiles_per_chunk + i) * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
        n, oy, ox, p_ok = _pixels(q, NP, OHW, OW)
        valid = p_ok[:, None] & c_ok[None, :]
        z = _conv_tile(x_ptr, w_ptr, n, oy, ox, p_ok, c, c_ok, H, W, sxn, sxc, sxh, sxw, STRIDE, K, BLOCK_PIX,
                       BLOCK_C)
        goff = n.to(tl.int64)[:, None] * sgn + (oy * sgh + ox * sgw)[:, None] + c[None, :] * sgc
        gy = tl.load(gy_ptr + goff, mask=valid, other=0.0).to(tl.float32)
        g, zhat = _masked_grad(gy, z, mean, invstd, gamma, beta, valid, RELU6)
        sum_g += tl.sum(g, axis=0)
        sum_gz += tl.sum(g * zhat, axis=0)
    tl.store(part_ptr + chunk * C + c, sum_g, mask=c_ok)
    tl.store(part_ptr + (n_chunks + chunk) * C + c, sum_gz, mask=c_ok)


@triton.jit
def _bwd_finalize_kernel(part_ptr, gamma_ptr, invstd_ptr, ggamma_ptr, gbeta_ptr, coef_ptr, NP, C, n_chunks,
                         BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gz = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j in range(n_chunks):
        sum_g += tl.load(part_ptr + j * C + c, mask=c_ok, other=0.0)
        sum_gz += tl.load(part_ptr + (n_chunks + j) * C + c, mask=c_ok, other=0.0)
    gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(gbeta_ptr + c, sum_g.to(gbeta_ptr.dtype.element_ty), mask=c_ok)
    tl.store(ggamma_ptr + c, sum_gz.to(ggamma_ptr.dtype.element_ty), mask=c_ok)
    count = NP * 1.0
    tl.store(coef_ptr + c, gamma * invstd, mask=c_ok)
    tl.store(coef_ptr + C + c, sum_g / count, mask=c_ok)
    tl.store(coef_ptr + 2 * C + c, sum_gz / count, mask=c_ok)


@triton.jit
def _bwd_grad_kernel(gy_ptr, x_ptr, w_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, coef_ptr, gx_ptr, gw_part_ptr,
                     C, H, W, OH, OW, tiles_h, tiles_w, n_tiles, tiles_per_prog,
                     sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
                     STRIDE: tl.constexpr, K: tl.constexpr, RELU6: tl.constexpr, TH: tl.constexpr,
                     TW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HP: tl.constexpr, BLOCK_KK: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    # An input tile of TH x TW pixels (multiples of STRIDE) needs dz on outputs
    # [i0/S - PAD//S, i0/S + (TH-1+PAD)//S] per axis: its output halo, OHH x OWH.
    PAD: tl.constexpr = K // 2
    LO: tl.constexpr = PAD // STRIDE
    OHH: tl.constexpr = (TH - 1 + PAD) // STRIDE + LO + 1
    OWH: tl.constexpr = (TW - 1 + PAD) // STRIDE + LO + 1
    prog = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    a = tl.load(coef_ptr + c, mask=c_ok, other=0.0)
    b = tl.load(coef_ptr + C + c, mask=c_ok, other=0.0)
    cc = tl.load(coef_ptr + 2 * C + c, mask=c_ok, other=0.0)
    kk = tl.arange(0, BLOCK_KK)
    gw = tl.zeros((BLOCK_KK, BLOCK_C), dtype=tl.float32)

    hq = tl.arange(0, BLOCK_HP)
    hy = hq // OWH
    hx = hq % OWH
    p = tl.arange(0, BLOCK_P)
    py = p // TW
    px = p % TW
    for j in range(tiles_per_prog):
        t = prog * tiles_per_prog + j
        n = t // (tiles_h * tiles_w)
        r = t % (tiles_h * tiles_w)
        iy0 = (r // tiles_w) * TH
        ix0 = (r % tiles_w) * TW
        oy_lo = iy0 // STRIDE - LO
        ox_lo = ix0 // STRIDE - LO
        oy = oy_lo + hy
        ox = ox_lo + hx
        # Vector comparisons: the interpreter rejects masks built from a scalar bool.
        h_ok = (hq * 0 + t < n_tiles) & (hq < OHH * OWH) & (oy >= 0) & (oy < OH) & (ox >= 0) & (ox < OW)
        valid = h_ok[:, None] & c_ok[None, :]
        z = _conv_tile(x_ptr, w_ptr, n + hq * 0, oy, ox, h_ok, c, c_ok, H, W, sxn, sxc, sxh, sxw, STRIDE, K,
                       BLOCK_HP, BLOCK_C)
        goff = n.to(tl.int64) * sgn + (oy * sgh + ox * sgw)[:, None] + c[None, :] * sgc
        gy = tl.load(gy_ptr + goff, mask=valid, other=0.0).to(tl.float32)
        g, zhat = _masked_grad(gy, z, mean, invstd, gamma, beta, valid, RELU6)
        dz = tl.where(valid, a[None, :] * (g - b[None, :] - zhat * cc[None, :]), 0.0)

        # grad_w over the outputs this tile owns: [iy0/S, (iy0+TH)/S) x [ix0/S, (ix0+TW)/S).
        own = (oy >= iy0 // STRIDE) & (oy < (iy0 + TH) // STRIDE) & (ox >= ix0 // STRIDE) & \
            (ox < (ix0 + TW) // STRIDE)
        dz_own = tl.where(own[:, None], dz, 0.0)
        xbase = x_ptr + n.to(tl.int64) * sxn
        for tap in range(K * K):
            iy = oy * STRIDE - PAD + tap // K
            ix = ox * STRIDE - PAD + tap % K
            ok = h_ok & own & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            xv = tl.load(xbase + (iy * sxh + ix * sxw)[:, None] + c[None, :] * sxc, mask=ok[:, None] & c_ok[None, :],
                         other=0.0).to(tl.float32)
            gw += tl.where(kk[:, None] == tap, tl.sum(dz_own * xv, axis=0)[None, :], 0.0)

        # grad_x[i] = sum_tap w[tap] * dz[(i + PAD - tap) / S] where that division is exact.
        iy = iy0 + py
        ix = ix0 + px
        p_ok = (p * 0 + t < n_tiles) & (p < TH * TW) & (iy < H) & (ix < W)
        gx = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for tap in range(K * K):
            ty = iy + PAD - tap // K
            tx = ix + PAD - tap % K
            ok = p_ok & (ty >= 0) & (tx >= 0) & (ty % STRIDE == 0) & (tx % STRIDE == 0)
            rows = (ty // STRIDE - oy_lo) * OWH + (tx // STRIDE - ox_lo)
            rows = tl.where(ok, rows, 0)
            dzt = tl.gather(dz, tl.broadcast_to(rows[:, None], (BLOCK_P, BLOCK_C)), axis=0)
            wv = tl.load(w_ptr + c * (K * K) + tap, mask=c_ok, other=0.0).to(tl.float32)
            gx += tl.where(ok[:, None], dzt, 0.0) * wv[None, :]
        doff = n.to(tl.int64) * sdn + (iy * sdh + ix * sdw)[:, None] + c[None, :] * sdc
        tl.store(gx_ptr + doff, gx.to(gx_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])

    KK: tl.constexpr = K * K
    tl.store(gw_part_ptr + prog * (KK * C) + kk[:, None] * C + c[None, :], gw,
             mask=(kk[:, None] < KK) & c_ok[None, :])


@triton.jit
def _reduce_gw_kernel(gw_part_ptr, gw_ptr, C, n_progs, KK: tl.constexpr, BLOCK: tl.constexpr):
    # Element (c, tap) of grad_w (C x k x k) is entry tap * C + c of each partial.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < C * KK
    c = i // KK
    tap = i % KK
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(n_progs):
        acc += tl.load(gw_part_ptr + j * (KK * C) + tap * C + c, mask=ok, other=0.0)
    tl.store(gw_ptr + i, acc.to(gw_ptr.dtype.element_ty), mask=ok)


def _check(x: torch.Tensor, weight: torch.Tensor, stride: int) -> int:
    if x.dim() != 4 or weight.dim() != 3 or weight.shape[0] != x.shape[1] or weight.shape[1] != weight.shape[2] \
            or weight.shape[1] % 2 == 0:
        raise ValueError(f"dwconv_bn_act (Triton): bad shapes x {tuple(x.shape)}, weight {tuple(weight.shape)} "
                         "(want N x C x H x W and C x k x k, k odd)")
    if stride < 1:
        raise ValueError(f"dwconv_bn_act (Triton): stride must be >= 1, got {stride}")
    return weight.shape[-1]


def _out_hw(h: int, w: int, k: int, stride: int) -> tuple[int, int]:
    p = k // 2
    return (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1


def _chunks(np_: int, c_blocks: int) -> tuple[int, int]:
    """(n_chunks, tiles_per_chunk) for the reduction passes: about _TARGET_PROGRAMS programs in all."""
    tiles = triton.cdiv(np_, _BLOCK_PIX)
    want = max(1, _TARGET_PROGRAMS // c_blocks)
    per = triton.cdiv(tiles, min(tiles, want))
    return triton.cdiv(tiles, per), per


def _empty_like_layout(shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)


def forward(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, stride: int, eps: float,
            relu6: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastface::dwconv_bn_act: (y, batch mean, invstd) of depthwise conv -> BN (batch stats) -> ReLU6."""
    k = _check(x, weight, stride)
    n, c, h, w = x.shape
    oh, ow = _out_hw(h, w, k, stride)
    np_ = n * oh * ow
    if np_ == 0 or c == 0:
        raise ValueError("dwconv_bn_act (Triton): batch statistics of an empty batch")
    y = _empty_like_layout((n, c, oh, ow), x)
    mean = torch.empty(c, device=x.device, dtype=x.dtype)
    invstd = torch.empty(c, device=x.device, dtype=x.dtype)
    wt = weight.contiguous()
    c_blocks = triton.cdiv(c, _BLOCK_C)
    n_chunks, per = _chunks(np_, c_blocks)
    part = torch.empty((2, n_chunks, c), device=x.device, dtype=torch.float32)
    affine = torch.empty((2, c), device=x.device, dtype=torch.float32)
    _stats_kernel[(n_chunks, c_blocks)](x, wt, part[0], part[1], np_, c, h, w, ow, oh * ow, per, *x.stride(),
                                        STRIDE=stride, K=k, BLOCK_PIX=_BLOCK_PIX, BLOCK_C=_BLOCK_C,
                                        num_warps=_WARPS)
    _finalize_kernel[(c_blocks,)](part[0], part[1], gamma.contiguous(), beta.contiguous(), mean, invstd, affine, np_,
                                  c, n_chunks, per * _BLOCK_PIX, float(eps), BLOCK_C=_BLOCK_C)
    _normalize_kernel[(triton.cdiv(np_, _BLOCK_PIX), c_blocks)](
        x, wt, affine, y, np_, c, h, w, ow, oh * ow, *x.stride(), *y.stride(), STRIDE=stride, K=k,
        RELU6=bool(relu6), BLOCK_PIX=_BLOCK_PIX, BLOCK_C=_BLOCK_C, num_warps=_WARPS)
    return y, mean, invstd


def _grad_tile(stride: int, k: int) -> tuple[int, int, int, int]:
    """(TH, TW, BLOCK_P, BLOCK_HP) of the grad-x tile: ~4 x 8 inputs, multiples of the stride (one owner per output)."""
    th, tw = stride * -(-4 // stride), stride * -(-8 // stride)
    lo = (k // 2) // stride
    ohh = (th - 1 + k // 2) // stride + lo + 1
    owh = (tw - 1 + k // 2) // stride + lo + 1
    return th, tw, max(16, triton.next_power_of_2(th * tw)), max(16, triton.next_power_of_2(ohh * owh))


def backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
             mean: torch.Tensor, invstd: torch.Tensor, stride: int, relu6: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastface::dwconv_bn_act_backward: grads w.r.t. (x, weight, gamma, beta), the conv recomputed from x."""
    k = _check(x, weight, stride)
    n, c, h, w = x.shape
    oh, ow = _out_hw(h, w, k, stride)
    if tuple(grad_y.shape) != (n, c, oh, ow):
        raise ValueError(f"dwconv_bn_act_backward (Triton): grad_y is {tuple(grad_y.shape)}, want {(n, c, oh, ow)}")
    np_ = n * oh * ow
    wt = weight.contiguous()
    gamma_c, beta_c = gamma.contiguous(), beta.contiguous()
    mean_c, invstd_c = mean.contiguous(), invstd.contiguous()
    grad_x = _empty_like_layout(tuple(x.shape), x)
    grad_w = torch.empty_like(wt)
    grad_gamma = torch.empty(c, device=x.device, dtype=gamma.dtype)
    grad_beta = torch.empty(c, device=x.device, dtype=beta.dtype)
    c_blocks = triton.cdiv(c, _BLOCK_C)
    n_chunks, per = _chunks(np_, c_blocks)
    part = torch.empty((2, n_chunks, c), device=x.device, dtype=torch.float32)
    coef = torch.empty((3, c), device=x.device, dtype=torch.float32)
    _bwd_sums_kernel[(n_chunks, c_blocks)](
        grad_y, x, wt, mean_c, invstd_c, gamma_c, beta_c, part, np_, c, h, w, ow, oh * ow, per, *x.stride(),
        *grad_y.stride(), STRIDE=stride, K=k, RELU6=bool(relu6), BLOCK_PIX=_BLOCK_PIX, BLOCK_C=_BLOCK_C,
        num_warps=_WARPS)
    _bwd_finalize_kernel[(c_blocks,)](part, gamma_c, invstd_c, grad_gamma, grad_beta, coef, np_, c, n_chunks,
                                      BLOCK_C=_BLOCK_C)
    th, tw, block_p, block_hp = _grad_tile(stride, k)
    tiles_h, tiles_w = triton.cdiv(h, th), triton.cdiv(w, tw)
    n_tiles = n * tiles_h * tiles_w
    # Several tiles per program keep the grad_w partials small; the split never depends on the device.
    tiles_per_prog = triton.cdiv(n_tiles, min(n_tiles, max(1, _TARGET_PROGRAMS // c_blocks)))
    n_progs = triton.cdiv(n_tiles, tiles_per_prog)
    gw_part = torch.empty((n_progs, k * k, c), device=x.device, dtype=torch.float32)
    _bwd_grad_kernel[(n_progs, c_blocks)](
        grad_y, x, wt, mean_c, invstd_c, gamma_c, beta_c, coef, grad_x, gw_part, c, h, w, oh, ow, tiles_h, tiles_w,
        n_tiles, tiles_per_prog, *x.stride(), *grad_y.stride(), *grad_x.stride(), STRIDE=stride, K=k,
        RELU6=bool(relu6), TH=th, TW=tw, BLOCK_P=block_p, BLOCK_HP=block_hp,
        BLOCK_KK=triton.next_power_of_2(k * k), BLOCK_C=_BLOCK_C, num_warps=_WARPS)
    block = 256
    _reduce_gw_kernel[(triton.cdiv(c * k * k, block),)](gw_part, grad_w, c, n_progs, KK=k * k, BLOCK=block)
    return grad_x, grad_w, grad_gamma, grad_beta
