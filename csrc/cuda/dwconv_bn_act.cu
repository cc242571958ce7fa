// Training path of the depthwise stage, depthwise conv -> BatchNorm (batch statistics) -> ReLU6, CUDA.
// NHWC activations; blocks of 32 channel lanes x 8 pixel rows, so every warp reads 32 adjacent
// channels of one pixel. The conv output z is never stored: each pass recomputes it from x
// (K*K loads per element, served by L1/L2). Reductions are deterministic: blocks write partials
// for a fixed split of the pixels and one thread per channel combines them in order.
//   forward:  stats (Welford per thread, Chan merges) -> finalize (mean, invstd, fp32 affine) -> normalize
//   backward: sums (sum g, sum g*zhat) -> finalize (grad_gamma, grad_beta, dz coefficients)
//             -> grad (dz on an 8x8 input tile's output halo in shared memory; grad_x by the transposed
//                conv from there; grad_w partials over the outputs each tile owns) -> reduce grad_w
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dwconv_bn_act.h"
#include "float_convert.cuh"

namespace fastface {
namespace cuda {
namespace {

constexpr int kLanes = 32;  // channels per block
constexpr int kRows = 8;    // pixel rows per block
constexpr int kThreads = kLanes * kRows;
constexpr int kTargetBlocks = 1024;  // blocks of the reduction passes; independent of the device (determinism)
constexpr int kTile = 8;             // input tile of the grad pass: kTile x kTile pixels
constexpr int64_t kMinChunk = 4 * kRows;  // pixels per block of the reduction passes, at least

// How the reduction passes split the N*OH*OW output pixels: n_chunks chunks of chunk_pix each.
struct Split {
  int64_t n_chunks, chunk_pix;
};

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline Split split_of(const DwBnShape& s) {
  const int64_t np = s.N * s.OH * s.OW, c_blocks = cdiv(s.C, kLanes);
  int64_t want = kTargetBlocks / c_blocks;
  if (want < 1) want = 1;
  int64_t chunk_pix = cdiv(np, want);
  if (chunk_pix < kMinChunk) chunk_pix = kMinChunk;
  return {cdiv(np, chunk_pix), chunk_pix};
}

// Input tiles of the grad pass and how many each block walks (its grad_w partial covers them all).
struct GradSplit {
  int64_t tiles_h, tiles_w, n_tiles, per_block, n_blocks;
};

inline GradSplit grad_split_of(const DwBnShape& s) {
  GradSplit g;
  g.tiles_h = cdiv(s.H, kTile);
  g.tiles_w = cdiv(s.W, kTile);
  g.n_tiles = s.N * g.tiles_h * g.tiles_w;
  int64_t want = kTargetBlocks / cdiv(s.C, kLanes);
  if (want < 1) want = 1;
  g.per_block = cdiv(g.n_tiles, want < g.n_tiles ? want : g.n_tiles);
  g.n_blocks = cdiv(g.n_tiles, g.per_block);
  return g;
}

// Per-thread view of one channel: its K*K weights in registers, and z at one output pixel.
template <typename T, int K>
struct Channel {
  float w[K * K];

  __device__ void load(const T* __restrict__ wt, int64_t c) {
#pragma unroll
    for (int t = 0; t < K * K; ++t) w[t] = to_f(wt[c * K * K + t]);
  }

