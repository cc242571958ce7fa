// Tile routines shared by the fused CPU kernels (ir_block.cpp, dwconv_bn_act.cpp).
//
// Layout: every tile buffer is NHWC with the channel pitch rounded up to whole vectors
// (simd::padded), and "padded" buffers also carry the depthwise conv's zero border, so the
// depthwise loops run without a single bounds check. Row r of a padded buffer holds input
// row r0 + r (zeros where that row lies outside the image), column j holds input column j - p.
#pragma once

#include <algorithm>
#include <cstdint>

#include "simd.h"

namespace fastface {
namespace tiles {

using simd::Vec;

// Copy input rows [r0, r0 + rows) of one image (pixel stride ldx, C channels from x) into a
// padded buffer of pitch Cp with p zero columns each side; rows outside [0, H) become zeros.
// Lanes past C are zero too, so whole-vector reads of the buffer stay finite.
template <typename T>
void fill_padded(const T* x, int64_t H, int64_t W, int64_t ldx, int64_t C, int64_t r0, int64_t rows, int64_t p,
                 T* P, int64_t Cp) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t Wp = W + 2 * p, ncv = Cp / L;
  for (int64_t r = 0; r < rows; ++r) {
    T* prow = P + r * Wp * Cp;
    const int64_t iy = r0 + r;
    if (iy < 0 || iy >= H) {
      std::fill(prow, prow + Wp * Cp, T(0));
      continue;
    }
    std::fill(prow, prow + p * Cp, T(0));
    std::fill(prow + (W + p) * Cp, prow + Wp * Cp, T(0));
    const T* xrow = x + iy * W * ldx;
    T* dst = prow + p * Cp;
    for (int64_t ix = 0; ix < W; ++ix) {
      for (int64_t cv = 0; cv < ncv; ++cv) {
        V::store(dst + ix * Cp + cv * L, V::load(xrow + ix * ldx + cv * L, V::tail(C - cv * L)));
      }
    }
  }
}

// Zero the border of a padded buffer whose interior (input rows in [0, H)) is written elsewhere.
template <typename T>
void zero_border(int64_t H, int64_t W, int64_t r0, int64_t rows, int64_t p, T* P, int64_t Cp) {
  const int64_t Wp = W + 2 * p;
  for (int64_t r = 0; r < rows; ++r) {
    T* prow = P + r * Wp * Cp;
    const int64_t iy = r0 + r;
    if (iy < 0 || iy >= H) {
      std::fill(prow, prow + Wp * Cp, T(0));
    } else {
      std::fill(prow, prow + p * Cp, T(0));
      std::fill(prow + (W + p) * Cp, prow + Wp * Cp, T(0));
    }
  }
}

// Depthwise k x k conv over a padded buffer P (pitch Cp, width W + 2p): `rows` output rows of
// OW pixels, output row r reading padded rows r*S .. r*S + K - 1. w: K*K rows of packed weights
// (pitch ldw, channel-contiguous). Epi supplies the accumulator start (init) and the value
// stored (fin). Output pixel (r, ox) goes to out + (r*OW + ox)*ldo; full_store writes whole
// vectors (the destination has a padded pitch), otherwise the channel tail is masked.
template <typename T, int K, int S, class Epi>
void dw_rows_fixed(const T* P, int64_t Wp, int64_t Cp, int64_t rows, int64_t OW, const T* w, int64_t ldw, int64_t C,
                   const Epi& epi, T* out, int64_t ldo, bool full_store) {
  using V = Vec<T>;
  using R = typename V::reg;
  constexpr int L = V::L;
  constexpr int B = 4;                  // output pixels per register block
  constexpr int NC = (B - 1) * S + K;   // padded columns those pixels read
  const int64_t rs = Wp * Cp, ncv = (C + L - 1) / L;
  for (int64_t cv = 0; cv < ncv; ++cv) {
    const auto lm = V::tail(C - cv * L);
    const auto sm = full_store ? V::full() : lm;
    R wr[K * K];
    FF_UNROLL
    for (int i = 0; i < K * K; ++i) wr[i] = V::load(w + i * ldw + cv * L, lm);
    const R init = epi.init(cv, lm);
    for (int64_t r = 0; r < rows; ++r) {
      const T* prow = P + r * S * rs + cv * L;
      T* orow = out + r * OW * ldo + cv * L;
      int64_t ox = 0;
      for (; ox + B <= OW; ox += B) {
        R acc[B];
        FF_UNROLL
        for (int j = 0; j < B; ++j) acc[j] = init;
        FF_UNROLL
        for (int ky = 0; ky < K; ++ky) {
          const T* pr = prow + ky * rs + ox * S * Cp;
          R col[NC];
          FF_UNROLL
          for (int c = 0; c < NC; ++c) col[c] = V::load(pr + c * Cp);
          FF_UNROLL
          for (int j = 0; j < B; ++j)
            FF_UNROLL
            for (int kx = 0; kx < K; ++kx) acc[j] = V::fmadd(col[j * S + kx], wr[ky * K + kx], acc[j]);
        }
        FF_UNROLL
        for (int j = 0; j < B; ++j) V::store(orow + (ox + j) * ldo, epi.fin(acc[j], cv, ox + j, r), sm);
      }
      for (; ox < OW; ++ox) {
        R acc = init;
        FF_UNROLL
        for (int ky = 0; ky < K; ++ky) {
          const T* pr = prow + ky * rs + ox * S * Cp;
          FF_UNROLL
          for (int kx = 0; kx < K; ++kx) acc = V::fmadd(V::load(pr + kx * Cp), wr[ky * K + kx], acc);
        }
        V::store(orow + ox * ldo, epi.fin(acc, cv, ox, r), sm);
      }
    }
  }
}

// Any odd K and stride: weights are read from L1 instead of living in registers.
template <typename T, class Epi>
void dw_rows_any(const T* P, int64_t Wp, int64_t Cp, int64_t rows, int64_t OW, int64_t K, int64_t S, const T* w,
                 int64_t ldw, int64_t C, const Epi& epi, T* out, int64_t ldo, bool full_store) {
  using V = Vec<T>;
  using R = typename V::reg;
  constexpr int L = V::L;
  const int64_t rs = Wp * Cp, ncv = (C + L - 1) / L;
  for (int64_t cv = 0; cv < ncv; ++cv) {
    const auto lm = V::tail(C - cv * L);
    const auto sm = full_store ? V::full() : lm;
    const R init = epi.init(cv, lm);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t ox = 0; ox < OW; ++ox) {
        R acc = init;
        for (int64_t ky = 0; ky < K; ++ky) {
          const T* pr = P + (r * S + ky) * rs + ox * S * Cp + cv * L;
          for (int64_t kx = 0; kx < K; ++kx)
            acc = V::fmadd(V::load(pr + kx * Cp), V::load(w + (ky * K + kx) * ldw + cv * L, lm), acc);
        }
        V::store(out + (r * OW + ox) * ldo + cv * L, epi.fin(acc, cv, ox, r), sm);
      }
    }
  }
}

template <typename T, class Epi>
void dw_rows(const T* P, int64_t Wp, int64_t Cp, int64_t rows, int64_t OW, int64_t K, int64_t S, const T* w,
             int64_t ldw, int64_t C, const Epi& epi, T* out, int64_t ldo, bool full_store) {
  if (K == 3 && S == 1) return dw_rows_fixed<T, 3, 1>(P, Wp, Cp, rows, OW, w, ldw, C, epi, out, ldo, full_store);
  if (K == 3 && S == 2) return dw_rows_fixed<T, 3, 2>(P, Wp, Cp, rows, OW, w, ldw, C, epi, out, ldo, full_store);
  if (K == 5 && S == 1) return dw_rows_fixed<T, 5, 1>(P, Wp, Cp, rows, OW, w, ldw, C, epi, out, ldo, full_store);
  if (K == 5 && S == 2) return dw_rows_fixed<T, 5, 2>(P, Wp, Cp, rows, OW, w, ldw, C, epi, out, ldo, full_store);
  dw_rows_any<T>(P, Wp, Cp, rows, OW, K, S, w, ldw, C, epi, out, ldo, full_store);
}

// ---- GEMM with fused epilogue --------------------------------------------------------------
// C[m, n] = epi(sum_k A[m, k] * B[k, n] + bias[n]) for row-major A (pitch lda) and B (pitch
// ldb, n contiguous: the weights pre-transposed once by the caller). Rows of C are given by
// pointer (crow(m)), so the expand GEMM can write straight into a padded tile buffer.
enum class Epilogue { kNone, kRelu6, kResidual };

template <typename T, int MR, int NV>
void gemm_micro(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, const T* bias, T* const* crow,
                const T* const* rrow, int64_t coff, Epilogue epi, typename Vec<T>::mask lm,
                typename Vec<T>::mask sm) {
  using V = Vec<T>;
  using R = typename V::reg;
  constexpr int L = V::L;
  R acc[MR][NV];
  FF_UNROLL
  for (int j = 0; j < NV; ++j) {
    const R b = j == NV - 1 ? V::load(bias + j * L, lm) : V::load(bias + j * L);
    FF_UNROLL
    for (int i = 0; i < MR; ++i) acc[i][j] = b;
  }
  for (int64_t k = 0; k < K; ++k) {
    R bv[NV];
    FF_UNROLL
    for (int j = 0; j < NV; ++j) bv[j] = j == NV - 1 ? V::load(B + k * ldb + j * L, lm) : V::load(B + k * ldb + j * L);
    FF_UNROLL
    for (int i = 0; i < MR; ++i) {
      const R a = V::set1(A[i * lda + k]);
      FF_UNROLL
      for (int j = 0; j < NV; ++j) acc[i][j] = V::fmadd(a, bv[j], acc[i][j]);
    }
  }
  if (epi == Epilogue::kRelu6) {
    FF_UNROLL
    for (int i = 0; i < MR; ++i)
      FF_UNROLL
      for (int j = 0; j < NV; ++j) acc[i][j] = simd::relu6<T>(acc[i][j]);
  } else if (epi == Epilogue::kResidual) {
    FF_UNROLL
    for (int i = 0; i < MR; ++i)
      FF_UNROLL
      for (int j = 0; j < NV; ++j)
        acc[i][j] = V::add(acc[i][j], j == NV - 1 ? V::load(rrow[i] + coff + j * L, lm)
                                                  : V::load(rrow[i] + coff + j * L));
  }
  FF_UNROLL
  for (int i = 0; i < MR; ++i)
    FF_UNROLL
    for (int j = 0; j < NV; ++j) {
      if (j == NV - 1)
        V::store(crow[i] + coff + j * L, acc[i][j], sm);
      else
        V::store(crow[i] + coff + j * L, acc[i][j]);
    }
}

// Rows per register block for NV vectors of columns: about 24 accumulators, enough
// independent FMA chains to hide latency when N is narrow (Cout = 16, 24).
template <int NV>
struct MrFor {
  static constexpr int value = NV == 1 ? 16 : NV == 2 ? 12 : NV == 3 ? 8 : 6;
};
constexpr int kMaxNV = 4;

inline int mr_for(int nv) { return nv == 1 ? MrFor<1>::value : nv == 2 ? MrFor<2>::value : nv == 3 ? MrFor<3>::value
                                                                                                   : MrFor<4>::value; }

// A register-blocked micro-kernel per shape (NV vectors of columns, MR = 1..MrFor<NV> rows), looked up at run
// time: fn[nv - 1][mr - 1] = Kernel<mr, nv>::fn. Every shape is its own instantiation, so the accumulator arrays
// stay compile-time sized (and in registers). Serves this file's gemm and conv1x1.cpp's kernels.
template <typename Fn, template <int, int> class Kernel>
struct MicroTable {
  Fn fn[kMaxNV][16] = {};
  MicroTable() {
    fill<1>();
    fill<2>();
    fill<3>();
    fill<4>();
  }
  static const MicroTable& get() {
    static const MicroTable t;
    return t;
  }

 private:
  template <int NV, int MR = MrFor<NV>::value>
  void fill() {
    if constexpr (MR > 0) {
      fn[NV - 1][MR - 1] = Kernel<MR, NV>::fn;
      fill<NV, MR - 1>();
    }
  }
};

template <typename T>
using MicroFn = void (*)(int64_t, const T*, int64_t, const T*, int64_t, const T*, T* const*, const T* const*, int64_t,
                         Epilogue, typename Vec<T>::mask, typename Vec<T>::mask);

template <typename T>
struct GemmMicro {
  template <int MR, int NV>
  struct At {
    static constexpr MicroFn<T> fn = &gemm_micro<T, MR, NV>;
  };
};

// crow(m) -> T* and rrow(m) -> const T* (residual rows; ignored unless epi == kResidual).
// full_store: C rows have a padded pitch, so whole vectors may be written past N.
template <typename T, class CRow, class RRow>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, const T* bias,
          const CRow& crow, const RRow& rrow, Epilogue epi, bool full_store) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const auto& tab = MicroTable<MicroFn<T>, GemmMicro<T>::template At>::get();
  T* cp[16];
  const T* rp[16];
  for (int64_t n0 = 0; n0 < N; n0 += kMaxNV * L) {
    const int nv = int(std::min<int64_t>(kMaxNV, (N - n0 + L - 1) / L));
    const auto lm = V::tail(N - n0 - int64_t(nv - 1) * L);
    const auto sm = full_store ? V::full() : lm;
    const int MR = mr_for(nv);
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int mr = int(std::min<int64_t>(MR, M - m0));
      for (int i = 0; i < mr; ++i) {
        cp[i] = crow(m0 + i);
        rp[i] = rrow(m0 + i);
      }
      tab.fn[nv - 1][mr - 1](K, A + m0 * lda, lda, B + n0, ldb, bias + n0, cp, rp, n0, epi, lm, sm);
    }
  }
}

}  // namespace tiles
}  // namespace fastface
