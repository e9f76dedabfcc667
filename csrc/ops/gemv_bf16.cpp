#include "ops/gemv_bf16.h"

#include "common.h"

#include <immintrin.h>

#include <cstring>
#include <stdexcept>

namespace gemmalens::ops {

bool bf16_gemv_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

namespace {

#define GL_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))

GL_BF16 inline __m512i pair_broadcast(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// One 64-column panel ([K/2][64][2] contiguous) against MB activation rows: 4 x MB accumulators of 16 columns.
template <int MB>
GL_BF16 void panel64(const uint16_t* wp, int64_t K, const uint16_t* x, int64_t K_ld, float* y, int64_t ldy) {
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  const int64_t KP = K / 2;
  for (int64_t kp = 0; kp < KP; ++kp) {
    const uint16_t* wv = wp + kp * 128;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wv), w1 = (__m512bh)_mm512_loadu_si512(wv + 32),
                   w2 = (__m512bh)_mm512_loadu_si512(wv + 64), w3 = (__m512bh)_mm512_loadu_si512(wv + 96);
    for (int m = 0; m < MB; ++m) {
      const __m512bh xb = (__m512bh)pair_broadcast(x + m * K_ld + 2 * kp);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w2, xb);
      acc[m][3] = _mm512_dpbf16_ps(acc[m][3], w3, xb);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + m * ldy + 16 * j, acc[m][j]);
}

GL_BF16 void blocked64_impl(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M, float* y, int64_t ldy) {
  const int64_t panels = N / 64;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    const uint16_t* wp = w + p * 64 * K;
    float* yp = y + p * 64;
    // Rows in groups of at most 4 (16 accumulators); a panel (64 x K bf16) stays in L2 between groups.
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) panel64<4>(wp, K, x + m * K, K, yp + m * ldy, ldy);
    switch (M - m) {
      case 3: panel64<3>(wp, K, x + m * K, K, yp + m * ldy, ldy); break;
      case 2: panel64<2>(wp, K, x + m * K, K, yp + m * ldy, ldy); break;
      case 1: panel64<1>(wp, K, x + m * K, K, yp + m * ldy, ldy); break;
      default: break;
    }
  }
}

// R consecutive rows of row-major W against one activation row: R accumulators of 16 pair-sums, reduced at the end.
template <int R>
GL_BF16 inline void rows_dot(const uint16_t* w, int64_t K, const uint16_t* x, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + r * K + k), xv);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

GL_BF16 void rows_impl(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M, float* y, int64_t ldy) {
  const int64_t groups = N / 4;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t n = 4 * g;
    float out[4];
    for (int64_t m = 0; m < M; ++m) {  // the 4 rows stay in L1 across m
      rows_dot<4>(w + n * K, K, x + m * K, out);
      std::memcpy(y + m * ldy + n, out, sizeof out);
    }
  }
  for (int64_t n = groups * 4; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) rows_dot<1>(w + n * K, K, x + m * K, y + m * ldy + n);
}

GL_BF16 void cvt_bf16_avx512(const float* x, uint16_t* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(y + i, k, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, x + i)));
  }
}

}  // namespace

void f32_to_bf16_n(const float* x, uint16_t* y, int64_t n) {
  if (bf16_gemv_supported()) {
    cvt_bf16_avx512(x, y, n);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = f32_to_bf16(x[i]);
  }
}

void gemv_bf16_blocked64(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M, float* y, int64_t ldy) {
  if (!bf16_gemv_supported() || N % 64 != 0 || K % 32 != 0 || M < 1 || M > kGemvMaxM)
    throw InternalError("gemv_bf16_blocked64: unsupported CPU or shape");
  blocked64_impl(w, N, K, x, M, y, ldy);
}

void gemv_bf16_rows(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M, float* y, int64_t ldy) {
  if (!bf16_gemv_supported() || K % 32 != 0 || M < 1 || M > kGemvMaxM)
    throw InternalError("gemv_bf16_rows: unsupported CPU or shape");
  rows_impl(w, N, K, x, M, y, ldy);
}

}  // namespace gemmalens::ops
