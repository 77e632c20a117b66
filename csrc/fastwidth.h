// Shared helpers of the native ops: dtype loads into fp32 rows and a vectorizable exp.
// The ops' schemas are declared once in ops.cpp; each <op>.cpp registers its CPU kernels.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace fastwidth {

// Inner loops that GCC vectorizes get an AVX2 clone beside the baseline x86-64 one, picked at
// load time by the CPU (so a cached build stays valid on any x86-64 machine).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FW_VECTOR_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define FW_VECTOR_LOOP
#endif

// Row `n` of T as fp32: the pointer itself for float, else converted into `buf`.
template <typename T>
inline const float* as_float(const T* p, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
    buf.resize(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return buf.data();
  }
}

// Store fp32 `src` into `dst` of T (round to nearest for bf16/half).
template <typename T>
inline void store_as(const float* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// exp(x) for fp32 in straight-line code the compiler vectorizes (Cephes expf: 2^k * p(r),
// |r| <= ln2/2, about 2 ulp; the clamps become blends only with -fno-trapping-math, which the
// build passes). Inputs below -87 give exp(-87) ~ 1.6e-38 instead of less (no
// denormals); NaN stays NaN. Every caller feeds x <= ~0 (z - max, z - lse).
inline float vexp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // round to nearest by the 1.5 * 2^23 trick: vectorizes without SSE4.1's roundps
  const float magic = 12582912.0f;
  float k = (x * 1.44269504088896341f + magic) - magic;
  float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Reductions: `omp simd reduction` lets the compiler keep one partial per vector lane (without
// -ffast-math it may not reassociate a plain loop). The order is fixed for a given build and CPU,
// so results repeat run to run. static: each translation unit has its own clones.
static FW_VECTOR_LOOP float lane_sum(const float* a, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i];
  return s;
}

// sum of (a - shift) * (b - shift); a == b and shift = 0 gives the sum of squares
static FW_VECTOR_LOOP float lane_dot(const float* a, const float* b, int64_t n, float shift) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += (a[i] - shift) * (b[i] - shift);
  return s;
}

}  // namespace fastwidth