  // z at output (n, oy, ox); xv receives the K*K inputs it read (0 outside the image).
  __device__ float conv(const T* __restrict__ x, const DwBnShape& s, int64_t n, int64_t oy, int64_t ox, int64_t c,
                        float* xv) const {
    float z = 0.f;
#pragma unroll
    for (int ky = 0; ky < K; ++ky) {
      const int64_t iy = oy * s.stride - K / 2 + ky;
#pragma unroll
      for (int kx = 0; kx < K; ++kx) {
        const int64_t ix = ox * s.stride - K / 2 + kx;
        float v = 0.f;
        if (iy >= 0 && iy < s.H && ix >= 0 && ix < s.W) v = to_f(x[((n * s.H + iy) * s.W + ix) * s.C + c]);
        xv[ky * K + kx] = v;
        z += v * w[ky * K + kx];
      }
    }
    return z;
  }
};

// Chan et al.'s merge of (count, mean, M2) summaries: no sum-of-squares cancellation.
__device__ __forceinline__ void chan_merge(float& cnt, float& mean, float& m2, float cnt_b, float mean_b, float m2_b) {
  const float tot = cnt + cnt_b;
  if (tot <= 0.f) return;
  const float delta = mean_b - mean, frac = cnt_b / tot;
  mean += delta * frac;
  m2 += m2_b + delta * delta * cnt * frac;
  cnt = tot;
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const T* __restrict__ x, const T* __restrict__ wt, float* __restrict__ part_mean,
                 float* __restrict__ part_m2, DwBnShape s, Split sp) {
  __shared__ float s_cnt[kRows][kLanes], s_mean[kRows][kLanes], s_m2[kRows][kLanes];
  const int lane = threadIdx.x % kLanes, row = threadIdx.x / kLanes;
  const int64_t c = (int64_t)blockIdx.y * kLanes + lane, chunk = blockIdx.x;
  const int64_t np = s.N * s.OH * s.OW, q0 = chunk * sp.chunk_pix;
  const int64_t q1 = q0 + sp.chunk_pix < np ? q0 + sp.chunk_pix : np;
  float cnt = 0.f, mean = 0.f, m2 = 0.f;
  if (c < s.C) {
    Channel<T, K> ch;
    ch.load(wt, c);
    float xv[K * K];
    for (int64_t q = q0 + row; q < q1; q += kRows) {
      const int64_t ox = q % s.OW, oy = (q / s.OW) % s.OH, n = q / (s.OW * s.OH);
      const float z = ch.conv(x, s, n, oy, ox, c, xv);
      cnt += 1.f;  // Welford
      const float d = z - mean;
      mean += d / cnt;
      m2 += d * (z - mean);
    }
  }
  s_cnt[row][lane] = cnt;
  s_mean[row][lane] = mean;
  s_m2[row][lane] = m2;
  __syncthreads();
  if (row == 0 && c < s.C) {
    for (int r = 1; r < kRows; ++r) chan_merge(cnt, mean, m2, s_cnt[r][lane], s_mean[r][lane], s_m2[r][lane]);
    part_mean[chunk * s.C + c] = mean;
    part_m2[chunk * s.C + c] = m2;
  }
}

template <typename T>
__global__ void finalize_kernel(const float* __restrict__ part_mean, const float* __restrict__ part_m2,
                                const float* __restrict__ gamma, const float* __restrict__ beta, T* __restrict__ mean_out,
                                T* __restrict__ invstd_out, float* __restrict__ affine, DwBnShape s, Split sp, float eps) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= s.C) return;
  const int64_t np = s.N * s.OH * s.OW;
  float cnt = 0.f, mean = 0.f, m2 = 0.f;
  for (int64_t j = 0; j < sp.n_chunks; ++j) {
    const int64_t left = np - j * sp.chunk_pix;
    const float cnt_b = (float)(left < sp.chunk_pix ? left : sp.chunk_pix);
    chan_merge(cnt, mean, m2, cnt_b, part_mean[j * s.C + c], part_m2[j * s.C + c]);
  }
  const float invstd = rsqrtf(m2 / cnt + eps);
  const float scale = gamma[c] * invstd;
  mean_out[c] = from_f<T>(mean);
  invstd_out[c] = from_f<T>(invstd);
  affine[c] = scale;
  affine[s.C + c] = beta[c] - mean * scale;
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads)
    normalize_kernel(const T* __restrict__ x, const T* __restrict__ wt, const float* __restrict__ affine,
                     T* __restrict__ y, DwBnShape s, bool relu6) {
  const int lane = threadIdx.x % kLanes, row = threadIdx.x / kLanes;
  const int64_t c = (int64_t)blockIdx.y * kLanes + lane;
  if (c >= s.C) return;  // no barriers below
  Channel<T, K> ch;
  ch.load(wt, c);
  const float scale = affine[c], shift = affine[s.C + c];
  const int64_t np = s.N * s.OH * s.OW;
  float xv[K * K];
  for (int64_t q = (int64_t)blockIdx.x * kRows + row; q < np; q += (int64_t)gridDim.x * kRows) {
    const int64_t ox = q % s.OW, oy = (q / s.OW) % s.OH, n = q / (s.OW * s.OH);
    float v = ch.conv(x, s, n, oy, ox, c, xv) * scale + shift;
    if (relu6) v = fminf(fmaxf(v, 0.f), 6.f);
    y[q * s.C + c] = from_f<T>(v);
  }
}

struct BnParams {
  float mean, invstd, gamma, beta;
};

// grad_y through the ReLU6 window (by the recomputed pre-activation), and zhat.
__device__ __forceinline__ float masked_grad(float gy, float z, const BnParams& p, bool relu6, float& zhat) {
  zhat = (z - p.mean) * p.invstd;
  if (!relu6) return gy;
  const float pre = zhat * p.gamma + p.beta;
  return pre > 0.f && pre < 6.f ? gy : 0.f;
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads)
    bwd_sums_kernel(const T* __restrict__ gy, const T* __restrict__ x, const T* __restrict__ wt,
                    const float* __restrict__ mean, const float* __restrict__ invstd, const float* __restrict__ gamma,
                    const float* __restrict__ beta, float* __restrict__ part, DwBnShape s, Split sp, bool relu6) {
  __shared__ float s_g[kRows][kLanes], s_gz[kRows][kLanes];
  const int lane = threadIdx.x % kLanes, row = threadIdx.x / kLanes;
  const int64_t c = (int64_t)blockIdx.y * kLanes + lane, chunk = blockIdx.x;
  const int64_t np = s.N * s.OH * s.OW, q0 = chunk * sp.chunk_pix;
  const int64_t q1 = q0 + sp.chunk_pix < np ? q0 + sp.chunk_pix : np;
  float sum_g = 0.f, sum_gz = 0.f;
  if (c < s.C) {
    Channel<T, K> ch;
    ch.load(wt, c);
    const BnParams p{mean[c], invstd[c], gamma[c], beta[c]};
    float xv[K * K];
    for (int64_t q = q0 + row; q < q1; q += kRows) {
      const int64_t ox = q % s.OW, oy = (q / s.OW) % s.OH, n = q / (s.OW * s.OH);
      float zhat;
      const float g = masked_grad(to_f(gy[q * s.C + c]), ch.conv(x, s, n, oy, ox, c, xv), p, relu6, zhat);
      sum_g += g;
      sum_gz += g * zhat;
    }
  }
  s_g[row][lane] = sum_g;
  s_gz[row][lane] = sum_gz;
  __syncthreads();
  if (row == 0 && c < s.C) {
    for (int r = 1; r < kRows; ++r) {
      sum_g += s_g[r][lane];
      sum_gz += s_gz[r][lane];
    }
    part[chunk * s.C + c] = sum_g;
    part[(sp.n_chunks + chunk) * s.C + c] = sum_gz;
  }
}

__global__ void bwd_finalize_kernel(const float* __restrict__ part, const float* __restrict__ gamma,
                                    const float* __restrict__ invstd, float* __restrict__ grad_gamma,
                                    float* __restrict__ grad_beta, float* __restrict__ coef, DwBnShape s, Split sp) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= s.C) return;
  float sum_g = 0.f, sum_gz = 0.f;
  for (int64_t j = 0; j < sp.n_chunks; ++j) {
    sum_g += part[j * s.C + c];
    sum_gz += part[(sp.n_chunks + j) * s.C + c];
  }
  grad_beta[c] = sum_g;
  grad_gamma[c] = sum_gz;
  const float count = (float)(s.N * s.OH * s.OW);
  coef[c] = gamma[c] * invstd[c];       // dz = a * (g - b - zhat * cc)
  coef[s.C + c] = sum_g / count;        // b
  coef[2 * s.C + c] = sum_gz / count;   // cc
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads)
    bwd_grad_kernel(const T* __restrict__ gy, const T* __restrict__ x, const T* __restrict__ wt,
                    const float* __restrict__ mean, const float* __restrict__ invstd, const float* __restrict__ gamma,
                    const float* __restrict__ beta, const float* __restrict__ coef, T* __restrict__ gx,
                    float* __restrict__ gw_part, DwBnShape s, GradSplit gs, int stride, bool relu6) {
  // An input tile [i0, i0 + kTile) (i0 a multiple of the stride) needs dz on the outputs
  // [i0/S - PAD/S, i0/S + (kTile-1+PAD)/S] per axis: its halo, at most HALO x HALO for stride 1.
  constexpr int PAD = K / 2;
  constexpr int HALO = kTile - 1 + 2 * PAD + 1;
  __shared__ float s_dz[HALO * HALO][kLanes];
  __shared__ float s_red[kRows][kLanes];
  const int lane = threadIdx.x % kLanes, row = threadIdx.x / kLanes;
  const int64_t c = (int64_t)blockIdx.y * kLanes + lane;
  const bool c_ok = c < s.C;
  const int lo = PAD / stride;
  const int hh = (kTile - 1 + PAD) / stride + lo + 1;  // halo side for this stride
  Channel<T, K> ch;
  BnParams p{0.f, 0.f, 0.f, 0.f};
  float a = 0.f, b = 0.f, cc = 0.f;
  if (c_ok) {
    ch.load(wt, c);
    p = BnParams{mean[c], invstd[c], gamma[c], beta[c]};
    a = coef[c];
    b = coef[s.C + c];
    cc = coef[2 * s.C + c];
  } else {
#pragma unroll
    for (int t = 0; t < K * K; ++t) ch.w[t] = 0.f;
  }
  float gw[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) gw[t] = 0.f;
  float xv[K * K];

  for (int64_t j = 0; j < gs.per_block; ++j) {
    const int64_t tile = (int64_t)blockIdx.x * gs.per_block + j;
    if (tile >= gs.n_tiles) break;  // uniform across the block: barriers stay matched
    const int64_t n = tile / (gs.tiles_h * gs.tiles_w), r = tile % (gs.tiles_h * gs.tiles_w);
    const int64_t iy0 = (r / gs.tiles_w) * kTile, ix0 = (r % gs.tiles_w) * kTile;
    const int64_t oy_lo = iy0 / stride - lo, ox_lo = ix0 / stride - lo;
    const int64_t own_y0 = iy0 / stride, own_y1 = (iy0 + kTile) / stride;
    const int64_t own_x0 = ix0 / stride, own_x1 = (ix0 + kTile) / stride;

    // dz on the halo, and grad_w over the outputs this tile owns (each output is owned once).
    for (int hq = row; hq < hh * hh; hq += kRows) {
      const int64_t oy = oy_lo + hq / hh, ox = ox_lo + hq % hh;
      float dz = 0.f;
      if (c_ok && oy >= 0 && oy < s.OH && ox >= 0 && ox < s.OW) {
        const int64_t q = (n * s.OH + oy) * s.OW + ox;
        float zhat;
        const float g = masked_grad(to_f(gy[q * s.C + c]), ch.conv(x, s, n, oy, ox, c, xv), p, relu6, zhat);
        dz = a * (g - b - zhat * cc);
        if (oy >= own_y0 && oy < own_y1 && ox >= own_x0 && ox < own_x1) {
#pragma unroll
          for (int t = 0; t < K * K; ++t) gw[t] += dz * xv[t];
        }
      }
      s_dz[hq][lane] = dz;
    }
    __syncthreads();
    // grad_x[i] = sum_tap w[tap] * dz[(i + PAD - tap) / S] where the division is exact.
    for (int pq = row; pq < kTile * kTile; pq += kRows) {
      const int64_t iy = iy0 + pq / kTile, ix = ix0 + pq % kTile;
      if (!c_ok || iy >= s.H || ix >= s.W) continue;
      float acc = 0.f;
#pragma unroll
      for (int ky = 0; ky < K; ++ky) {
        const int64_t ty = iy + PAD - ky;
        if (ty < 0 || ty % stride) continue;
#pragma unroll
        for (int kx = 0; kx < K; ++kx) {
          const int64_t tx = ix + PAD - kx;
          if (tx < 0 || tx % stride) continue;
          // Outputs past the image edge hold dz = 0 in the halo.
          acc += ch.w[ky * K + kx] * s_dz[(ty / stride - oy_lo) * hh + (tx / stride - ox_lo)][lane];
        }
      }
      gx[((n * s.H + iy) * s.W + ix) * s.C + c] = from_f<T>(acc);
    }
    __syncthreads();
  }

  // This block's grad_w partial: the kRows rows summed in order.
  for (int t = 0; t < K * K; ++t) {
    s_red[row][lane] = gw[t];
    __syncthreads();
    if (row == 0 && c_ok) {
      float v = 0.f;
      for (int r = 0; r < kRows; ++r) v += s_red[r][lane];
      gw_part[((int64_t)blockIdx.x * K * K + t) * s.C + c] = v;
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void reduce_gw_kernel(const float* __restrict__ gw_part, T* __restrict__ gw, int64_t C, int64_t KK,
                                 int64_t n_blocks) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;  // element c * KK + tap of grad_w
  if (i >= C * KK) return;
  const int64_t c = i / KK, t = i % KK;
  float acc = 0.f;
  for (int64_t j = 0; j < n_blocks; ++j) acc += gw_part[(j * KK + t) * C + c];
  gw[i] = from_f<T>(acc);
}

struct Workspace {
  float *part_a, *part_b, *small, *gw_part;
};

// Forward: part_a/part_b = mean/M2 partials, small = affine (2 x C).
// Backward: part_a = sum g and sum g*zhat partials (2 x n_chunks x C), small = coef (3 x C), gw_part.
inline Workspace carve(void* base, const DwBnShape& s) {
  const Split sp = split_of(s);
  float* f = static_cast<float*>(base);
  Workspace w;
  w.part_a = f;
  w.part_b = f + sp.n_chunks * s.C;
  w.small = f + 2 * sp.n_chunks * s.C;
  w.gw_part = w.small + 3 * s.C;
  return w;
}

bool valid(const DwBnShape& s) {
  return s.N > 0 && s.C > 0 && s.OH > 0 && s.OW > 0 && (s.K == 3 || s.K == 5) &&
         (s.stride == 1 || s.stride == 2);
}

template <typename T, int K>
cudaError_t forward_k(const void* x, const void* w, const float* gamma, const float* beta, void* y, void* mean,
                      void* invstd, const DwBnShape& s, float eps, bool relu6, void* workspace, cudaStream_t stream) {
  const Split sp = split_of(s);
  const Workspace ws = carve(workspace, s);
  const unsigned c_blocks = (unsigned)cdiv(s.C, kLanes);
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(w);
  stats_kernel<T, K><<<dim3((unsigned)sp.n_chunks, c_blocks), kThreads, 0, stream>>>(xt, wt, ws.part_a, ws.part_b,
                                                                                      s, sp);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  finalize_kernel<T><<<(unsigned)cdiv(s.C, 256), 256, 0, stream>>>(ws.part_a, ws.part_b, gamma, beta,
                                                                   static_cast<T*>(mean), static_cast<T*>(invstd),
                                                                   ws.small, s, sp, eps);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t np = s.N * s.OH * s.OW;
  const int64_t rows = cdiv(np, kRows);
  const unsigned grid_x = (unsigned)(rows < 65535 * 4 ? rows : 65535 * 4);
  normalize_kernel<T, K><<<dim3(grid_x, c_blocks), kThreads, 0, stream>>>(xt, wt, ws.small, static_cast<T*>(y), s,
                                                                         relu6);
  return cudaGetLastError();
}

template <typename T, int K>
cudaError_t backward_k(const void* grad_y, const void* x, const void* w, const float* gamma, const float* beta,
                       const float* mean, const float* invstd, void* grad_x, void* grad_w, float* grad_gamma,
                       float* grad_beta, const DwBnShape& s, bool relu6, void* workspace, cudaStream_t stream) {
  const Split sp = split_of(s);
  const GradSplit gs = grad_split_of(s);
  const Workspace ws = carve(workspace, s);
  const unsigned c_blocks = (unsigned)cdiv(s.C, kLanes);
  const T* gyt = static_cast<const T*>(grad_y);
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(w);
  bwd_sums_kernel<T, K><<<dim3((unsigned)sp.n_chunks, c_blocks), kThreads, 0, stream>>>(
      gyt, xt, wt, mean, invstd, gamma, beta, ws.part_a, s, sp, relu6);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  bwd_finalize_kernel<<<(unsigned)cdiv(s.C, 256), 256, 0, stream>>>(ws.part_a, gamma, invstd, grad_gamma, grad_beta,
                                                                  ws.small, s, sp);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  bwd_grad_kernel<T, K><<<dim3((unsigned)gs.n_blocks, c_blocks), kThreads, 0, stream>>>(
      gyt, xt, wt, mean, invstd, gamma, beta, ws.small, static_cast<T*>(grad_x), ws.gw_part, s, gs, (int)s.stride,
      relu6);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reduce_gw_kernel<T><<<(unsigned)cdiv(s.C * K * K, 256), 256, 0, stream>>>(ws.gw_part, static_cast<T*>(grad_w), s.C,
                                                                           K * K, gs.n_blocks);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_t(const void* x, const void* w, const float* gamma, const float* beta, void* y, void* mean,
                      void* invstd, const DwBnShape& s, float eps, bool relu6, void* ws, cudaStream_t stream) {
  switch (s.K) {
    case 3: return forward_k<T, 3>(x, w, gamma, beta, y, mean, invstd, s, eps, relu6, ws, stream);
    case 5: return forward_k<T, 5>(x, w, gamma, beta, y, mean, invstd, s, eps, relu6, ws, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t backward_t(const void* gy, const void* x, const void* w, const float* gamma, const float* beta,
                       const float* mean, const float* invstd, void* gx, void* gw, float* gg, float* gb,
                       const DwBnShape& s, bool relu6, void* ws, cudaStream_t stream) {
  switch (s.K) {
    case 3: return backward_k<T, 3>(gy, x, w, gamma, beta, mean, invstd, gx, gw, gg, gb, s, relu6, ws, stream);
    case 5: return backward_k<T, 5>(gy, x, w, gamma, beta, mean, invstd, gx, gw, gg, gb, s, relu6, ws, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

size_t dwconv_bn_act_workspace(const DwBnShape& s) {
  if (!valid(s)) return 0;
  const Split sp = split_of(s);
  const GradSplit gs = grad_split_of(s);
  const int64_t floats = 2 * sp.n_chunks * s.C + 3 * s.C + gs.n_blocks * s.K * s.K * s.C;
  return (size_t)floats * sizeof(float);
}

cudaError_t dwconv_bn_act_forward(const void* x, const void* w, const float* gamma, const float* beta, void* y,
                                  void* mean, void* invstd, FusedDType dtype, const DwBnShape& s, float eps,
                                  bool relu6, void* workspace, cudaStream_t stream) {
  if (!valid(s) || !workspace) return cudaErrorInvalidValue;
  switch (dtype) {
    case FusedDType::kFloat32:
      return forward_t<float>(x, w, gamma, beta, y, mean, invstd, s, eps, relu6, workspace, stream);
    case FusedDType::kFloat16:
      return forward_t<__half>(x, w, gamma, beta, y, mean, invstd, s, eps, relu6, workspace, stream);
    case FusedDType::kBFloat16:
      return forward_t<__nv_bfloat16>(x, w, gamma, beta, y, mean, invstd, s, eps, relu6, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t dwconv_bn_act_backward(const void* grad_y, const void* x, const void* w, const float* gamma,
                                   const float* beta, const float* mean, const float* invstd, void* grad_x,
                                   void* grad_w, float* grad_gamma, float* grad_beta, FusedDType dtype,
                                   const DwBnShape& s, bool relu6, void* workspace, cudaStream_t stream) {
  if (!valid(s) || !workspace) return cudaErrorInvalidValue;
  switch (dtype) {
    case FusedDType::kFloat32:
      return backward_t<float>(grad_y, x, w, gamma, beta, mean, invstd, grad_x, grad_w, grad_gamma, grad_beta, s,
                               relu6, workspace, stream);
    case FusedDType::kFloat16:
      return backward_t<__half>(grad_y, x, w, gamma, beta, mean, invstd, grad_x, grad_w, grad_gamma, grad_beta, s,
                                relu6, workspace, stream);
    case FusedDType::kBFloat16:
      return backward_t<__nv_bfloat16>(grad_y, x, w, gamma, beta, mean, invstd, grad_x, grad_w, grad_gamma,
                                       grad_beta, s, relu6, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastface
