// Depthwise 3 x 3 conv (padding 1, stride 1 or 2, no bias, no dilation) for training on the CPU,
// forward and both gradients, optionally of a BN + ReLU6 applied on the fly to its input:
//   a = relu6((x - mean) * scale + beta)   (per channel, bn_act's formula; or a = x without them)
//   z[n, oy, ox, c] = sum over taps (ky, kx) of a[n, oy*S - 1 + ky, ox*S - 1 + kx, c] * w[c, ky, kx]
// With the prologue the activation a, the largest tensor of an inverted-residual block, is never
// stored: the forward applies it to each input row as it buffers it, the backward recomputes it.
//
// Forward: per (band of output rows, channel vector) the input rows are activated once into a small
// ring of zero-padded rows (three rows of W + 2 vectors, in L1), so every tap is a plain load. On request
// (STATS, dwconv_forward_stats) it also reduces the batch statistics of z from the registers it writes z
// from, for the training BN that follows the conv in a block (see ZStats).
//
// Backward: grad_x[iy, ix] = sum of grad_out[oy, ox] * w[ky, kx] and grad_w[ky, kx] = sum of
// grad_out[oy, ox] * a[iy, ix] pair the same grad_out value with the same input pixel, so one gather
// per input pixel feeds both: every grad_out vector loaded for grad_x also updates grad_w (ATen/oneDNN
// runs them as two passes). Per (band of input rows, channel vector) the nine weights and nine grad_w
// accumulators stay in registers; which taps exist is a compile-time mask per row and per pixel (a
// switch at the borders and between stride-2 parities), so the inner loop has no bounds checks.
// With the prologue the first output is the gradient w.r.t. a; on request (sums) it is g = grad_a behind
// the ReLU6 mask (the gradient w.r.t. the BN's output) and the same pass also reduces the BN backward's
// per-channel sums sum(g) and sum(g * (x - mean)), so that BN backward needs no pass of its own over
// grad_a (bn_act_backward_sums: one pass, not two; fastface.ops.expand_dwconv: none).
//
// NHWC (channels_last) is the layout, channels vectorised; NCHW inputs are converted on entry and
// exit. Tasks are bands of rows fixed by the shape alone; grad_w's per-task partials (float32 per
// band, float64 per task) are merged in task order, so results do not depend on the thread count.
//
// The kernels live in this header and are instantiated in four translation units, one per dtype and
// stride (dwconv_train_{f32,f64}_s{1,2}.cpp): as one file they took ~6 minutes of one core to
// compile, the longest step of the build by 8x; dwconv_train.cpp holds the ops.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "aten_tasks.h"
#include "layout.h"
#include "simd.h"

