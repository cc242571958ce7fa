// Registers the depthwise conv CUDA launchers for the CUDA dispatch key (CUDA builds only).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "dwconv.h"

namespace fastface {
namespace {

cuda::DwShape shape_of(const at::Tensor& x, const at::Tensor& w, int64_t oh, int64_t ow, int64_t stride,
                       int64_t padding) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), oh, ow, w.size(2), stride, padding};
}

bool channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda(), "dwconv2d (CUDA): tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && w.size(0) == x.size(1) && w.size(1) == 1 && w.size(2) == w.size(3),
              "dwconv2d (CUDA): bad shapes x ", x.sizes(), " weight ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "dwconv2d (CUDA): float32/float64 only, got ", x.scalar_type());
}

at::Tensor dwconv2d_cuda(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& b_, int64_t stride,
                         int64_t padding, bool relu6) {
  check(x_, w_);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), w = w_.contiguous(), b = b_.to(x.scalar_type()).contiguous();
  const int64_t K = w.size(2);
  const int64_t oh = (x.size(2) + 2 * padding - K) / stride + 1, ow = (x.size(3) + 2 * padding - K) / stride + 1;
  TORCH_CHECK(oh > 0 && ow > 0, "dwconv2d (CUDA): input too small for kernel ", K);
  auto y = at::empty({x.size(0), x.size(1), oh, ow}, x.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv2d_cuda", [&] {
    auto err = cuda::dwconv2d_forward<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                                b.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                                shape_of(x, w, oh, ow, stride, padding), relu6, stream);
    TORCH_CHECK(err == cudaSuccess, "dwconv2d (CUDA): ", cudaGetErrorString(err));
  });
  return channels_last(x_) ? y.contiguous(at::MemoryFormat::ChannelsLast) : y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv2d_backward_cuda(const at::Tensor& go_, const at::Tensor& x_,
                                                                      const at::Tensor& w_, const at::Tensor& out_,
                                                                      int64_t stride, int64_t padding, bool relu6) {
  check(x_, w_);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), w = w_.contiguous(), go = go_.contiguous(), out = out_.contiguous();
  auto gx = at::empty_like(x), gw = at::empty_like(w), gb = at::empty({x.size(1)}, x.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv2d_backward_cuda", [&] {
    auto err = cuda::dwconv2d_backward<scalar_t>(
        go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        gx.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(),
        shape_of(x, w, go.size(2), go.size(3), stride, padding), relu6, stream);
    TORCH_CHECK(err == cudaSuccess, "dwconv2d_backward (CUDA): ", cudaGetErrorString(err));
  });
  if (channels_last(x_)) gx = gx.contiguous(at::MemoryFormat::ChannelsLast);
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CUDA, m) {
  m.impl("dwconv2d", &dwconv2d_cuda);
  m.impl("dwconv2d_backward", &dwconv2d_backward_cuda);
}

}  // namespace fastface
