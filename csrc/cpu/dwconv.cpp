// Depthwise conv + bias + ReLU6 on the CPU (NCHW planes, one (n, c) plane per task).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>

#include "layout.h"

namespace fastface {
namespace {

void check_args(const at::Tensor& x, const at::Tensor& w, int64_t stride, int64_t padding) {
  TORCH_CHECK(x.dim() == 4, "dwconv2d: x must be N x C x H x W, got ", x.sizes());
  TORCH_CHECK(w.dim() == 4 && w.size(1) == 1 && w.size(0) == x.size(1) && w.size(2) == w.size(3),
              "dwconv2d: weight must be C x 1 x k x k with C = ", x.size(1), ", got ", w.sizes());
  TORCH_CHECK(stride >= 1 && padding >= 0, "dwconv2d: need stride >= 1 and padding >= 0, got ", stride, ", ",
              padding);
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "dwconv2d: x and weight dtypes differ");
}

// Output columns ox with 0 <= ox*s - p + kx < W, as [lo, hi); floor division keeps it right
// when the numerators go negative (tiny inputs, large padding).
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t col_lo(int64_t kx, int64_t s, int64_t p) { return std::max<int64_t>(0, -floor_div(kx - p, s)); }
inline int64_t col_hi(int64_t W, int64_t OW, int64_t kx, int64_t s, int64_t p) {
  return std::max<int64_t>(0, std::min<int64_t>(OW, floor_div(W - 1 + p - kx, s) + 1));
}

inline int64_t out_size(int64_t in, int64_t k, int64_t s, int64_t p) { return (in + 2 * p - k) / s + 1; }

template <typename T>
void forward_plane(const T* x, const T* w, T b, T* y, int64_t H, int64_t W, int64_t OH, int64_t OW, int64_t K,
                   int64_t s, int64_t p, bool relu6) {
  for (int64_t oy = 0; oy < OH; ++oy) {
    T* yrow = y + oy * OW;
    std::fill(yrow, yrow + OW, b);
    for (int64_t ky = 0; ky < K; ++ky) {
      const int64_t iy = oy * s - p + ky;
      if (iy < 0 || iy >= H) continue;
      const T* xrow = x + iy * W;
      for (int64_t kx = 0; kx < K; ++kx) {
        const T wv = w[ky * K + kx];
        const int64_t lo = col_lo(kx, s, p), hi = col_hi(W, OW, kx, s, p);
        const T* xs = xrow - p + kx;
        if (s == 1) {
#pragma omp simd
          for (int64_t ox = lo; ox < hi; ++ox) yrow[ox] += wv * xs[ox];
        } else {
          for (int64_t ox = lo; ox < hi; ++ox) yrow[ox] += wv * xs[ox * s];
        }
      }
    }
    if (relu6) {
#pragma omp simd
      for (int64_t ox = 0; ox < OW; ++ox) yrow[ox] = std::min<T>(std::max<T>(yrow[ox], T(0)), T(6));
    }
  }
}

at::Tensor dwconv2d_cpu(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& b_, int64_t stride,
                        int64_t padding, bool relu6) {
  check_args(x_, w_, stride, padding);
  TORCH_CHECK(b_.dim() == 1 && b_.size(0) == x_.size(1), "dwconv2d: bias must have C = ", x_.size(1), " entries");
  const bool cl = channels_last(x_);
  auto x = x_.contiguous();
  auto w = w_.contiguous();
  auto b = b_.to(x.scalar_type()).contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = w.size(2);
  const int64_t OH = out_size(H, K, stride, padding), OW = out_size(W, K, stride, padding);
  TORCH_CHECK(OH > 0 && OW > 0, "dwconv2d: input ", H, "x", W, " too small for kernel ", K);
  auto y = at::empty({N, C, OH, OW}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv2d_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t c = nc % C;
        forward_plane<scalar_t>(xp + nc * H * W, wp + c * K * K, bp[c], yp + nc * OH * OW, H, W, OH, OW, K, stride,
                                padding, relu6);
      }
    });
  });
  return cl ? y.contiguous(at::MemoryFormat::ChannelsLast) : y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv2d_backward_cpu(const at::Tensor& go_, const at::Tensor& x_,
                                                                     const at::Tensor& w_, const at::Tensor& out_,
                                                                     int64_t stride, int64_t padding, bool relu6) {
  check_args(x_, w_, stride, padding);
  const bool cl = channels_last(x_);
  auto x = x_.contiguous();
  auto w = w_.contiguous();
  auto go = go_.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = w.size(2);
  const int64_t OH = go.size(2), OW = go.size(3);
  TORCH_CHECK(go.sizes() == out_.sizes(), "dwconv2d_backward: grad_out and out shapes differ");
  // The gradient through ReLU6 is zero where the output sits on 0 or 6 (as in torch's hardtanh).
  at::Tensor g = relu6 ? go * at::logical_and(out_ > 0, out_ < 6).to(go.scalar_type()).contiguous() : go;
  auto gx = at::zeros_like(x);
  auto gw = at::empty_like(w);
  auto gb = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv2d_backward_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gwp = gw.data_ptr<scalar_t>();
    scalar_t* gbp = gb.data_ptr<scalar_t>();
    // grad x: each (n, c) plane scatters only into itself, so planes run in parallel.
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t c = nc % C;
        const scalar_t* gpl = gp + nc * OH * OW;
        const scalar_t* wc = wp + c * K * K;
        scalar_t* gxpl = gxp + nc * H * W;
        for (int64_t oy = 0; oy < OH; ++oy) {
          for (int64_t ky = 0; ky < K; ++ky) {
            const int64_t iy = oy * stride - padding + ky;
            if (iy < 0 || iy >= H) continue;
            for (int64_t kx = 0; kx < K; ++kx) {
              const scalar_t wv = wc[ky * K + kx];
              const int64_t lo = col_lo(kx, stride, padding), hi = col_hi(W, OW, kx, stride, padding);
              scalar_t* gxrow = gxpl + iy * W - padding + kx;
              const scalar_t* grow = gpl + oy * OW;
              for (int64_t ox = lo; ox < hi; ++ox) gxrow[ox * stride] += wv * grow[ox];
            }
          }
        }
      }
    });
    // grad weight and bias: reductions over n, one channel per task.
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        scalar_t gbias = 0;
        std::vector<scalar_t> acc(K * K, scalar_t(0));
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* gpl = gp + (n * C + c) * OH * OW;
          const scalar_t* xpl = xp + (n * C + c) * H * W;
          for (int64_t i = 0; i < OH * OW; ++i) gbias += gpl[i];
          for (int64_t ky = 0; ky < K; ++ky) {
            for (int64_t kx = 0; kx < K; ++kx) {
              const int64_t lo = col_lo(kx, stride, padding), hi = col_hi(W, OW, kx, stride, padding);
              scalar_t s = 0;
              for (int64_t oy = 0; oy < OH; ++oy) {
                const int64_t iy = oy * stride - padding + ky;
                if (iy < 0 || iy >= H) continue;
                const scalar_t* xrow = xpl + iy * W - padding + kx;
                const scalar_t* grow = gpl + oy * OW;
                for (int64_t ox = lo; ox < hi; ++ox) s += grow[ox] * xrow[ox * stride];
              }
              acc[ky * K + kx] += s;
            }
          }
        }
        std::copy(acc.begin(), acc.end(), gwp + c * K * K);
        gbp[c] = gbias;
      }
    });
  });
  if (cl) gx = gx.contiguous(at::MemoryFormat::ChannelsLast);
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CPU, m) {
  m.impl("dwconv2d", &dwconv2d_cpu);
  m.impl("dwconv2d_backward", &dwconv2d_backward_cpu);
}

}  // namespace fastface