namespace fastface {
namespace dwconv_train {

using simd::Vec;

constexpr int K = 3;  // the kernel size served (MobileNetV2's); others take ATen's path
constexpr int NT = K * K;

struct Geo {
  int64_t N, C, H, W, OH, OW;
};

// Per channel vector: the nine weights, the prologue's scale and shift, the tail mask.
template <typename T>
struct VecConsts {
  typename Vec<T>::reg w[NT];
  typename Vec<T>::reg mu, sc, be;
  typename Vec<T>::mask m;
};

// The backward's per-channel-vector accumulators: grad_w per tap, then the BN sums (sum g, sum g * xc).
constexpr int NACC = NT + 2;

template <typename T>
struct Regs {  // a plain array (std::array of vector types drops their alignment attributes)
  typename Vec<T>::reg v[NACC];
  FF_ALWAYS_INLINE typename Vec<T>::reg& operator[](int i) { return v[i]; }
};

// Per-channel constants, a padded row each (zeros past C): the nine taps, then the prologue's mean,
// scale and beta (zeros without a prologue).
template <typename T>
struct Consts {
  static constexpr int kMu = NT, kSc = NT + 1, kBe = NT + 2;
  simd::Padded<T> rows;
  int64_t Cp;
  Consts(const at::Tensor& weight, const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& scale,
         const c10::optional<at::Tensor>& beta, int64_t C)
      : rows(C, NT + 3), Cp(rows.Cp) {
    at::Tensor wc = weight.reshape({C, NT}).contiguous();
    const T* wp = wc.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c)
      for (int k = 0; k < NT; ++k) rows[k][c] = wp[c * NT + k];
    const c10::optional<at::Tensor>* prologue[] = {&mean, &scale, &beta};
    for (int i = 0; i < 3; ++i) {
      if (!prologue[i]->has_value()) continue;
      at::Tensor t = (*prologue[i])->contiguous();
      std::copy(t.data_ptr<T>(), t.data_ptr<T>() + C, rows[kMu + i]);
    }
  }
  VecConsts<T> at(int64_t o, int64_t C) const {
    using V = Vec<T>;
    VecConsts<T> k;
    for (int i = 0; i < NT; ++i) k.w[i] = V::load(rows[i] + o);
    k.mu = V::load(rows[kMu] + o);
    k.sc = V::load(rows[kSc] + o);
    k.be = V::load(rows[kBe] + o);
    k.m = V::tail(C - o);
    return k;
  }
};

// How a channel vector is loaded and an output stored: whole vectors, the masked tail, or whole
// vectors with non-temporal stores (large outputs: no read for ownership of lines that would leave
// the cache anyway).
constexpr int kPlain = 0, kMasked = 1, kStream = 2;

// Channel vectors per backward sweep (see pixel). One: a vector's nine weights, nine grad_w accumulators and the
// BN sums' two take most of the 32 registers, and with two vectors (once ~25-30 % faster, before BandPrefetch and
// the sums) the compiler spilled the accumulators to the stack, a load and a store per tap. Ad-hoc A/B on the face
// model's maps, 2 threads, inputs evicted before each call: with the sums one vector was 1.2-1.35x faster on 7 x 7
// and 14 x 14 maps and 1.05-1.1x on 28 x 28 and 56 x 56 ones; without them 1.0-1.2x, 1.5x on 4 x 4 x 960.
constexpr int kVecs = 1;

// The backward's flavours: a plain conv, the BN + ReLU6 prologue, the prologue and the BN sums.
constexpr int kNoPrologue = 0, kPrologue = 1, kPrologueSums = 2;

template <typename T, int MODE>
FF_ALWAYS_INLINE typename Vec<T>::reg load(const T* p, typename Vec<T>::mask m) {
  return MODE == kMasked ? Vec<T>::load(p, m) : Vec<T>::load(p);
}

template <typename T, int MODE>
FF_ALWAYS_INLINE void store(T* p, typename Vec<T>::reg v, typename Vec<T>::mask m) {
  if (MODE == kMasked)
    Vec<T>::store(p, v, m);
  else if (MODE == kStream)
    Vec<T>::stream(p, v);
  else
    Vec<T>::store(p, v);
}

// Rows per task for `rows` rows of row_bytes each: up to 64 tasks of at least ~256 KiB, fixed by the
// shape alone (the backward's every task adds a 9 x C float64 partial to a serial-order merge).
inline int64_t task_rows(int64_t rows, int64_t row_bytes) {
  const int64_t by_size = std::max<int64_t>(1, rows * row_bytes / (256 * 1024));
  const int64_t ntasks = std::min<int64_t>({rows, int64_t(64), by_size});
  return (rows + ntasks - 1) / ntasks;
}

// Rows per band: a band is swept once per channel vector, so ~96 KiB of it should stay in L2.
inline int64_t band_rows(int64_t row_bytes) { return std::max<int64_t>(1, (96 * 1024) / std::max<int64_t>(row_bytes, 1)); }

// ---- forward ----------------------------------------------------------------------------------

// Input row xr (W pixels x C channels, read in memory order) activated into a ring slot laid out
// [channel vector][W + 2][L], zero-padded at both ends of every vector's row: taps become plain loads.
template <typename T, bool PRO>
void fill_row(T* slot, const T* xr, int64_t W, int64_t C, const Consts<T>& cst) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t nv = cst.Cp / L, pitch = (W + 2) * L, full = C / L;
  for (int64_t v = 0; v < nv; ++v) {
    V::store(slot + v * pitch, V::zero());
    V::store(slot + v * pitch + (W + 1) * L, V::zero());
  }
  // Pixels outer, vectors inner: x is read in memory order (a vector every C channels ran slower).
  const T* mu = cst.rows[Consts<T>::kMu];
  const T* sc = cst.rows[Consts<T>::kSc];
  const T* be = cst.rows[Consts<T>::kBe];
  const auto tail = V::tail(C - full * L);
  for (int64_t ix = 0; ix < W; ++ix) {
    const T* src = xr + ix * C;
    T* dst = slot + (ix + 1) * L;
    for (int64_t v = 0; v < nv; ++v) {
      auto a = v < full ? V::load(src + v * L) : V::load(src + v * L, tail);
      if (PRO) a = simd::relu6<T>(V::fmadd(V::sub(a, V::load(mu + v * L)), V::load(sc + v * L), V::load(be + v * L)));
      V::store(dst + v * pitch, a);
    }
  }
}

