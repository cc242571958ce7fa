// Torch-free launchers of the training-path depthwise stage, depthwise conv -> BatchNorm (batch
// statistics) -> ReLU6, CUDA (raw pointers, sizes, a workspace, a stream), so dwconv_bn_act.cu
// compiles with plain nvcc (make cuda-check) without CUDA torch.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ir_block.h"  // FusedDType

namespace fastface {
namespace cuda {

struct DwBnShape {
  int64_t N, C, H, W, OH, OW, K, stride;  // K 3 or 5 (padding K/2), stride 1 or 2
};

// Bytes of device workspace (float partials) that both launchers below need for this shape.
size_t dwconv_bn_act_workspace(const DwBnShape& s);

// y = act(gamma * (z - mean) * invstd + beta), z = depthwise conv(x, w) (no bias), batch
// statistics over (N, OH, OW). x and y are channels-last (NHWC) contiguous, w is C x K x K;
// x, w, y, mean and invstd (C each) have storage type `dtype`, gamma and beta are fp32. z is never
// stored: one pass computes the statistics, a second recomputes z and normalises.
cudaError_t dwconv_bn_act_forward(const void* x, const void* w, const float* gamma, const float* beta, void* y,
                                  void* mean, void* invstd, FusedDType dtype, const DwBnShape& s, float eps,
                                  bool relu6, void* workspace, cudaStream_t stream);

// Gradients w.r.t. x (NHWC, `dtype`), w (C x K x K, `dtype`), gamma and beta (fp32), z recomputed
// from x; grad_y is NHWC `dtype`, mean and invstd are the forward's, as fp32. Deterministic: every
// reduction sums per-block partials in a fixed order.
cudaError_t dwconv_bn_act_backward(const void* grad_y, const void* x, const void* w, const float* gamma,
                                   const float* beta, const float* mean, const float* invstd, void* grad_x,
                                   void* grad_w, float* grad_gamma, float* grad_beta, FusedDType dtype,
                                   const DwBnShape& s, bool relu6, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastface
