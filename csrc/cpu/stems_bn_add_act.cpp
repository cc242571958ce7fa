// The split model's two branch stems, each a dense 3x3 conv (no bias, padding 1) over its modality's
// channels of one input followed by a training BN, summed and activated: the "add" merge at
// split = 1, in training, on the CPU, float32/float64.
//
//   y = act(BN_a(conv(x[:, :ca], w_a, stride)) + BN_b(conv(x[:, ca:], w_b, stride)))
//
// Why one op: with 1-3 input channels a stem costs only 9 * cin multiply-adds per output value,
// but its outputs are the network's largest maps (64 x 32 x 56 x 56 per branch at batch 64).
// ATen's path writes both conv outputs, reads them twice (statistics, then the BN), and in the
// backward writes and reads both pre-activation gradients again before its weight-gradient
// convs (~25 ms of the face model's ~300 ms training step on 2 cores). Here the conv outputs are
// recomputed from the input (a few KB per output row, in L1) instead of stored:
//
// Forward, two passes over output rows (n, oh):
//   1. conv row -> per-row mean and M2 (two sweeps over the row in L1), merged into the task's
//      float64 moments with Chan's formula; tasks merged in task order (moments.h), so results do
//      not depend on the thread count;
//   2. conv row again -> y = act(z_a * s_a + z_b * s_b + shift), written channels_last.
// Backward (x is the network input: no gradient for it), one pass (grad_y and x read once):
//   conv row -> u (the forward's pre-activation, so the ReLU6 mask is the forward's bit for bit),
//   g = grad_y behind the mask; per task the BN sums (sum g = grad_beta of both BNs, sum g * (z - mean)
//   per branch = grad_gamma / invstd) and the weight-gradient sums G, H, S of backward_kernel, whose
//   linear combination after the pass gives the weight gradients (float per few rows, float64 per task,
//   tasks combined in order).
// Per row the input rows a 3x3 window reads are copied into a zero-padded buffer, so the inner
// loops have no border cases. The micro-kernels vectorise output channels (padded to whole
// vectors with zero weights) and block several output pixels in registers. Tasks (fixed by the shape)
// run on ATen's OpenMP threads (aten_tasks.h), as the other training kernels' do: the op runs between
// oneDNN's convs and the fused optimiser, whose OpenMP threads would otherwise spin next to a pool's.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "aten_tasks.h"
#include "moments.h"
#include "simd.h"

namespace fastface {
namespace {

constexpr int K = 3;  // kernel size (padding 1)

template <typename T>
using V = simd::Vec<T>;

// Output pixels a forward micro-kernel keeps in registers with NV channel vectors each.
template <int NV>
constexpr int block_pixels() {
  return NV == 1 ? 12 : NV == 2 ? 8 : 6;
}

// z[p * zs + v * L] = sum over (ci, kh, kw) of xp[ci][kh][(ow0 + p) * s + kw] * w[tap][v * L] for P pixels,
// NV channel vectors. xp rows: (ci * K + kh) * Wp; w rows: taps of Cp values.
template <typename T, int NV, int P, int S>
FF_ALWAYS_INLINE void conv_block(const T* xp, int64_t cin, int64_t Wp, int s_, const T* w, int64_t Cp, T* z,
                                 int64_t zs) {
  const int s = S > 0 ? S : s_;  // constant for the common strides: the window loads take fixed offsets
  using R = typename V<T>::reg;
  constexpr int L = V<T>::L;
  R acc[P][NV];
  FF_UNROLL for (int p = 0; p < P; ++p) {
    FF_UNROLL for (int v = 0; v < NV; ++v) acc[p][v] = V<T>::zero();
  }
  for (int64_t ci = 0; ci < cin; ++ci) {
    for (int kh = 0; kh < K; ++kh) {
      const T* row = xp + (ci * K + kh) * Wp;
      FF_UNROLL for (int kw = 0; kw < K; ++kw) {
        const T* wt = w + ((ci * K + kh) * K + kw) * Cp;
        R wv[NV];
        FF_UNROLL for (int v = 0; v < NV; ++v) wv[v] = V<T>::load(wt + v * L);
        FF_UNROLL for (int p = 0; p < P; ++p) {
          const R xb = V<T>::set1(row[p * s + kw]);
          FF_UNROLL for (int v = 0; v < NV; ++v) acc[p][v] = V<T>::fmadd(xb, wv[v], acc[p][v]);
        }
      }
    }
  }
  FF_UNROLL for (int p = 0; p < P; ++p) {
    FF_UNROLL for (int v = 0; v < NV; ++v) V<T>::store(z + p * zs + v * L, acc[p][v]);
  }
}

// One output row of one branch's conv: z[ow * zs + c] for ow < OW, c < Cp (whole vectors).
template <typename T, int NV, int S>
void conv_row_chunk(const T* xp, int64_t cin, int64_t Wp, int s, const T* w, int64_t Cp, int64_t OW, T* z,
                    int64_t zs) {
  constexpr int P = block_pixels<NV>();
  int64_t ow = 0;
  for (; ow + P <= OW; ow += P) conv_block<T, NV, P, S>(xp + ow * s, cin, Wp, s, w, Cp, z + ow * zs, zs);
  for (; ow + 4 <= OW; ow += 4) conv_block<T, NV, 4, S>(xp + ow * s, cin, Wp, s, w, Cp, z + ow * zs, zs);
  if (ow + 2 <= OW) {
    conv_block<T, NV, 2, S>(xp + ow * s, cin, Wp, s, w, Cp, z + ow * zs, zs);
    ow += 2;
  }
  if (ow < OW) conv_block<T, NV, 1, S>(xp + ow * s, cin, Wp, s, w, Cp, z + ow * zs, zs);
}

// f(NV, c0) for the Cp padded channels in chunks of up to 4 vectors (NV a std::integral_constant: the
// micro-kernels' register blocks are sized at compile time).
template <typename T, class F>
FF_ALWAYS_INLINE void for_channel_chunks(int64_t Cp, F&& f) {
  constexpr int L = V<T>::L;
  for (int64_t c0 = 0; c0 < Cp; c0 += 4 * L) {
    switch (std::min<int64_t>(4, (Cp - c0) / L)) {
      case 1: f(std::integral_constant<int, 1>{}, c0); break;
      case 2: f(std::integral_constant<int, 2>{}, c0); break;
      case 3: f(std::integral_constant<int, 3>{}, c0); break;
      default: f(std::integral_constant<int, 4>{}, c0); break;
    }
  }
}

template <typename T, int S>
void conv_row_s(const T* xp, int64_t cin, int64_t Wp, int s, const T* w, int64_t Cp, int64_t OW, T* z, int64_t zs) {
  for_channel_chunks<T>(Cp, [&](auto nv, int64_t c0) {
    conv_row_chunk<T, decltype(nv)::value, S>(xp, cin, Wp, s, w + c0, Cp, OW, z + c0, zs);
  });
}

template <typename T>
void conv_row(const T* xp, int64_t cin, int64_t Wp, int s, const T* w, int64_t Cp, int64_t OW, T* z, int64_t zs) {
  if (s == 2) {
    conv_row_s<T, 2>(xp, cin, Wp, s, w, Cp, OW, z, zs);
  } else if (s == 1) {
    conv_row_s<T, 1>(xp, cin, Wp, s, w, Cp, OW, z, zs);
  } else {
    conv_row_s<T, 0>(xp, cin, Wp, s, w, Cp, OW, z, zs);
  }
}

// gw[tap][c] += sum over ow of dz[ow * zs + c] * xp[ci][kh][ow * s + kw], for one branch, NV channel
// vectors at a time, KH rows of K taps per sweep (KH * K * NV accumulators: all 9 taps of an input
// channel for up to two vectors, so each loaded dz vector feeds 9 FMAs).
template <typename T, int NV, int KH>
void wgrad_row_chunk(const T* xp, int64_t cin, int64_t Wp, int s, const T* dz, int64_t zs, int64_t OW, T* gw,
                     int64_t Cp) {
  using R = typename V<T>::reg;
  constexpr int L = V<T>::L;
  for (int64_t ci = 0; ci < cin; ++ci) {
    for (int kh0 = 0; kh0 < K; kh0 += KH) {
      const T* rows = xp + (ci * K + kh0) * Wp;
      R acc[KH][K][NV];
      FF_UNROLL for (int kh = 0; kh < KH; ++kh) {
        FF_UNROLL for (int kw = 0; kw < K; ++kw) {
          FF_UNROLL for (int v = 0; v < NV; ++v) acc[kh][kw][v] = V<T>::zero();
        }
      }
      for (int64_t ow = 0; ow < OW; ++ow) {
        R d[NV];
        FF_UNROLL for (int v = 0; v < NV; ++v) d[v] = V<T>::load(dz + ow * zs + v * L);
        FF_UNROLL for (int kh = 0; kh < KH; ++kh) {
          FF_UNROLL for (int kw = 0; kw < K; ++kw) {
            const R xb = V<T>::set1(rows[kh * Wp + ow * s + kw]);
            FF_UNROLL for (int v = 0; v < NV; ++v) acc[kh][kw][v] = V<T>::fmadd(xb, d[v], acc[kh][kw][v]);
          }
        }
      }
      FF_UNROLL for (int kh = 0; kh < KH; ++kh) {
        FF_UNROLL for (int kw = 0; kw < K; ++kw) {
          T* g = gw + ((ci * K + kh0 + kh) * K + kw) * Cp;
          FF_UNROLL for (int v = 0; v < NV; ++v) {
            V<T>::store(g + v * L, V<T>::add(V<T>::load(g + v * L), acc[kh][kw][v]));
          }
        }
      }
    }
  }
}

template <typename T>
void wgrad_row(const T* xp, int64_t cin, int64_t Wp, int s, const T* dz, int64_t zs, int64_t OW, T* gw, int64_t Cp) {
  for_channel_chunks<T>(Cp, [&](auto nv, int64_t c0) {
    constexpr int NV = decltype(nv)::value;
    // All 9 taps of an input channel in registers up to two vectors (18 accumulators), a row of 3 beyond.
    wgrad_row_chunk<T, NV, (NV <= 2 ? K : 1)>(xp, cin, Wp, s, dz + c0, zs, OW, gw + c0, Cp);
  });
}

// Shapes and strides of one call; rows r = n * OH + oh.
struct Geometry {
  int64_t N, Cin, H, W, ca, cb, C, Cp, OH, OW, Wp, s;
  int64_t sn, sc, sh, sw;  // x's strides (any layout)
  int64_t rows() const { return N * OH; }
  int64_t taps_a() const { return ca * K * K; }
  int64_t taps_b() const { return cb * K * K; }
};

// The K input rows under output row r of every input channel, zero-padded: xp[(ci * K + kh) * Wp + 1 + iw].
template <typename T>
void pad_rows(const Geometry& g, const T* x, int64_t r, T* xp) {
  const int64_t n = r / g.OH, oh = r % g.OH;
  for (int64_t ci = 0; ci < g.Cin; ++ci) {
    for (int kh = 0; kh < K; ++kh) {
      T* dst = xp + (ci * K + kh) * g.Wp;
      const int64_t ih = oh * g.s - 1 + kh;
      dst[0] = T(0);
      std::fill(dst + 1 + g.W, dst + g.Wp, T(0));
      if (ih < 0 || ih >= g.H) {
        std::fill(dst + 1, dst + 1 + g.W, T(0));
        continue;
      }
      const T* src = x + n * g.sn + ci * g.sc + ih * g.sh;
      if (g.sw == 1) {
        std::memcpy(dst + 1, src, size_t(g.W) * sizeof(T));
      } else {
        for (int64_t iw = 0; iw < g.W; ++iw) dst[1 + iw] = src[iw * g.sw];
      }
    }
  }
}

// Both branches' conv outputs of row r: z[(b * OW + ow) * Cp + c] (b = 0: branch a, 1: branch b).
template <typename T>
void both_convs(const Geometry& g, const T* xp, const T* wa, const T* wb, T* z) {
  conv_row<T>(xp, g.ca, g.Wp, int(g.s), wa, g.Cp, g.OW, z, g.Cp);
  conv_row<T>(xp + g.ca * K * g.Wp, g.cb, g.Wp, int(g.s), wb, g.Cp, g.OW, z + g.OW * g.Cp, g.Cp);
}

// ---- row passes -------------------------------------------------------------------------------
// Free functions on __restrict pointers, not lambdas: a lambda's captured references are reloaded
// after every store (bn_act.cpp measured ~3x slower row loops). z is both branches' conv row
// ([2][OW][Cp]); per-channel constants are Cp-padded (zeros past C); gy and y rows are OW x C.

// Per-channel mean and M2 of the row (two sweeps over z in L1) merged into the task's float64
// moments (mu, m2 over 2 * Cp channels, cnt values so far) with Chan's formula.
template <typename T>
void stats_row(const T* __restrict z, int64_t OW, int64_t Cp, double cnt, double* __restrict mu,
               double* __restrict m2) {
  using R = typename V<T>::reg;
  constexpr int L = V<T>::L;
  const R inv = V<T>::set1(T(1) / T(OW));
  const double nb = double(OW), nab = cnt + nb;
  for (int64_t c = 0; c < 2 * Cp; c += L) {
    const T* zc = z + (c / Cp) * OW * Cp + c % Cp;
    R sum = V<T>::zero();
    for (int64_t ow = 0; ow < OW; ++ow) sum = V<T>::add(sum, V<T>::load(zc + ow * Cp));
    const R m = V<T>::mul(sum, inv);
    R q = V<T>::zero();
    for (int64_t ow = 0; ow < OW; ++ow) {
      const R d = V<T>::sub(V<T>::load(zc + ow * Cp), m);
      q = V<T>::fmadd(d, d, q);
    }
    alignas(64) T mb[L], qb[L];
    V<T>::store(mb, m);
    V<T>::store(qb, q);
    for (int l = 0; l < L; ++l) {
      const double delta = double(mb[l]) - mu[c + l];
      mu[c + l] += delta * nb / nab;
      m2[c + l] += double(qb[l]) + delta * delta * cnt * nb / nab;
    }
  }
}

// y = act(z_a * sa + z_b * sb + shift) for one row; nt: non-temporal stores (whole vectors, aligned).
template <typename T>
void apply_row(const T* __restrict z, const T* __restrict sa, const T* __restrict sb, const T* __restrict shift,
               int64_t OW, int64_t C, int64_t Cp, bool relu6, bool nt, T* __restrict y) {
  using R = typename V<T>::reg;
  constexpr int L = V<T>::L;
  const R zero = V<T>::zero(), six = V<T>::set1(T(6));
  for (int64_t ow = 0; ow < OW; ++ow) {
    const T* za = z + ow * Cp;
    const T* zb = z + (OW + ow) * Cp;
    T* yo = y + ow * C;
    for (int64_t c = 0; c < C; c += L) {
      R u = V<T>::fmadd(V<T>::load(za + c), V<T>::load(sa + c), V<T>::load(shift + c));
      u = V<T>::fmadd(V<T>::load(zb + c), V<T>::load(sb + c), u);
      if (relu6) u = V<T>::min(V<T>::max(u, zero), six);
      if (nt) {
        V<T>::stream(yo + c, u);
      } else {
        V<T>::store(yo + c, u, V<T>::tail(C - c));
      }
    }
  }
}

// grad_y behind the ReLU6 mask of the recomputed pre-activation, at pixel ow, channels [c, c + L).
template <typename T>
FF_ALWAYS_INLINE typename V<T>::reg masked_grad(const T* __restrict za, const T* __restrict zb,
                                                const T* __restrict gy, const T* __restrict sa,
                                                const T* __restrict sb, const T* __restrict shift, int64_t c,
                                                int64_t C, bool relu6) {
  using R = typename V<T>::reg;
  const R g = V<T>::load(gy + c, V<T>::tail(C - c));
  if (!relu6) return g;
  R u = V<T>::fmadd(V<T>::load(za + c), V<T>::load(sa + c), V<T>::load(shift + c));
  u = V<T>::fmadd(V<T>::load(zb + c), V<T>::load(sb + c), u);
  return V<T>::keep_open(g, u, V<T>::zero(), V<T>::set1(T(6)));
}

// Per row of the backward: gb = g (grad_y behind the mask); s[0..Cp) += g, s[Cp..2Cp) += g * (z_a - mean_a),
// s[2Cp..3Cp) += g * (z_b - mean_b); z_a, z_b replaced by z_a - mean_a, z_b - mean_b (what the weight
// gradients' H sums take). sa, sb, shift: the forward's affine (the mask); ma, mb: the means.
template <typename T>
void grad_row(T* __restrict z, const T* __restrict gy, const T* __restrict sa, const T* __restrict sb,
              const T* __restrict shift, const T* __restrict ma, const T* __restrict mb, int64_t OW, int64_t C,
              int64_t Cp, bool relu6, T* __restrict gb, T* __restrict s) {
  using R = typename V<T>::reg;
  constexpr int L = V<T>::L;
  for (int64_t ow = 0; ow < OW; ++ow) {
    T* za = z + ow * Cp;
    T* zb = z + (OW + ow) * Cp;
    for (int64_t c = 0; c < Cp; c += L) {
      const R g = masked_grad<T>(za, zb, gy + ow * C, sa, sb, shift, c, C, relu6);
      const R da = V<T>::sub(V<T>::load(za + c), V<T>::load(ma + c));
      const R db = V<T>::sub(V<T>::load(zb + c), V<T>::load(mb + c));
      V<T>::store(gb + ow * Cp + c, g);
      V<T>::store(za + c, da);
      V<T>::store(zb + c, db);
      V<T>::store(s + c, V<T>::add(V<T>::load(s + c), g));
      V<T>::store(s + Cp + c, V<T>::fmadd(g, da, V<T>::load(s + Cp + c)));
      V<T>::store(s + 2 * Cp + c, V<T>::fmadd(g, db, V<T>::load(s + 2 * Cp + c)));
    }
  }
}

// Sum over the n elements row[0], row[s], ..., vectorised for s = 1 and 2 (lane parity is element parity:
// even lanes sum row[0], row[2], ..., odd lanes row[1], row[3], ...); a scalar sum in four chains otherwise.
// Returns {sum of row[i * s] for i < n, sum of row[i * s + 1] for i < n} (the second for s = 2 only).
template <typename T>
FF_ALWAYS_INLINE std::pair<T, T> strided_sums(const T* __restrict row, int64_t n, int s) {
  using R = typename V<T>::reg;
  constexpr int L = V<T>::L;
  if (s == 1 || (s == 2 && L % 2 == 0)) {
    const int64_t len = n * s;
    R acc = V<T>::zero();
    for (int64_t j = 0; j < len; j += L) acc = V<T>::add(acc, V<T>::load(row + j, V<T>::tail(len - j)));
    alignas(64) T lanes[L];
    V<T>::store(lanes, acc);
    T even = T(0), odd = T(0);
    for (int l = 0; l < L; l += 2) {
      even += lanes[l];
      if (l + 1 < L) odd += lanes[l + 1];
    }
    if (L == 1) return {even, T(0)};
    return s == 1 ? std::pair<T, T>{even + odd, T(0)} : std::pair<T, T>{even, odd};
  }
  T c[4] = {T(0), T(0), T(0), T(0)};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    FF_UNROLL for (int k = 0; k < 4; ++k) c[k] += row[(i + k) * s];
  }
  for (; i < n; ++i) c[0] += row[i * s];
  return {(c[0] + c[1]) + (c[2] + c[3]), T(0)};
}

// sp[(ci * K + kh) * K + kw] += sum over ow of the tap's input, xp[ci][kh][ow * s + kw] (the patch sums): one
// vector sweep of each padded row, the three taps from it (s = 1: the window slides by one element per tap;
// s = 2: taps 0 and 2 are the even elements, tap 1 the odd ones).
template <typename T>
void patch_sums_row(const T* __restrict xp, int64_t cin, int64_t Wp, int s, int64_t OW, T* __restrict sp) {
  for (int64_t ci = 0; ci < cin; ++ci) {
    for (int kh = 0; kh < K; ++kh) {
      const T* row = xp + (ci * K + kh) * Wp;
      T* o = sp + (ci * K + kh) * K;
      if (s == 1) {
        const T s0 = strided_sums<T>(row, OW, 1).first;  // row[0 .. OW)
        const T s1 = s0 - row[0] + row[OW];
        o[0] += s0;
        o[1] += s1;
        o[2] += s1 - row[1] + row[OW + 1];
      } else if (s == 2 && V<T>::L % 2 == 0) {
        const auto eo = strided_sums<T>(row, OW, 2);  // row[0], row[2], ... and row[1], row[3], ...
        o[0] += eo.first;
        o[1] += eo.second;
        o[2] += eo.first - row[0] + row[2 * OW];
      } else {
        for (int kw = 0; kw < K; ++kw) o[kw] += strided_sums<T>(row + kw, OW, s).first;
      }
    }
  }
}

// A branch's weight (C x cin x K x K) as taps x Cp rows, zero-padded channels.
template <typename T>
std::vector<T> pack_weight(const at::Tensor& w_, int64_t Cp) {
  const at::Tensor w = w_.contiguous();
  const int64_t C = w.size(0), taps = w.size(1) * K * K;
  std::vector<T> out(size_t(taps * Cp), T(0));
  const T* src = w.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < taps; ++t) out[size_t(t * Cp + c)] = src[c * taps + t];
  return out;
}

