// The two helpers of fastface.ops.expand_dwconv (an inverted-residual block's 1x1 expand conv with its
// training BN folded into the conv's algebra), on the CPU:
//
//   channel_moments(x, groups) -> (mean, cov): per-channel mean and within-group covariance of x over
//     every dim but 1, float64. With e = x W^T they give the BN's batch statistics of e
//     (mean_e = W mean, var_e = diag(W cov W^T)) from one pass over x instead of one over e (6x wider).
//   grouped_linear_sub(y, x, a, c) -> y - x A - c per pixel, A block-diagonal (groups x ci x ci): the
//     correction of the conv's input gradient when the BN backward is folded in.
//
// channels_last is the layout read (every pixel's channels contiguous; other layouts are converted).
// Tasks are fixed by the shape alone and merged in task order, so results do not depend on the thread
// count.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "aten_tasks.h"
#include "layout.h"
#include "simd.h"

namespace fastface {
namespace {

using simd::Vec;

// Pixels summed in T before their block joins the float64 task sums: short runs of shifted values
// keep float32 rounding at the level of the data, and the inner loop stays in T's wide vectors.
constexpr int64_t kBlock = 128;

// Rows i0..i0+R-1 of a group's block Gram matrix, NV vectors a row, accumulated in registers over the block's
// n pixels (d: pitch `pitch`, the group's shifted channels) and then added to gk's rows; with SUM also the
// block's channel sums (added to sk). R and NV are compile-time so the accumulators stay in registers.
template <typename T, int NV, int R, bool SUM>
FF_ALWAYS_INLINE void gram_rows(const T* d, int64_t n, int64_t pitch, int64_t i0, int64_t cip, T* gk, T* sk) {
  using V = Vec<T>;
  constexpr int L = V::L;
  typename V::reg acc[R][NV], sacc[NV];
  for (int v = 0; v < NV; ++v) {
    sacc[v] = V::zero();
    for (int r = 0; r < R; ++r) acc[r][v] = V::zero();
  }
  for (int64_t p = 0; p < n; ++p) {
    const T* dp = d + p * pitch;
    typename V::reg dv[NV];
    for (int v = 0; v < NV; ++v) dv[v] = V::load(dp + v * L);
    if (SUM)
      for (int v = 0; v < NV; ++v) sacc[v] = V::add(sacc[v], dv[v]);
    for (int r = 0; r < R; ++r) {
      const auto di = V::set1(dp[i0 + r]);
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(di, dv[v], acc[r][v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    if (SUM) V::store(sk + v * L, V::add(V::load(sk + v * L), sacc[v]));
    for (int r = 0; r < R; ++r) {
      T* row = gk + (i0 + r) * cip + v * L;
      V::store(row, V::add(V::load(row), acc[r][v]));
    }
  }
}

// All ci rows of one group's block Gram matrix (and its sums), NV vectors a row: four rows per sweep.
template <typename T, int NV>
void gram_group(const T* d, int64_t n, int64_t pitch, int64_t ci, int64_t cip, T* gk, T* sk) {
  if (ci < 4) {  // the first sweep takes the sums too
    if (ci == 3) gram_rows<T, NV, 3, true>(d, n, pitch, 0, cip, gk, sk);
    if (ci == 2) gram_rows<T, NV, 2, true>(d, n, pitch, 0, cip, gk, sk);
    if (ci == 1) gram_rows<T, NV, 1, true>(d, n, pitch, 0, cip, gk, sk);
    return;
  }
  gram_rows<T, NV, 4, true>(d, n, pitch, 0, cip, gk, sk);
  int64_t i0 = 4;
  for (; i0 + 4 <= ci; i0 += 4) gram_rows<T, NV, 4, false>(d, n, pitch, i0, cip, gk, sk);
  switch (ci - i0) {
    case 3: gram_rows<T, NV, 3, false>(d, n, pitch, i0, cip, gk, sk); break;
    case 2: gram_rows<T, NV, 2, false>(d, n, pitch, i0, cip, gk, sk); break;
    case 1: gram_rows<T, NV, 1, false>(d, n, pitch, i0, cip, gk, sk); break;
    default: break;
  }
}

// The same for any number of vectors a row (the accumulators in memory).
template <typename T>
void gram_group_any(const T* d, int64_t n, int64_t pitch, int64_t nv, int64_t ci, int64_t cip, T* gk, T* sk) {
  using V = Vec<T>;
  constexpr int L = V::L;
  for (int64_t p = 0; p < n; ++p) {
    const T* dp = d + p * pitch;
    for (int64_t v = 0; v < nv; ++v) V::store(sk + v * L, V::add(V::load(sk + v * L), V::load(dp + v * L)));
    for (int64_t r = 0; r < ci; ++r) {
      const auto di = V::set1(dp[r]);
      T* row = gk + r * cip;
      for (int64_t v = 0; v < nv; ++v) V::store(row + v * L, V::fmadd(di, V::load(dp + v * L), V::load(row + v * L)));
    }
  }
}

// Layout of the per-group buffers: group k's ci channels padded to cip (whole vectors, zero lanes
// past ci), its ci x ci matrix as ci rows of cip.
template <typename T>
void moments_kernel(const T* x, int64_t P, int64_t C, int64_t groups, double* mean_out, double* cov_out) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t ci = C / groups, cip = simd::padded<T>(ci), nv = cip / L, gsz = groups * ci * ci;
  const auto tail = V::tail(ci - (nv - 1) * L);
  const int64_t bytes = P * C * int64_t(sizeof(T));
  const int64_t ntasks = std::max<int64_t>(1, std::min<int64_t>({P, int64_t(64), bytes / (256 * 1024)}));
  const int64_t per = (P + ntasks - 1) / ntasks;
  // Per task: its mean (C) and sum of squared deviations (groups x ci x ci) about it.
  std::vector<double> tmean(static_cast<size_t>(ntasks * C)), tm2(static_cast<size_t>(ntasks * gsz));
  std::vector<int64_t> tcount(static_cast<size_t>(ntasks), 0);
  for_tasks(P * C * ci, ntasks, [&](int64_t t) {
    const int64_t p0 = t * per, p1 = std::min(P, p0 + per);
    if (p0 >= p1) return;
    const int64_t padc = groups * cip, padg = groups * ci * cip;
    // One aligned scratch: the shift, the block's shifted pixels, the block's sums and Gram rows.
    T* buf = simd::scratch<T, 0>(size_t(padc * (kBlock + 2) + padg));
    T* shift = buf;
    T* d = shift + padc;
    T* sb = d + padc * kBlock;
    T* gb = sb + padc;
    std::fill(shift, shift + padc, T(0));
    std::vector<double> s(static_cast<size_t>(padc), 0.0), g(static_cast<size_t>(padg), 0.0);
    for (int64_t k = 0; k < groups; ++k)  // the task's first pixel: values stay near 0 once shifted
      std::copy(x + p0 * C + k * ci, x + p0 * C + (k + 1) * ci, shift + k * cip);
    for (int64_t b0 = p0; b0 < p1; b0 += kBlock) {
      const int64_t n = std::min(p1, b0 + kBlock) - b0;
      std::fill(sb, sb + padc + padg, T(0));
      for (int64_t p = 0; p < n; ++p) {  // the block, shifted, into d (rows of padc)
        const T* xp = x + (b0 + p) * C;
        for (int64_t k = 0; k < groups; ++k)
          for (int64_t v = 0; v < nv; ++v) {
            const auto xv = v + 1 < nv ? V::load(xp + k * ci + v * L) : V::load(xp + k * ci + v * L, tail);
            V::store(d + p * padc + k * cip + v * L, V::sub(xv, V::load(shift + k * cip + v * L)));
          }
      }
      for (int64_t k = 0; k < groups; ++k) {
        const T* dk = d + k * cip;
        T* gk = gb + k * ci * cip;
        T* sk = sb + k * cip;
        switch (nv) {
          case 1: gram_group<T, 1>(dk, n, padc, ci, cip, gk, sk); break;
          case 2: gram_group<T, 2>(dk, n, padc, ci, cip, gk, sk); break;
          case 3: gram_group<T, 3>(dk, n, padc, ci, cip, gk, sk); break;
          default: gram_group_any<T>(dk, n, padc, nv, ci, cip, gk, sk);
        }
      }
      for (int64_t i = 0; i < padc; ++i) s[size_t(i)] += double(sb[i]);
      for (int64_t i = 0; i < padg; ++i) g[size_t(i)] += double(gb[i]);
    }
    const double n = double(p1 - p0);
    double* mt = tmean.data() + t * C;
    double* qt = tm2.data() + t * gsz;
    for (int64_t k = 0; k < groups; ++k)
      for (int64_t i = 0; i < ci; ++i) {
        const double si = s[size_t(k * cip + i)];
        mt[k * ci + i] = double(shift[k * cip + i]) + si / n;
        for (int64_t j = 0; j < ci; ++j)
          qt[(k * ci + i) * ci + j] = g[size_t((k * ci + i) * cip + j)] - si * s[size_t(k * cip + j)] / n;
      }
    tcount[size_t(t)] = p1 - p0;
  });
  // Chan et al.'s merge, matrix form, in task order.
  std::vector<double> mu(static_cast<size_t>(C), 0.0), m2(static_cast<size_t>(gsz), 0.0);
  std::vector<double> delta(static_cast<size_t>(C));
  double cnt = 0;
  for (int64_t t = 0; t < ntasks; ++t) {
    const double nb = double(tcount[size_t(t)]);
    if (nb == 0) continue;
    const double nab = cnt + nb, w = cnt * nb / nab;
    const double* mt = tmean.data() + t * C;
    const double* qt = tm2.data() + t * gsz;
    for (int64_t c = 0; c < C; ++c) delta[size_t(c)] = mt[c] - mu[size_t(c)];
    for (int64_t k = 0; k < groups; ++k)
      for (int64_t i = 0; i < ci; ++i)
        for (int64_t j = 0; j < ci; ++j) {
          const int64_t at = (k * ci + i) * ci + j;
          m2[size_t(at)] += qt[at] + delta[size_t(k * ci + i)] * delta[size_t(k * ci + j)] * w;
        }
    for (int64_t c = 0; c < C; ++c) mu[size_t(c)] += delta[size_t(c)] * nb / nab;
    cnt = nab;
  }
  std::copy(mu.begin(), mu.end(), mean_out);
  for (int64_t i = 0; i < gsz; ++i) cov_out[i] = m2[size_t(i)] / cnt;
}

// One pixel's group k: out = y - c - x_k A_k over NV vectors, A's rows outer (one broadcast each), two
// partial sums per vector so consecutive FMAs do not wait on each other.
template <typename T, int NV>
FF_ALWAYS_INLINE void linear_sub_group(const T* yk, const T* xk, const T* nak, const T* ck, T* ok, int64_t ci, int64_t cip,
                                typename Vec<T>::mask tail) {
  using V = Vec<T>;
  constexpr int L = V::L;
  typename V::reg a0[NV], a1[NV];
  for (int v = 0; v < NV; ++v) {
    a0[v] = V::sub(v + 1 < NV ? V::load(yk + v * L) : V::load(yk + v * L, tail), V::load(ck + v * L));
    a1[v] = V::zero();
  }
  int64_t i = 0;
  for (; i + 2 <= ci; i += 2) {
    const auto x0 = V::set1(xk[i]), x1 = V::set1(xk[i + 1]);
    for (int v = 0; v < NV; ++v) {
      a0[v] = V::fmadd(x0, V::load(nak + i * cip + v * L), a0[v]);
      a1[v] = V::fmadd(x1, V::load(nak + (i + 1) * cip + v * L), a1[v]);
    }
  }
  if (i < ci) {
    const auto x0 = V::set1(xk[i]);
    for (int v = 0; v < NV; ++v) a0[v] = V::fmadd(x0, V::load(nak + i * cip + v * L), a0[v]);
  }
  for (int v = 0; v < NV; ++v) {
    const auto r = V::add(a0[v], a1[v]);
    if (v + 1 < NV)
      V::store(ok + v * L, r);
    else
      V::store(ok + v * L, r, tail);
  }
}

// Any number of vectors (wide groups): the same, vector by vector.
template <typename T>
void linear_sub_group_any(const T* yk, const T* xk, const T* nak, const T* ck, T* ok, int64_t ci, int64_t cip,
                          typename Vec<T>::mask tail) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t nv = cip / L;
  for (int64_t v = 0; v < nv; ++v) {
    const bool last = v + 1 == nv;
    auto a0 = V::sub(last ? V::load(yk + v * L, tail) : V::load(yk + v * L), V::load(ck + v * L));
    for (int64_t i = 0; i < ci; ++i) a0 = V::fmadd(V::set1(xk[i]), V::load(nak + i * cip + v * L), a0);
    if (last)
      V::store(ok + v * L, a0, tail);
    else
      V::store(ok + v * L, a0);
  }
}

template <typename T>
void linear_sub_kernel(const T* y, const T* x, const T* a, const T* c, T* out, int64_t P, int64_t C,
                       int64_t groups) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t ci = C / groups, cip = simd::padded<T>(ci), nv = cip / L;
  const auto tail = V::tail(ci - (nv - 1) * L);
  // -a and c, rows padded to whole vectors.
  std::vector<T> na(static_cast<size_t>(groups * ci * cip), T(0)), cp(static_cast<size_t>(groups * cip), T(0));
  for (int64_t k = 0; k < groups; ++k) {
    for (int64_t i = 0; i < ci; ++i)
      for (int64_t j = 0; j < ci; ++j) na[size_t((k * ci + i) * cip + j)] = -a[(k * ci + i) * ci + j];
    std::copy(c + k * ci, c + (k + 1) * ci, cp.begin() + k * cip);
  }
  const T* nap = na.data();
  const T* cpp = cp.data();
  at::parallel_for(0, P, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      for (int64_t k = 0; k < groups; ++k) {
        const int64_t at = p * C + k * ci;
        const T* nak = nap + k * ci * cip;
        const T* ck = cpp + k * cip;
        switch (nv) {
          case 1: linear_sub_group<T, 1>(y + at, x + at, nak, ck, out + at, ci, cip, tail); break;
          case 2: linear_sub_group<T, 2>(y + at, x + at, nak, ck, out + at, ci, cip, tail); break;
          case 3: linear_sub_group<T, 3>(y + at, x + at, nak, ck, out + at, ci, cip, tail); break;
          case 4: linear_sub_group<T, 4>(y + at, x + at, nak, ck, out + at, ci, cip, tail); break;
          default: linear_sub_group_any<T>(y + at, x + at, nak, ck, out + at, ci, cip, tail);
        }
      }
  });
}

// x as rows of channels: channels_last 4-D tensors as they are, 2-D (N x C) as they are, others converted.
at::Tensor rows_of(const at::Tensor& t) {
  return t.dim() == 4 ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

void check_x(const char* op, const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4 || x.dim() == 2, op, ": x must be N x C x H x W or N x C, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, op, ": groups (", groups, ") must divide the ", x.size(1),
              " channels");
  TORCH_CHECK(x.numel() > 0, op, ": x is empty (", x.sizes(), ")");
}

std::tuple<at::Tensor, at::Tensor> channel_moments_cpu(const at::Tensor& x_, int64_t groups) {
  check_x("channel_moments", x_, groups);
  const at::Tensor x = rows_of(x_);
  const int64_t C = x.size(1), P = x.numel() / C, ci = C / groups;
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kDouble));
  at::Tensor cov = at::empty({groups, ci, ci}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_moments_cpu", [&] {
    moments_kernel<scalar_t>(x.data_ptr<scalar_t>(), P, C, groups, mean.data_ptr<double>(), cov.data_ptr<double>());
  });
  return {mean, cov};
}

at::Tensor grouped_linear_sub_cpu(const at::Tensor& y_, const at::Tensor& x_, const at::Tensor& a_,
                                  const at::Tensor& c_) {
  TORCH_CHECK(a_.dim() == 3 && a_.size(1) == a_.size(2), "grouped_linear_sub: a must be groups x ci x ci, got ",
              a_.sizes());
  const int64_t groups = a_.size(0);
  check_x("grouped_linear_sub", x_, groups);
  const int64_t C = x_.size(1);
  TORCH_CHECK(a_.size(1) * groups == C, "grouped_linear_sub: a ", a_.sizes(), " does not split ", C,
              " channels into ", groups, " groups");
  TORCH_CHECK(c_.dim() == 1 && c_.size(0) == C, "grouped_linear_sub: c must be (", C, "), got ", c_.sizes());
  TORCH_CHECK(y_.sizes() == x_.sizes(), "grouped_linear_sub: y ", y_.sizes(), " and x ", x_.sizes(), " differ");
  for (const at::Tensor* t : {&y_, &a_, &c_})
    TORCH_CHECK(t->scalar_type() == x_.scalar_type() && t->device() == x_.device(),
                "grouped_linear_sub: y, a and c must match x's dtype (", x_.scalar_type(), ") and device");
  const at::Tensor x = rows_of(x_), y = rows_of(y_), a = a_.contiguous(), c = c_.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t P = x.numel() / C;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_linear_sub_cpu", [&] {
    linear_sub_kernel<scalar_t>(y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                                c.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), P, C, groups);
  });
  return channels_last(y_) ? out : out.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CPU, m) {
  m.impl("channel_moments", &channel_moments_cpu);
  m.impl("grouped_linear_sub", &grouped_linear_sub_cpu);
}

}  // namespace fastface
