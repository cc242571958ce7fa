// Training-mode BatchNorm (batch statistics) + optional residual add + optional ReLU6 on the CPU,
// forward and backward, for channels_last (NHWC) float32/float64 tensors:
//
//   y = act((x - mean) * (invstd * gamma) + beta [+ residual])
//
// The tensor is an M x C matrix (M = N*H*W pixels, channels contiguous): every pass streams it
// once, channels vectorised, rows split into tasks.
//
// Forward, two passes:
//   1. per chunk of rows (~128 KiB, in L2): mean and M2 in the input dtype (two sweeps over
//      the cached chunk, so no E[x^2] - mean^2 cancellation), merged into the task's float64
//      statistics with Chan's formula; tasks merged in task order (results do not depend on the
//      thread count);
//   2. y = act(fma(x - mean, invstd * gamma, beta) [+ residual]).
// Large outputs (y, grad_x, the residual's gradient; >= simd::kStreamBytes) are written with
// non-temporal stores when their rows are whole vectors (simd::stream_ok).
// Backward, two passes (x is saved, not y: the ReLU6 mask is recomputed from x exactly as the
// forward computed its pre-activation, so it is the forward's mask bit for bit):
//   1. sum(g) and sum(g * xhat) per channel, g = grad_y behind the mask (float per chunk, float64
//      per task, tasks summed in order) = grad_beta, grad_gamma;
//   2. grad_x = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)); with a residual and ReLU6
//      also g itself (the residual's gradient; without ReLU6 that is grad_y, returned by the caller).
//
// bn_add_act: act(BN_x(x) + BN_r(r)), two training BNs summed (the split model's add merge of its
// stems); the residual is normalised on the fly (the RB flag), so neither BN's output is stored, and
// its backward reduces both BNs' sums in one pass (sum g is common) and writes both gradients in one.
//
// ATen's channels_last batch norm is the comparison: its backward ran at ~2 GB/s on the
// [64, 96, 56, 56] maps of the face model (35 ms), and BN, hardtanh and hardtanh_backward each
// stream the map again. NCHW tensors are converted on entry and exit (the model only calls this
// op on channels_last tensors).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <functional>
#include <type_traits>
#include <vector>

#include "aten_tasks.h"
#include "layout.h"
#include "moments.h"
#include "simd.h"

namespace fastface {
namespace {

using simd::Vec;

// The matrix view: M rows (pixels) x C channels, in NHWC (ChannelsLast) memory order.
at::Tensor as_nhwc(const at::Tensor& t) {
  return t.dim() == 4 ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

// Returns M (pixels per channel).
int64_t check_args(const char* op, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                   const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 4 || x.dim() == 2, op, ": x must be N x C x H x W (or N x C), got ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == C && beta.dim() == 1 && beta.size(0) == C, op,
              ": gamma and beta must have C = ", C, " entries, got ", gamma.sizes(), " and ", beta.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": CPU kernel supports float32 and float64, got ", dt);
  TORCH_CHECK(gamma.scalar_type() == dt && beta.scalar_type() == dt, op, ": dtypes differ (x is ", dt, ")");
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(), ", got ",
                residual->sizes());
    TORCH_CHECK(residual->scalar_type() == dt, op, ": residual dtype ", residual->scalar_type(), " is not ", dt);
  }
  const int64_t M = x.numel() / std::max<int64_t>(C, 1);
  TORCH_CHECK(C >= 1 && M >= 1, op, ": batch statistics need at least one element per channel, got ", x.sizes());
  return M;
}

// Rows per chunk: a chunk (~128 KiB) stays in L2 between the sweeps that reduce it, and the
// per-chunk float64 merges are few. 16 KiB (L1) chunks made the forward 3-25 % slower on 7x7 to
// 56x56 maps (the merges) and a training step ~6 % slower in three of four A/B runs on this box.
template <typename T>
int64_t chunk_rows(int64_t C) {
  return std::max<int64_t>(8, (128 * 1024 / int64_t(sizeof(T))) / C);
}

// The row partition into tasks depends on (M, C) only, never on the thread count: the per-task
// float64 partials are merged in task order, so results are the same on any number of threads.
struct Split {
  int64_t ntasks, rows;  // rows per task (a multiple of the chunk)
};

template <typename T>
Split split_rows(int64_t M, int64_t C) {
  const int64_t cr = chunk_rows<T>(C);
  const int64_t chunks = (M + cr - 1) / cr;
  const int64_t ntasks = std::min<int64_t>(64, chunks);
  const int64_t per = (chunks + ntasks - 1) / ntasks;
  const int64_t rows = per * cr;
  return {(M + rows - 1) / rows, rows};
}

// ---- row kernels ---------------------------------------------------------------------------
// Each works on rows [r0, r1) of an M x C matrix through local restrict pointers (a lambda's
// captured references would be reloaded after every store: measured ~3x slower), full
// vectors unmasked, the channel tail (C % L) masked. Padded per-channel constants read past C
// as 0.

// How far ahead (bytes) the software prefetch of large maps reads (prefetch_rows).
constexpr int64_t kPrefetchBytes = 8 << 10;

