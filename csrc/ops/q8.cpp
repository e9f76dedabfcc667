#include "ops/q8.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace gemmalens::ops {

bool q8_supported(int64_t K) {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return cpu && K % 64 == 0 && K > 0;
}

namespace {
// One block of 32: d = max|x| / 127, q = round(x / d) in [-127, 127]; returns d and the sum of q.
inline float quant_block32(const float* src, int* q, int* sum) {
  float amax = 0.f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(src[j]));
  const float d = amax / 127.f;
  const float id = d > 0.f ? 1.f / d : 0.f;
  int s = 0;
  for (int j = 0; j < 32; ++j) {
    q[j] = std::min(127, std::max(-127, static_cast<int>(std::nearbyint(src[j] * id))));
    s += q[j];
  }
  *sum = s;
  return d;
}
}  // namespace

Q8Weights q8_alloc(int64_t N, int64_t K) {
  if (K % 64 != 0) throw std::runtime_error("q8_quantize: K must be a multiple of 64");
  Q8Weights r;
  r.N = N;
  r.K = K;
  r.q.resize(static_cast<size_t>(N) * K);
  r.d.resize(static_cast<size_t>(N) * (K / 32));
  return r;
}

void q8_quantize_rows(Q8Weights& r, const float* w, int64_t r0, int64_t n) {
  const int64_t K = r.K;
#pragma omp parallel for if (n > 64)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t b = 0; b < K / 32; ++b) {
      int q[32], sum;
      r.d[(r0 + i) * (K / 32) + b] = quant_block32(w + i * K + b * 32, q, &sum);
      uint8_t* dst = r.q.data() + (r0 + i) * K + b * 32;
      for (int j = 0; j < 32; ++j) dst[j] = static_cast<uint8_t>(q[j] + 128);
    }
}

Q8Weights q8_quantize(const float* w, int64_t N, int64_t K) {
  Q8Weights r = q8_alloc(N, K);
  q8_quantize_rows(r, w, 0, N);
  return r;
}

void q8_row(const Q8Weights& w, int64_t n, float* out) {
  for (int64_t b = 0; b < w.K / 32; ++b) {
    const float d = w.d[n * (w.K / 32) + b];
    const uint8_t* q = w.q.data() + n * w.K + b * 32;
    for (int j = 0; j < 32; ++j) out[b * 32 + j] = d * static_cast<float>(static_cast<int>(q[j]) - 128);
  }
}

namespace {

#define GL_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq")))

// Activation rows quantised: xq [M, K] int8, per pair of blocks (64 values) the lane vectors the kernel needs:
// corr = 16 * sum(xq of the block) in the 8 lanes of each block (vpdpbusd sums (q + 128) * x: the 128 * sum(x)
// spread over 8 lanes), and dx = the two block scales, 8 lanes each.
struct XQ {
  std::vector<int8_t> q;
  std::vector<int32_t> corr;  // [M, K/64, 16]
  std::vector<float> dx;      // [M, K/64, 16]
};

void quantize_x(const float* x, int64_t M, int64_t K, XQ& o) {
  const int64_t P = K / 64;
  o.q.resize(static_cast<size_t>(M) * K);
  o.corr.resize(static_cast<size_t>(M) * P * 16);
  o.dx.resize(static_cast<size_t>(M) * P * 16);
#pragma omp parallel for if (M > 4)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K / 32; ++b) {
      int q[32], sum;
      const float d = quant_block32(x + m * K + b * 32, q, &sum);
      int8_t* dst = o.q.data() + m * K + b * 32;
      for (int j = 0; j < 32; ++j) dst[j] = static_cast<int8_t>(q[j]);
      const int64_t p = b / 2, half = (b % 2) * 8;
      for (int l = 0; l < 8; ++l) {
        o.corr[(m * P + p) * 16 + half + l] = 16 * sum;
        o.dx[(m * P + p) * 16 + half + l] = d;
      }
    }
}

template <int MB>
GL_VNNI void kernel(const Q8Weights& w, const XQ& xq, int64_t m0, float* y, int64_t ldy) {
  const int64_t K = w.K, P = K / 64, N = w.N;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    __m512 acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
    const uint8_t* wq = w.q.data() + n * K;
    const float* wd = w.d.data() + n * (K / 32);
    for (int64_t p = 0; p < P; ++p) {
      const __m512i wv = _mm512_loadu_si512(wq + p * 64);
      const __m512 dw = _mm512_insertf32x8(_mm512_set1_ps(wd[2 * p]), _mm256_set1_ps(wd[2 * p + 1]), 1);
      for (int i = 0; i < MB; ++i) {
        const int64_t m = m0 + i;
        const __m512i xv = _mm512_loadu_si512(xq.q.data() + m * K + p * 64);
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
        dot = _mm512_sub_epi32(dot, _mm512_loadu_si512(xq.corr.data() + (m * P + p) * 16));
        const __m512 s = _mm512_mul_ps(dw, _mm512_loadu_ps(xq.dx.data() + (m * P + p) * 16));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[i]);
      }
    }
    for (int i = 0; i < MB; ++i) y[(m0 + i) * ldy + n] = _mm512_reduce_add_ps(acc[i]);
  }
}

}  // namespace

void q8_matmul(const Q8Weights& w, const float* x, int64_t M, float* y, int64_t ldy) {
  if (!q8_supported(w.K)) throw std::runtime_error("int8 weights need AVX-512 VNNI and K % 64 == 0");
  thread_local XQ xq;
  quantize_x(x, M, w.K, xq);
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) kernel<8>(w, xq, m, y, ldy);
  for (; m + 4 <= M; m += 4) kernel<4>(w, xq, m, y, ldy);
  for (; m < M; ++m) kernel<1>(w, xq, m, y, ldy);
}

}  // namespace gemmalens::ops
