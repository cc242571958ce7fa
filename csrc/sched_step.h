// One step of the FastFace LR scheduler on a float64 state vector: the maths shared by the
// C++ CPU kernel (cpu/sched.cpp) and the CUDA kernel (cuda/sched.cu). Torch-free and
// CUDA-free, so both a host compiler and plain nvcc take it.
//
// Every backend (these two, the Triton kernel and the Python float implementation in
// fastface/sched/fastface.py) must round exactly alike: a single flipped `S < lambda`
// comparison changes every later LR. So each product and sum is rounded on its own, in the
// same order as the Python expression `(w1*s1 - w2*s2) + w3*(prev - loss)`; no FMA may merge
// them (the CPU build uses -ffp-contract=fast, nvcc contracts by default).
#pragma once
#include <cfloat>
#include <cstdint>

#if defined(__CUDACC__)
#define FF_HD __host__ __device__
#else
#define FF_HD
#endif

namespace fastface {
namespace sched {

// Layout of the state vector (float64). Mirrored by STATE_FIELDS in fastface/ops/sched.py.
enum Field : int {
  kPrevLoss = 0,   // L_{t-1}: the last accepted (finite) loss
  kS1 = 1,         // S_{t-1}: smoothed loss drop per step
  kS2 = 2,         // S_{t-2}
  kCount = 3,      // consecutive steps with S < lambda (the patience counter)
  kHalvings = 4,   // LR halvings applied so far (at most max_halvings)
  kFactor = 5,     // LR factor: delta^-halvings
  kNonFinite = 6,  // non-finite losses seen (and ignored)
  kAccepted = 7,   // finite losses seen: the step index t of the next loss
  kStateSize = 8,
};

struct Params {
  double w1, w2, w3;  // omega_1, omega_2, omega_3 of the second-order recurrence
  double alpha;       // seed of the first slope: S_1 = alpha * (L_0 - L_1)
  double lambd;       // progress threshold (loss units per step)
  double delta;       // LR divisor per halving
  int64_t patience;   // T
  int64_t max_halvings;
  int64_t warmup_steps;
};

// Correctly rounded double ops that no compiler may fuse: CUDA intrinsics on the device,
// a volatile round trip on the host (a volatile value must be materialised, so it cannot be
// folded into a fused multiply-add).
#if defined(__CUDA_ARCH__)
FF_HD inline double rn(double x) { return x; }
FF_HD inline double mul(double a, double b) { return __dmul_rn(a, b); }
FF_HD inline double add(double a, double b) { return __dadd_rn(a, b); }
FF_HD inline double sub(double a, double b) { return __dsub_rn(a, b); }
FF_HD inline double div(double a, double b) { return __ddiv_rn(a, b); }
#else
FF_HD inline double rn(double x) {
  volatile double v = x;
  return v;
}
FF_HD inline double mul(double a, double b) { return rn(a * b); }
FF_HD inline double add(double a, double b) { return rn(a + b); }
FF_HD inline double sub(double a, double b) { return rn(a - b); }
FF_HD inline double div(double a, double b) { return rn(a / b); }
#endif

FF_HD inline bool finite(double x) { return x <= DBL_MAX && x >= -DBL_MAX; }  // false for NaN and +-inf

// Updates st in place with one batch loss. A non-finite loss only bumps kNonFinite.
FF_HD inline void update(double* st, double loss, const Params& p) {
  if (!finite(loss)) {
    st[kNonFinite] += 1.0;
    return;
  }
  const double n = st[kAccepted];
  if (n > 0.0) {
    double s;
    if (n == 1.0) {
      // Reference seeding: S_1 = alpha (L_0 - L_1), the first EMA drop D_1 taken as is. With
      // S_0 := S_1 the recurrence below equals the two-stage EMA -> Haar -> EMA form exactly.
      s = mul(p.alpha, sub(st[kPrevLoss], loss));
      st[kS2] = s;
    } else {
      s = add(sub(mul(p.w1, st[kS1]), mul(p.w2, st[kS2])), mul(p.w3, sub(st[kPrevLoss], loss)));
      st[kS2] = st[kS1];
    }
    st[kS1] = s;
    if (n < (double)p.warmup_steps) {
      st[kCount] = 0.0;  // no decisions while the LR is still ramping up
    } else if (st[kCount] >= (double)p.patience) {
      // The count reached T on the previous step; the reference applies the decision at the
      // start of the next step, and that step starts a fresh patience window.
      st[kCount] = 0.0;
      if (st[kHalvings] < (double)p.max_halvings) {
        st[kHalvings] += 1.0;
        st[kFactor] = div(st[kFactor], p.delta);
      }
    } else if (s < p.lambd) {
      st[kCount] += 1.0;
    } else {
      st[kCount] = 0.0;
    }
  }
  st[kPrevLoss] = loss;
  st[kAccepted] = n + 1.0;
}

// The multiplier of the base LRs for the next optimiser step: factor x linear warmup.
FF_HD inline double lr_scale(const double* st, const Params& p) {
  double warm = 1.0;
  if (p.warmup_steps > 0) {
    const double w = div(add(st[kAccepted], 1.0), (double)p.warmup_steps);
    warm = w < 1.0 ? w : 1.0;
  }
  return mul(st[kFactor], warm);
}

}  // namespace sched
}  // namespace fastface
