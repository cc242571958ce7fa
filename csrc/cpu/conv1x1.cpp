// A 1x1 convolution (groups 1, no bias) on the CPU, channels_last: its forward, and its backward in one pass
// over the output gradient:
//
//   conv1x1_forward(x, w) -> x w^T per pixel
//   conv1x1_backward(g, x, w, a?, c?, mask) -> (grad_x, grad_w)
//     grad_x = g w - x a - c      per pixel (a: Cin x Cin, c: Cin; both optional: expand_dwconv's BN
//                                 correction folded in, so its grouped_linear_sub pass is not needed)
//     grad_w = g^T x              summed over every pixel
//
// ATen's (oneDNN's) backward runs two primitives, each reading g (the wide side of MobileNetV2's expand
// convs: 6 Cin channels) from memory; on the face model's large maps (Cin or Cout 16..32 at 28 x 28 and
// 56 x 56) they ran at 76-114 GFLOP/s where its large GEMMs reach ~200. Here each task walks its rows in
// blocks small enough for L1 and computes both products from the block while it is there. Both kernels share
// one register-blocked micro-kernel (micro), prefetch the next block as they go and write large outputs with
// non-temporal stores.
//
// Tasks are fixed by the shape alone and grad_w's per-task partials (T, one task's rows each) are summed
// in task order in float64, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <vector>

#include "aten_tasks.h"
#include "fused_tiles.h"
#include "layout.h"
#include "simd.h"

