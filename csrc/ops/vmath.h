// Vectorisable f32 math (libm's expf/tanhf do not vectorise under `omp simd`).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"

#include <immintrin.h>

namespace gemmalens::ops {

// exp(x) in f32, written so that `omp simd` loops vectorise it (libm's expf does not).
// Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 polynomial for e^r
// (Cephes expf coefficients); relative error ~2e-7 on the clamped range [-87.3, 88.7].
inline float exp_f32(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  // round to nearest via the 1.5 * 2^23 trick (branch-free, vectorises; |x log2 e| < 2^22).
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.f;
  // unsigned: a NaN x (n = INT_MIN on x86) must not make the shift undefined; p is NaN then and so is the result
  const uint32_t e = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, 4);
  return p * scale;
}

// exp_f32 in 16 lanes (AVX-512 callers only).
__attribute__((target("avx512f,avx512dq,fma"))) inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// exp_f32 in 8 lanes (AVX2 + FMA; the baseline every CPU class has).
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.7f)), _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// tanh(x) = sign(x) (1 - 2 / (exp(2|x|) + 1)); absolute error ~2e-7 (callers add it to O(1) terms).
inline float tanh_f32(float x) {
  const float a = std::fabs(x);
  const float t = 1.f - 2.f / (exp_f32(2.f * a) + 1.f);
  return std::copysign(t, x);
}

// One row of 64 attention scores, in place, for the online softmax (AVX2, the baseline every class has): s[c] =
// exp(x_c - mx) for the visible columns [c_lo, c_hi] (x_c = s[c] * scale, soft-capped when softcap > 0), 0 elsewhere;
// mx = max(m_prev, max x_c) is returned, *sum = the sum of the exps. The visible lanes come from comparing column
// indices with [c_lo, c_hi] (no mask registers).
inline float softmax_row64(float* s, int c_lo, int c_hi, float scale, float softcap, float m_prev, float* sum) {
  constexpr int NK = 64;
  if (softcap > 0.f) {  // rare (no released Gemma 3 sets it): scalar
    float mx = m_prev;
    for (int c = c_lo; c <= c_hi; ++c) {
      s[c] = softcap * tanh_f32(s[c] * scale / softcap);
      mx = std::max(mx, s[c]);
    }
    float acc = 0.f;
    for (int c = 0; c < NK; ++c) {
      s[c] = (c < c_lo || c > c_hi) ? 0.f : exp_f32(s[c] - mx);
      acc += s[c];
    }
    *sum = acc;
    return mx;
  }
  const __m256 sc = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i lo = _mm256_set1_epi32(c_lo - 1), hi = _mm256_set1_epi32(c_hi + 1);
  __m256 vis[NK / 8];
  __m256 vmx = _mm256_set1_ps(m_prev);
  for (int v = 0; v < NK / 8; ++v) {
    const __m256i col = _mm256_add_epi32(_mm256_set1_epi32(8 * v), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    vis[v] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(col, lo), _mm256_cmpgt_epi32(hi, col)));
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + 8 * v), sc);
    _mm256_storeu_ps(s + 8 * v, x);
    vmx = _mm256_max_ps(vmx, _mm256_blendv_ps(ninf, x, vis[v]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float mx = _mm_cvtss_f32(m4);
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (int v = 0; v < NK / 8; ++v) {
    const __m256 e = _mm256_and_ps(vis[v], exp256(_mm256_sub_ps(_mm256_loadu_ps(s + 8 * v), m)));
    _mm256_storeu_ps(s + 8 * v, e);
    acc = _mm256_add_ps(acc, e);
  }
  __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  a4 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
  a4 = _mm_add_ss(a4, _mm_movehdup_ps(a4));
  *sum = _mm_cvtss_f32(a4);
  return mx;
}

// The sum of 8 lanes: halves, then pairs, then the last two (one order for every caller, so their sums agree).
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
// 8 bf16 values (p[0..8)) as f32: zero-extended to 32 bits and shifted into the high half.
inline __m256 widen8_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// Dot products and axpy over one head (n = head_dim) with f32 or bf16 (cache) operands.
inline float dot_f32(const float* a, const float* b, int n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}
inline float dot_bf16(const float* a, const uint16_t* b, int n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += a[i] * bf16_to_f32(b[i]);
  return acc;
}
inline void axpy_f32(float p, const float* v, float* z, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) z[i] += p * v[i];
}
inline void axpy_bf16(float p, const uint16_t* v, float* z, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) z[i] += p * bf16_to_f32(v[i]);
}
// The int8 cache's rows, a block of one scale at a time (the caller multiplies by the scale).
inline float dot_i8(const float* a, const int8_t* b, int n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += a[i] * static_cast<float>(b[i]);
  return acc;
}
inline void axpy_i8(float p, const int8_t* v, float* z, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) z[i] += p * static_cast<float>(v[i]);
}

}  // namespace gemmalens::ops
