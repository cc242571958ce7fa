// Fused inverted-residual block (BN folded), CUDA. One thread block computes one output tile
// (TH x TW pixels of one image, one branch, up to 160 output channels) in a single pass:
//   for each chunk of 32 expanded channels (one per lane):
//     expand   E[halo][32] = relu6(x[halo] . w_expand + b_expand)  shared memory; x staged 32 channels at a time
//     dw       D[tile][32] = relu6(sum_tap E[..] * w_dw + b_dw)     shared memory
//     project  acc[tile][cout] += D . w_proj                        registers (16 x 16 threads, 4 x CO_REG each)
//   y = acc + b_proj (+ x)
// The expanded tensor never reaches global memory; each block recomputes the expand on its halo,
// ((TH-1)s+K)((TW-1)s+K) / (TH TW) = 1.56x the expand FLOPs for 8 x 8 tiles, 3 x 3, stride 1.
// Activations and weights are read as T (float, half, bfloat16); all math is fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ir_block.h"
#include "float_convert.cuh"

namespace fastface {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCeB = 32;      // expanded channels per chunk: one per lane
constexpr int kCinB = 32;     // input channels staged per expand step
constexpr int kMaxP = 64;     // output pixels per tile (16 pixel lanes x 4)
constexpr int kRowBlock = 4;  // halo rows per thread and expand step: each weight read serves 4 rows
constexpr int kMaxK = 7;

__device__ __forceinline__ float relu6(float v) { return fminf(fmaxf(v, 0.f), 6.f); }

struct Tile {
  int th, tw;            // output pixels of a tile
  int hh, hw;            // its halo in the expanded tensor: (th-1)*stride+K x (tw-1)*stride+K
  int tiles_h, tiles_w;  // tiles per image
};

// Offsets (in floats) of the shared-memory buffers; rows padded by one float where a warp
// writes down a column, so those writes hit 32 different banks.
struct SmemLayout {
  int xs, es, ds, ws, wp, wd, be, bd, total;
};

__host__ __device__ inline SmemLayout smem_layout(int halo, int cout_b, int k) {
  SmemLayout l;
  l.xs = 0;                                  // x halo, 32 input channels    [halo][kCinB + 1]
  l.es = l.xs + halo * (kCinB + 1);          // expanded halo, 32 channels   [halo][kCeB]
  l.ds = l.es + halo * kCeB;                 // depthwise output             [kMaxP][kCeB + 1]
  l.ws = l.ds + kMaxP * (kCeB + 1);          // expand weights (transposed)  [kCinB][kCeB + 1]
  l.wp = l.ws + kCinB * (kCeB + 1);          // project weights (transposed) [kCeB][cout_b + 1]
  l.wd = l.wp + kCeB * (cout_b + 1);         // depthwise weights            [k*k][kCeB]
  l.be = l.wd + k * k * kCeB;                // expand bias                  [kCeB]
  l.bd = l.be + kCeB;                        // depthwise bias               [kCeB]
  l.total = l.bd + kCeB;
  return l;
}

template <typename T, int CO_REG>
__global__ void __launch_bounds__(kThreads, 2)
    ir_block_kernel(const T* __restrict__ x, const T* __restrict__ we, const T* __restrict__ be,
                    const T* __restrict__ wd, const T* __restrict__ bd, const T* __restrict__ wp,
                    const T* __restrict__ bp, T* __restrict__ y, IrBlockShape s, Tile t) {
  constexpr int COUT_B = 16 * CO_REG;
  extern __shared__ float smem[];
  const int halo = t.hh * t.hw;
  const int K = (int)s.K, KK = K * K, S = (int)s.stride;
  const SmemLayout L = smem_layout(halo, COUT_B, K);
  float* xs = smem + L.xs;
  float* es = smem + L.es;
  float* ds = smem + L.ds;
  float* ws = smem + L.ws;
  float* wps = smem + L.wp;
  float* wds = smem + L.wd;
  float* bes = smem + L.be;
  float* bds = smem + L.bd;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tiles = t.tiles_h * t.tiles_w;
  const int64_t n = blockIdx.x / tiles;
  const int tile = (int)(blockIdx.x % tiles);
  const int oy0 = (tile / t.tiles_w) * t.th, ox0 = (tile % t.tiles_w) * t.tw;
  const int64_t g = blockIdx.y;
  const int co0 = (int)blockIdx.z * COUT_B;
  const int iy0 = oy0 * S - K / 2, ix0 = ox0 * S - K / 2;  // top-left of the halo, in x
  const int P = t.th * t.tw;
  const int Cin = (int)s.Cin, Ce = (int)s.Ce, Cout = (int)s.Cout;
  const int64_t cin_tot = s.G * s.Cin, cout_tot = s.G * s.Cout;
  const T* xn = x + n * s.H * s.W * cin_tot + g * Cin;  // image n, channel slice of branch g

  // Projection: thread (tp, tc) owns pixels tp + 16 i and channels co0 + tc + 16 j.
  const int tp = tid >> 4, tc = tid & 15;
  float acc[4][CO_REG];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < CO_REG; ++j) acc[i][j] = 0.f;

  for (int ce0 = 0; ce0 < Ce; ce0 += kCeB) {
    const int64_t gce = g * Ce + ce0;  // first expanded channel of this chunk, over all branches
    // The chunk's weights; visible after the first barrier below.
    for (int e = tid; e < KK * kCeB; e += kThreads) {
      const int ce = e % kCeB, tap = e / kCeB;
      wds[e] = ce0 + ce < Ce ? to_f(wd[(gce + ce) * KK + tap]) : 0.f;
    }
    if (tid < kCeB) {
      const bool ok = ce0 + tid < Ce;
      bds[tid] = ok ? to_f(bd[gce + tid]) : 0.f;
      bes[tid] = ok && s.has_expand ? to_f(be[gce + tid]) : 0.f;
    }
    for (int e = tid; e < kCeB * COUT_B; e += kThreads) {
      const int ce = e % kCeB, co = e / kCeB;
      const bool ok = ce0 + ce < Ce && co0 + co < Cout;
      wps[ce * (COUT_B + 1) + co] = ok ? to_f(wp[(g * Cout + co0 + co) * Ce + ce0 + ce]) : 0.f;
    }

    if (s.has_expand) {
      for (int ci0 = 0; ci0 < Cin; ci0 += kCinB) {
        const int nci = Cin - ci0 < kCinB ? Cin - ci0 : kCinB;
        const bool first = ci0 == 0, last = ci0 + kCinB >= Cin;
        for (int e = tid; e < halo * kCinB; e += kThreads) {
          const int ci = e % kCinB, r = e / kCinB;
          const int iy = iy0 + r / t.hw, ix = ix0 + r % t.hw;
          float v = 0.f;
          if (ci < nci && iy >= 0 && iy < s.H && ix >= 0 && ix < s.W)
            v = to_f(xn[((int64_t)iy * s.W + ix) * cin_tot + ci0 + ci]);
          xs[r * (kCinB + 1) + ci] = v;
        }
        for (int e = tid; e < kCinB * kCeB; e += kThreads) {
          const int ci = e % kCinB, ce = e / kCinB;
          const bool ok = ci < nci && ce0 + ce < Ce;
          ws[ci * (kCeB + 1) + ce] = ok ? to_f(we[(gce + ce) * Cin + ci0 + ci]) : 0.f;
        }
        __syncthreads();
        // Lane = expanded channel; warp w takes halo rows w, w + 8, ... four at a time.
        for (int r0 = warp; r0 < halo; r0 += kWarps * kRowBlock) {
          int rows[kRowBlock];
          float a[kRowBlock];
#pragma unroll
          for (int u = 0; u < kRowBlock; ++u) {
            const int r = r0 + u * kWarps;
            rows[u] = r < halo ? r : halo - 1;  // clamped reads; only rows < halo are written
            a[u] = 0.f;
          }
          for (int ci = 0; ci < nci; ++ci) {
            const float w = ws[ci * (kCeB + 1) + lane];
#pragma unroll
            for (int u = 0; u < kRowBlock; ++u) a[u] += xs[rows[u] * (kCinB + 1) + ci] * w;
          }
#pragma unroll
          for (int u = 0; u < kRowBlock; ++u) {
            const int r = r0 + u * kWarps;
            if (r >= halo) break;
            float v = (first ? 0.f : es[r * kCeB + lane]) + a[u];
            if (last) {
              // The depthwise conv zero-pads h, the expand's output: relu6(b) must not leak in.
              const int iy = iy0 + r / t.hw, ix = ix0 + r % t.hw;
              const bool inside = iy >= 0 && iy < s.H && ix >= 0 && ix < s.W;
              v = inside ? relu6(v + bes[lane]) : 0.f;
            }
            es[r * kCeB + lane] = v;
          }
        }
        __syncthreads();
      }
    } else {
      for (int e = tid; e < halo * kCeB; e += kThreads) {
        const int ce = e % kCeB, r = e / kCeB;
        const int iy = iy0 + r / t.hw, ix = ix0 + r % t.hw;
        float v = 0.f;
        if (ce0 + ce < Ce && iy >= 0 && iy < s.H && ix >= 0 && ix < s.W)
          v = to_f(xn[((int64_t)iy * s.W + ix) * cin_tot + ce0 + ce]);
        es[r * kCeB + ce] = v;
      }
      __syncthreads();
    }

    // Depthwise k x k from the halo in shared memory; lane = channel, warp w takes pixels w, w + 8, ...
    for (int p = warp; p < P; p += kWarps) {
      const int py = p / t.tw, px = p % t.tw;
      float a = 0.f;
      for (int ky = 0; ky < K; ++ky) {
        const float* row = es + ((py * S + ky) * t.hw + px * S) * kCeB + lane;
        const float* wrow = wds + ky * K * kCeB + lane;
        for (int kx = 0; kx < K; ++kx) a += row[kx * kCeB] * wrow[kx * kCeB];
      }
      ds[p * (kCeB + 1) + lane] = relu6(a + bds[lane]);
    }
    __syncthreads();

    // Projection into the register tile. Rows p >= P of ds hold stale values; their results are never stored.
    for (int ce = 0; ce < kCeB; ++ce) {
      float w[CO_REG];
#pragma unroll
      for (int j = 0; j < CO_REG; ++j) w[j] = wps[ce * (COUT_B + 1) + tc + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float d = ds[(tp + 16 * i) * (kCeB + 1) + ce];
#pragma unroll
        for (int j = 0; j < CO_REG; ++j) acc[i][j] += d * w[j];
      }
    }
    __syncthreads();  // the next chunk overwrites every buffer
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int p = tp + 16 * i;
    if (p >= P) continue;
    const int oy = oy0 + p / t.tw, ox = ox0 + p % t.tw;
    if (oy >= s.OH || ox >= s.OW) continue;
    const int64_t pix = (n * s.OH + oy) * s.OW + ox;
#pragma unroll
    for (int j = 0; j < CO_REG; ++j) {
      const int co = co0 + tc + 16 * j;
      if (co >= Cout) continue;
      float v = acc[i][j] + to_f(bp[g * Cout + co]);
      if (s.residual) v += to_f(x[pix * cin_tot + g * Cin + co]);  // stride 1: output pixel = input pixel
      y[pix * cout_tot + g * Cout + co] = from_f<T>(v);
    }
  }
}