// Software prefetch, pf rows ahead (0: none), for maps of >= simd::kStreamBytes: the hardware
// prefetchers alone kept the backward's two input streams at ~30 GB/s on this box; with it
// 1.25-1.7x faster backwards and 1.1-1.3x faster forwards over 26-77 MB maps. Maps that fit in
// the last-level cache lost up to 15 % to the extra instructions, so they go without.
template <typename T>
inline int64_t prefetch_rows(int64_t M, int64_t C) {
  if (M * C * int64_t(sizeof(T)) < simd::kStreamBytes) return 0;
  return std::max<int64_t>(1, kPrefetchBytes / (C * int64_t(sizeof(T))));
}

template <typename T>
inline void prefetch_row(const T* p, int64_t C) {  // (a prefetch past the end of a map cannot fault)
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < C * int64_t(sizeof(T)); o += 64) __builtin_prefetch(c + o, 0, 3);
}

// s[c] += sum_r (x[r, c] - k[c]): shifted by a value of the data (the chunk's first row), the sum
// stays of the order of the spread, not of the mean, so a large mean costs no float precision.
template <typename T>
inline void rows_sum(const T* __restrict x, int64_t r0, int64_t r1, int64_t C, const T* __restrict k,
                     T* __restrict s, int64_t pf) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t nfull = C / L;
  const auto last = V::tail(C - nfull * L);
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * C;
    if (pf) prefetch_row(xr + pf * C, C);
    for (int64_t o = 0; o < nfull * L; o += L)
      V::store(s + o, V::add(V::load(s + o), V::sub(V::load(xr + o), V::load(k + o))));
    if (nfull * L < C) {
      const int64_t o = nfull * L;
      V::store(s + o, V::add(V::load(s + o), V::sub(V::load(xr + o, last), V::load(k + o))));
    }
  }
}

// q[c] += sum_r (x[r, c] - m[c])^2
template <typename T>
inline void rows_m2(const T* __restrict x, int64_t r0, int64_t r1, int64_t C, const T* __restrict m,
                    T* __restrict q) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t nfull = C / L;
  const auto last = V::tail(C - nfull * L);
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * C;
    for (int64_t o = 0; o < nfull * L; o += L) {
      const auto d = V::sub(V::load(xr + o), V::load(m + o));
      V::store(q + o, V::fmadd(d, d, V::load(q + o)));
    }
    if (nfull * L < C) {
      const int64_t o = nfull * L;
      const auto d = V::sub(V::load(xr + o, last), V::load(m + o));
      V::store(q + o, V::fmadd(d, d, V::load(q + o)));
    }
  }
}

// y = act(fma(x - mean, scale, beta) [+ res]); RB: the residual through its own BN, fma(res - rk[0],
// rk[1], rk[2]) (bn_add_act); NT: non-temporal stores (simd::stream_ok holds for y)
template <typename T, bool RES, bool RB, bool RELU6, bool NT>
inline void rows_normalize(const T* __restrict x, const T* __restrict res, int64_t r0, int64_t r1, int64_t C,
                           const T* __restrict mean, const T* __restrict scale, const T* __restrict beta,
                           const T* __restrict rmean, const T* __restrict rscale, const T* __restrict rbeta,
                           T* __restrict y, int64_t pf) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t nfull = C / L;
  const auto last = V::tail(C - nfull * L);
  const auto lo = V::zero(), hi = V::set1(T(6));
  auto one = [&](int64_t off, int64_t o, typename V::mask m, bool full) {
    auto v = V::fmadd(V::sub(full ? V::load(x + off + o) : V::load(x + off + o, m), V::load(mean + o)),
                      V::load(scale + o), V::load(beta + o));
    if (RES) {
      auto r = full ? V::load(res + off + o) : V::load(res + off + o, m);
      if (RB) r = V::fmadd(V::sub(r, V::load(rmean + o)), V::load(rscale + o), V::load(rbeta + o));
      v = V::add(v, r);
    }
    if (RELU6) v = V::min(V::max(v, lo), hi);
    if (NT)
      V::stream(y + off + o, v);
    else if (full)
      V::store(y + off + o, v);
    else
      V::store(y + off + o, v, m);
  };
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * C;
    if (pf) prefetch_row(x + off + pf * C, C);
    if (RB && pf) prefetch_row(res + off + pf * C, C);
    for (int64_t o = 0; o < nfull * L; o += L) one(off, o, V::full(), true);
    if (nfull * L < C) one(off, nfull * L, last, false);
  }
}

// Backward constants, padded: mean, scale (invstd * gamma, the forward's multiplier: same
// rounding, same mask), beta, k1 (gamma * invstd), mg (mean g), mgz (invstd * mean(g * xhat));
// with a BN'd residual (bn_add_act) its mean, scale, beta, k1 and mgz.
template <typename T>
struct BwdK {
  const T* mean;
  const T* scale;
  const T* beta;
  const T* k1;
  const T* mg;
  const T* mgz;
  const T* rmean = nullptr;
  const T* rscale = nullptr;
  const T* rbeta = nullptr;
  const T* rk1 = nullptr;
  const T* rmgz = nullptr;
};

// g = grad_y behind the ReLU6 mask of the forward's pre-activation; xc = x - mean; RB: rc = res - rmean.
template <typename T, bool RES, bool RB, bool RELU6>
inline void grad_xc(const T* __restrict x, const T* __restrict gy, const T* __restrict res, int64_t off, int64_t o,
                    const BwdK<T>& k, typename Vec<T>::mask m, bool full, typename Vec<T>::reg& gv,
                    typename Vec<T>::reg& xc, typename Vec<T>::reg& rc) {
  using V = Vec<T>;
  xc = V::sub(full ? V::load(x + off + o) : V::load(x + off + o, m), V::load(k.mean + o));
  gv = full ? V::load(gy + off + o) : V::load(gy + off + o, m);
  auto r = V::zero();
  if (RES && (RB || RELU6)) r = full ? V::load(res + off + o) : V::load(res + off + o, m);
  if (RB) {
    rc = V::sub(r, V::load(k.rmean + o));
    r = V::fmadd(rc, V::load(k.rscale + o), V::load(k.rbeta + o));
  }
  if (RELU6) {
    auto pre = V::fmadd(xc, V::load(k.scale + o), V::load(k.beta + o));
    if (RES) pre = V::add(pre, r);
    gv = V::keep_open(gv, pre, V::zero(), V::set1(T(6)));
  }
}

// a[c] += sum_r g, b[c] += sum_r g * (x - mean); RB: c[c] += sum_r g * (res - rmean)
template <typename T, bool RES, bool RB, bool RELU6>
inline void rows_grad_sums(const T* __restrict x, const T* __restrict gy, const T* __restrict res, int64_t r0,
                           int64_t r1, int64_t C, const BwdK<T> k, T* __restrict a, T* __restrict b,
                           T* __restrict c, int64_t pf) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t nfull = C / L;
  const auto last = V::tail(C - nfull * L);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * C;
    if (pf) {
      prefetch_row(x + off + pf * C, C);
      prefetch_row(gy + off + pf * C, C);
      if (RB) prefetch_row(res + off + pf * C, C);
    }
    for (int64_t o = 0; o < C; o += L) {
      const bool full = o < nfull * L;
      typename V::reg gv, xc, rc;
      grad_xc<T, RES, RB, RELU6>(x, gy, res, off, o, k, last, full, gv, xc, rc);
      V::store(a + o, V::add(V::load(a + o), gv));
      V::store(b + o, V::fmadd(gv, xc, V::load(b + o)));
      if (RB) V::store(c + o, V::fmadd(gv, rc, V::load(c + o)));
    }
  }
}

// gx = k1 * (g - mg - (x - mean) * mgz); gres = g (if given), or with RB its BN's gradient
// rk1 * (g - mg - (res - rmean) * rmgz) (mean g is the same for both); NT: non-temporal stores
template <typename T, bool RES, bool RB, bool RELU6, bool NT>
inline void rows_grad_x(const T* __restrict x, const T* __restrict gy, const T* __restrict res, int64_t r0,
                        int64_t r1, int64_t C, const BwdK<T> k, T* __restrict gx, T* __restrict gres,
                        int64_t pf) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t nfull = C / L;
  const auto last = V::tail(C - nfull * L);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * C;
    if (pf) {
      prefetch_row(x + off + pf * C, C);
      prefetch_row(gy + off + pf * C, C);
      if (RB) prefetch_row(res + off + pf * C, C);
    }
    for (int64_t o = 0; o < C; o += L) {
      const bool full = o < nfull * L;
      typename V::reg gv, xc, rc;
      grad_xc<T, RES, RB, RELU6>(x, gy, res, off, o, k, last, full, gv, xc, rc);
      const auto gm = V::sub(gv, V::load(k.mg + o));
      const auto d = V::mul(V::load(k.k1 + o), V::sub(gm, V::mul(xc, V::load(k.mgz + o))));
      constexpr bool GRES = RES && (RB || RELU6);
      auto gr = gv;
      if (RB) gr = V::mul(V::load(k.rk1 + o), V::sub(gm, V::mul(rc, V::load(k.rmgz + o))));
      if (NT) {
        V::stream(gx + off + o, d);
        if (GRES) V::stream(gres + off + o, gr);
      } else if (full) {
        V::store(gx + off + o, d);
        if (GRES) V::store(gres + off + o, gr);
      } else {
        V::store(gx + off + o, d, last);
        if (GRES) V::store(gres + off + o, gr, last);
      }
    }
  }
}

// f(std::integral_constant<bool, b>) for a runtime flag.
template <class F>
void dispatch_bool(bool b, F&& f) {
  if (b)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// f(RES, RB, RELU6) with the runtime flags as integral constants (RB only with RES).
template <class F>
void dispatch_flags(bool res, bool rb, bool relu6, F&& f) {
  dispatch_bool(relu6, [&](auto RELU6) {
    if (!res)
      f(std::false_type{}, std::false_type{}, RELU6);
    else
      dispatch_bool(rb, [&](auto RB) { f(std::true_type{}, RB, RELU6); });
  });
}

// ---- forward ------------------------------------------------------------------------------

// y = act((x - mean) * (invstd * gamma) + beta [+ res]) with the statistics given: forward_kernel's second pass.
template <typename T>
void apply_kernel(int64_t M, int64_t C, const T* x, const T* res, const T* gamma, const T* beta, const T* mean_in,
                  const T* invstd_in, bool relu6, T* y, const simd::Padded<T>* rk) {
  const Split sp = split_rows<T>(M, C);
  const int64_t pf = prefetch_rows<T>(M, C);
  simd::Padded<T> k(C, 3);
  T* meanP = k[0];
  T* scaleP = k[1];
  T* betaP = k[2];
  for (int64_t c = 0; c < C; ++c) {
    meanP[c] = mean_in[c];
    scaleP[c] = invstd_in[c] * gamma[c];
    betaP[c] = beta[c];
  }

  const bool nt = simd::stream_ok(y, M, C, simd::kStreamBytes);
  const T* rmean = rk ? (*rk)[0] : nullptr;
  const T* rscale = rk ? (*rk)[1] : nullptr;
  const T* rbeta = rk ? (*rk)[2] : nullptr;
  dispatch_flags(res != nullptr, rk != nullptr, relu6, [&](auto RES, auto RB, auto RELU6) {
    dispatch_bool(nt, [&](auto NT) {
      for_tasks(M * C, sp.ntasks, [=](int64_t t) {
        const int64_t r0 = t * sp.rows, r1 = std::min(M, r0 + sp.rows);
        rows_normalize<T, decltype(RES)::value, decltype(RB)::value, decltype(RELU6)::value, decltype(NT)::value>(
            x, res, r0, r1, C, meanP, scaleP, betaP, rmean, rscale, rbeta, y, pf);
        if (decltype(NT)::value) simd::stream_fence();
      });
    });
  });
}

// rk (bn_add_act): the residual's own BN as three padded rows (mean, scale = invstd * gamma, beta).
template <typename T>
void forward_kernel(int64_t M, int64_t C, const T* x, const T* res, const T* gamma, const T* beta, double eps,
                    bool relu6, T* y, T* mean_out, T* invstd_out, const simd::Padded<T>* rk = nullptr) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t Cp = simd::padded<T>(C);
  const int64_t cr = chunk_rows<T>(C);
  const Split sp = split_rows<T>(M, C);
  std::vector<double> tmean(size_t(sp.ntasks * C)), tm2(size_t(sp.ntasks * C));
  std::vector<int64_t> tcount(size_t(sp.ntasks), 0);
  double* const tmean_p = tmean.data();
  double* const tm2_p = tm2.data();
  int64_t* const tcount_p = tcount.data();
  const int64_t pf = prefetch_rows<T>(M, C);

  for_tasks(M * C, sp.ntasks, [=](int64_t t) {
    T* acc = simd::scratch<T, 3>(size_t(4 * Cp));
    T* __restrict s = acc;
    T* __restrict q = acc + Cp;
    T* __restrict rm = acc + 2 * Cp;
    T* __restrict k = acc + 3 * Cp;  // the shift: the chunk's first row (lanes past C: 0)
    double* __restrict mu = tmean_p + t * C;
    double* __restrict m2 = tm2_p + t * C;
    const int64_t r0 = t * sp.rows, r1 = std::min(M, r0 + sp.rows);
    int64_t cnt = 0;
    for (int64_t c0 = r0; c0 < r1; c0 += cr) {
      const int64_t c1 = std::min(r1, c0 + cr), n = c1 - c0;
      std::fill(s, s + 2 * Cp, T(0));
      std::copy(x + c0 * C, x + c0 * C + C, k);
      std::fill(k + C, k + Cp, T(0));
      rows_sum<T>(x, c0, c1, C, k, s, pf);
      const auto inv_n = V::set1(T(1) / T(n));
      for (int64_t o = 0; o < Cp; o += L) V::store(rm + o, V::fmadd(V::load(s + o), inv_n, V::load(k + o)));
      rows_m2<T>(x, c0, c1, C, rm, q);
      // Lanes past C hold 0 (masked loads); only C are merged.
      if (cnt == 0) {
        for (int64_t c = 0; c < C; ++c) {
          mu[c] = rm[c];
          m2[c] = q[c];
        }
      } else {
        const double na = double(cnt), nb = double(n), nab = na + nb, f = nb / nab, g = na * nb / nab;
        for (int64_t c = 0; c < C; ++c) {
          const double delta = double(rm[c]) - mu[c];
          mu[c] += delta * f;
          m2[c] += double(q[c]) + delta * delta * g;
        }
      }
      cnt += n;
    }
    tcount_p[t] = cnt;
  });

  std::vector<double> mu, m2;
  const double cnt = merge_task_moments(sp.ntasks, C, tmean, tm2, tcount, mu, m2);
  write_mean_invstd(C, mu, m2, cnt, eps, mean_out, invstd_out);
  if (y == nullptr) return;  // statistics only (bn_stats)
  apply_kernel<T>(M, C, x, res, gamma, beta, mean_out, invstd_out, relu6, y, rk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_cpu(const at::Tensor& x_, const at::Tensor& gamma_,
                                                          const at::Tensor& beta_,
                                                          const c10::optional<at::Tensor>& residual_, double eps,
                                                          bool relu6) {
  const int64_t M = check_args("bn_act", x_, gamma_, beta_, residual_);
  TORCH_CHECK(eps >= 0, "bn_act: eps must be >= 0, got ", eps);
  const int64_t C = x_.size(1);
  const bool cl = channels_last(x_);
  at::Tensor x = as_nhwc(x_);
  at::Tensor res = residual_.has_value() ? as_nhwc(*residual_) : at::Tensor();
  at::Tensor gamma = gamma_.contiguous(), beta = beta_.contiguous();
  at::Tensor y = at::empty_like(x);  // same (NHWC) strides as x
  at::Tensor mean = at::empty({C}, x.options()), invstd = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_cpu", [&] {
    forward_kernel<scalar_t>(M, C, x.data_ptr<scalar_t>(), res.defined() ? res.data_ptr<scalar_t>() : nullptr,
                             gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), eps, relu6,
                             y.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>());
  });
  return {(cl || x_.dim() != 4) ? y : y.contiguous(), mean, invstd};
}

// bn_act with its statistics given (a producer reduced them as it wrote x: dwconv_forward_stats): y alone.
at::Tensor bn_act_apply_cpu(const at::Tensor& x_, const at::Tensor& gamma_, const at::Tensor& beta_,
                            const at::Tensor& mean_, const at::Tensor& invstd_, bool relu6) {
  const int64_t M = check_args("bn_act_apply", x_, gamma_, beta_, c10::nullopt);
  const int64_t C = x_.size(1);
  TORCH_CHECK(mean_.dim() == 1 && mean_.size(0) == C && invstd_.dim() == 1 && invstd_.size(0) == C,
              "bn_act_apply: mean and invstd must have C = ", C, " entries, got ", mean_.sizes(), " and ",
              invstd_.sizes());
  TORCH_CHECK(mean_.scalar_type() == x_.scalar_type() && invstd_.scalar_type() == x_.scalar_type(),
              "bn_act_apply: dtypes differ (x is ", x_.scalar_type(), ")");
  const bool cl = channels_last(x_);
  at::Tensor x = as_nhwc(x_);
  at::Tensor gamma = gamma_.contiguous(), beta = beta_.contiguous(), mean = mean_.contiguous(),
             invstd = invstd_.contiguous();
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_apply_cpu", [&] {
    apply_kernel<scalar_t>(M, C, x.data_ptr<scalar_t>(), nullptr, gamma.data_ptr<scalar_t>(),
                           beta.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), relu6,
                           y.data_ptr<scalar_t>(), nullptr);
  });
  return (cl || x_.dim() != 4) ? y : y.contiguous();
}

// The batch statistics alone: bn_act's first pass, for a consumer that normalises on the fly.
std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x_, double eps) {
  TORCH_CHECK(x_.dim() == 4 || x_.dim() == 2, "bn_stats: x must be N x C x H x W or N x C, got ", x_.sizes());
  const auto dt = x_.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "bn_stats: CPU kernel supports float32 and float64, got ", dt);
  TORCH_CHECK(eps >= 0, "bn_stats: eps must be >= 0, got ", eps);
  const int64_t C = x_.size(1), M = x_.numel() / std::max<int64_t>(C, 1);
  TORCH_CHECK(C >= 1 && M >= 1, "bn_stats: batch statistics need at least one element per channel, got ", x_.sizes());
  at::Tensor x = as_nhwc(x_);
  at::Tensor mean = at::empty({C}, x.options()), invstd = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "bn_stats_cpu", [&] {
    forward_kernel<scalar_t>(M, C, x.data_ptr<scalar_t>(), nullptr, nullptr, nullptr, eps, false, nullptr,
                             mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>());
  });
  return {mean, invstd};
}

// ---- backward -----------------------------------------------------------------------------

// The residual's own BN in bn_add_act's backward: its parameters and statistics in, its gradients out.
template <typename T>
struct ResBN {
  const T* gamma;
  const T* beta;
  const T* mean;
  const T* invstd;
  T* ggamma;
  T* gbeta;
};