// One output pixel at one channel vector from the three ring rows (padded: ox * S + kx is in range).
template <typename T, int S, int MODE>
FF_ALWAYS_INLINE typename Vec<T>::reg out_pixel(const T* const* rows, T* zp, int64_t ox, const VecConsts<T>& k) {
  using V = Vec<T>;
  constexpr int L = V::L;
  auto acc = V::zero();
#pragma GCC unroll 3
  for (int ky = 0; ky < K; ++ky) {
    const T* p = rows[ky] + ox * S * L;
#pragma GCC unroll 3
    for (int kx = 0; kx < K; ++kx) acc = V::fmadd(V::load(p + kx * L), k.w[ky * K + kx], acc);
  }
  store<T, MODE>(zp, acc, k.m);
  return acc;
}

// s += a - kv, q += (a - kv)^2: an output vector's share of the batch statistics (STATS), from the register
// it was written from (the outputs are never read back for them).
template <typename T>
FF_ALWAYS_INLINE void add_moments(typename Vec<T>::reg a, typename Vec<T>::reg kv, typename Vec<T>::reg& s,
                                  typename Vec<T>::reg& q) {
  using V = Vec<T>;
  const auto d = V::sub(a, kv);
  s = V::add(s, d);
  q = V::fmadd(d, d, q);
}

// A row's OW output pixels at one channel vector; with STATS also their moments about the shift kv (add_moments).
template <typename T, int S, int MODE, bool STATS>
FF_ALWAYS_INLINE void out_row(const T* const* rows, T* zo, int64_t OW, int64_t C, const VecConsts<T>& k,
                              typename Vec<T>::reg kv, typename Vec<T>::reg& s, typename Vec<T>::reg& q) {
  for (int64_t ox = 0; ox < OW; ++ox) {
    const auto a = out_pixel<T, S, MODE>(rows, zo + ox * C, ox, k);
    if (STATS) add_moments<T>(a, kv, s, q);
  }
}

// out_row at two consecutive channel vectors (ra, rb): z is written a 128-byte run per pixel (see pixel).
template <typename T, int S, int MODE, bool STATS>
FF_ALWAYS_INLINE void out_row2(const T* const* ra, const T* const* rb, T* zo, int64_t OW, int64_t C,
                               const VecConsts<T>& k0, const VecConsts<T>& k1, typename Vec<T>::reg kv0,
                               typename Vec<T>::reg kv1, typename Vec<T>::reg& s0, typename Vec<T>::reg& q0,
                               typename Vec<T>::reg& s1, typename Vec<T>::reg& q1) {
  constexpr int L = Vec<T>::L;
  for (int64_t ox = 0; ox < OW; ++ox) {
    const auto a0 = out_pixel<T, S, MODE>(ra, zo + ox * C, ox, k0);
    const auto a1 = out_pixel<T, S, MODE>(rb, zo + ox * C + L, ox, k1);
    if (STATS) add_moments<T>(a0, kv0, s0, q0), add_moments<T>(a1, kv1, s1, q1);
  }
}

// The forward's tasks: (rows per task, tasks) over the N * OH output rows, fixed by the shape alone.
template <typename T>
inline std::pair<int64_t, int64_t> forward_tasks(const Geo& G) {
  const int64_t rows = G.N * G.OH, per = task_rows(rows, G.OW * G.C * int64_t(sizeof(T)));
  return {per, (rows + per - 1) / per};
}

// The forward's batch statistics of z (STATS): per task, float sums over each output row about a per-channel
// shift (the task's first output pixel, then its first row's mean: a value of the data, so the sums stay of the
// order of the spread), added to float64 sums; tasks merged in task order as bn_act merges its chunks.
template <typename T>
struct ZStats {
  double* sum;    // ntasks x C: sum of (z - shift)
  double* sumsq;  // ntasks x C: sum of (z - shift)^2
  T* shift;       // ntasks x C
  int64_t* count; // ntasks
};

template <typename T, int S, bool PRO, bool STATS>
void forward_kernel(const Geo& G, const T* x, T* z, const Consts<T>& cst, const ZStats<T>* zs) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t C = G.C, W = G.W, rows = G.N * G.OH;
  const auto [per, ntasks] = forward_tasks<T>(G);
  const int64_t nv = cst.Cp / L, full = C / L, vpitch = (W + 2) * L, spitch = nv * vpitch;
  const bool nt = simd::stream_ok(z, rows * G.OW, C, simd::kStreamBytes);
  for_tasks(rows * G.OW * C, ntasks, [&](int64_t t) {
    T* ring = simd::scratch<T, 8>(size_t(4 * spitch + (STATS ? 3 * cst.Cp : 0)));
    T* zero_slot = ring + 3 * spitch;
    std::fill(zero_slot, zero_slot + spitch, T(0));
    // STATS: the shift, and the current row's float sums of (z - shift) and its square, a padded row each.
    T* kk = ring + 4 * spitch;
    T* ss = kk + cst.Cp;
    T* qq = ss + cst.Cp;
    double* dsum = STATS ? zs->sum + t * C : nullptr;
    double* dsq = STATS ? zs->sumsq + t * C : nullptr;
    if (STATS) {
      std::fill(kk, kk + 3 * cst.Cp, T(0));
      std::fill(dsum, dsum + C, 0.0);
      std::fill(dsq, dsq + C, 0.0);
    }
    int64_t held[K] = {-1, -1, -1};  // which input row (n * H + iy) each ring slot holds
    const int64_t r0 = t * per, r1 = std::min(rows, (t + 1) * per);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / G.OH, oy = r % G.OH;
      const T* slots[K];
      for (int ky = 0; ky < K; ++ky) {
        const int64_t iy = oy * S - 1 + ky;
        if (iy < 0 || iy >= G.H) {
          slots[ky] = zero_slot;
          continue;
        }
        const int64_t id = n * G.H + iy, s = iy % K;  // three consecutive rows: three slots
        T* slot = ring + s * spitch;
        if (held[s] != id) {
          fill_row<T, PRO>(slot, x + id * W * C, W, C, cst);
          held[s] = id;
        }
        slots[ky] = slot;
      }
      if (STATS && r == r0) {  // the shift: the task's first output pixel, computed once more into kk
        for (int64_t v = 0; v < nv; ++v) {
          const VecConsts<T> k = cst.at(v * L, C);
          const T* rv[K] = {slots[0] + v * vpitch, slots[1] + v * vpitch, slots[2] + v * vpitch};
          out_pixel<T, S, kMasked>(rv, kk + v * L, 0, k);
        }
      }
      T* zr = z + r * G.OW * C;
      int64_t v = 0;
      for (; v + 2 <= full; v += 2) {  // two vectors per sweep over the row's pixels (out_row2)
        const VecConsts<T> k0 = cst.at(v * L, C), k1 = cst.at((v + 1) * L, C);
        const T* ra[K] = {slots[0] + v * vpitch, slots[1] + v * vpitch, slots[2] + v * vpitch};
        const T* rb[K] = {ra[0] + vpitch, ra[1] + vpitch, ra[2] + vpitch};
        T* zo = zr + v * L;
        auto s0 = V::zero(), q0 = V::zero(), s1 = V::zero(), q1 = V::zero(), kv0 = V::zero(), kv1 = V::zero();
        if (STATS) {
          s0 = V::load(ss + v * L), q0 = V::load(qq + v * L), kv0 = V::load(kk + v * L);
          s1 = V::load(ss + v * L + L), q1 = V::load(qq + v * L + L), kv1 = V::load(kk + v * L + L);
        }
        if (nt)
          out_row2<T, S, kStream, STATS>(ra, rb, zo, G.OW, C, k0, k1, kv0, kv1, s0, q0, s1, q1);
        else
          out_row2<T, S, kPlain, STATS>(ra, rb, zo, G.OW, C, k0, k1, kv0, kv1, s0, q0, s1, q1);
        if (STATS) {
          V::store(ss + v * L, s0), V::store(qq + v * L, q0);
          V::store(ss + v * L + L, s1), V::store(qq + v * L + L, q1);
        }
      }
      for (; v < nv; ++v) {
        const VecConsts<T> k = cst.at(v * L, C);
        const T* rv[K] = {slots[0] + v * vpitch, slots[1] + v * vpitch, slots[2] + v * vpitch};
        T* zo = zr + v * L;
        auto sv = V::zero(), qv = V::zero(), kv = V::zero();
        if (STATS) sv = V::load(ss + v * L), qv = V::load(qq + v * L), kv = V::load(kk + v * L);
        if (v >= full)
          out_row<T, S, kMasked, STATS>(rv, zo, G.OW, C, k, kv, sv, qv);
        else if (nt)
          out_row<T, S, kStream, STATS>(rv, zo, G.OW, C, k, kv, sv, qv);
        else
          out_row<T, S, kPlain, STATS>(rv, zo, G.OW, C, k, kv, sv, qv);
        if (STATS) V::store(ss + v * L, sv), V::store(qq + v * L, qv);
      }
      if (STATS) {
        for (int64_t c = 0; c < C; ++c) {  // (vectorised by the compiler)
          dsum[c] += double(ss[c]);
          dsq[c] += double(qq[c]);
        }
        std::fill(ss, ss + 2 * cst.Cp, T(0));
        if (r == r0) {
          // Re-shift to the first row's mean (rounded to T): one pixel may lie a few standard deviations from
          // the mean, and sumsq - sum^2 / n then cancels that much; the float64 sums move exactly with it.
          const double n = double(G.OW);
          for (int64_t c = 0; c < C; ++c) {
            const T k1 = T(double(kk[c]) + dsum[c] / n);
            const double d = double(k1) - double(kk[c]);
            dsq[c] += d * (n * d - 2.0 * dsum[c]);
            dsum[c] -= n * d;
            kk[c] = k1;
          }
        }
      }
    }
    if (STATS) {
      std::copy(kk, kk + C, zs->shift + t * C);
      zs->count[t] = (r1 - r0) * G.OW;
    }
    if (nt) simd::stream_fence();
  });
}

// ---- backward ---------------------------------------------------------------------------------

// The taps a row (or a pixel) of the input receives: bit k set when output index (i + 1 - k) / S
// exists (divisible by S and in [0, O)).
template <int S>
inline int tap_mask(int64_t i, int64_t O) {
  int m = 0;
  for (int k = 0; k < K; ++k) {
    const int64_t o2 = i + 1 - k;
    if (o2 >= 0 && o2 % S == 0 && o2 / S < O) m |= 1 << k;
  }
  return m;
}

// One input pixel, NV consecutive channel vectors: grad_x from the taps, grad_w accumulated from the same
// loads. g[ky] points at grad_out row oy(ky) at the first vector; gxp/xp at the pixel. Several vectors per
// pass keep the sweep over a band's pixels contiguous in memory (one 64-byte vector per pixel every C
// channels ran at ~2/3 of the bandwidth).
template <typename T, int S, int FL, int RM, int CM, int MODE, int NV>
FF_ALWAYS_INLINE void pixel(const T* const* g, int64_t ix, int64_t C, const T* xp, T* gxp, const VecConsts<T>* k,
                            Regs<T>* gw) {
  using V = Vec<T>;
  constexpr int L = V::L;
  constexpr int LM = MODE == kStream ? kPlain : MODE;
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const auto xv = load<T, LM>(xp + j * L, k[j].m);
    auto xc = V::zero(), pre = V::zero(), av = xv;
    if (FL != kNoPrologue) {
      xc = V::sub(xv, k[j].mu);
      pre = V::fmadd(xc, k[j].sc, k[j].be);
      av = simd::relu6<T>(pre);
    }
    auto acc = V::zero();
#pragma GCC unroll 3
    for (int ky = 0; ky < K; ++ky) {
      if (!((RM >> ky) & 1)) continue;
#pragma GCC unroll 3
      for (int kx = 0; kx < K; ++kx) {
        if (!((CM >> kx) & 1)) continue;
        const int64_t ox = (ix + 1 - kx) / S;
        const auto gv = load<T, LM>(g[ky] + ox * C + j * L, k[j].m);
        acc = V::fmadd(gv, k[j].w[ky * K + kx], acc);
        gw[j][ky * K + kx] = V::fmadd(gv, av, gw[j][ky * K + kx]);
      }
    }
    if (FL == kPrologueSums) {  // g = grad_a behind the ReLU6 mask (the BN output's gradient) and its BN sums
      const auto gm = V::keep_open(acc, pre, V::zero(), V::set1(T(6)));
      store<T, MODE>(gxp + j * L, gm, k[j].m);
      gw[j][NT] = V::add(gw[j][NT], gm);
      gw[j][NT + 1] = V::fmadd(gm, xc, gw[j][NT + 1]);
    } else {
      store<T, MODE>(gxp + j * L, acc, k[j].m);
    }
  }
}

template <typename T, int S, int FL, int RM, int MODE, int NV>
FF_ALWAYS_INLINE void pixel_any(int cm, const T* const* g, int64_t ix, int64_t C, const T* xp, T* gxp,
                                const VecConsts<T>* k, Regs<T>* gw) {
  switch (cm) {
#define FF_CASE(c) \
  case c:          \
    pixel<T, S, FL, RM, c, MODE, NV>(g, ix, C, xp, gxp, k, gw); \
    break;
    FF_CASE(0) FF_CASE(1) FF_CASE(2) FF_CASE(3) FF_CASE(4) FF_CASE(5) FF_CASE(6) FF_CASE(7)
#undef FF_CASE
  }
}

// One input row at NV channel vectors: its pixels in order, the common column masks without the switch.
template <typename T, int S, int FL, int RM, int MODE, int NV>
FF_ALWAYS_INLINE void row_pixels(const Geo& G, const T* const* g, const T* xo, T* gxo, const VecConsts<T>* k,
                                 Regs<T>* gw, const int* cmask) {
  const int64_t C = G.C, W = G.W;
  if (S == 1) {
    // Interior columns 1..W-2 receive all three taps.
    pixel_any<T, S, FL, RM, MODE, NV>(cmask[0], g, 0, C, xo, gxo, k, gw);
    for (int64_t ix = 1; ix < W - 1; ++ix)
      pixel<T, S, FL, RM, 7, MODE, NV>(g, ix, C, xo + ix * C, gxo + ix * C, k, gw);
    if (W > 1)
      pixel_any<T, S, FL, RM, MODE, NV>(cmask[W - 1], g, W - 1, C, xo + (W - 1) * C, gxo + (W - 1) * C, k, gw);
  } else {
    // Stride 2: even columns take the middle tap (mask 2), odd ones the outer two (mask 5) except
    // possibly the last; any other mask goes through the switch.
    int64_t ix = 0;
    for (; ix + 1 < W; ix += 2) {
      const T* x0 = xo + ix * C;
      T* g0 = gxo + ix * C;
      if (cmask[ix] == 2)
        pixel<T, S, FL, RM, 2, MODE, NV>(g, ix, C, x0, g0, k, gw);
      else
        pixel_any<T, S, FL, RM, MODE, NV>(cmask[ix], g, ix, C, x0, g0, k, gw);
      if (cmask[ix + 1] == 5)
        pixel<T, S, FL, RM, 5, MODE, NV>(g, ix + 1, C, x0 + C, g0 + C, k, gw);
      else
        pixel_any<T, S, FL, RM, MODE, NV>(cmask[ix + 1], g, ix + 1, C, x0 + C, g0 + C, k, gw);
    }
    if (ix < W) pixel_any<T, S, FL, RM, MODE, NV>(cmask[ix], g, ix, C, xo + ix * C, gxo + ix * C, k, gw);
  }
}