template <typename T, int CO_REG>
cudaError_t launch(const void* x, const void* we, const void* be, const void* wd, const void* bd, const void* wp,
                   const void* bp, void* y, const IrBlockShape& s, const Tile& t, cudaStream_t stream) {
  const SmemLayout l = smem_layout(t.hh * t.hw, 16 * CO_REG, (int)s.K);
  const size_t bytes = (size_t)l.total * sizeof(float);
  auto kernel = ir_block_kernel<T, CO_REG>;
  if (bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (err != cudaSuccess) return err;
  }
  const int cout_blocks = (int)((s.Cout + 16 * CO_REG - 1) / (16 * CO_REG));
  const dim3 grid((unsigned)(s.N * t.tiles_h * t.tiles_w), (unsigned)s.G, (unsigned)cout_blocks);
  kernel<<<grid, kThreads, bytes, stream>>>(static_cast<const T*>(x), static_cast<const T*>(we),
                                            static_cast<const T*>(be), static_cast<const T*>(wd),
                                            static_cast<const T*>(bd), static_cast<const T*>(wp),
                                            static_cast<const T*>(bp), static_cast<T*>(y), s, t);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_cout(const void* x, const void* we, const void* be, const void* wd, const void* bd,
                            const void* wp, const void* bp, void* y, const IrBlockShape& s, const Tile& t,
                            cudaStream_t stream) {
  // The narrowest register tile that holds Cout; wider layers take several blocks of 160.
  if (s.Cout <= 16) return launch<T, 1>(x, we, be, wd, bd, wp, bp, y, s, t, stream);
  if (s.Cout <= 32) return launch<T, 2>(x, we, be, wd, bd, wp, bp, y, s, t, stream);
  if (s.Cout <= 64) return launch<T, 4>(x, we, be, wd, bd, wp, bp, y, s, t, stream);
  if (s.Cout <= 96) return launch<T, 6>(x, we, be, wd, bd, wp, bp, y, s, t, stream);
  return launch<T, 10>(x, we, be, wd, bd, wp, bp, y, s, t, stream);
}

}  // namespace

cudaError_t ir_block_forward(const void* x, const void* w_expand, const void* b_expand, const void* w_dw,
                             const void* b_dw, const void* w_proj, const void* b_proj, void* y, FusedDType dtype,
                             const IrBlockShape& s, cudaStream_t stream) {
  if (s.K < 1 || s.K > kMaxK || s.K % 2 == 0 || (s.stride != 1 && s.stride != 2) || s.N < 0 || s.G < 1 ||
      s.Cin < 1 || s.Ce < 1 || s.Cout < 1 || s.OH < 1 || s.OW < 1 || (s.has_expand && (!w_expand || !b_expand)) ||
      (!s.has_expand && s.Ce != s.Cin) || (s.residual && (s.stride != 1 || s.Cout != s.Cin)))
    return cudaErrorInvalidValue;
  if (s.N == 0) return cudaSuccess;
  Tile t;
  // Stride 2 tiles are half as tall: their halo rows cost twice as much.
  t.tw = (int)(s.OW < 8 ? s.OW : 8);
  const int th_max = (s.stride == 1 ? kMaxP : kMaxP / 2) / t.tw;
  t.th = (int)(s.OH < th_max ? s.OH : th_max);
  t.hh = (t.th - 1) * (int)s.stride + (int)s.K;
  t.hw = (t.tw - 1) * (int)s.stride + (int)s.K;
  t.tiles_h = (int)((s.OH + t.th - 1) / t.th);
  t.tiles_w = (int)((s.OW + t.tw - 1) / t.tw);
  switch (dtype) {
    case FusedDType::kFloat32:
      return launch_for_cout<float>(x, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj, y, s, t, stream);
    case FusedDType::kFloat16:
      return launch_for_cout<__half>(x, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj, y, s, t, stream);
    case FusedDType::kBFloat16:
      return launch_for_cout<__nv_bfloat16>(x, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj, y, s, t, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastface
