// Depthwise conv + bias + ReLU6, CUDA. One thread per output (forward and grad x);
// one block per channel for the weight/bias reductions.
#include "dwconv.h"

namespace fastface {
namespace cuda {
namespace {

template <typename T>
__global__ void dw_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                  T* __restrict__ y, DwShape s, bool relu6) {
  const int64_t total = s.N * s.C * s.OH * s.OW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ox = i % s.OW, oy = (i / s.OW) % s.OH, nc = i / (s.OW * s.OH), c = nc % s.C;
    const T* xp = x + nc * s.H * s.W;
    const T* wp = w + c * s.K * s.K;
    T acc = b[c];
    for (int64_t ky = 0; ky < s.K; ++ky) {
      const int64_t iy = oy * s.stride - s.padding + ky;
      if (iy < 0 || iy >= s.H) continue;
      for (int64_t kx = 0; kx < s.K; ++kx) {
        const int64_t ix = ox * s.stride - s.padding + kx;
        if (ix < 0 || ix >= s.W) continue;
        acc += wp[ky * s.K + kx] * xp[iy * s.W + ix];
      }
    }
    if (relu6) acc = acc < T(0) ? T(0) : (acc > T(6) ? T(6) : acc);
    y[i] = acc;
  }
}

template <typename T>
__device__ inline T masked_grad(const T* g, const T* out, int64_t i, bool relu6) {
  if (!relu6) return g[i];
  const T o = out[i];
  return (o > T(0) && o < T(6)) ? g[i] : T(0);
}

template <typename T>
__global__ void dw_grad_input_kernel(const T* __restrict__ g, const T* __restrict__ out, const T* __restrict__ w,
                                     T* __restrict__ gx, DwShape s, bool relu6) {
  const int64_t total = s.N * s.C * s.H * s.W;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ix = i % s.W, iy = (i / s.W) % s.H, nc = i / (s.W * s.H), c = nc % s.C;
    const T* wp = w + c * s.K * s.K;
    const int64_t base = nc * s.OH * s.OW;
    T acc = T(0);
    for (int64_t ky = 0; ky < s.K; ++ky) {
      const int64_t ty = iy + s.padding - ky;  // = oy * stride
      if (ty < 0 || ty % s.stride) continue;
      const int64_t oy = ty / s.stride;
      if (oy >= s.OH) continue;
      for (int64_t kx = 0; kx < s.K; ++kx) {
        const int64_t tx = ix + s.padding - kx;
        if (tx < 0 || tx % s.stride) continue;
        const int64_t ox = tx / s.stride;
        if (ox >= s.OW) continue;
        acc += wp[ky * s.K + kx] * masked_grad(g, out, base + oy * s.OW + ox, relu6);
      }
    }
    gx[i] = acc;
  }
}

// One block per channel: each thread accumulates over a strided share of (n, oy, ox),
// then a shared-memory tree reduction per weight tap.
template <typename T, int THREADS>
__global__ void dw_grad_weight_kernel(const T* __restrict__ g, const T* __restrict__ out, const T* __restrict__ x,
                                      T* __restrict__ gw, T* __restrict__ gb, DwShape s, bool relu6) {
  const int64_t c = blockIdx.x;
  const int64_t per_c = s.N * s.OH * s.OW;
  __shared__ T red[THREADS];
  for (int64_t tap = -1; tap < s.K * s.K; ++tap) {  // tap -1 is the bias
    const int64_t ky = tap < 0 ? 0 : tap / s.K, kx = tap < 0 ? 0 : tap % s.K;
    T acc = T(0);
    for (int64_t j = threadIdx.x; j < per_c; j += THREADS) {
      const int64_t ox = j % s.OW, oy = (j / s.OW) % s.OH, n = j / (s.OW * s.OH);
      const int64_t gi = ((n * s.C + c) * s.OH + oy) * s.OW + ox;
      const T gv = masked_grad(g, out, gi, relu6);
      if (tap < 0) {
        acc += gv;
      } else {
        const int64_t iy = oy * s.stride - s.padding + ky, ix = ox * s.stride - s.padding + kx;
        if (iy >= 0 && iy < s.H && ix >= 0 && ix < s.W) acc += gv * x[((n * s.C + c) * s.H + iy) * s.W + ix];
      }
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      if (tap < 0) gb[c] = red[0];
      else gw[c * s.K * s.K + tap] = red[0];
    }
    __syncthreads();
  }
}

inline unsigned grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return (unsigned)(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

}  // namespace

template <typename T>
cudaError_t dwconv2d_forward(const T* x, const T* w, const T* b, T* y, DwShape s, bool relu6, cudaStream_t stream) {
  constexpr int threads = 256;
  dw_forward_kernel<T><<<grid_for(s.N * s.C * s.OH * s.OW, threads), threads, 0, stream>>>(x, w, b, y, s, relu6);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dwconv2d_backward(const T* grad_out, const T* x, const T* w, const T* out, T* gx, T* gw, T* gb, DwShape s,
                              bool relu6, cudaStream_t stream) {
  constexpr int threads = 256;
  dw_grad_input_kernel<T><<<grid_for(s.N * s.C * s.H * s.W, threads), threads, 0, stream>>>(grad_out, out, w, gx, s,
                                                                                           relu6);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  dw_grad_weight_kernel<T, threads><<<(unsigned)s.C, threads, 0, stream>>>(grad_out, out, x, gw, gb, s, relu6);
  return cudaGetLastError();
}

template cudaError_t dwconv2d_forward<float>(const float*, const float*, const float*, float*, DwShape, bool,
                                             cudaStream_t);
template cudaError_t dwconv2d_forward<double>(const double*, const double*, const double*, double*, DwShape, bool,
                                              cudaStream_t);
template cudaError_t dwconv2d_backward<float>(const float*, const float*, const float*, const float*, float*, float*,
                                              float*, DwShape, bool, cudaStream_t);
template cudaError_t dwconv2d_backward<double>(const double*, const double*, const double*, const double*, double*,
                                               double*, double*, DwShape, bool, cudaStream_t);

}  // namespace cuda
}  // namespace fastface