template <typename T>
void backward_kernel(int64_t M, int64_t C, const T* gy, const T* x, const T* res, const T* gamma, const T* beta,
                     const T* mean, const T* invstd, bool relu6, T* gx, T* gres, T* ggamma, T* gbeta,
                     const double* sums = nullptr, const ResBN<T>* rb = nullptr) {
  const int64_t Cp = simd::padded<T>(C);
  const int64_t cr = chunk_rows<T>(C);
  const Split sp = split_rows<T>(M, C);
  simd::Padded<T> kp(C, rb ? 11 : 6);
  for (int64_t c = 0; c < C; ++c) {
    kp[0][c] = mean[c];
    kp[1][c] = invstd[c] * gamma[c];
    kp[2][c] = beta[c];
    kp[3][c] = gamma[c] * invstd[c];
    if (rb) {
      kp[6][c] = rb->mean[c];
      kp[7][c] = rb->invstd[c] * rb->gamma[c];
      kp[8][c] = rb->beta[c];
      kp[9][c] = rb->gamma[c] * rb->invstd[c];
    }
  }
  BwdK<T> k{kp[0], kp[1], kp[2], kp[3], kp[4], kp[5]};
  if (rb) {
    k.rmean = kp[6];
    k.rscale = kp[7];
    k.rbeta = kp[8];
    k.rk1 = kp[9];
    k.rmgz = kp[10];
  }
  const int64_t pf = prefetch_rows<T>(M, C);

  // The first pass's sums (sum g, sum g * (x - mean); with rb sum g * (res - rmean)), unless the
  // caller reduced them already.
  const int64_t nsum = sums ? 1 : sp.ntasks;
  std::vector<double> tsg(size_t(nsum * C), 0.0), tsgz(size_t(nsum * C), 0.0), tsgr(size_t(rb ? nsum * C : 0), 0.0);
  double* const tsg_p = tsg.data();
  double* const tsgz_p = tsgz.data();
  double* const tsgr_p = tsgr.data();
  if (sums) {
    std::copy(sums, sums + C, tsg.begin());
    std::copy(sums + C, sums + 2 * C, tsgz.begin());
  } else dispatch_flags(res != nullptr, rb != nullptr, relu6, [&](auto RES, auto RB, auto RELU6) {
    for_tasks(M * C, sp.ntasks, [=](int64_t t) {
      T* acc = simd::scratch<T, 3>(size_t(3 * Cp));
      T* __restrict a = acc;
      T* __restrict b = acc + Cp;
      T* __restrict cr_ = acc + 2 * Cp;
      double* __restrict sg = tsg_p + t * C;
      double* __restrict sgz = tsgz_p + t * C;
      double* __restrict sgr = decltype(RB)::value ? tsgr_p + t * C : nullptr;
      const int64_t r0 = t * sp.rows, r1 = std::min(M, r0 + sp.rows);
      for (int64_t c0 = r0; c0 < r1; c0 += cr) {
        const int64_t c1 = std::min(r1, c0 + cr);
        std::fill(acc, acc + 3 * Cp, T(0));
        rows_grad_sums<T, decltype(RES)::value, decltype(RB)::value, decltype(RELU6)::value>(x, gy, res, c0, c1, C, k,
                                                                                              a, b, cr_, pf);
        for (int64_t c = 0; c < C; ++c) {
          sg[c] += double(a[c]);
          sgz[c] += double(b[c]);
          if (decltype(RB)::value) sgr[c] += double(cr_[c]);
        }
      }
    });
  });
  const double count = double(M);
  T* mgP = kp[4];
  T* mgzP = kp[5];
  for (int64_t c = 0; c < C; ++c) {
    double sa = 0, sb = 0, sr = 0;
    for (int64_t t = 0; t < nsum; ++t) {
      sa += tsg[size_t(t * C + c)];
      sb += tsgz[size_t(t * C + c)];
      if (rb) sr += tsgr[size_t(t * C + c)];
    }
    sb *= double(invstd[c]);  // sum(g * (x - mean)) * invstd = sum(g * xhat)
    gbeta[c] = T(sa);
    ggamma[c] = T(sb);
    mgP[c] = T(sa / count);
    // xhat * mean(g * xhat) = (x - mean) * (invstd * mean(g * xhat)): one multiply per element.
    mgzP[c] = T(sb / count * double(invstd[c]));
    if (rb) {  // the residual's BN sees the same g: its grad_beta is sum g as well
      sr *= double(rb->invstd[c]);
      rb->gbeta[c] = T(sa);
      rb->ggamma[c] = T(sr);
      kp[10][c] = T(sr / count * double(rb->invstd[c]));
    }
  }

  const bool nt = simd::stream_ok(gx, M, C, simd::kStreamBytes) && (gres == nullptr || simd::stream_ok(gres, M, C, 0));
  dispatch_flags(res != nullptr, rb != nullptr, relu6, [&](auto RES, auto RB, auto RELU6) {
    dispatch_bool(nt, [&](auto NT) {
      for_tasks(M * C, sp.ntasks, [=](int64_t t) {
        const int64_t r0 = t * sp.rows, r1 = std::min(M, r0 + sp.rows);
        rows_grad_x<T, decltype(RES)::value, decltype(RB)::value, decltype(RELU6)::value, decltype(NT)::value>(
            x, gy, res, r0, r1, C, k, gx, gres, pf);
        if (decltype(NT)::value) simd::stream_fence();
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(
    const at::Tensor& grad_y_, const at::Tensor& x_, const at::Tensor& gamma_, const at::Tensor& beta_,
    const at::Tensor& mean_, const at::Tensor& invstd_, const c10::optional<at::Tensor>& residual_, bool relu6) {
  const int64_t M = check_args("bn_act_backward", x_, gamma_, beta_, residual_);
  const int64_t C = x_.size(1);
  TORCH_CHECK(grad_y_.sizes() == x_.sizes(), "bn_act_backward: grad_y must have x's shape ", x_.sizes(), ", got ",
              grad_y_.sizes());
  TORCH_CHECK(mean_.dim() == 1 && mean_.size(0) == C && invstd_.dim() == 1 && invstd_.size(0) == C,
              "bn_act_backward: mean and invstd must have C = ", C, " entries");
  for (const at::Tensor* t : {&grad_y_, &mean_, &invstd_})
    TORCH_CHECK(t->scalar_type() == x_.scalar_type(), "bn_act_backward: dtypes differ (x is ", x_.scalar_type(),
                ", got ", t->scalar_type(), ")");
  const bool cl = channels_last(x_);
  at::Tensor x = as_nhwc(x_), gy = as_nhwc(grad_y_);
  const bool with_res = residual_.has_value() && relu6;  // without ReLU6 the mask needs no residual
  at::Tensor res = with_res ? as_nhwc(*residual_) : at::Tensor();
  at::Tensor gamma = gamma_.contiguous(), beta = beta_.contiguous(), mean = mean_.contiguous(),
             invstd = invstd_.contiguous();
  at::Tensor gx = at::empty_like(x);
  at::Tensor gres = with_res ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor ggamma = at::empty({C}, x.options()), gbeta = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_backward_cpu", [&] {
    backward_kernel<scalar_t>(M, C, gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                              with_res ? res.data_ptr<scalar_t>() : nullptr, gamma.data_ptr<scalar_t>(),
                              beta.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), relu6,
                              gx.data_ptr<scalar_t>(), with_res ? gres.data_ptr<scalar_t>() : nullptr,
                              ggamma.data_ptr<scalar_t>(), gbeta.data_ptr<scalar_t>());
  });
  const bool keep = cl || x_.dim() != 4;
  return {keep ? gx : gx.contiguous(), ggamma, gbeta, (keep || !with_res) ? gres : gres.contiguous()};
}

// bn_act_backward without a residual, its first pass's sums given (a fused producer reduced them).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_sums_cpu(
    const at::Tensor& grad_y_, const at::Tensor& x_, const at::Tensor& gamma_, const at::Tensor& beta_,
    const at::Tensor& mean_, const at::Tensor& invstd_, const at::Tensor& sums_, bool relu6) {
  const int64_t M = check_args("bn_act_backward_sums", x_, gamma_, beta_, c10::nullopt);
  const int64_t C = x_.size(1);
  TORCH_CHECK(grad_y_.sizes() == x_.sizes(), "bn_act_backward_sums: grad_y must have x's shape ", x_.sizes(),
              ", got ", grad_y_.sizes());
  TORCH_CHECK(mean_.dim() == 1 && mean_.size(0) == C && invstd_.dim() == 1 && invstd_.size(0) == C,
              "bn_act_backward_sums: mean and invstd must have C = ", C, " entries");
  TORCH_CHECK(sums_.dim() == 2 && sums_.size(0) == 2 && sums_.size(1) == C && sums_.scalar_type() == at::kDouble,
              "bn_act_backward_sums: sums must be float64 2 x C = 2 x ", C, ", got ", sums_.scalar_type(), " ",
              sums_.sizes());
  for (const at::Tensor* t : {&grad_y_, &mean_, &invstd_})
    TORCH_CHECK(t->scalar_type() == x_.scalar_type(), "bn_act_backward_sums: dtypes differ (x is ",
                x_.scalar_type(), ", got ", t->scalar_type(), ")");
  const bool cl = channels_last(x_);
  at::Tensor x = as_nhwc(x_), gy = as_nhwc(grad_y_);
  at::Tensor gamma = gamma_.contiguous(), beta = beta_.contiguous(), mean = mean_.contiguous(),
             invstd = invstd_.contiguous(), sums = sums_.contiguous();
  at::Tensor gx = at::empty_like(x);
  at::Tensor ggamma = at::empty({C}, x.options()), gbeta = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_backward_sums_cpu", [&] {
    backward_kernel<scalar_t>(M, C, gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), nullptr,
                              gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                              invstd.data_ptr<scalar_t>(), relu6, gx.data_ptr<scalar_t>(), nullptr,
                              ggamma.data_ptr<scalar_t>(), gbeta.data_ptr<scalar_t>(), sums.data_ptr<double>());
  });
  return {(cl || x_.dim() != 4) ? gx : gx.contiguous(), ggamma, gbeta};
}