// Input rows [r0, r1) at channel vectors [o, o + NV * L): the weights and grad_w accumulators are loaded
// and flushed once per band, not per row (7 x 7 maps have 7 pixels a row).
template <typename T, int S, int FL, int MODE, int NV>
void bwd_band_vector(const Geo& G, const T* gy, const T* x, T* gx, const Consts<T>& cst, T* gwt, int64_t r0,
                     int64_t r1, int64_t o, const int* cmask) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t C = G.C, W = G.W;
  VecConsts<T> k[NV];
  Regs<T> gw[NV];
  for (int j = 0; j < NV; ++j) {
    k[j] = cst.at(o + j * L, C);
    for (int i = 0; i < NACC; ++i) gw[j][i] = V::zero();
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / G.H, iy = r % G.H;
    const T* g[K];
    for (int ky = 0; ky < K; ++ky) {
      const int64_t oy = std::min<int64_t>(std::max<int64_t>(iy + 1 - ky, 0) / S, G.OH - 1);  // read only if valid
      g[ky] = gy + (n * G.OH + oy) * G.OW * C + o;
    }
    const T* xo = x + r * W * C + o;
    T* gxo = gx + r * W * C + o;
    switch (tap_mask<S>(iy, G.OH)) {
#define FF_CASE(rm) \
  case rm:          \
    row_pixels<T, S, FL, rm, MODE, NV>(G, g, xo, gxo, k, gw, cmask); \
    break;
      FF_CASE(1) FF_CASE(2) FF_CASE(3) FF_CASE(4) FF_CASE(5) FF_CASE(6) FF_CASE(7)
#undef FF_CASE
      default:  // no tap reaches this row: its gradient is 0
        for (int64_t ix = 0; ix < W; ++ix)
          for (int j = 0; j < NV; ++j) store<T, MODE>(gxo + ix * C + j * L, V::zero(), k[j].m);
    }
  }
  for (int j = 0; j < NV; ++j) {
    T* acc = gwt + o + j * L;
    for (int i = 0; i < NACC; ++i) V::store(acc + i * cst.Cp, V::add(V::load(acc + i * cst.Cp), gw[j][i]));
  }
}

// The next band's rows pulled into L2 while the current one is swept, a slice per channel-vector sweep.
// Every sweep reads one or two 64-byte lines of each of the band's pixels, C channels apart: with a
// wide pixel (960 channels: 3840 bytes) that is one line a page, which the hardware prefetchers do not
// follow, and every load waited on L3 (the 4 x 4 x 960 maps ran at ~6 GB/s, 2-3x slower than oneDNN).
class BandPrefetch {
 public:
  // Byte ranges [p, p + n) (write: prefetched for ownership), fetched over `steps` calls of step().
  void add(const void* p, int64_t n, bool write) {
    if (n <= 0) return;
    ranges_[count_++] = {static_cast<const char*>(p), n, write};
    lines_ += (n + 63) / 64;
  }
  void start(int64_t steps) { per_ = (lines_ + std::max<int64_t>(steps, 1) - 1) / std::max<int64_t>(steps, 1); }
  void step() {
    for (int64_t done = 0; done < per_ && r_ < count_;) {
      const Range& g = ranges_[r_];
      const char* p = g.p + off_;
      if (g.write)
        __builtin_prefetch(p, 1, 2);
      else
        __builtin_prefetch(p, 0, 2);
      ++done;
      off_ += 64;
      if (off_ >= g.n) off_ = 0, ++r_;
    }
  }

 private:
  struct Range {
    const char* p;
    int64_t n;
    bool write;
  };
  Range ranges_[3];
  int count_ = 0, r_ = 0;
  int64_t lines_ = 0, per_ = 0, off_ = 0;
};

template <typename T, int S, int FL>
void backward_kernel(const Geo& G, const T* gy, const T* x, T* gx, const Consts<T>& cst, double* gwd) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t C = G.C, Cp = cst.Cp, rows = G.N * G.H, row_bytes = G.W * C * int64_t(sizeof(T));
  const int64_t per = task_rows(rows, row_bytes), ntasks = (rows + per - 1) / per, band = band_rows(row_bytes);
  const int64_t full = C / L * L;
  const bool nt = simd::stream_ok(gx, rows * G.W, C, simd::kStreamBytes);
  std::vector<int> cmask(static_cast<size_t>(G.W));
  for (int64_t ix = 0; ix < G.W; ++ix) cmask[size_t(ix)] = tap_mask<S>(ix, G.OW);
  std::unique_ptr<double[]> part(new double[static_cast<size_t>(ntasks * NACC * C)]);  // every task writes its slice
  const int* cm = cmask.data();
  double* partp = part.get();
  for_tasks(rows * G.W * C, ntasks, [&](int64_t t) {
    T* gwt = simd::scratch<T, 7>(size_t(NACC * Cp));
    std::fill(gwt, gwt + NACC * Cp, T(0));
    for (int64_t b0 = t * per, t1 = std::min(rows, (t + 1) * per); b0 < t1; b0 += band) {
      const int64_t b1 = std::min(t1, b0 + band), b2 = std::min(t1, b1 + band);
      BandPrefetch pf;
      if (b2 > b1) {  // grad_out rows oy(ky) of the next band's input rows: from its first row's oy(2) on
        const int64_t g0 = (b1 / G.H) * G.OH + std::max<int64_t>(b1 % G.H - 1, 0) / S;
        const int64_t g1 = ((b2 - 1) / G.H) * G.OH + std::min<int64_t>((b2 - 1) % G.H + 1, G.OH * S - 1) / S + 1;
        pf.add(x + b1 * G.W * C, (b2 - b1) * row_bytes, false);
        pf.add(gy + g0 * G.OW * C, (g1 - g0) * G.OW * C * int64_t(sizeof(T)), false);
        if (!nt) pf.add(gx + b1 * G.W * C, (b2 - b1) * row_bytes, true);
        pf.start((full / (kVecs * L)) + (full % (kVecs * L)) / L + (full < C));
      }
      int64_t o = 0;
      for (; o + kVecs * L <= full; o += kVecs * L) {
        pf.step();
        if (nt)
          bwd_band_vector<T, S, FL, kStream, kVecs>(G, gy, x, gx, cst, gwt, b0, b1, o, cm);
        else
          bwd_band_vector<T, S, FL, kPlain, kVecs>(G, gy, x, gx, cst, gwt, b0, b1, o, cm);
      }
      for (; o < full; o += L) {
        pf.step();
        if (nt)
          bwd_band_vector<T, S, FL, kStream, 1>(G, gy, x, gx, cst, gwt, b0, b1, o, cm);
        else
          bwd_band_vector<T, S, FL, kPlain, 1>(G, gy, x, gx, cst, gwt, b0, b1, o, cm);
      }
      pf.step();
      if (full < C) bwd_band_vector<T, S, FL, kMasked, 1>(G, gy, x, gx, cst, gwt, b0, b1, full, cm);
    }
    if (nt) simd::stream_fence();
    double* dst = partp + t * NACC * C;
    for (int i = 0; i < NACC; ++i)
      for (int64_t c = 0; c < C; ++c) dst[i * C + c] = double(gwt[i * Cp + c]);
  });
  // Task partials summed in task order (per element, so any split of the elements gives the same sums).
  at::parallel_for(0, NACC * C, 2048, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double acc = 0.0;
      for (int64_t t = 0; t < ntasks; ++t) acc += partp[t * NACC * C + i];
      gwd[i] = acc;
    }
  });
}

// The kernels one translation unit instantiates (EXTERN empty) or every other one takes from there (EXTERN extern).
#define FASTFACE_DWCONV_TRAIN_KERNELS(EXTERN, T, S)                                                        \
  EXTERN template void forward_kernel<T, S, false, false>(const Geo&, const T*, T*, const Consts<T>&,      \
                                                          const ZStats<T>*);                               \
  EXTERN template void forward_kernel<T, S, true, false>(const Geo&, const T*, T*, const Consts<T>&,       \
                                                         const ZStats<T>*);                                \
  EXTERN template void forward_kernel<T, S, false, true>(const Geo&, const T*, T*, const Consts<T>&,       \
                                                         const ZStats<T>*);                                \
  EXTERN template void forward_kernel<T, S, true, true>(const Geo&, const T*, T*, const Consts<T>&,        \
                                                        const ZStats<T>*);                                 \
  EXTERN template void backward_kernel<T, S, kNoPrologue>(const Geo&, const T*, const T*, T*, const Consts<T>&, \
                                                          double*);                                        \
  EXTERN template void backward_kernel<T, S, kPrologue>(const Geo&, const T*, const T*, T*, const Consts<T>&,   \
                                                        double*);                                          \
  EXTERN template void backward_kernel<T, S, kPrologueSums>(const Geo&, const T*, const T*, T*,                 \
                                                            const Consts<T>&, double*);

FASTFACE_DWCONV_TRAIN_KERNELS(extern, float, 1)
FASTFACE_DWCONV_TRAIN_KERNELS(extern, float, 2)
FASTFACE_DWCONV_TRAIN_KERNELS(extern, double, 1)
FASTFACE_DWCONV_TRAIN_KERNELS(extern, double, 2)

}  // namespace dwconv_train
}  // namespace fastface
