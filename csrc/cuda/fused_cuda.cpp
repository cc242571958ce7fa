// Registers the fused ir_block and dwconv_bn_act CUDA launchers for the CUDA dispatch key (CUDA builds only).
// The kernels work on channels-last activations: other layouts are converted on the way in, and
// outputs follow the op's rule (channels_last in -> channels_last out, anything else -> contiguous).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <optional>
#include <tuple>

#include "dwconv_bn_act.h"
#include "ir_block.h"

namespace fastface {
namespace {

cuda::FusedDType fused_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::FusedDType::kFloat32;
    case at::kHalf: return cuda::FusedDType::kFloat16;
    case at::kBFloat16: return cuda::FusedDType::kBFloat16;
    default: TORCH_CHECK(false, op, " (CUDA): float32/float16/bfloat16 only, got ", t.scalar_type());
  }
}

bool channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The kernels' layout: NHWC memory. Ambiguous tensors (C == 1, H == W == 1, ...) already are.
at::Tensor nhwc(const at::Tensor& x) { return x.contiguous(at::MemoryFormat::ChannelsLast); }

at::Tensor in_layout_of(const at::Tensor& y, const at::Tensor& x) {
  return channels_last(x) ? y : y.contiguous();
}

void check_same(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, " (CUDA): ", name, " is on ", t.device(), ", x on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, " (CUDA): ", name, " has dtype ", t.scalar_type(), ", x ",
              ref.scalar_type());
}

at::Tensor ir_block_cuda(const at::Tensor& x_, const std::optional<at::Tensor>& w_expand,
                         const std::optional<at::Tensor>& b_expand, const at::Tensor& w_dw, const at::Tensor& b_dw,
                         const at::Tensor& w_proj, const at::Tensor& b_proj, int64_t stride, bool residual,
                         int64_t groups) {
  constexpr const char* op = "ir_block";
  TORCH_CHECK(x_.is_cuda(), "ir_block (CUDA): tensors must be on a CUDA device");
  TORCH_CHECK(x_.dim() == 4 && groups >= 1 && x_.size(1) % groups == 0, "ir_block (CUDA): x must be N x (G*Cin) x H x W",
              " with groups >= 1 dividing its channels, got ", x_.sizes(), " and groups=", groups);
  const bool has_expand = w_expand.has_value() && w_expand->defined();
  TORCH_CHECK(has_expand == (b_expand.has_value() && b_expand->defined()),
              "ir_block (CUDA): w_expand and b_expand must both be given or both be None");
  const int64_t cin = x_.size(1) / groups;
  TORCH_CHECK(w_dw.dim() == 3 && w_dw.size(1) == w_dw.size(2) && w_dw.size(1) % 2 == 1 && w_dw.size(1) <= 7 &&
                  w_dw.size(0) % groups == 0,
              "ir_block (CUDA): w_dw must be (G*Ce) x k x k with odd k <= 7, got ", w_dw.sizes());
  const int64_t ce = w_dw.size(0) / groups, k = w_dw.size(1);
  TORCH_CHECK(w_proj.dim() == 2 && w_proj.size(1) == ce && w_proj.size(0) % groups == 0,
              "ir_block (CUDA): w_proj must be (G*Cout) x ", ce, ", got ", w_proj.sizes());
  const int64_t cout = w_proj.size(0) / groups;
  TORCH_CHECK(b_dw.dim() == 1 && b_dw.size(0) == w_dw.size(0) && b_proj.dim() == 1 && b_proj.size(0) == w_proj.size(0),
              "ir_block (CUDA): bias shapes ", b_dw.sizes(), " and ", b_proj.sizes(), " do not match the weights");
  if (has_expand) {
    TORCH_CHECK(w_expand->dim() == 2 && w_expand->size(0) == w_dw.size(0) && w_expand->size(1) == cin &&
                    b_expand->dim() == 1 && b_expand->size(0) == w_dw.size(0),
                "ir_block (CUDA): w_expand must be ", w_dw.size(0), " x ", cin, " and b_expand (", w_dw.size(0),
                "), got ", w_expand->sizes(), " and ", b_expand->sizes());
    check_same(x_, *w_expand, op, "w_expand");
    check_same(x_, *b_expand, op, "b_expand");
  } else {
    TORCH_CHECK(ce == cin, "ir_block (CUDA): without an expand conv Ce must equal Cin, got ", ce, " and ", cin);
  }
  TORCH_CHECK(stride == 1 || stride == 2, "ir_block (CUDA): stride must be 1 or 2, got ", stride);
  TORCH_CHECK(!residual || (stride == 1 && cout == cin),
              "ir_block (CUDA): residual needs stride 1 and Cout == Cin, got stride ", stride, ", ", cout, " vs ", cin);
  check_same(x_, w_dw, op, "w_dw");
  check_same(x_, b_dw, op, "b_dw");
  check_same(x_, w_proj, op, "w_proj");
  check_same(x_, b_proj, op, "b_proj");
  const auto dtype = fused_dtype(x_, op);
  c10::cuda::CUDAGuard guard(x_.device());

  auto x = nhwc(x_);
  auto we = has_expand ? w_expand->contiguous() : at::Tensor();
  auto be = has_expand ? b_expand->contiguous() : at::Tensor();
  auto wd = w_dw.contiguous(), bd = b_dw.contiguous(), wp = w_proj.contiguous(), bp = b_proj.contiguous();
  const int64_t pad = k / 2;
  const int64_t oh = (x.size(2) + 2 * pad - k) / stride + 1, ow = (x.size(3) + 2 * pad - k) / stride + 1;
  auto y = at::empty({x.size(0), groups * cout, oh, ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const cuda::IrBlockShape s{x.size(0), x.size(2), x.size(3), oh, ow, groups, cin, ce, cout, k, stride, has_expand,
                             residual};
  auto err = cuda::ir_block_forward(x.data_ptr(), has_expand ? we.data_ptr() : nullptr,
                                    has_expand ? be.data_ptr() : nullptr, wd.data_ptr(), bd.data_ptr(), wp.data_ptr(),
                                    bp.data_ptr(), y.data_ptr(), dtype, s, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "ir_block (CUDA): ", cudaGetErrorString(err));
  return in_layout_of(y, x_);
}

cuda::DwBnShape dwbn_shape(const at::Tensor& x, const at::Tensor& w, int64_t stride, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, " (CUDA): tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 4 && w.dim() == 3 && w.size(0) == x.size(1) && w.size(1) == w.size(2) &&
                  (w.size(1) == 3 || w.size(1) == 5),
              op, " (CUDA): want x N x C x H x W and weight C x k x k with k 3 or 5, got ", x.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, op, " (CUDA): stride must be 1 or 2, got ", stride);
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 0 && x.size(1) > 0, op,
              " (CUDA): batch statistics of an empty batch, x ", x.sizes());
  check_same(x, w, op, "weight");
  const int64_t k = w.size(1), pad = k / 2;
  return {x.size(0), x.size(1), x.size(2), x.size(3), (x.size(2) + 2 * pad - k) / stride + 1,
          (x.size(3) + 2 * pad - k) / stride + 1, k, stride};
}

// Per-channel vectors travel as fp32 (a few hundred floats: the cast is free next to the kernels).
at::Tensor channel_f32(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, " (CUDA): ", name, " must have ", x.size(1),
              " entries, got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), op, " (CUDA): ", name, " is on ", t.device(), ", x on ", x.device());
  return t.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_cuda(const at::Tensor& x_, const at::Tensor& weight,
                                                                  const at::Tensor& gamma, const at::Tensor& beta,
                                                                  int64_t stride, double eps, bool relu6) {
  constexpr const char* op = "dwconv_bn_act";
  const auto s = dwbn_shape(x_, weight, stride, op);
  const auto dtype = fused_dtype(x_, op);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = nhwc(x_), w = weight.contiguous();
  auto g = channel_f32(gamma, x_, op, "gamma"), b = channel_f32(beta, x_, op, "beta");
  auto y = at::empty({s.N, s.C, s.OH, s.OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto mean = at::empty({s.C}, x.options()), invstd = at::empty({s.C}, x.options());
  auto ws = at::empty({(int64_t)cuda::dwconv_bn_act_workspace(s)}, x.options().dtype(at::kByte));
  auto err = cuda::dwconv_bn_act_forward(x.data_ptr(), w.data_ptr(), g.data_ptr<float>(), b.data_ptr<float>(),
                                         y.data_ptr(), mean.data_ptr(), invstd.data_ptr(), dtype, s, (float)eps, relu6,
                                         ws.data_ptr(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dwconv_bn_act (CUDA): ", cudaGetErrorString(err));
  return {in_layout_of(y, x_), mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& invstd, int64_t stride, bool relu6) {
  constexpr const char* op = "dwconv_bn_act_backward";
  const auto s = dwbn_shape(x_, weight, stride, op);
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == s.N && grad_y.size(1) == s.C && grad_y.size(2) == s.OH &&
                  grad_y.size(3) == s.OW,
              "dwconv_bn_act_backward (CUDA): grad_y is ", grad_y.sizes(), ", want [", s.N, ", ", s.C, ", ", s.OH,
              ", ", s.OW, "]");
  check_same(x_, grad_y, op, "grad_y");
  const auto dtype = fused_dtype(x_, op);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = nhwc(x_), gy = nhwc(grad_y), w = weight.contiguous();
  auto g = channel_f32(gamma, x_, op, "gamma"), b = channel_f32(beta, x_, op, "beta");
  auto m = channel_f32(mean, x_, op, "mean"), iv = channel_f32(invstd, x_, op, "invstd");
  auto gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto gw = at::empty_like(w);
  auto gg = at::empty({s.C}, x.options().dtype(at::kFloat)), gb = at::empty({s.C}, x.options().dtype(at::kFloat));
  auto ws = at::empty({(int64_t)cuda::dwconv_bn_act_workspace(s)}, x.options().dtype(at::kByte));
  auto err = cuda::dwconv_bn_act_backward(gy.data_ptr(), x.data_ptr(), w.data_ptr(), g.data_ptr<float>(),
                                          b.data_ptr<float>(), m.data_ptr<float>(), iv.data_ptr<float>(), gx.data_ptr(),
                                          gw.data_ptr(), gg.data_ptr<float>(), gb.data_ptr<float>(), dtype, s, relu6,
                                          ws.data_ptr(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dwconv_bn_act_backward (CUDA): ", cudaGetErrorString(err));
  return {in_layout_of(gx, x_), gw, gg.to(gamma.scalar_type()), gb.to(beta.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CUDA, m) {
  m.impl("ir_block", &ir_block_cuda);
  m.impl("dwconv_bn_act", &dwconv_bn_act_cuda);
  m.impl("dwconv_bn_act_backward", &dwconv_bn_act_backward_cuda);
}

}  // namespace fastface