template <typename T>
std::vector<T> padded_copy(const at::Tensor& v_, int64_t Cp) {
  const at::Tensor v = v_.contiguous();
  std::vector<T> out(size_t(Cp), T(0));
  std::copy(v.data_ptr<T>(), v.data_ptr<T>() + v.numel(), out.begin());
  return out;
}

// The forward's affine, Cp-padded: u = z_a * sa + z_b * sb + shift with sa = invstd_a * gamma_a, sb likewise,
// shift = beta_a - mean_a * sa + beta_b - mean_b * sb. One function for the forward and the backward, so the
// backward's recomputed pre-activation (its ReLU6 mask) is the forward's bit for bit.
template <typename T>
struct Affine {
  std::vector<T> sa, sb, shift;
};

template <typename T>
Affine<T> stems_affine(int64_t C, int64_t Cp, const T* gamma_a, const T* beta_a, const T* mean_a, const T* invstd_a,
                       const T* gamma_b, const T* beta_b, const T* mean_b, const T* invstd_b) {
  Affine<T> f{std::vector<T>(size_t(Cp), T(0)), std::vector<T>(size_t(Cp), T(0)), std::vector<T>(size_t(Cp), T(0))};
  for (int64_t c = 0; c < C; ++c) {
    const T sa = invstd_a[c] * gamma_a[c], sb = invstd_b[c] * gamma_b[c];
    f.sa[size_t(c)] = sa;
    f.sb[size_t(c)] = sb;
    f.shift[size_t(c)] = (beta_a[c] - mean_a[c] * sa) + (beta_b[c] - mean_b[c] * sb);
  }
  return f;
}

// Rows per task: ~64 tasks whatever the thread count (results depend on the tasks, not the threads).
inline int64_t rows_per_task(int64_t rows) { return std::max<int64_t>(1, (rows + 63) / 64); }

Geometry check_geometry(const char* op, const at::Tensor& x, const at::Tensor& wa, const at::Tensor& wb,
                        int64_t stride) {
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors only, got x on ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be N x C x H x W, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": float32/float64 only, got ", x.scalar_type());
  for (const at::Tensor* w : {&wa, &wb}) {
    TORCH_CHECK(w->dim() == 4 && w->size(2) == K && w->size(3) == K, op, ": stem weights must be C x cin x 3 x 3, got ",
                w->sizes());
    TORCH_CHECK(w->scalar_type() == x.scalar_type(), op, ": dtypes differ (x is ", x.scalar_type(), ", a weight ",
                w->scalar_type(), ")");
  }
  TORCH_CHECK(wa.size(0) == wb.size(0), op, ": both stems must have the same output channels, got ", wa.size(0),
              " and ", wb.size(0));
  TORCH_CHECK(wa.size(1) >= 1 && wb.size(1) >= 1 && wa.size(1) + wb.size(1) == x.size(1), op,
              ": the stems' input channels (", wa.size(1), " + ", wb.size(1), ") must add up to x's ", x.size(1));
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(x.size(0) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, op, ": empty input ", x.sizes());
  Geometry g{};
  g.N = x.size(0);
  g.Cin = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.ca = wa.size(1);
  g.cb = wb.size(1);
  g.C = wa.size(0);
  g.Cp = simd::padded<float>(g.C);
  if (x.scalar_type() == at::kDouble) g.Cp = simd::padded<double>(g.C);
  g.s = stride;
  g.OH = (g.H + 2 - K) / stride + 1;
  g.OW = (g.W + 2 - K) / stride + 1;
  g.Wp = g.W + 2;
  g.sn = x.stride(0);
  g.sc = x.stride(1);
  g.sh = x.stride(2);
  g.sw = x.stride(3);
  return g;
}

void check_bn(const char* op, const Geometry& g, const at::Tensor& x, std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == g.C, op, ": BN parameters and statistics must have C = ", g.C,
                " entries, got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": dtypes differ (x is ", x.scalar_type(), ", got ",
                t->scalar_type(), ")");
  }
}

template <typename T>
void forward_kernel(const Geometry& g, const T* x, const at::Tensor& wa_, const at::Tensor& wb_,
                    const at::Tensor& gamma_a, const at::Tensor& beta_a, const at::Tensor& gamma_b,
                    const at::Tensor& beta_b, double eps, bool relu6, T* y, T* mean_a, T* invstd_a, T* mean_b,
                    T* invstd_b) {
  const int64_t Cp = g.Cp, OW = g.OW, C = g.C, C2 = 2 * Cp;
  const std::vector<T> wa = pack_weight<T>(wa_, Cp), wb = pack_weight<T>(wb_, Cp);
  const int64_t rows = g.rows(), per = rows_per_task(rows), ntasks = (rows + per - 1) / per;
  const int64_t work = rows * OW * Cp * g.Cin * K * K;  // multiply-adds of one conv pass
  const size_t xp_n = size_t(g.Cin * K * g.Wp), z_n = size_t(2 * OW * Cp);

  // Pass 1: both branches' moments (2 * Cp channels per task).
  std::vector<double> tmean(size_t(ntasks * C2)), tm2(size_t(ntasks * C2));
  std::vector<int64_t> tcount(size_t(ntasks), 0);
  for_tasks(work, ntasks, [&](int64_t t) {
    T* xp = simd::scratch<T, 0>(xp_n);
    T* z = simd::scratch<T, 1>(z_n);
    double* mu = tmean.data() + t * C2;
    double* m2 = tm2.data() + t * C2;
    std::fill(mu, mu + C2, 0.0);
    std::fill(m2, m2 + C2, 0.0);
    double cnt = 0;
    for (int64_t r = t * per; r < std::min(rows, (t + 1) * per); ++r) {
      pad_rows<T>(g, x, r, xp);
      both_convs<T>(g, xp, wa.data(), wb.data(), z);
      stats_row<T>(z, OW, Cp, cnt, mu, m2);
      cnt += double(OW);
    }
    tcount[size_t(t)] = int64_t(cnt);
  });
  std::vector<double> mu, m2;
  const double cnt = merge_task_moments(ntasks, C2, tmean, tm2, tcount, mu, m2);
  std::vector<double> mua(mu.begin(), mu.begin() + Cp), m2a(m2.begin(), m2.begin() + Cp);
  std::vector<double> mub(mu.begin() + Cp, mu.end()), m2b(m2.begin() + Cp, m2.end());
  write_mean_invstd<T>(C, mua, m2a, cnt, eps, mean_a, invstd_a);
  write_mean_invstd<T>(C, mub, m2b, cnt, eps, mean_b, invstd_b);

  // Pass 2: y = act(z_a * s_a + z_b * s_b + shift), shift = beta_a - mean_a * s_a + beta_b - mean_b * s_b.
  const std::vector<T> ga = padded_copy<T>(gamma_a, Cp), ba = padded_copy<T>(beta_a, Cp),
                       gb = padded_copy<T>(gamma_b, Cp), bb = padded_copy<T>(beta_b, Cp);
  const Affine<T> f = stems_affine<T>(C, Cp, ga.data(), ba.data(), mean_a, invstd_a, gb.data(), bb.data(), mean_b,
                                      invstd_b);
  const bool nt = simd::stream_ok(y, rows * OW, C, simd::kStreamBytes);
  for_tasks(work, ntasks, [&](int64_t t) {
    T* xp = simd::scratch<T, 0>(xp_n);
    T* z = simd::scratch<T, 1>(z_n);
    for (int64_t r = t * per; r < std::min(rows, (t + 1) * per); ++r) {
      pad_rows<T>(g, x, r, xp);
      both_convs<T>(g, xp, wa.data(), wb.data(), z);
      apply_row<T>(z, f.sa.data(), f.sb.data(), f.shift.data(), OW, C, Cp, relu6, nt, y + r * OW * C);
    }
    if (nt) simd::stream_fence();
  });
}

// The backward in one pass over the rows (grad_y and x read once). A branch's weight gradient is
//   gw[c, tap] = sum_p dz[p, c] patch[p, tap],  dz = k * (g - mean(g) - (z - mean) * q)   (bn_act's closed form)
//              = k[c] * (G[c, tap] - (mean(g)[c] - m_t[c]) * S[tap] - q[c] * H[c, tap])
// with, per task t, G = sum (g - m_t) (x) patch, S = sum patch, H = sum (z - mean) (x) patch: mean(g) and q need
// the whole batch's sums, which this same pass collects, so the linear combination is taken afterwards (in
// float64, tasks in order). m_t (g's mean over the task's first row) is a shift that keeps G's sums of the
// order of g's spread, not of its mean, so the subtraction of mean(g) * S cancels no float precision; z - mean
// is exact. G runs over all input channels' taps at once (g is both branches'), H over each branch's own.
template <typename T>
void backward_kernel(const Geometry& g, const T* gy, const T* x, const at::Tensor& wa_, const at::Tensor& wb_,
                     const at::Tensor& gamma_a, const at::Tensor& beta_a, const at::Tensor& mean_a_,
                     const at::Tensor& invstd_a_, const at::Tensor& gamma_b, const at::Tensor& beta_b,
                     const at::Tensor& mean_b_, const at::Tensor& invstd_b_, bool relu6, T* gwa, T* gga, T* gba,
                     T* gwb, T* ggb, T* gbb) {
  constexpr int L = V<T>::L;
  const int64_t Cp = g.Cp, OW = g.OW, C = g.C;
  const std::vector<T> wa = pack_weight<T>(wa_, Cp), wb = pack_weight<T>(wb_, Cp);
  const std::vector<T> ga = padded_copy<T>(gamma_a, Cp), ba = padded_copy<T>(beta_a, Cp),
                       gb = padded_copy<T>(gamma_b, Cp), bb = padded_copy<T>(beta_b, Cp),
                       ma = padded_copy<T>(mean_a_, Cp), ia = padded_copy<T>(invstd_a_, Cp),
                       mb = padded_copy<T>(mean_b_, Cp), ib = padded_copy<T>(invstd_b_, Cp);
  const Affine<T> f = stems_affine<T>(C, Cp, ga.data(), ba.data(), ma.data(), ia.data(), gb.data(), bb.data(),
                                      mb.data(), ib.data());
  const int64_t rows = g.rows(), per = rows_per_task(rows), ntasks = (rows + per - 1) / per;
  const int64_t taps = g.Cin * K * K, tn = taps * Cp;
  const int64_t work = rows * OW * tn;  // multiply-adds of one conv pass
  // Per task, float64: sums (3 Cp), G (tn), H (tn), S (taps), the shift m_t (Cp).
  const int64_t rec = 3 * Cp + 2 * tn + taps + Cp;
  std::vector<double> task(size_t(ntasks * rec));
  const size_t xp_n = size_t(g.Cin * K * g.Wp), z_n = size_t(2 * OW * Cp);
  // grad_y is read row after row within a task: the hardware prefetchers follow it (a software prefetch of
  // the next row, 112 lines at once, stalled on the fill buffers: the backward ran 0.5 ms slower in the step).
  for_tasks(work, ntasks, [&](int64_t t) {
    T* xp = simd::scratch<T, 0>(xp_n);
    T* z = simd::scratch<T, 1>(z_n);
    T* gbuf = simd::scratch<T, 2>(size_t(OW * Cp));
    // Accumulators in T over a few rows (~1k pixels), then into the task's float64 record.
    const int64_t acc_n = 3 * Cp + 2 * tn + taps;
    T* acc = simd::scratch<T, 3>(size_t(acc_n + Cp));
    T* shiftg = acc + acc_n;  // m_t
    std::fill(acc, acc + acc_n, T(0));
    double* rt = task.data() + t * rec;
    std::fill(rt, rt + rec, 0.0);
    const int64_t flush = std::max<int64_t>(1, 1024 / OW);
    int64_t pending = 0;
    const int64_t r0 = t * per, r1 = std::min(rows, (t + 1) * per);
    for (int64_t r = r0; r < r1; ++r) {
      pad_rows<T>(g, x, r, xp);
      both_convs<T>(g, xp, wa.data(), wb.data(), z);
      grad_row<T>(z, gy + r * OW * C, f.sa.data(), f.sb.data(), f.shift.data(), ma.data(), mb.data(), OW, C, Cp,
                  relu6, gbuf, acc);
      if (r == r0) {
        for (int64_t c = 0; c < Cp; ++c) {
          T m = T(0);
          for (int64_t ow = 0; ow < OW; ++ow) m += gbuf[ow * Cp + c];
          shiftg[c] = m / T(OW);
          rt[3 * Cp + 2 * tn + taps + c] = double(shiftg[c]);
        }
      }
      for (int64_t ow = 0; ow < OW; ++ow) {
        T* gr = gbuf + ow * Cp;
        for (int64_t c = 0; c < Cp; c += L) V<T>::store(gr + c, V<T>::sub(V<T>::load(gr + c), V<T>::load(shiftg + c)));
      }
      T* G = acc + 3 * Cp;
      T* H = G + tn;
      wgrad_row<T>(xp, g.Cin, g.Wp, int(g.s), gbuf, Cp, OW, G, Cp);
      wgrad_row<T>(xp, g.ca, g.Wp, int(g.s), z, Cp, OW, H, Cp);
      wgrad_row<T>(xp + g.ca * K * g.Wp, g.cb, g.Wp, int(g.s), z + OW * Cp, Cp, OW, H + g.taps_a() * Cp, Cp);
      patch_sums_row<T>(xp, g.Cin, g.Wp, int(g.s), OW, H + tn);
      if (++pending == flush || r + 1 == r1) {
        for (int64_t i = 0; i < acc_n; ++i) rt[i] += double(acc[i]);
        std::fill(acc, acc + acc_n, T(0));
        pending = 0;
      }
    }
  });
  // The batch's sums, tasks in order.
  std::vector<double> sums(size_t(3 * Cp), 0.0);
  for (int64_t t = 0; t < ntasks; ++t)
    for (int64_t i = 0; i < 3 * Cp; ++i) sums[size_t(i)] += task[size_t(t * rec + i)];
  const double M = double(rows * OW);
  std::vector<double> kk(size_t(2 * Cp), 0.0), qq(size_t(2 * Cp), 0.0), mg(size_t(Cp), 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const double ia_c = double(ia[size_t(c)]), ib_c = double(ib[size_t(c)]);
    const double sg = sums[size_t(c)], sga = sums[size_t(Cp + c)] * ia_c, sgb = sums[size_t(2 * Cp + c)] * ib_c;
    gba[c] = T(sg);
    gbb[c] = T(sg);
    gga[c] = T(sga);
    ggb[c] = T(sgb);
    kk[size_t(c)] = double(ga[size_t(c)]) * ia_c;
    kk[size_t(Cp + c)] = double(gb[size_t(c)]) * ib_c;
    qq[size_t(c)] = ia_c * sga / M;
    qq[size_t(Cp + c)] = ib_c * sgb / M;
    mg[size_t(c)] = sg / M;
  }
  // gw[tap][c] = k * (G - (mean(g) - m_t) * S - q * H), summed over tasks in order.
  std::vector<double> gw(size_t(tn), 0.0);
  const int64_t taps_a = g.taps_a();
  for (int64_t t = 0; t < ntasks; ++t) {
    const double* rt = task.data() + t * rec;
    const double* G = rt + 3 * Cp;
    const double* H = G + tn;
    const double* S = H + tn;
    const double* mt = S + taps;
    for (int64_t tp = 0; tp < taps; ++tp) {
      const int64_t b = tp < taps_a ? 0 : 1;
      for (int64_t c = 0; c < C; ++c) {
        gw[size_t(tp * Cp + c)] += kk[size_t(b * Cp + c)] * (G[tp * Cp + c] - (mg[size_t(c)] - mt[c]) * S[tp] -
                                                            qq[size_t(b * Cp + c)] * H[tp * Cp + c]);
      }
    }
  }
  // Unpack taps x Cp into C x cin x K x K per branch.
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t tp = 0; tp < taps_a; ++tp) gwa[c * taps_a + tp] = T(gw[size_t(tp * Cp + c)]);
    for (int64_t tp = 0; tp < g.taps_b(); ++tp) gwb[c * g.taps_b() + tp] = T(gw[size_t((taps_a + tp) * Cp + c)]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stems_bn_add_act_cpu(
    const at::Tensor& x, const at::Tensor& w_a, const at::Tensor& gamma_a, const at::Tensor& beta_a,
    const at::Tensor& w_b, const at::Tensor& gamma_b, const at::Tensor& beta_b, int64_t stride, double eps,
    bool relu6) {
  const char* op = "stems_bn_add_act";
  const Geometry g = check_geometry(op, x, w_a, w_b, stride);
  check_bn(op, g, x, {&gamma_a, &beta_a, &gamma_b, &beta_b});
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const auto opts = x.options();
  at::Tensor y = at::empty({g.N, g.C, g.OH, g.OW}, opts.memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor ma = at::empty({g.C}, opts), ia = at::empty({g.C}, opts), mb = at::empty({g.C}, opts),
             ib = at::empty({g.C}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stems_bn_add_act_cpu", [&] {
    forward_kernel<scalar_t>(g, x.data_ptr<scalar_t>(), w_a, w_b, gamma_a, beta_a, gamma_b, beta_b, eps, relu6,
                             y.data_ptr<scalar_t>(), ma.data_ptr<scalar_t>(), ia.data_ptr<scalar_t>(),
                             mb.data_ptr<scalar_t>(), ib.data_ptr<scalar_t>());
  });
  return {y, ma, ia, mb, ib};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stems_bn_add_act_backward_cpu(
    const at::Tensor& grad_y_, const at::Tensor& x, const at::Tensor& w_a, const at::Tensor& gamma_a,
    const at::Tensor& beta_a, const at::Tensor& mean_a, const at::Tensor& invstd_a, const at::Tensor& w_b,
    const at::Tensor& gamma_b, const at::Tensor& beta_b, const at::Tensor& mean_b, const at::Tensor& invstd_b,
    int64_t stride, bool relu6) {
  const char* op = "stems_bn_add_act_backward";
  const Geometry g = check_geometry(op, x, w_a, w_b, stride);
  check_bn(op, g, x, {&gamma_a, &beta_a, &mean_a, &invstd_a, &gamma_b, &beta_b, &mean_b, &invstd_b});
  TORCH_CHECK(grad_y_.dim() == 4 && grad_y_.size(0) == g.N && grad_y_.size(1) == g.C && grad_y_.size(2) == g.OH &&
                  grad_y_.size(3) == g.OW,
              op, ": grad_y must be ", g.N, " x ", g.C, " x ", g.OH, " x ", g.OW, ", got ", grad_y_.sizes());
  TORCH_CHECK(grad_y_.scalar_type() == x.scalar_type(), op, ": dtypes differ (x is ", x.scalar_type(), ", grad_y ",
              grad_y_.scalar_type(), ")");
  const at::Tensor gy = grad_y_.contiguous(at::MemoryFormat::ChannelsLast);
  const auto opts = x.options();
  at::Tensor gwa = at::empty(w_a.sizes(), opts), gwb = at::empty(w_b.sizes(), opts);
  at::Tensor gga = at::empty({g.C}, opts), gba = at::empty({g.C}, opts), ggb = at::empty({g.C}, opts),
             gbb = at::empty({g.C}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stems_bn_add_act_backward_cpu", [&] {
    using T = scalar_t;
    backward_kernel<T>(g, gy.data_ptr<T>(), x.data_ptr<T>(), w_a, w_b, gamma_a, beta_a, mean_a, invstd_a, gamma_b,
                       beta_b, mean_b, invstd_b, relu6, gwa.data_ptr<T>(), gga.data_ptr<T>(), gba.data_ptr<T>(),
                       gwb.data_ptr<T>(), ggb.data_ptr<T>(), gbb.data_ptr<T>());
  });
  // Weight gradients in the weights' own layout (a channels_last stem weight stays channels_last).
  if (!w_a.is_contiguous() && w_a.is_contiguous(at::MemoryFormat::ChannelsLast))
    gwa = gwa.contiguous(at::MemoryFormat::ChannelsLast);
  if (!w_b.is_contiguous() && w_b.is_contiguous(at::MemoryFormat::ChannelsLast))
    gwb = gwb.contiguous(at::MemoryFormat::ChannelsLast);
  return {gwa, gga, gba, gwb, ggb, gbb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CPU, m) {
  m.impl("stems_bn_add_act", &stems_bn_add_act_cpu);
  m.impl("stems_bn_add_act_backward", &stems_bn_add_act_backward_cpu);
}

}  // namespace fastface