namespace fastface {
namespace {

using simd::Vec;

// Into L2: a block's rows are walked a cache line or two at a time (one column block after another), a
// pattern the hardware prefetchers miss, so the micro-kernels fetch the next block as they go, a line per
// step (all at once stalled the core as much as it saved).
FF_ALWAYS_INLINE void prefetch_line(const char* p) {
#if defined(__AVX2__) || defined(__AVX512F__)
  _mm_prefetch(p, _MM_HINT_T1);
#else
  (void)p;
#endif
}

// Lines of two ranges, [next, end) then [next2, end2), still to prefetch; take(n) hands out at most n
// consecutive ones (stopping at the end of the first range).
struct Prefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  const char* next2 = nullptr;
  const char* end2 = nullptr;
  int64_t take(int64_t n, const char*& at) {
    if (next >= end) {
      std::swap(next, next2);
      std::swap(end, end2);
    }
    at = next;
    const int64_t m = std::max<int64_t>(0, std::min<int64_t>(n, (end - next + 63) / 64));
    next += m * 64;
    return m;
  }
};

// C[i, cols] = init[i] + sum_k A(i, k) B[k, cols] (+ sum_k A2(i, k) B2[k, cols]) for MR rows i and NV
// vectors of columns; A(i, k) = A[i * sai + k * sak], so one kernel serves g w (rows = pixels) and g^T x
// (rows = output channels, k = pixels). init: null (zero), a row broadcast to every i (ldi 0) or rows
// (ldi: pitch; C's own rows when accumulating). lm masks B's last vector, sm C's last vector.
// Step k < npf also prefetches line k from pf; nt: C takes non-temporal stores (whole vectors only, so never
// with HT). HT: the last vector is a simd::Half (a tail of at most half a vector at half the FMA cost).
template <typename T, int MR, int NV, bool HT>
void micro(int64_t kn, const T* A, int64_t sai, int64_t sak, const T* B, int64_t ldb, int64_t kn2, const T* A2,
           int64_t sai2, const T* B2, int64_t ldb2, const T* init, int64_t ldi, T* C, int64_t ldc,
           typename Vec<T>::mask lm, typename Vec<T>::mask sm, const char* pf, int64_t npf, bool nt) {
  using V = Vec<T>;
  using R = typename V::reg;
  using H = simd::Half<T>;
  using HR = typename H::reg;
  constexpr int L = V::L;
  constexpr int NF = HT ? NV - 1 : NV;  // whole vectors
  constexpr int NA = NF > 0 ? NF : 1;
  const typename H::mask hlm = H::from(lm), hsm = H::from(sm);
  R acc[MR][NA];
  HR acch[MR];
  FF_UNROLL
  for (int i = 0; i < MR; ++i) {
    FF_UNROLL
    for (int j = 0; j < NF; ++j)
      acc[i][j] = init == nullptr ? V::zero() : V::load(init + i * ldi + j * L, !HT && j == NV - 1 ? sm : V::full());
    if constexpr (HT) acch[i] = init == nullptr ? H::zero() : H::load(init + i * ldi + NF * L, hsm);
  }
  for (int64_t k = 0; k < kn; ++k) {
    if (k < npf) prefetch_line(pf + k * 64);
    R b[NA];
    HR bh;
    FF_UNROLL
    for (int j = 0; j < NF; ++j)
      b[j] = !HT && j == NV - 1 ? V::load(B + k * ldb + j * L, lm) : V::load(B + k * ldb + j * L);
    if constexpr (HT) bh = H::load(B + k * ldb + NF * L, hlm);
    const T* ak = A + k * sak;
    FF_UNROLL
    for (int i = 0; i < MR; ++i) {
      const T ai = ak[i * sai];
      const R a = V::set1(ai);
      FF_UNROLL
      for (int j = 0; j < NF; ++j) acc[i][j] = V::fmadd(a, b[j], acc[i][j]);
      if constexpr (HT) acch[i] = H::fmadd(H::low(a), bh, acch[i]);
    }
  }
  for (int64_t k = 0; k < kn2; ++k) {  // the correction term: x's own row (k along it) times -a
    R b[NA];
    HR bh;
    FF_UNROLL
    for (int j = 0; j < NF; ++j) b[j] = V::load(B2 + k * ldb2 + j * L);
    if constexpr (HT) bh = H::load(B2 + k * ldb2 + NF * L);
    FF_UNROLL
    for (int i = 0; i < MR; ++i) {
      const T ai = A2[i * sai2 + k];
      const R a = V::set1(ai);
      FF_UNROLL
      for (int j = 0; j < NF; ++j) acc[i][j] = V::fmadd(a, b[j], acc[i][j]);
      if constexpr (HT) acch[i] = H::fmadd(H::low(a), bh, acch[i]);
    }
  }
  if (!HT && nt) {  // whole aligned vectors (simd::stream_ok)
    FF_UNROLL
    for (int i = 0; i < MR; ++i)
      FF_UNROLL
      for (int j = 0; j < NF; ++j) V::stream(C + i * ldc + j * L, acc[i][j]);
    return;
  }
  FF_UNROLL
  for (int i = 0; i < MR; ++i) {
    FF_UNROLL
    for (int j = 0; j < NF; ++j) {
      if (!HT && j == NV - 1)
        V::store(C + i * ldc + j * L, acc[i][j], sm);
      else
        V::store(C + i * ldc + j * L, acc[i][j]);
    }
    if constexpr (HT) H::store(C + i * ldc + NF * L, acch[i], hsm);
  }
}

// Pixels per block: a multiple of every tiles::MrFor value, and the block's g and x rows stay in L1.
constexpr int64_t kBlockRows = 48;
// The backward's least rows per task (see backward_kernel).
constexpr int64_t kMinTaskRows = 384;

// Tasks of whole kBlockRows blocks over P rows, about `want` of them (1 <= want <= blocks(P)): per rows each, n
// tasks, none empty (rounding per up to whole blocks left e.g. 46 of 256 forward tasks empty at 64 x 28 x 28).
struct RowTasks {
  static int64_t blocks(int64_t P) { return (P + kBlockRows - 1) / kBlockRows; }
  RowTasks(int64_t P, int64_t want)
      : per((blocks(P) + want - 1) / want * kBlockRows), n((P + per - 1) / per) {}
  int64_t per, n;
};

template <typename T>
using MicroFn = void (*)(int64_t, const T*, int64_t, int64_t, const T*, int64_t, int64_t, const T*, int64_t, const T*,
                         int64_t, const T*, int64_t, T*, int64_t, typename Vec<T>::mask, typename Vec<T>::mask,
                         const char*, int64_t, bool);

template <typename T, bool HT>
struct Kernel {
  template <int MR, int NV>
  struct At {
    static constexpr MicroFn<T> fn = &micro<T, MR, NV, HT>;
  };
};

// micros<T>(ht)[nv - 1][mr - 1]: the micro-kernel of nv vectors (the last a simd::Half if ht) and mr rows.
template <typename T>
using MicroTab = MicroFn<T>[tiles::kMaxNV][16];

template <typename T>
const MicroTab<T>& micros(bool ht) {
  if constexpr (simd::kHasHalf) {
    if (ht) return tiles::MicroTable<MicroFn<T>, Kernel<T, true>::template At>::get().fn;
  }
  return tiles::MicroTable<MicroFn<T>, Kernel<T, false>::template At>::get().fn;
}

// For column blocks of at most tiles::kMaxNV vectors over ncols columns: body(c0, nv, lm, ht) with lm the last
// vector's mask and ht whether that vector is a simd::Half (a tail of at most half a vector).
template <typename T, class F>
FF_ALWAYS_INLINE void column_blocks(int64_t ncols, F&& body) {
  using V = Vec<T>;
  constexpr int L = V::L;
  for (int64_t c0 = 0; c0 < ncols; c0 += tiles::kMaxNV * L) {
    const int nv = int(std::min<int64_t>(tiles::kMaxNV, (ncols - c0 + L - 1) / L));
    const int64_t tail = ncols - c0 - int64_t(nv - 1) * L;
    body(c0, nv, V::tail(tail), simd::kHasHalf && tail <= simd::Half<T>::L);
  }
}

// The backward's operands prepared once per call: w, -a and -c with rows padded to whole vectors (zero
// lanes, so their loads need no mask), and grad_w's orientation. rows_of_block() computes one block of pixels:
// grad_x rows = g w - x a - c, and the block's g^T x added to a task's partial.
template <typename T>
struct Backward {
  int64_t N, K, Kp;
  std::vector<T> wp, nap, ncp;
  // grad_w's vectors run along its longer side: with K < N (an expand conv's, K = 16) rows of K would give
  // one FMA per broadcast, so the tasks accumulate grad_w^T (K rows of N) instead.
  bool wt;
  int64_t wrows, wcols, wpitch, wsize;

  Backward(const T* w, const T* a, const T* c, int64_t N_, int64_t K_) : N(N_), K(K_), Kp(simd::padded<T>(K_)) {
    wp.assign(static_cast<size_t>(N * Kp), T(0));
    for (int64_t n = 0; n < N; ++n) std::copy(w + n * K, w + (n + 1) * K, wp.begin() + n * Kp);
    if (a != nullptr) {
      nap.assign(static_cast<size_t>(K * Kp), T(0));
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = 0; j < K; ++j) nap[size_t(i * Kp + j)] = -a[i * K + j];
    }
    if (c != nullptr) {
      ncp.assign(static_cast<size_t>(Kp), T(0));
      for (int64_t j = 0; j < K; ++j) ncp[size_t(j)] = -c[j];
    }
    wt = K < N;
    wrows = wt ? K : N;
    wcols = wt ? N : K;
    wpitch = simd::padded<T>(wcols);
    wsize = wrows * wpitch;
  }

  // `rows` pixels: g rows gb (pitch N), x rows xb (pitch K); gx rows to gxb (pitch K; null: none), pw (a
  // task's grad_w partial, wsize; null: none) += their product; pf: lines to prefetch as the kernels go.
  void rows_of_block(const T* gb, const T* xb, int64_t rows, T* gxb, bool gx_nt, T* pw, Prefetch& pf) const {
    using V = Vec<T>;
    const T* na = nap.empty() ? nullptr : nap.data();
    const T* nc = ncp.empty() ? nullptr : ncp.data();
    const char* at = nullptr;
    if (gxb != nullptr) {
      column_blocks<T>(K, [&](int64_t c0, int nv, typename V::mask lm, bool ht) {
        const auto& tab = micros<T>(ht);
        const int MR = tiles::mr_for(nv);
        for (int64_t r = 0; r < rows; r += MR) {
          const int mr = int(std::min<int64_t>(MR, rows - r));
          const int64_t npf = pf.take(N, at);
          tab[nv - 1][mr - 1](N, gb + r * N, N, 1, wp.data() + c0, Kp, na != nullptr ? K : 0, xb + r * K, K,
                                 na != nullptr ? na + c0 : nullptr, Kp, nc != nullptr ? nc + c0 : nullptr, 0,
                                 gxb + r * K + c0, K, V::full(), lm, at, npf, gx_nt);
        }
      });
    }
    if (pw != nullptr) {
      const T* rows_a = wt ? xb : gb;  // A(i, p): the side along grad_w's rows
      const T* rows_b = wt ? gb : xb;  // B[p, cols]
      const int64_t lda = wt ? K : N, ldb = wt ? N : K;
      column_blocks<T>(wcols, [&](int64_t c0, int nv, typename V::mask lm, bool ht) {
        const auto& tab = micros<T>(ht);
        const int MR = tiles::mr_for(nv);
        for (int64_t i0 = 0; i0 < wrows; i0 += MR) {
          const int mr = int(std::min<int64_t>(MR, wrows - i0));
          T* acc = pw + i0 * wpitch + c0;
          const int64_t npf = pf.take(rows, at);
          tab[nv - 1][mr - 1](rows, rows_a + i0, 1, lda, rows_b + c0, ldb, 0, nullptr, 0, nullptr, 0, acc, wpitch,
                                 acc, wpitch, lm, V::full(), at, npf, false);
        }
      });
    }
  }

  // grad_w (N x K) from the tasks' partials, summed per element in task order in float64 (any split of the
  // elements over threads gives the same sums).
  void reduce(const T* pp, int64_t ntasks, T* gw) const {
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K * ntasks, 1)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t at = wt ? k * wpitch + n : n * wpitch + k;
          double acc = 0.0;
          for (int64_t t = 0; t < ntasks; ++t) acc += double(pp[t * wsize + at]);
          gw[n * K + k] = T(acc);
        }
    });
  }
};

// g: P x N rows, x: P x K rows, w: N x K, a / c: K x K / K or null (grad_x = g w - x a - c). gx: P x K rows
// or null; gw: N x K or null.
template <typename T>
void backward_kernel(const T* g, const T* x, const T* w, const T* a, const T* c, T* gx, T* gw, int64_t P, int64_t N,
                     int64_t K) {
  const Backward<T> plan(w, a, c, N, K);
  const int64_t blocks = RowTasks::blocks(P);
  const int64_t bytes = P * (N + K) * int64_t(sizeof(T));
  // Every task zeroes, fills and hands in a grad_w partial of N x K: with both sides wide (7 x 7 maps, 96 x 576)
  // tasks of one block made that merge the bulk of the work (0.4x oneDNN), so a task takes at least
  // kMinTaskRows rows.
  const int64_t by_rows = std::max<int64_t>(1, P / kMinTaskRows);
  const RowTasks tasks(P,
                       std::max<int64_t>(1, std::min<int64_t>({blocks, int64_t(64), bytes / (128 * 1024), by_rows})));
  const int64_t per = tasks.per, ntasks = tasks.n;
  // Each task zeroes its own partial (in parallel, into its cache) rather than the caller the lot.
  std::unique_ptr<T[]> part(gw != nullptr ? new T[static_cast<size_t>(ntasks * plan.wsize)] : nullptr);
  const bool gx_nt = gx != nullptr && simd::stream_ok(gx, P, K, simd::kStreamBytes);
  for_tasks(P * N * K, ntasks, [&](int64_t t) {
    const int64_t p0 = std::min(P, t * per), p1 = std::min(P, p0 + per);
    T* pw = gw != nullptr ? part.get() + t * plan.wsize : nullptr;
    if (pw != nullptr) std::fill(pw, pw + plan.wsize, T(0));
    for (int64_t b0 = p0; b0 < p1; b0 += kBlockRows) {
      const int64_t rows = std::min(p1, b0 + kBlockRows) - b0;
      Prefetch pf;  // the next block's g rows, then its x rows
      if (b0 + kBlockRows < p1) {
        const int64_t b1 = b0 + kBlockRows, b2 = std::min(p1, b0 + 2 * kBlockRows);
        pf.next = reinterpret_cast<const char*>(g + b1 * N);
        pf.end = reinterpret_cast<const char*>(g + b2 * N);
        pf.next2 = reinterpret_cast<const char*>(x + b1 * K);
        pf.end2 = reinterpret_cast<const char*>(x + b2 * K);
      }
      plan.rows_of_block(g + b0 * N, x + b0 * K, rows, gx != nullptr ? gx + b0 * K : nullptr, gx_nt, pw, pf);
    }
    if (gx_nt) simd::stream_fence();
  });
  if (gw != nullptr) plan.reduce(part.get(), ntasks, gw);
}

// z = x w^T: x P x K rows, w N x K, z P x N rows.
template <typename T>
void forward_kernel(const T* x, const T* w, T* z, int64_t P, int64_t N, int64_t K) {
  using V = Vec<T>;
  const int64_t Np = simd::padded<T>(N);
  std::vector<T> wt(static_cast<size_t>(K * Np), T(0));  // w^T, rows padded
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) wt[size_t(k * Np + n)] = w[n * K + k];
  const T* wtp = wt.data();
  const bool nt = simd::stream_ok(z, P, N, simd::kStreamBytes);
  const RowTasks tasks(P, std::max<int64_t>(1, std::min<int64_t>(RowTasks::blocks(P), int64_t(256))));
  const int64_t per = tasks.per, ntasks = tasks.n;
  for_tasks(P * N * K, ntasks, [&](int64_t t) {
    const int64_t p0 = std::min(P, t * per), p1 = std::min(P, p0 + per);
    for (int64_t b0 = p0; b0 < p1; b0 += kBlockRows) {
      const int64_t rows = std::min(p1, b0 + kBlockRows) - b0;
      const T* xb = x + b0 * K;
      Prefetch pf;  // the next block's x rows
      if (b0 + kBlockRows < p1) {
        pf.next = reinterpret_cast<const char*>(xb + kBlockRows * K);
        pf.end = reinterpret_cast<const char*>(x + std::min(p1, b0 + 2 * kBlockRows) * K);
      }
      const char* at = nullptr;
      column_blocks<T>(N, [&](int64_t c0, int nv, typename V::mask lm, bool ht) {
        const auto& tab = micros<T>(ht);
        const int MR = tiles::mr_for(nv);
        for (int64_t r = 0; r < rows; r += MR) {
          const int mr = int(std::min<int64_t>(MR, rows - r));
          const int64_t npf = pf.take(K, at);
          tab[nv - 1][mr - 1](K, xb + r * K, K, 1, wtp + c0, Np, 0, nullptr, 0, nullptr, 0, nullptr, 0,
                                 z + (b0 + r) * N + c0, N, V::full(), lm, at, npf, nt);
        }
      });
    }
    if (nt) simd::stream_fence();
  });
}

at::Tensor rows_of(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

std::tuple<at::Tensor, at::Tensor> conv1x1_backward_cpu(const at::Tensor& grad_, const at::Tensor& x_,
                                                        const at::Tensor& w_, const std::optional<at::Tensor>& a_,
                                                        const std::optional<at::Tensor>& c_,
                                                        std::array<bool, 2> mask) {
  const char* op = "conv1x1_backward";
  TORCH_CHECK(x_.device().is_cpu() && grad_.device().is_cpu() && w_.device().is_cpu(), op,
              ": grad_out, x and weight must be CPU tensors");
  TORCH_CHECK(x_.dim() == 4 && grad_.dim() == 4, op, ": grad_out and x must be N x C x H x W, got ", grad_.sizes(),
              " and ", x_.sizes());
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x_.scalar_type());
  TORCH_CHECK(w_.dim() == 4 && w_.size(2) == 1 && w_.size(3) == 1, op, ": weight must be Cout x Cin x 1 x 1, got ",
              w_.sizes());
  const int64_t K = x_.size(1), N = w_.size(0);
  TORCH_CHECK(w_.size(1) == K, op, ": weight ", w_.sizes(), " does not take x's ", K, " channels (groups = 1 only)");
  TORCH_CHECK(grad_.size(0) == x_.size(0) && grad_.size(1) == N && grad_.size(2) == x_.size(2) &&
                  grad_.size(3) == x_.size(3),
              op, ": grad_out ", grad_.sizes(), " is not the output of weight ", w_.sizes(), " on x ", x_.sizes());
  TORCH_CHECK(x_.numel() > 0 && grad_.numel() > 0, op, ": x ", x_.sizes(), " is empty");
  for (const at::Tensor* t : {&grad_, &w_})
    TORCH_CHECK(t->scalar_type() == x_.scalar_type(), op, ": grad_out and weight must match x's dtype (",
                x_.scalar_type(), "), got ", t->scalar_type());
  if (a_.has_value()) {
    TORCH_CHECK(a_->dim() == 2 && a_->size(0) == K && a_->size(1) == K && a_->scalar_type() == x_.scalar_type() &&
                    a_->device().is_cpu(),
                op, ": a must be a ", K, " x ", K, " CPU tensor of x's dtype, got ", a_->sizes());
  }
  if (c_.has_value()) {
    TORCH_CHECK(c_->dim() == 1 && c_->size(0) == K && c_->scalar_type() == x_.scalar_type() && c_->device().is_cpu(),
                op, ": c must be a (", K, ") CPU tensor of x's dtype, got ", c_->sizes());
  }
  const at::Tensor g = rows_of(grad_), x = rows_of(x_), w = w_.contiguous();
  const at::Tensor a = a_.has_value() ? a_->contiguous() : at::Tensor();
  const at::Tensor c = c_.has_value() ? c_->contiguous() : at::Tensor();
  const int64_t P = x.numel() / K;
  at::Tensor gx = mask[0] ? at::empty_like(x, x.options(), at::MemoryFormat::ChannelsLast) : x.new_empty({0});
  at::Tensor gw = mask[1] ? at::empty_like(w, w.options(), at::MemoryFormat::Contiguous) : w.new_empty({0});
  if (!mask[0] && !mask[1]) return {gx, gw};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1x1_backward_cpu", [&] {
    backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                              a.defined() ? a.data_ptr<scalar_t>() : nullptr,
                              c.defined() ? c.data_ptr<scalar_t>() : nullptr,
                              mask[0] ? gx.data_ptr<scalar_t>() : nullptr, mask[1] ? gw.data_ptr<scalar_t>() : nullptr,
                              P, N, K);
  });
  if (mask[0] && !channels_last(x_)) gx = gx.contiguous();
  return {gx, gw};
}

at::Tensor conv1x1_forward_cpu(const at::Tensor& x_, const at::Tensor& w_) {
  const char* op = "conv1x1_forward";
  TORCH_CHECK(x_.device().is_cpu() && w_.device().is_cpu(), op, ": x and weight must be CPU tensors");
  TORCH_CHECK(x_.dim() == 4, op, ": x must be N x C x H x W, got ", x_.sizes());
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x_.scalar_type());
  TORCH_CHECK(w_.dim() == 4 && w_.size(2) == 1 && w_.size(3) == 1, op, ": weight must be Cout x Cin x 1 x 1, got ",
              w_.sizes());
  TORCH_CHECK(w_.size(1) == x_.size(1), op, ": weight ", w_.sizes(), " does not take x's ", x_.size(1),
              " channels (groups = 1 only)");
  TORCH_CHECK(w_.scalar_type() == x_.scalar_type(), op, ": weight must match x's dtype (", x_.scalar_type(),
              "), got ", w_.scalar_type());
  TORCH_CHECK(x_.numel() > 0 && w_.size(0) > 0, op, ": x ", x_.sizes(), " or weight ", w_.sizes(), " is empty");
  const at::Tensor x = rows_of(x_), w = w_.contiguous();
  const int64_t K = x.size(1), N = w.size(0), P = x.numel() / K;
  at::Tensor z =
      at::empty({x.size(0), N, x.size(2), x.size(3)}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1x1_forward_cpu", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), P, N, K);
  });
  return channels_last(x_) ? z : z.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CPU, m) {
  m.impl("conv1x1_forward", &conv1x1_forward_cpu);
  m.impl("conv1x1_backward", &conv1x1_backward_cpu);
}

}  // namespace fastface
