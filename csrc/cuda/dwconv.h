// Torch-free launchers of the depthwise conv CUDA kernels (raw pointers, sizes, a stream),
// so every .cu compiles with plain nvcc (make cuda-check) on machines without CUDA torch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastface {
namespace cuda {

struct DwShape {
  int64_t N, C, H, W, OH, OW, K, stride, padding;
};

// y = act(dwconv(x, w) + b), NCHW contiguous.
template <typename T>
cudaError_t dwconv2d_forward(const T* x, const T* w, const T* b, T* y, DwShape s, bool relu6, cudaStream_t stream);

// gx, gw, gb from grad_out and the forward output (masks ReLU6); gx NCHW contiguous.
template <typename T>
cudaError_t dwconv2d_backward(const T* grad_out, const T* x, const T* w, const T* out, T* gx, T* gw, T* gb, DwShape s,
                              bool relu6, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastface
