// A minimal SIMD vector for the fused CPU kernels: one code path for float and double.
// AVX-512 where the compiler targets it (setup.py builds with -march=native), AVX2 next,
// else one scalar lane: the kernels stay correct everywhere and fast where it matters.
// Masked loads/stores handle channel tails, so channel counts need not be multiples of 16.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// For the kernels' small per-pixel helpers, which must not stay calls (their register arrays would spill).
#if defined(__GNUC__)
#define FF_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FF_ALWAYS_INLINE inline
#endif

// Register-blocked loops must be fully unrolled before GCC's scalar replacement runs, or the
// accumulator arrays live on the stack and every FMA is followed by a store (measured: ~3x
// slower micro-kernel).
#if defined(__clang__)
#define FF_UNROLL _Pragma("unroll")
#else
#define FF_UNROLL _Pragma("GCC unroll 64")
#endif

namespace fastface {
namespace simd {

template <typename T>
struct Vec;

#if defined(__AVX512F__)
template <>
struct Vec<float> {
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int L = 16;
  static inline mask tail(int64_t n) { return n >= L ? mask(0xFFFF) : mask((1u << n) - 1u); }
  static inline mask full() { return mask(0xFFFF); }
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg set1(float v) { return _mm512_set1_ps(v); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  // Lanes outside the mask read as 0 and never fault (AVX-512 masked loads suppress faults).
  static inline reg load(const float* p, mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static inline void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static inline void store(float* p, reg v, mask m) { _mm512_mask_storeu_ps(p, m, v); }
  static inline void stream(float* p, reg v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
  static inline reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  // a where lo < p < hi, else 0 (the ReLU6 gradient mask).
  static inline reg keep_open(reg a, reg p, reg lo, reg hi) {
    mask m = _mm512_cmp_ps_mask(p, lo, _CMP_GT_OQ) & _mm512_cmp_ps_mask(p, hi, _CMP_LT_OQ);
    return _mm512_maskz_mov_ps(m, a);
  }
};

template <>
struct Vec<double> {
  using reg = __m512d;
  using mask = __mmask8;
  static constexpr int L = 8;
  static inline mask tail(int64_t n) { return n >= L ? mask(0xFF) : mask((1u << n) - 1u); }
  static inline mask full() { return mask(0xFF); }
  static inline reg zero() { return _mm512_setzero_pd(); }
  static inline reg set1(double v) { return _mm512_set1_pd(v); }
  static inline reg load(const double* p) { return _mm512_loadu_pd(p); }
  static inline reg load(const double* p, mask m) { return _mm512_maskz_loadu_pd(m, p); }
  static inline void store(double* p, reg v) { _mm512_storeu_pd(p, v); }
  static inline void store(double* p, reg v, mask m) { _mm512_mask_storeu_pd(p, m, v); }
  static inline void stream(double* p, reg v) { _mm512_stream_pd(p, v); }  // p 64-byte aligned
  static inline reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_pd(a, b); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  static inline reg min(reg a, reg b) { return _mm512_min_pd(a, b); }
  static inline reg max(reg a, reg b) { return _mm512_max_pd(a, b); }
  static inline reg keep_open(reg a, reg p, reg lo, reg hi) {
    mask m = _mm512_cmp_pd_mask(p, lo, _CMP_GT_OQ) & _mm512_cmp_pd_mask(p, hi, _CMP_LT_OQ);
    return _mm512_maskz_mov_pd(m, a);
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
template <>
struct Vec<float> {
  using reg = __m256;
  using mask = __m256i;
  static constexpr int L = 8;
  static inline mask tail(int64_t n) {
    const int k = n >= L ? L : int(n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline mask full() { return _mm256_set1_epi32(-1); }
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg set1(float v) { return _mm256_set1_ps(v); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline reg load(const float* p, mask m) { return _mm256_maskload_ps(p, m); }
  static inline void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static inline void store(float* p, reg v, mask m) { _mm256_maskstore_ps(p, m, v); }
  static inline void stream(float* p, reg v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
  static inline reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static inline reg keep_open(reg a, reg p, reg lo, reg hi) {
    reg m = _mm256_and_ps(_mm256_cmp_ps(p, lo, _CMP_GT_OQ), _mm256_cmp_ps(p, hi, _CMP_LT_OQ));
    return _mm256_and_ps(m, a);
  }
};

template <>
struct Vec<double> {
  using reg = __m256d;
  using mask = __m256i;
  static constexpr int L = 4;
  static inline mask tail(int64_t n) {
    const long long k = n >= L ? L : n;
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(k), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static inline mask full() { return _mm256_set1_epi64x(-1); }
  static inline reg zero() { return _mm256_setzero_pd(); }
  static inline reg set1(double v) { return _mm256_set1_pd(v); }
  static inline reg load(const double* p) { return _mm256_loadu_pd(p); }
  static inline reg load(const double* p, mask m) { return _mm256_maskload_pd(p, m); }
  static inline void store(double* p, reg v) { _mm256_storeu_pd(p, v); }
  static inline void store(double* p, reg v, mask m) { _mm256_maskstore_pd(p, m, v); }
  static inline void stream(double* p, reg v) { _mm256_stream_pd(p, v); }  // p 32-byte aligned
  static inline reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_pd(a, b); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_pd(a, b); }
  static inline reg min(reg a, reg b) { return _mm256_min_pd(a, b); }
  static inline reg max(reg a, reg b) { return _mm256_max_pd(a, b); }
  static inline reg keep_open(reg a, reg p, reg lo, reg hi) {
    reg m = _mm256_and_pd(_mm256_cmp_pd(p, lo, _CMP_GT_OQ), _mm256_cmp_pd(p, hi, _CMP_LT_OQ));
    return _mm256_and_pd(m, a);
  }
};
#endif

#if !defined(__AVX512F__) && !(defined(__AVX2__) && defined(__FMA__))
#define FASTFACE_SIMD_SCALAR 1
#endif

// One scalar lane: the portable fallback (and the only path without AVX2/AVX-512).
template <typename T>
struct ScalarVec {
  using reg = T;
  using mask = bool;
  static constexpr int L = 1;
  static inline mask tail(int64_t n) { return n >= 1; }
  static inline mask full() { return true; }
  static inline reg zero() { return T(0); }
  static inline reg set1(T v) { return v; }
  static inline reg load(const T* p) { return *p; }
  static inline reg load(const T* p, mask m) { return m ? *p : T(0); }
  static inline void store(T* p, reg v) { *p = v; }
  static inline void store(T* p, reg v, mask m) {
    if (m) *p = v;
  }
  static inline void stream(T* p, reg v) { *p = v; }
  static inline reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static inline reg add(reg a, reg b) { return a + b; }
  static inline reg sub(reg a, reg b) { return a - b; }
  static inline reg mul(reg a, reg b) { return a * b; }
  static inline reg min(reg a, reg b) { return b < a ? b : a; }
  static inline reg max(reg a, reg b) { return a < b ? b : a; }
  static inline reg keep_open(reg a, reg p, reg lo, reg hi) { return (p > lo && p < hi) ? a : T(0); }
};

#ifdef FASTFACE_SIMD_SCALAR
template <>
struct Vec<float> : ScalarVec<float> {};
template <>
struct Vec<double> : ScalarVec<double> {};
#endif

// Half of a Vec: a 256-bit register where Vec is 512 bits wide. Zen 4 runs a 512-bit FMA as two 256-bit halves
// whether or not a mask turns half of its lanes off, so a channel tail of at most half a vector (24 = 16 + 8 of
// the face model's 1x1 convs) costs a whole FMA per row in Vec and half of one here. kHasHalf is false (and Half
// is just Vec) on the AVX2 and scalar paths, whose kernels never take it.
#if defined(__AVX512F__)
constexpr bool kHasHalf = true;
template <typename T>
struct Half;
template <>
struct Half<float> {
  using reg = __m256;
  using mask = __mmask8;
  static constexpr int L = 8;
  static inline mask from(Vec<float>::mask m) { return mask(m & 0xFF); }
  static inline reg low(Vec<float>::reg v) { return _mm512_castps512_ps256(v); }  // no instruction
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg set1(float v) { return _mm256_set1_ps(v); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline reg load(const float* p, mask m) { return _mm256_maskz_loadu_ps(m, p); }
  static inline void store(float* p, reg v, mask m) { _mm256_mask_storeu_ps(p, m, v); }
  static inline reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
};
template <>
struct Half<double> {
  using reg = __m256d;
  using mask = __mmask8;
  static constexpr int L = 4;
  static inline mask from(Vec<double>::mask m) { return mask(m & 0x0F); }
  static inline reg low(Vec<double>::reg v) { return _mm512_castpd512_pd256(v); }
  static inline reg zero() { return _mm256_setzero_pd(); }
  static inline reg set1(double v) { return _mm256_set1_pd(v); }
  static inline reg load(const double* p) { return _mm256_loadu_pd(p); }
  static inline reg load(const double* p, mask m) { return _mm256_maskz_loadu_pd(m, p); }
  static inline void store(double* p, reg v, mask m) { _mm256_mask_storeu_pd(p, m, v); }
  static inline reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
};
#else
constexpr bool kHasHalf = false;
template <typename T>
struct Half : Vec<T> {
  static inline typename Vec<T>::mask from(typename Vec<T>::mask m) { return m; }
  static inline typename Vec<T>::reg low(typename Vec<T>::reg v) { return v; }
};
#endif

template <typename T>
inline typename Vec<T>::reg relu6(typename Vec<T>::reg v) {
  using V = Vec<T>;
  return V::min(V::max(v, V::zero()), V::set1(T(6)));
}

// Non-temporal stores (Vec::stream) are weakly ordered: each thread fences its own before the
// parallel region ends, so the data is visible to whoever reads it after the join.
inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX2__)
  _mm_sfence();
#endif
}

// Outputs of at least this size are written with non-temporal stores (see stream_ok): between a
// layer's write and its consumer's read the rest of the step's maps pass through the last-level
// cache (32 MiB here, shared), so even maps well under its size are mostly read back from memory,
// and the stores skip reading every line for ownership first. Measured on the face model's training
// step (A/B pairs of builds, 2 threads): 6 MiB was 1.7 % faster than 16 MiB, 2 MiB no faster than 6,
// 40 MiB 2.5 % slower than 16.
constexpr int64_t kStreamBytes = int64_t(6) << 20;

// Whether an M x C output written row by row may take non-temporal stores: whole vectors only
// (every row starts on a vector boundary, so no masked tail), an aligned base, and large enough
// that it would not have stayed in the last-level cache anyway (then the stores skip the read
// for ownership of every line: measured 1.2-1.4x faster for a read + write pass on 25-77 MB).
template <typename T>
inline bool stream_ok(const T* p, int64_t M, int64_t C, int64_t min_bytes) {
#ifdef FASTFACE_SIMD_SCALAR
  return false;
#else
  const int64_t align = int64_t(sizeof(typename Vec<T>::reg));
  return C % Vec<T>::L == 0 && reinterpret_cast<uintptr_t>(p) % uintptr_t(align) == 0 &&
         M * C * int64_t(sizeof(T)) >= min_bytes;
#endif
}

// Channels rounded up to whole vectors: the row pitch of the kernels' scratch buffers.
template <typename T>
inline int64_t padded(int64_t c) {
  return (c + Vec<T>::L - 1) / Vec<T>::L * Vec<T>::L;
}

// n rows of per-channel constants, each padded to whole vectors (lanes past C are 0), so loads need
// no masks.
template <typename T>
struct Padded {
  std::vector<T> buf;
  int64_t Cp;
  explicit Padded(int64_t C, int n) : buf(size_t(padded<T>(C) * n), T(0)), Cp(padded<T>(C)) {}
  T* operator[](int i) { return buf.data() + i * Cp; }
  const T* operator[](int i) const { return buf.data() + i * Cp; }
};

// Per-thread scratch that only grows: the kernels run once per layer per call, and a fresh
// malloc of a few hundred KB each time would mmap/munmap and page-fault on every call.
template <typename T>
class Scratch {
 public:
  T* get(size_t n) {
    if (n > cap_) {
      const size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
      void* p = std::aligned_alloc(64, bytes);
      if (p == nullptr) throw std::bad_alloc();
      buf_.reset(static_cast<T*>(p));
      cap_ = bytes / sizeof(T);
    }
    return buf_.get();
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> buf_;
  size_t cap_ = 0;
};

template <typename T, int Slot>
inline T* scratch(size_t n) {
  static thread_local Scratch<T> s;
  return s.get(n);
}

}  // namespace simd
}  // namespace fastface
