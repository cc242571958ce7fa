// Training path of the depthwise stage on the CPU: depthwise k x k conv -> BatchNorm with batch
// statistics -> ReLU6, forward and backward, without ever storing the conv output z.
//
// Forward, two passes over bands of output rows (tasks):
//   1. recompute z per row, reduce per-channel mean and M2 of the row in the input dtype, and
//      merge rows into the task's float64 statistics with Chan's formula (no E[z^2] - mean^2
//      cancellation); tasks are merged in task order, so results do not depend on threading;
//   2. recompute z and write y = relu6((z - mean) * (invstd * gamma) + beta).
// Backward, two passes:
//   1. recompute z, the ReLU6 mask and zhat; reduce sum(g) and sum(g * zhat) (= grad_beta,
//      grad_gamma) per task, merged in task order;
//   2. per band: recompute dz for the band's output rows plus a one-row halo, gather grad_x for
//      the band's input rows (transposed depthwise conv), and reduce grad_weight over the
//      band's own output rows into per-task float64 partials (summed in task order).
// NHWC is the fast layout (channels vectorised); NCHW tensors are converted on entry and exit.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "aten_tasks.h"
#include "fused_tiles.h"
#include "layout.h"
#include "moments.h"

namespace fastface {
namespace {

using simd::Vec;

struct Geo {
  int64_t N, C, H, W, K, S, P, OH, OW;
};

Geo check_args(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& gamma,
               const at::Tensor& beta, int64_t stride) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be N x C x H x W, got ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(w.dim() == 3 && w.size(0) == C && w.size(1) == w.size(2) && w.size(1) % 2 == 1, op,
              ": weight must be C x k x k with C = ", C, " and odd k, got ", w.sizes());
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == C && beta.dim() == 1 && beta.size(0) == C, op,
              ": gamma and beta must have C = ", C, " entries, got ", gamma.sizes(), " and ", beta.sizes());
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": CPU kernel supports float32 and float64, got ", dt);
  for (const at::Tensor* t : {&w, &gamma, &beta})
    TORCH_CHECK(t->scalar_type() == dt, op, ": dtypes differ (x is ", dt, ", got ", t->scalar_type(), ")");
  Geo g;
  g.N = x.size(0);
  g.C = C;
  g.H = x.size(2);
  g.W = x.size(3);
  g.K = w.size(1);
  g.S = stride;
  g.P = g.K / 2;
  TORCH_CHECK(g.H >= 1 && g.W >= 1, op, ": empty spatial size ", g.H, "x", g.W);
  g.OH = (g.H + 2 * g.P - g.K) / g.S + 1;
  g.OW = (g.W + 2 * g.P - g.K) / g.S + 1;
  TORCH_CHECK(g.N * g.OH * g.OW > 0, op, ": batch statistics need at least one output element, got x of shape ",
              x.sizes());
  return g;
}

// body(t) for every task (aten_tasks.h); tiny problems (under ~1M multiply-adds) run inline.
template <class F>
void for_tasks(const Geo& g, int64_t ntasks, F&& body) {
  const std::function<void(int64_t)> fn = body;
  ::fastface::for_tasks(g.N * g.OH * g.OW * g.C * g.K * g.K, ntasks, fn, int64_t(1) << 20);
}

// Output rows per band: the padded input band plus row buffers stay within ~256 KiB, and
// there are enough bands for every thread (in equal shares when the batch is small).

template <typename T>
int64_t band_rows(const Geo& g) {
  const int64_t Cp = simd::padded<T>(g.C), Wp = g.W + 2 * g.P;
  const int64_t budget = 256 * 1024 / int64_t(sizeof(T));
  int64_t bands = 1;
  while (bands < g.OH && (((g.OH + bands - 1) / bands + 1) * g.S + g.K) * Wp * Cp > budget) ++bands;
  const int64_t threads = at::get_num_threads();
  if (g.N < 2 * threads) {
    const int64_t want = (2 * threads + g.N - 1) / g.N;
    bands = std::min<int64_t>(g.OH, std::max(bands, want));
  }
  return (g.OH + bands - 1) / bands;
}

template <typename T>
struct ZeroInit {
  typename Vec<T>::reg init(int64_t, typename Vec<T>::mask) const { return Vec<T>::zero(); }
  typename Vec<T>::reg fin(typename Vec<T>::reg a, int64_t, int64_t, int64_t) const { return a; }
};

template <typename T>
struct Normalize {
  const T* mean;
  const T* scale;  // invstd * gamma
  const T* beta;
  typename Vec<T>::mask lm_last;
  int64_t ncv;
  bool relu6;
  typename Vec<T>::reg init(int64_t, typename Vec<T>::mask) const { return Vec<T>::zero(); }
  typename Vec<T>::reg fin(typename Vec<T>::reg z, int64_t cv, int64_t, int64_t) const {
    using V = Vec<T>;
    const auto m = cv == ncv - 1 ? lm_last : V::full();
    const int64_t o = cv * V::L;
    auto y = V::fmadd(V::sub(z, V::load(mean + o, m)), V::load(scale + o, m), V::load(beta + o, m));
    return relu6 ? simd::relu6<T>(y) : y;
  }
};

// ---- forward ------------------------------------------------------------------------------

template <typename T>
void forward_kernel(const Geo& g, const T* x, const T* wP, const T* gamma, const T* beta, double eps, bool relu6,
                    T* y, T* mean_out, T* invstd_out) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t C = g.C, Cp = simd::padded<T>(C), Wp = g.W + 2 * g.P, ncv = Cp / L;
  const int64_t rows = band_rows<T>(g), bands = (g.OH + rows - 1) / rows, ntasks = g.N * bands;
  const int64_t prow_max = (rows - 1) * g.S + g.K;
  std::vector<double> tmean(size_t(ntasks * C)), tm2(size_t(ntasks * C));
  std::vector<int64_t> tcount(size_t(ntasks), 0);

  for_tasks(g, ntasks, [&](int64_t t) {
    T* P = simd::scratch<T, 1>(size_t(prow_max * Wp * Cp + g.OW * Cp + 2 * Cp));
    T* Z = P + prow_max * Wp * Cp;
    T* rmean = Z + g.OW * Cp;
    T* rm2 = rmean + Cp;
    {
      const int64_t n = t / bands, oy0 = (t % bands) * rows, oy1 = std::min(g.OH, oy0 + rows);
      const int64_t r0 = oy0 * g.S - g.P, prows = (oy1 - oy0 - 1) * g.S + g.K;
      tiles::fill_padded<T>(x + n * g.H * g.W * C, g.H, g.W, C, C, r0, prows, g.P, P, Cp);
      double* mu = tmean.data() + t * C;
      double* m2 = tm2.data() + t * C;
      int64_t cnt = 0;
      for (int64_t oy = oy0; oy < oy1; ++oy) {
        tiles::dw_rows<T>(P + (oy - oy0) * g.S * Wp * Cp, Wp, Cp, 1, g.OW, g.K, g.S, wP, C, C, ZeroInit<T>{}, Z, Cp,
                          true);
        // Row statistics in the input dtype (at most W terms), then an exact merge in float64.
        const auto inv_ow = V::set1(T(1) / T(g.OW));
        for (int64_t cv = 0; cv < ncv; ++cv) {
          auto s = V::zero();
          for (int64_t ox = 0; ox < g.OW; ++ox) s = V::add(s, V::load(Z + ox * Cp + cv * L));
          const auto m = V::mul(s, inv_ow);
          auto q = V::zero();
          for (int64_t ox = 0; ox < g.OW; ++ox) {
            const auto dv = V::sub(V::load(Z + ox * Cp + cv * L), m);
            q = V::fmadd(dv, dv, q);
          }
          V::store(rmean + cv * L, m);
          V::store(rm2 + cv * L, q);
        }
        const double na = double(cnt), nb = double(g.OW), nab = na + nb;
        for (int64_t c = 0; c < C; ++c) {
          if (cnt == 0) {
            mu[c] = rmean[c];
            m2[c] = rm2[c];
          } else {
            const double delta = double(rmean[c]) - mu[c];
            mu[c] += delta * nb / nab;
            m2[c] += double(rm2[c]) + delta * delta * na * nb / nab;
          }
        }
        cnt += g.OW;
      }
      tcount[size_t(t)] = cnt;
    }
  });

  std::vector<double> mu, m2;
  const double cnt = merge_task_moments(ntasks, C, tmean, tm2, tcount, mu, m2);
  write_mean_invstd(C, mu, m2, cnt, eps, mean_out, invstd_out);
  std::vector<T> scale(size_t(Cp), T(0)), meanT(size_t(Cp), T(0)), betaP(size_t(Cp), T(0));
  for (int64_t c = 0; c < C; ++c) {
    meanT[size_t(c)] = mean_out[c];
    scale[size_t(c)] = invstd_out[c] * gamma[c];
    betaP[size_t(c)] = beta[c];
  }

  const Normalize<T> norm{meanT.data(), scale.data(), betaP.data(), V::tail(C - (ncv - 1) * L), ncv, relu6};
  for_tasks(g, ntasks, [&](int64_t t) {
    T* P = simd::scratch<T, 1>(size_t(prow_max * Wp * Cp + g.OW * Cp + 2 * Cp));
    {
      const int64_t n = t / bands, oy0 = (t % bands) * rows, oy1 = std::min(g.OH, oy0 + rows);
      const int64_t r0 = oy0 * g.S - g.P, prows = (oy1 - oy0 - 1) * g.S + g.K;
      tiles::fill_padded<T>(x + n * g.H * g.W * C, g.H, g.W, C, C, r0, prows, g.P, P, Cp);
      tiles::dw_rows<T>(P, Wp, Cp, oy1 - oy0, g.OW, g.K, g.S, wP, C, C, norm, y + (n * g.OH + oy0) * g.OW * C, C,
                        false);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_cpu(const at::Tensor& x_, const at::Tensor& weight,
                                                                 const at::Tensor& gamma_, const at::Tensor& beta_,
                                                                 int64_t stride, double eps, bool relu6) {
  const Geo g = check_args("dwconv_bn_act", x_, weight, gamma_, beta_, stride);
  TORCH_CHECK(eps >= 0, "dwconv_bn_act: eps must be >= 0, got ", eps);
  const bool cl = channels_last(x_);
  at::Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor wP = weight.permute({1, 2, 0}).contiguous();
  at::Tensor gamma = gamma_.contiguous(), beta = beta_.contiguous();
  at::Tensor yh = at::empty({g.N, g.OH, g.OW, g.C}, x.options());
  at::Tensor mean = at::empty({g.C}, x.options()), invstd = at::empty({g.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bn_act_cpu", [&] {
    forward_kernel<scalar_t>(g, x.data_ptr<scalar_t>(), wP.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(),
                             beta.data_ptr<scalar_t>(), eps, relu6, yh.data_ptr<scalar_t>(),
                             mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>());
  });
  at::Tensor y = yh.permute({0, 3, 1, 2});
  return {cl ? y : y.contiguous(), mean, invstd};
}

// ---- backward -----------------------------------------------------------------------------

template <typename T>
struct BwdConsts {
  const T* mean;
  const T* invstd;
  const T* gamma;
  const T* beta;
  const T* k1;   // gamma * invstd
  const T* mg;   // sum(g) / count
  const T* mgz;  // sum(g * zhat) / count
};

// g (the incoming gradient behind the ReLU6 mask) and zhat of one pixel's channel vector.
template <typename T>
inline void grad_and_zhat(const BwdConsts<T>& k, typename Vec<T>::reg z, const T* gy, int64_t o,
                          typename Vec<T>::mask m, bool relu6, typename Vec<T>::reg& gv, typename Vec<T>::reg& zh) {
  using V = Vec<T>;
  zh = V::mul(V::sub(z, V::load(k.mean + o, m)), V::load(k.invstd + o, m));
  gv = V::load(gy + o, m);
  if (relu6) {
    const auto pre = V::fmadd(zh, V::load(k.gamma + o, m), V::load(k.beta + o, m));
    gv = V::keep_open(gv, pre, V::zero(), V::set1(T(6)));
  }
}

// grad_weight of one output row: racc[(ky*K + kx)*Cp + c] = sum_ox dz[ox, c] * x[ox*S + kx, c]
// over padded x rows prow + ky. Fixed K keeps the K*K accumulators in registers.
template <typename T, int K>
void grad_weight_row_fixed(const T* dz, const T* prow, int64_t Wp, int64_t Cp, int64_t OW, int64_t S, int64_t ncv,
                           T* racc) {
  using V = Vec<T>;
  using R = typename V::reg;
  constexpr int L = V::L;
  const int64_t rs = Wp * Cp;
  for (int64_t cv = 0; cv < ncv; ++cv) {
    const int64_t o = cv * L;
    R acc[K * K];
    FF_UNROLL
    for (int i = 0; i < K * K; ++i) acc[i] = V::zero();
    for (int64_t ox = 0; ox < OW; ++ox) {
      const R d = V::load(dz + ox * Cp + o);
      const T* xp = prow + ox * S * Cp + o;
      FF_UNROLL
      for (int ky = 0; ky < K; ++ky)
        FF_UNROLL
        for (int kx = 0; kx < K; ++kx) acc[ky * K + kx] = V::fmadd(d, V::load(xp + ky * rs + kx * Cp), acc[ky * K + kx]);
    }
    FF_UNROLL
    for (int i = 0; i < K * K; ++i) V::store(racc + i * Cp + o, acc[i]);
  }
}

template <typename T>
void grad_weight_row(const T* dz, const T* prow, int64_t Wp, int64_t Cp, int64_t OW, int64_t K, int64_t S,
                     int64_t ncv, T* racc) {
  if (K == 3) return grad_weight_row_fixed<T, 3>(dz, prow, Wp, Cp, OW, S, ncv, racc);
  if (K == 5) return grad_weight_row_fixed<T, 5>(dz, prow, Wp, Cp, OW, S, ncv, racc);
  using V = Vec<T>;
  constexpr int L = V::L;
  for (int64_t cv = 0; cv < ncv; ++cv) {
    const int64_t o = cv * L;
    for (int64_t ky = 0; ky < K; ++ky) {
      for (int64_t kx = 0; kx < K; ++kx) {
        const T* xp = prow + ky * Wp * Cp + kx * Cp + o;
        auto acc = V::zero();
        for (int64_t ox = 0; ox < OW; ++ox) acc = V::fmadd(V::load(dz + ox * Cp + o), V::load(xp + ox * S * Cp), acc);
        V::store(racc + (ky * K + kx) * Cp + o, acc);
      }
    }
  }
}

template <typename T>
void backward_kernel(const Geo& g, const T* gy, const T* x, const T* wP, const T* gamma, const T* beta,
                     const T* mean, const T* invstd, bool relu6, T* gx, T* gw_out, T* ggamma, T* gbeta) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const int64_t C = g.C, Cp = simd::padded<T>(C), Wp = g.W + 2 * g.P, ncv = Cp / L, KK = g.K * g.K;
  const int64_t rows = band_rows<T>(g), bands = (g.OH + rows - 1) / rows, ntasks = g.N * bands;
  // Input rows a band's dz rows (its own plus the halo the gather needs) read.
  const int64_t halo = (g.K - 1) / g.S + 1;
  const int64_t drows_max = rows + 2 * halo;
  const int64_t prow_max = (drows_max - 1) * g.S + g.K;
  const auto last = V::tail(C - (ncv - 1) * L);
  auto cmask = [&](int64_t cv) { return cv == ncv - 1 ? last : V::full(); };

  std::vector<T> padT(size_t(7 * Cp), T(0));
  T* meanP = padT.data();
  T* invP = meanP + Cp;
  T* gamP = invP + Cp;
  T* betP = gamP + Cp;
  T* k1P = betP + Cp;
  T* mgP = k1P + Cp;
  T* mgzP = mgP + Cp;
  for (int64_t c = 0; c < C; ++c) {
    meanP[c] = mean[c];
    invP[c] = invstd[c];
    gamP[c] = gamma[c];
    betP[c] = beta[c];
    k1P[c] = gamma[c] * invstd[c];
  }
  const BwdConsts<T> k{meanP, invP, gamP, betP, k1P, mgP, mgzP};
  const size_t scratch1 = size_t(prow_max * Wp * Cp + g.OW * Cp + 2 * Cp);

  // Pass 1: sum(g) and sum(g * zhat) per task.
  std::vector<double> tsg(size_t(ntasks * C)), tsgz(size_t(ntasks * C));
  for_tasks(g, ntasks, [&](int64_t t) {
    T* P = simd::scratch<T, 1>(scratch1);
    T* Z = P + prow_max * Wp * Cp;
    T* rs = Z + g.OW * Cp;
    T* rsz = rs + Cp;
    {
      const int64_t n = t / bands, oy0 = (t % bands) * rows, oy1 = std::min(g.OH, oy0 + rows);
      const int64_t r0 = oy0 * g.S - g.P, prows = (oy1 - oy0 - 1) * g.S + g.K;
      tiles::fill_padded<T>(x + n * g.H * g.W * C, g.H, g.W, C, C, r0, prows, g.P, P, Cp);
      double* sg = tsg.data() + t * C;
      double* sgz = tsgz.data() + t * C;
      std::fill(sg, sg + C, 0.0);
      std::fill(sgz, sgz + C, 0.0);
      for (int64_t oy = oy0; oy < oy1; ++oy) {
        tiles::dw_rows<T>(P + (oy - oy0) * g.S * Wp * Cp, Wp, Cp, 1, g.OW, g.K, g.S, wP, C, C, ZeroInit<T>{}, Z, Cp,
                          true);
        const T* gyrow = gy + ((n * g.OH + oy) * g.OW) * C;
        for (int64_t cv = 0; cv < ncv; ++cv) {
          const auto m = cmask(cv);
          auto a = V::zero(), b = V::zero();
          for (int64_t ox = 0; ox < g.OW; ++ox) {
            typename V::reg gv, zh;
            grad_and_zhat<T>(k, V::load(Z + ox * Cp + cv * L), gyrow + ox * C, cv * L, m, relu6, gv, zh);
            a = V::add(a, gv);
            b = V::fmadd(gv, zh, b);
          }
          V::store(rs + cv * L, a);
          V::store(rsz + cv * L, b);
        }
        for (int64_t c = 0; c < C; ++c) {
          sg[c] += rs[c];
          sgz[c] += rsz[c];
        }
      }
    }
  });
  const double count = double(g.N * g.OH * g.OW);
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int64_t t = 0; t < ntasks; ++t) {
      a += tsg[size_t(t * C + c)];
      b += tsgz[size_t(t * C + c)];
    }
    gbeta[c] = T(a);
    ggamma[c] = T(b);
    mgP[c] = T(a / count);
    mgzP[c] = T(b / count);
  }

  // Pass 2: dz (recomputed), grad_x, grad_weight partials per task.
  // dz lives in a zero-bordered buffer (P columns each side, zero rows outside [0, OH)): for
  // stride 1, grad_x is then a plain depthwise conv of dz with the flipped kernel (the forward
  // tile routine, weights in registers); other strides scatter into a band-local buffer.
  std::vector<T> wflip(size_t(KK * C));
  for (int64_t kk = 0; kk < KK; ++kk)
    for (int64_t c = 0; c < C; ++c) wflip[size_t((KK - 1 - kk) * C + c)] = wP[kk * C + c];
  const bool conv_gx = g.S == 1;
  const int64_t DWpp = g.OW + 2 * g.P;                 // padded dz row pitch (pixels)
  const int64_t dz_rows_max = drows_max + 2 * g.P;
  const int64_t gxb_elems = conv_gx ? 0 : prow_max * Wp * Cp;
  const size_t scratch2 = size_t(prow_max * Wp * Cp + g.OW * Cp + dz_rows_max * DWpp * Cp + gxb_elems + KK * Cp);
  std::vector<double> tgw(size_t(ntasks * KK * C));
  for_tasks(g, ntasks, [&](int64_t t) {
    T* P = simd::scratch<T, 2>(scratch2);
    T* Z = P + prow_max * Wp * Cp;
    T* DZ = Z + g.OW * Cp;
    T* GXB = DZ + dz_rows_max * DWpp * Cp;
    T* racc = GXB + gxb_elems;
    {
      const int64_t n = t / bands, band = t % bands;
      const int64_t oy0 = band * rows, oy1 = std::min(g.OH, oy0 + rows);
      // This band owns input rows [ir0, ir1) of grad_x: the bands partition [0, H).
      const int64_t ir0 = band == 0 ? 0 : std::min(g.H, oy0 * g.S);
      const int64_t ir1 = band == bands - 1 ? g.H : std::min(g.H, oy1 * g.S);
      // dz rows grad_x needs: oy with oy*S - P + ky in [ir0, ir1) for some ky.
      const int64_t num = ir0 + g.P - (g.K - 1);
      const int64_t dlo = std::max<int64_t>(0, num >= 0 ? (num + g.S - 1) / g.S : -((-num) / g.S));
      const int64_t dhi = std::min<int64_t>(g.OH, ir1 > ir0 ? (ir1 - 1 + g.P) / g.S + 1 : dlo);
      const int64_t lo = std::min(dlo, oy0), hi = std::max(dhi, oy1);  // rows computed here
      const int64_t r0 = lo * g.S - g.P, prows = (hi - lo - 1) * g.S + g.K;
      tiles::fill_padded<T>(x + n * g.H * g.W * C, g.H, g.W, C, C, r0, prows, g.P, P, Cp);
      // Padded dz row r holds output row lo - P + r.
      const int64_t dzr0 = lo - g.P, dzrows = hi - lo + 2 * g.P;
      std::fill(DZ, DZ + dzrows * DWpp * Cp, T(0));
      for (int64_t oy = lo; oy < hi; ++oy) {
        tiles::dw_rows<T>(P + (oy - lo) * g.S * Wp * Cp, Wp, Cp, 1, g.OW, g.K, g.S, wP, C, C, ZeroInit<T>{}, Z, Cp,
                          true);
        const T* gyrow = gy + ((n * g.OH + oy) * g.OW) * C;
        T* dzrow = DZ + ((oy - dzr0) * DWpp + g.P) * Cp;
        for (int64_t ox = 0; ox < g.OW; ++ox) {
          for (int64_t cv = 0; cv < ncv; ++cv) {
            const auto m = cmask(cv);
            const int64_t o = cv * L;
            typename V::reg gv, zh;
            grad_and_zhat<T>(k, V::load(Z + ox * Cp + o), gyrow + ox * C, o, m, relu6, gv, zh);
            const auto inner = V::sub(V::sub(gv, V::load(mgP + o, m)), V::mul(zh, V::load(mgzP + o, m)));
            V::store(dzrow + ox * Cp + o, V::mul(V::load(k1P + o, m), inner));
          }
        }
      }
      // grad_weight over the band's own output rows.
      double* gwt = tgw.data() + t * KK * C;
      std::fill(gwt, gwt + KK * C, 0.0);
      for (int64_t oy = oy0; oy < oy1; ++oy) {
        grad_weight_row<T>(DZ + ((oy - dzr0) * DWpp + g.P) * Cp, P + (oy - lo) * g.S * Wp * Cp, Wp, Cp, g.OW, g.K, g.S,
                           ncv, racc);
        for (int64_t kk = 0; kk < KK; ++kk)
          for (int64_t c = 0; c < C; ++c) gwt[kk * C + c] += racc[kk * Cp + c];
      }
      T* gximg = gx + n * g.H * g.W * C;
      if (ir1 <= ir0) return;
      if (conv_gx) {
        // gx[iy, ix] = sum_{ky,kx} dz[iy + P - ky, ix + P - kx] w[ky, kx]: padded dz rows from
        // iy - P, flipped kernel, written straight into grad_x (channel tail masked).
        tiles::dw_rows<T>(DZ + (ir0 - g.P - dzr0) * DWpp * Cp, DWpp, Cp, ir1 - ir0, g.W, g.K, 1, wflip.data(), C, C,
                          ZeroInit<T>{}, gximg + ir0 * g.W * C, C, false);
      } else {
        // Scatter each dz pixel into a band-local padded buffer (input rows from lo*S - P), then
        // copy out the rows this band owns.
        const int64_t brows = (hi - lo - 1) * g.S + g.K;
        std::fill(GXB, GXB + brows * Wp * Cp, T(0));
        for (int64_t oy = lo; oy < hi; ++oy) {
          const T* dzrow = DZ + ((oy - dzr0) * DWpp + g.P) * Cp;
          T* brow = GXB + (oy - lo) * g.S * Wp * Cp;
          for (int64_t ox = 0; ox < g.OW; ++ox) {
            for (int64_t cv = 0; cv < ncv; ++cv) {
              const int64_t o = cv * L;
              const auto d = V::load(dzrow + ox * Cp + o);
              for (int64_t ky = 0; ky < g.K; ++ky) {
                T* b = brow + ky * Wp * Cp + ox * g.S * Cp + o;
                for (int64_t kx = 0; kx < g.K; ++kx)
                  V::store(b + kx * Cp, V::fmadd(d, V::load(wP + (ky * g.K + kx) * C + o, cmask(cv)),
                                                 V::load(b + kx * Cp)));
              }
            }
          }
        }
        for (int64_t iy = ir0; iy < ir1; ++iy) {
          T* dst = gximg + iy * g.W * C;
          if (iy - r0 >= brows) {  // below every sampled row (k = 1, stride > 1): no gradient
            std::fill(dst, dst + g.W * C, T(0));
            continue;
          }
          const T* src = GXB + ((iy - r0) * Wp + g.P) * Cp;
          for (int64_t ix = 0; ix < g.W; ++ix)
            for (int64_t cv = 0; cv < ncv; ++cv)
              V::store(dst + ix * C + cv * L, V::load(src + ix * Cp + cv * L), cmask(cv));
        }
      }
    }
  });
  for (int64_t kk = 0; kk < KK; ++kk) {
    for (int64_t c = 0; c < C; ++c) {
      double s = 0;
      for (int64_t t = 0; t < ntasks; ++t) s += tgw[size_t((t * KK + kk) * C + c)];
      gw_out[c * KK + kk] = T(s);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_backward_cpu(
    const at::Tensor& grad_y_, const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& gamma_,
    const at::Tensor& beta_, const at::Tensor& mean_, const at::Tensor& invstd_, int64_t stride, bool relu6) {
  const Geo g = check_args("dwconv_bn_act_backward", x_, weight, gamma_, beta_, stride);
  TORCH_CHECK(grad_y_.dim() == 4 && grad_y_.size(0) == g.N && grad_y_.size(1) == g.C && grad_y_.size(2) == g.OH &&
                  grad_y_.size(3) == g.OW,
              "dwconv_bn_act_backward: grad_y must be ", g.N, " x ", g.C, " x ", g.OH, " x ", g.OW, ", got ",
              grad_y_.sizes());
  TORCH_CHECK(mean_.dim() == 1 && mean_.size(0) == g.C && invstd_.dim() == 1 && invstd_.size(0) == g.C,
              "dwconv_bn_act_backward: mean and invstd must have C = ", g.C, " entries");
  for (const at::Tensor* t : {&grad_y_, &mean_, &invstd_})
    TORCH_CHECK(t->scalar_type() == x_.scalar_type(), "dwconv_bn_act_backward: dtypes differ (x is ",
                x_.scalar_type(), ", got ", t->scalar_type(), ")");
  const bool cl = channels_last(x_);
  at::Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor gy = grad_y_.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor wP = weight.permute({1, 2, 0}).contiguous();
  at::Tensor gamma = gamma_.contiguous(), beta = beta_.contiguous(), mean = mean_.contiguous(),
             invstd = invstd_.contiguous();
  at::Tensor gxh = at::empty({g.N, g.H, g.W, g.C}, x.options());
  at::Tensor gw = at::empty({g.C, g.K, g.K}, x.options());
  at::Tensor ggamma = at::empty({g.C}, x.options()), gbeta = at::empty({g.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bn_act_backward_cpu", [&] {
    backward_kernel<scalar_t>(g, gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), wP.data_ptr<scalar_t>(),
                              gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                              invstd.data_ptr<scalar_t>(), relu6, gxh.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(),
                              ggamma.data_ptr<scalar_t>(), gbeta.data_ptr<scalar_t>());
  });
  at::Tensor gx = gxh.permute({0, 3, 1, 2});
  return {cl ? gx : gx.contiguous(), gw, ggamma, gbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CPU, m) {
  m.impl("dwconv_bn_act", &dwconv_bn_act_cpu);
  m.impl("dwconv_bn_act_backward", &dwconv_bn_act_backward_cpu);
}

}  // namespace fastface
