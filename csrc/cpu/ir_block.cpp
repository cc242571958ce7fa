// Fused inverted-residual block (BN folded) on the CPU: expand 1x1 + ReLU6 -> depthwise k x k
// + ReLU6 -> project 1x1 (+ residual), one pass per tile with the expanded tensor kept in L2.
//
// Work is split into tasks of (branch group, image, band of output rows), run on the task pool
// of task_pool.h (the caller works too; see there why not OpenMP). A task
//   1. runs the expand GEMM for the input rows its band needs (the k/2-row halo is recomputed,
//      not shared) straight into a zero-bordered NHWC tile buffer E, bias + ReLU6 fused;
//   2. runs the depthwise conv over E into a second tile D (bias + ReLU6 fused);
//   3. runs the project GEMM from D into the output rows, bias (+ residual) fused.
// Only x is read and only y is written to memory; E and D are sized to stay in L2.
// Channels-last (NHWC) is the fast layout; NCHW input is converted on entry and exit.
//
// Weights may come pre-packed: w_expand and w_proj as transposed views (stride(0) == 1, i.e.
// w.t() contiguous) and w_dw as a (k, k, C) -> (C, k, k) permuted view of a contiguous
// tensor. Anything else is packed here on every call (correct, but it costs a copy); the
// model caches its folded weights in the packed form so the per-call cost is zero.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdlib>

#include "fused_tiles.h"
#include "layout.h"
#include "task_pool.h"