// act(BN_x(x) + BN_r(r)): two inputs, each through its own training BN, summed (the split model's
// "add" merge of its branch stems). bn_act with the residual normalised on the fly, so neither
// BN's output is written: statistics of r and x, then one pass over both.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_act_cpu(
    const at::Tensor& x_, const at::Tensor& gamma_, const at::Tensor& beta_, const at::Tensor& r_,
    const at::Tensor& r_gamma_, const at::Tensor& r_beta_, double eps, bool relu6) {
  const int64_t M = check_args("bn_add_act", x_, gamma_, beta_, r_);
  check_args("bn_add_act (r)", r_, r_gamma_, r_beta_, c10::nullopt);
  TORCH_CHECK(eps >= 0, "bn_add_act: eps must be >= 0, got ", eps);
  const int64_t C = x_.size(1);
  const bool cl = channels_last(x_);
  at::Tensor x = as_nhwc(x_), r = as_nhwc(r_);
  at::Tensor gamma = gamma_.contiguous(), beta = beta_.contiguous(), rgamma = r_gamma_.contiguous(),
             rbeta = r_beta_.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({C}, x.options()), invstd = at::empty({C}, x.options());
  at::Tensor rmean = at::empty({C}, x.options()), rinvstd = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_add_act_cpu", [&] {
    using T = scalar_t;
    T* rm = rmean.data_ptr<T>();
    T* ri = rinvstd.data_ptr<T>();
    forward_kernel<T>(M, C, r.data_ptr<T>(), nullptr, nullptr, nullptr, eps, false, nullptr, rm, ri);
    simd::Padded<T> rk(C, 3);
    const T* rg = rgamma.data_ptr<T>();
    const T* rb = rbeta.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      rk[0][c] = rm[c];
      rk[1][c] = ri[c] * rg[c];
      rk[2][c] = rb[c];
    }
    forward_kernel<T>(M, C, x.data_ptr<T>(), r.data_ptr<T>(), gamma.data_ptr<T>(), beta.data_ptr<T>(), eps, relu6,
                      y.data_ptr<T>(), mean.data_ptr<T>(), invstd.data_ptr<T>(), &rk);
  });
  return {(cl || x_.dim() != 4) ? y : y.contiguous(), mean, invstd, rmean, rinvstd};
}

// Gradients of bn_add_act w.r.t. (x, gamma, beta, r, r_gamma, r_beta): one pass for the three
// per-channel sums (g behind the mask, g * (x - mean), g * (r - r_mean)), one for both gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_act_backward_cpu(
    const at::Tensor& grad_y_, const at::Tensor& x_, const at::Tensor& gamma_, const at::Tensor& beta_,
    const at::Tensor& mean_, const at::Tensor& invstd_, const at::Tensor& r_, const at::Tensor& r_gamma_,
    const at::Tensor& r_beta_, const at::Tensor& r_mean_, const at::Tensor& r_invstd_, bool relu6) {
  const int64_t M = check_args("bn_add_act_backward", x_, gamma_, beta_, r_);
  check_args("bn_add_act_backward (r)", r_, r_gamma_, r_beta_, c10::nullopt);
  const int64_t C = x_.size(1);
  TORCH_CHECK(grad_y_.sizes() == x_.sizes(), "bn_add_act_backward: grad_y must have x's shape ", x_.sizes(),
              ", got ", grad_y_.sizes());
  for (const at::Tensor* t : {&mean_, &invstd_, &r_mean_, &r_invstd_}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "bn_add_act_backward: means and invstds must have C = ", C,
                " entries, got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x_.scalar_type(), "bn_add_act_backward: dtypes differ (x is ",
                x_.scalar_type(), ", got ", t->scalar_type(), ")");
  }
  TORCH_CHECK(grad_y_.scalar_type() == x_.scalar_type(), "bn_add_act_backward: dtypes differ (x is ",
              x_.scalar_type(), ", grad_y ", grad_y_.scalar_type(), ")");
  const bool cl = channels_last(x_);
  at::Tensor x = as_nhwc(x_), gy = as_nhwc(grad_y_), r = as_nhwc(r_);
  at::Tensor gamma = gamma_.contiguous(), beta = beta_.contiguous(), mean = mean_.contiguous(),
             invstd = invstd_.contiguous(), rgamma = r_gamma_.contiguous(), rbeta = r_beta_.contiguous(),
             rmean = r_mean_.contiguous(), rinvstd = r_invstd_.contiguous();
  at::Tensor gx = at::empty_like(x), gr = at::empty_like(x);
  at::Tensor ggamma = at::empty({C}, x.options()), gbeta = at::empty({C}, x.options());
  at::Tensor grgamma = at::empty({C}, x.options()), grbeta = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_add_act_backward_cpu", [&] {
    using T = scalar_t;
    const ResBN<T> rb{rgamma.data_ptr<T>(), rbeta.data_ptr<T>(), rmean.data_ptr<T>(), rinvstd.data_ptr<T>(),
                      grgamma.data_ptr<T>(), grbeta.data_ptr<T>()};
    backward_kernel<T>(M, C, gy.data_ptr<T>(), x.data_ptr<T>(), r.data_ptr<T>(), gamma.data_ptr<T>(),
                       beta.data_ptr<T>(), mean.data_ptr<T>(), invstd.data_ptr<T>(), relu6, gx.data_ptr<T>(),
                       gr.data_ptr<T>(), ggamma.data_ptr<T>(), gbeta.data_ptr<T>(), nullptr, &rb);
  });
  const bool keep = cl || x_.dim() != 4;
  return {keep ? gx : gx.contiguous(), ggamma, gbeta, keep ? gr : gr.contiguous(), grgamma, grbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CPU, m) {
  m.impl("bn_add_act", &bn_add_act_cpu);
  m.impl("bn_add_act_backward", &bn_add_act_backward_cpu);
  m.impl("bn_act_backward_sums", &bn_act_backward_sums_cpu);
  m.impl("bn_act", &bn_act_cpu);
  m.impl("bn_act_apply", &bn_act_apply_cpu);
  m.impl("bn_act_backward", &bn_act_backward_cpu);
  m.impl("bn_stats", &bn_stats_cpu);
}

}  // namespace fastface
