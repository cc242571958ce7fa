// Dense k x k convolution (groups allowed) + per-channel bias (a folded BN) + optional ReLU6 on
// the CPU, channels-last, for inference: the face model's stem, its last 1x1 conv and its
// head's linear layer (a 1x1 conv on a 1x1 map).
//
// Why not aten's conv: at batch 1 the last 1x1 conv (320 -> 1280 at 4x4) lands in
// aten::_slow_conv2d (~0.35 ms for 6.5 M multiply-adds), and every aten conv runs on the
// OpenMP pool, whose threads spin after each region and take the second core from the task
// pool the fused blocks run on (task_pool.h). Here the stem and the tail run on that same
// pool, so a folded forward uses one set of threads.
//
// 1x1, stride 1, no padding: one GEMM over all pixels, [N*H*W, Cin] x [Cin, Cout] per group,
// in tasks of (group, column block, row chunk); the row chunk varies fastest, so both threads
// work on one column block of the weights at a time and it stays in their L2.
// Otherwise: tasks of (image, group, band of output rows); a task gathers its band's patches
// into an L2-sized im2col tile (rows = output pixels, columns = (ky, kx, ci)) and runs the GEMM
// on it with bias and ReLU6 in the epilogue.
//
// Weights: (G*Cout, Cin, k, k), read as their (k, k, Cin, G*Cout) permutation; a weight given
// as a view of a tensor already in that layout (`pack_conv_weight`) is used without a copy.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstring>

#include "fused_tiles.h"
#include "task_pool.h"

namespace fastface {
namespace {

struct ConvDims {
  int64_t N, G, Cin, Cout, H, W, K, S, P, OH, OW;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// dst[0, n) = src[0, n), or zeros for src == nullptr; short rows (a stem's few channels) as a loop.
template <typename T>
inline void copy_or_zero(T* dst, const T* src, int64_t n) {
  if (n >= 16) {
    if (src != nullptr)
      std::memcpy(dst, src, size_t(n) * sizeof(T));
    else
      std::memset(dst, 0, size_t(n) * sizeof(T));
  } else if (src != nullptr) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = T(0);
  }
}

template <typename T>
void conv_bias_act_kernel(const ConvDims& d, const T* x, const T* wP, const T* b, T* y, bool relu6) {
  constexpr int64_t L = simd::Vec<T>::L;
  const int64_t GCin = d.G * d.Cin, GCout = d.G * d.Cout, KKC = d.K * d.K * d.Cin;
  const auto epi = relu6 ? tiles::Epilogue::kRelu6 : tiles::Epilogue::kNone;
  const auto rrow = [](int64_t) { return static_cast<const T*>(nullptr); };
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = 4 * threads;  // a few tasks per thread: a late helper costs one small task
  // Below ~1M multiply-adds (~15 us on one core) handing out tasks costs more than it saves.
  const int64_t macs = d.N * d.OH * d.OW * KKC * GCout;
  const auto run = [&](int64_t ntasks, const std::function<void(int64_t)>& task) {
    if (macs < pool::min_parallel_macs()) {
      for (int64_t t = 0; t < ntasks; ++t) task(t);
    } else {
      pool::parallel_tasks(ntasks, task);
    }
  };

  if (d.K == 1 && d.S == 1 && d.P == 0) {
    const int64_t M = d.N * d.H * d.W;
    // Column blocks of <= 256 channels (a K x 256 weight panel stays in L2), row chunks of
    // 16..512 pixels; more, narrower pieces only when there are fewer than `want` tasks.
    int64_t ncol = ceil_div(d.Cout, 256);
    const int64_t chunks_min = ceil_div(M, 512), chunks_max = std::max<int64_t>(1, ceil_div(M, 16));
    int64_t chunks = std::min(chunks_max, std::max(chunks_min, ceil_div(want, d.G * ncol)));
    if (d.G * ncol * chunks < want) ncol = std::min(ceil_div(d.Cout, L), ceil_div(want, d.G * chunks));
    const int64_t cb = ceil_div(ceil_div(d.Cout, ncol), L) * L;
    ncol = ceil_div(d.Cout, cb);
    const int64_t rm = ceil_div(M, chunks);
    chunks = ceil_div(M, rm);
    run(d.G * ncol * chunks, [&](int64_t t) {
      const int64_t chunk = t % chunks, gc = t / chunks, col = gc % ncol, g = gc / ncol;
      const int64_t m0 = chunk * rm, rows = std::min(rm, M - m0), c0 = g * d.Cout + col * cb;
      const int64_t n = std::min(cb, d.Cout - col * cb);
      T* ybase = y + m0 * GCout + c0;
      const auto crow = [=](int64_t m) { return ybase + m * GCout; };
      tiles::gemm<T>(rows, n, d.Cin, x + m0 * GCin + g * d.Cin, GCin, wP + c0, GCout, b + c0, crow, rrow, epi, false);
    });
    return;
  }

  // Output rows per band: the im2col tile within ~256 KB, and at least `want` tasks overall.
  const int64_t row_bytes = d.OW * KKC * int64_t(sizeof(T));
  int64_t rows = std::max<int64_t>(1, std::min<int64_t>(d.OH, (256 * 1024) / std::max<int64_t>(1, row_bytes)));
  const int64_t per_img = d.N * d.G;
  if (per_img * ceil_div(d.OH, rows) < want) rows = std::max<int64_t>(1, ceil_div(d.OH, ceil_div(want, per_img)));
  const int64_t bands = ceil_div(d.OH, rows);
  run(per_img * bands, [&](int64_t t) {
    const int64_t band = t % bands, ng = t / bands, g = ng % d.G, n = ng / d.G;
    const int64_t oy0 = band * rows, th = std::min(rows, d.OH - oy0), M = th * d.OW;
    T* A = simd::scratch<T, 2>(size_t(M * KKC));
    const T* ximg = x + n * d.H * d.W * GCin + g * d.Cin;
    const int64_t KC = d.K * d.Cin;
    for (int64_t r = 0; r < th; ++r) {
      const int64_t oy = oy0 + r;
      for (int64_t ox = 0; ox < d.OW; ++ox) {
        T* a = A + (r * d.OW + ox) * KKC;
        const int64_t ix0 = ox * d.S - d.P;
        for (int64_t ky = 0; ky < d.K; ++ky, a += KC) {
          const int64_t iy = oy * d.S - d.P + ky;
          if (iy < 0 || iy >= d.H) {
            copy_or_zero<T>(a, nullptr, KC);
          } else if (d.G == 1 && ix0 >= 0 && ix0 + d.K <= d.W) {
            copy_or_zero<T>(a, ximg + (iy * d.W + ix0) * GCin, KC);  // one group: the k pixels are contiguous
          } else {
            for (int64_t kx = 0; kx < d.K; ++kx) {
              const int64_t ix = ix0 + kx;
              copy_or_zero<T>(a + kx * d.Cin, ix < 0 || ix >= d.W ? nullptr : ximg + (iy * d.W + ix) * GCin, d.Cin);
            }
          }
        }
      }
    }
    T* ybase = y + (n * d.OH + oy0) * d.OW * GCout + g * d.Cout;
    const auto crow = [=](int64_t m) { return ybase + m * GCout; };
    tiles::gemm<T>(M, d.Cout, KKC, A, KKC, wP + g * d.Cout, GCout, b + g * d.Cout, crow, rrow, epi, false);
  });
}

at::Tensor conv_bias_act_cpu(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& bias, int64_t stride,
                             int64_t padding, int64_t groups, bool relu6) {
  TORCH_CHECK(x_.dim() == 4, "conv_bias_act: x must be N x C x H x W, got ", x_.sizes());
  TORCH_CHECK(w.dim() == 4 && w.size(2) == w.size(3), "conv_bias_act: weight must be Cout x Cin/groups x k x k, got ",
              w.sizes());
  TORCH_CHECK(groups >= 1, "conv_bias_act: groups must be >= 1, got ", groups);
  TORCH_CHECK(stride >= 1, "conv_bias_act: stride must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, "conv_bias_act: padding must be >= 0, got ", padding);
  TORCH_CHECK(x_.size(1) % groups == 0 && w.size(0) % groups == 0, "conv_bias_act: ", x_.size(1), " input and ",
              w.size(0), " output channels are not multiples of groups=", groups);
  TORCH_CHECK(w.size(1) == x_.size(1) / groups, "conv_bias_act: weight has ", w.size(1),
              " input channels per group, x has ", x_.size(1) / groups);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == w.size(0), "conv_bias_act: bias must be (", w.size(0), ",), got ",
              bias.sizes());
  const auto dt = x_.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "conv_bias_act: CPU kernel supports float32 and float64, got ", dt);
  TORCH_CHECK(w.scalar_type() == dt && bias.scalar_type() == dt, "conv_bias_act: dtypes differ (x ", dt, ", weight ",
              w.scalar_type(), ", bias ", bias.scalar_type(), ")");
  ConvDims d;
  d.N = x_.size(0);
  d.G = groups;
  d.Cin = w.size(1);
  d.Cout = w.size(0) / groups;
  d.H = x_.size(2);
  d.W = x_.size(3);
  d.K = w.size(2);
  d.S = stride;
  d.P = padding;
  TORCH_CHECK(d.H + 2 * d.P >= d.K && d.W + 2 * d.P >= d.K, "conv_bias_act: ", d.K, "x", d.K, " kernel larger than the ",
              d.H, "x", d.W, " input padded by ", d.P);
  d.OH = (d.H + 2 * d.P - d.K) / d.S + 1;
  d.OW = (d.W + 2 * d.P - d.K) / d.S + 1;
  const bool cl = x_.is_contiguous(at::MemoryFormat::ChannelsLast) && !x_.is_contiguous();
  at::Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor yh = at::empty({d.N, d.OH, d.OW, d.G * d.Cout}, x.options());
  if (d.N > 0 && d.OH > 0 && d.OW > 0) {
    at::Tensor wP = w.permute({2, 3, 1, 0});
    if (!wP.is_contiguous()) wP = wP.contiguous();
    at::Tensor b = bias.contiguous();
    AT_DISPATCH_FLOATING_TYPES(dt, "conv_bias_act_cpu", [&] {
      conv_bias_act_kernel<scalar_t>(d, x.data_ptr<scalar_t>(), wP.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                                     yh.data_ptr<scalar_t>(), relu6);
    });
  }
  at::Tensor y = yh.permute({0, 3, 1, 2});
  return cl ? y : y.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CPU, m) { m.impl("conv_bias_act", &conv_bias_act_cpu); }

}  // namespace fastface