namespace fastface {
namespace {

using simd::Vec;

struct Dims {
  int64_t N, G, Cin, Ce, Cout, H, W, K, S, P, OH, OW;
  bool expand, residual;
};

void check_args(const at::Tensor& x, const c10::optional<at::Tensor>& we, const c10::optional<at::Tensor>& be,
                const at::Tensor& wd, const at::Tensor& bd, const at::Tensor& wp, const at::Tensor& bp,
                int64_t stride, bool residual, int64_t groups, Dims& d) {
  TORCH_CHECK(groups >= 1, "ir_block: groups must be >= 1, got ", groups);
  TORCH_CHECK(x.dim() == 4, "ir_block: x must be N x C x H x W, got ", x.sizes());
  TORCH_CHECK(we.has_value() == be.has_value(), "ir_block: w_expand and b_expand must both be given or both be None");
  TORCH_CHECK(x.size(1) % groups == 0, "ir_block: x has ", x.size(1), " channels, not a multiple of groups=", groups);
  TORCH_CHECK(wd.dim() == 3 && wd.size(1) == wd.size(2) && wd.size(1) % 2 == 1,
              "ir_block: w_dw must be (G*Ce) x k x k with odd k, got ", wd.sizes());
  TORCH_CHECK(wd.size(0) % groups == 0, "ir_block: w_dw has ", wd.size(0), " channels, not a multiple of groups=",
              groups);
  d.N = x.size(0);
  d.G = groups;
  d.Cin = x.size(1) / groups;
  d.Ce = wd.size(0) / groups;
  d.H = x.size(2);
  d.W = x.size(3);
  d.K = wd.size(1);
  d.S = stride;
  d.P = d.K / 2;
  d.expand = we.has_value();
  if (d.expand) {
    TORCH_CHECK(we->dim() == 2 && we->size(0) == d.G * d.Ce && we->size(1) == d.Cin, "ir_block: w_expand must be (",
                d.G * d.Ce, ", ", d.Cin, "), got ", we->sizes());
    TORCH_CHECK(be->dim() == 1 && be->size(0) == d.G * d.Ce, "ir_block: b_expand must be (", d.G * d.Ce, ",), got ",
                be->sizes());
  } else {
    TORCH_CHECK(d.Ce == d.Cin, "ir_block: without an expand conv the depthwise stage needs Ce == Cin, got ", d.Ce,
                " and ", d.Cin);
  }
  TORCH_CHECK(bd.dim() == 1 && bd.size(0) == d.G * d.Ce, "ir_block: b_dw must be (", d.G * d.Ce, ",), got ",
              bd.sizes());
  TORCH_CHECK(wp.dim() == 2 && wp.size(1) == d.Ce && wp.size(0) % groups == 0, "ir_block: w_proj must be (G*Cout) x ",
              d.Ce, ", got ", wp.sizes());
  d.Cout = wp.size(0) / groups;
  TORCH_CHECK(bp.dim() == 1 && bp.size(0) == wp.size(0), "ir_block: b_proj must be (", wp.size(0), ",), got ",
              bp.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, "ir_block: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(!residual || (stride == 1 && d.Cout == d.Cin), "ir_block: residual needs stride 1 and Cout == Cin, got "
              "stride ", stride, ", ", wp.size(0), " vs ", x.size(1));
  d.residual = residual;
  const auto dt = x.scalar_type();
  for (const at::Tensor* t : {&wd, &bd, &wp, &bp}) {
    TORCH_CHECK(t->scalar_type() == dt, "ir_block: dtypes differ (x is ", dt, ", a weight is ", t->scalar_type(), ")");
    TORCH_CHECK(t->device() == x.device(), "ir_block: tensors on several devices");
  }
  if (d.expand) {
    for (const at::Tensor* t : {&*we, &*be}) {
      TORCH_CHECK(t->scalar_type() == dt, "ir_block: dtypes differ (x is ", dt, ", a weight is ", t->scalar_type(),
                  ")");
      TORCH_CHECK(t->device() == x.device(), "ir_block: tensors on several devices");
    }
  }
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "ir_block: CPU kernel supports float32 and float64, got ", dt);
  TORCH_CHECK(d.H >= 1 && d.W >= 1, "ir_block: empty spatial size ", d.H, "x", d.W);
  d.OH = (d.H + 2 * d.P - d.K) / d.S + 1;
  d.OW = (d.W + 2 * d.P - d.K) / d.S + 1;
}

// L2 budget of one task's tiles (E + D); the CPUs this targets have >= 1 MiB of L2 per core.
int64_t tile_budget_bytes() {
  static const int64_t b = [] {
    const char* env = std::getenv("FASTFACE_IR_TILE_KB");
    const int64_t kb = env ? std::atoll(env) : 0;
    return (kb > 0 ? kb : 320) * 1024;
  }();
  return b;
}

struct Plan {
  int64_t rows;   // output rows per band
  int64_t bands;  // bands per image
};

template <typename T>
Plan plan_tiles(const Dims& d) {
  const int64_t Cp = simd::padded<T>(d.Ce), Wp = d.W + 2 * d.P;
  const auto bytes = [&](int64_t th) {
    return (((th - 1) * d.S + d.K) * Wp + th * d.OW) * Cp * int64_t(sizeof(T));
  };
  int64_t bands = 1;
  while (bands < d.OH && bytes((d.OH + bands - 1) / bands) > tile_budget_bytes()) ++bands;
  // Few images (batch 1): split rows so every thread has work, in equal shares per thread.
  const int64_t threads = at::get_num_threads();
  const int64_t per_img = d.N * d.G;
  if (per_img * bands < threads) bands = std::min<int64_t>(d.OH, (threads + per_img - 1) / per_img);
  if (per_img < threads && bands > 1) {
    const int64_t total = per_img * bands;
    const int64_t want = (total + threads - 1) / threads * threads;
    bands = std::min<int64_t>(d.OH, (want + per_img - 1) / per_img);
  }
  const int64_t rows = (d.OH + bands - 1) / bands;
  return {rows, (d.OH + rows - 1) / rows};
}

template <typename T>
struct DwBiasRelu6 {
  const T* bias;
  typename Vec<T>::reg init(int64_t cv, typename Vec<T>::mask m) const { return Vec<T>::load(bias + cv * Vec<T>::L, m); }
  typename Vec<T>::reg fin(typename Vec<T>::reg a, int64_t, int64_t, int64_t) const { return simd::relu6<T>(a); }
};

template <typename T>
void ir_block_kernel(const Dims& d, const T* x, const T* weT, const T* be, const T* wdP, const T* bd, const T* wpT,
                     const T* bp, T* y) {
  const int64_t Cp = simd::padded<T>(d.Ce), Wp = d.W + 2 * d.P;
  const int64_t GCin = d.G * d.Cin, GCe = d.G * d.Ce, GCout = d.G * d.Cout;
  const Plan plan = plan_tiles<T>(d);
  const int64_t ntasks = d.G * d.N * plan.bands;
  const int64_t erows_max = (plan.rows - 1) * d.S + d.K;
  const size_t e_elems = size_t(erows_max * Wp * Cp), d_elems = size_t(plan.rows * d.OW * Cp);
  const std::function<void(int64_t)> task = [&](int64_t t) {
    T* E = simd::scratch<T, 0>(e_elems + d_elems);
    T* D = E + e_elems;
    // Task t: band (fastest varying), then branch group, then image.
    const int64_t band = t % plan.bands, ng = t / plan.bands;
    const int64_t g = ng % d.G, n = ng / d.G;
    const int64_t oy0 = band * plan.rows, oy1 = std::min(d.OH, oy0 + plan.rows), th = oy1 - oy0;
    const int64_t r0 = oy0 * d.S - d.P, erows = (th - 1) * d.S + d.K;
    const T* ximg = x + n * d.H * d.W * GCin + g * d.Cin;
    if (d.expand) {
      tiles::zero_border<T>(d.H, d.W, r0, erows, d.P, E, Cp);
      const int64_t iy0 = std::max<int64_t>(0, r0), iy1 = std::min<int64_t>(d.H, r0 + erows);
      if (iy1 > iy0) {
        T* ebase = E + ((iy0 - r0) * Wp + d.P) * Cp;
        const int64_t W = d.W;
        // Pixel m of the band -> its padded row/column in E (the border columns are skipped).
        auto crow = [=](int64_t m) { return ebase + ((m / W) * Wp + m % W) * Cp; };
        auto rrow = [](int64_t) { return static_cast<const T*>(nullptr); };
        tiles::gemm<T>((iy1 - iy0) * d.W, d.Ce, d.Cin, ximg + iy0 * d.W * GCin, GCin, weT + g * d.Ce, GCe,
                       be + g * d.Ce, crow, rrow, tiles::Epilogue::kRelu6, true);
      }
    } else {
      tiles::fill_padded<T>(ximg, d.H, d.W, GCin, d.Cin, r0, erows, d.P, E, Cp);
    }
    tiles::dw_rows<T>(E, Wp, Cp, th, d.OW, d.K, d.S, wdP + g * d.Ce, GCe, d.Ce, DwBiasRelu6<T>{bd + g * d.Ce}, D, Cp,
                      true);
    T* yband = y + ((n * d.OH + oy0) * d.OW) * GCout + g * d.Cout;
    const T* xres = x + ((n * d.H + oy0) * d.W) * GCin + g * d.Cin;
    auto crow = [=](int64_t m) { return yband + m * GCout; };
    auto rrow = [=](int64_t m) { return xres + m * GCin; };
    tiles::gemm<T>(th * d.OW, d.Cout, d.Ce, D, Cp, wpT + g * d.Cout, GCout, bp + g * d.Cout, crow, rrow,
                   d.residual ? tiles::Epilogue::kResidual : tiles::Epilogue::kNone, false);
  };
  // Below ~1M multiply-adds (~15 us on one core) handing out tasks costs more than it saves.
  const int64_t macs = d.G * d.N * ((d.expand ? d.H * d.W * d.Cin * d.Ce : 0) + d.OH * d.OW * d.Ce * (d.K * d.K + d.Cout));
  if (macs < pool::min_parallel_macs()) {
    for (int64_t t = 0; t < ntasks; ++t) task(t);
  } else {
    pool::parallel_tasks(ntasks, task);
  }
}

// A pre-transposed 2-D weight w (shape R x C) as its C x R row-major transpose.
at::Tensor transposed(const at::Tensor& w) {
  at::Tensor t = w.t();
  return t.is_contiguous() ? t : t.contiguous();
}

at::Tensor ir_block_cpu(const at::Tensor& x_, const c10::optional<at::Tensor>& w_expand,
                        const c10::optional<at::Tensor>& b_expand, const at::Tensor& w_dw, const at::Tensor& b_dw,
                        const at::Tensor& w_proj, const at::Tensor& b_proj, int64_t stride, bool residual,
                        int64_t groups) {
  Dims d;
  check_args(x_, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj, stride, residual, groups, d);
  const bool cl = channels_last(x_);
  at::Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor yh = at::empty({d.N, d.OH, d.OW, d.G * d.Cout}, x.options());
  if (d.N > 0) {
    at::Tensor weT = d.expand ? transposed(*w_expand) : at::Tensor();
    at::Tensor be = d.expand ? b_expand->contiguous() : at::Tensor();
    at::Tensor wdP = w_dw.permute({1, 2, 0});
    if (!wdP.is_contiguous()) wdP = wdP.contiguous();
    at::Tensor wpT = transposed(w_proj);
    at::Tensor bd = b_dw.contiguous(), bp = b_proj.contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ir_block_cpu", [&] {
      ir_block_kernel<scalar_t>(d, x.data_ptr<scalar_t>(), d.expand ? weT.data_ptr<scalar_t>() : nullptr,
                                d.expand ? be.data_ptr<scalar_t>() : nullptr, wdP.data_ptr<scalar_t>(),
                                bd.data_ptr<scalar_t>(), wpT.data_ptr<scalar_t>(), bp.data_ptr<scalar_t>(),
                                yh.data_ptr<scalar_t>());
    });
  }
  at::Tensor y = yh.permute({0, 3, 1, 2});
  return cl ? y : y.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CPU, m) { m.impl("ir_block", &ir_block_cpu); }

}  // namespace fastface
