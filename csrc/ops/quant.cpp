#include "ops/quant.h"
#include "ops/cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace gemmalens::ops {

int quant_bits(WeightQuant w) { return w == WeightQuant::Int8 ? 8 : w == WeightQuant::Int4 ? 4 : 0; }

// Every CPU class has a kernel (ops/cpu.h, quant_kernel_path()); only the shape limits it.
bool quant_supported(int64_t K) { return K % 64 == 0 && K > 0; }

namespace {
// Round to nearest, ties to even (as std::nearbyint in the default rounding mode) for |x| < 2^22: adding and taking
// away 1.5 * 2^23 leaves the integer part in the float's mantissa. Unlike the nearbyint call, it vectorises: the
// int4 scale search below went from the larger part of an int4 load to a small one.
inline float round_even(float x) {
  constexpr float m = 12582912.f;  // not folded: without -ffast-math (x + m) - m is not x to the compiler either
  return (x + m) - m;
}

// One block of 32 at `qmax` (127 or 7): d = max|x| / qmax, q = round(x / d) clamped to [qmin, qmax]; returns d
// and the sum of q.
inline float quant_block32(const float* src, int qmin, int qmax, int* q, int* sum) {
  float amax = 0.f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(src[j]));
  const float d = amax / static_cast<float>(qmax);
  const float id = d > 0.f ? 1.f / d : 0.f;
  int s = 0;
  for (int j = 0; j < 32; ++j) {
    q[j] = std::min(qmax, std::max(qmin, static_cast<int>(round_even(src[j] * id))));
    s += q[j];
  }
  *sum = s;
  return d;
}
// A 4-bit block: the scale that minimises the squared error among d = v / t for the block's extreme value v (signed,
// so it can take the extra negative level -8) and t in [-8, -6.5] u [6.5, 7.75] (a small grid in the spirit of ggml's
// make_qx_quants), q = round(x / d) clamped to [-8, 7]. Returns d.
// Written with intrinsics, AVX2 (the build's baseline) and AVX-512: the compiler's version of the same loops kept the
// maximum search and the error sums scalar, and int4 loads spent most of their time here (1b: 2.5 s of 4.3). Both
// sum each candidate's squared errors in the same order ((e_j + e_j+16) + (e_j+8 + e_j+24), then lanes pairwise), so
// every CPU class picks the same scales.
constexpr int kQ4Steps = 13;
inline float q4_t(int step) { return step <= 6 ? -8.f + 0.25f * step : 6.5f + 0.25f * (step - 7); }  // -8..-6.5, 6.5..7.75
inline float q4_vmax(const float* src, float amax) {  // the first value of the largest magnitude, with its sign
  for (int j = 0; j < 32; ++j)
    if (std::fabs(src[j]) == amax) return src[j];
  return 0.f;
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
float quant_block32_q4(const float* src, int* q) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 x[4], m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    x[i] = _mm256_loadu_ps(src + 8 * i);
    m = _mm256_max_ps(_mm256_andnot_ps(sign, x[i]), m);  // a NaN in x yields m (the second operand): ignored
  }
  const float amax = hmax8(m);
  if (!(amax > 0.f)) {
    for (int j = 0; j < 32; ++j) q[j] = 0;
    return 0.f;
  }
  const float vmax = q4_vmax(src, amax);
  const __m256 lo = _mm256_set1_ps(-8.f), hi = _mm256_set1_ps(7.f);
  auto residual = [&](__m256 xi, __m256 vd, __m256 vid) {
    __m256 qv = _mm256_round_ps(_mm256_mul_ps(xi, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_fnmadd_ps(vd, _mm256_min_ps(_mm256_max_ps(qv, lo), hi), xi);
  };
  float best_d = 0.f, best_err = INFINITY;
  for (int step = 0; step < kQ4Steps; ++step) {
    const float d = vmax / q4_t(step), id = 1.f / d;
    const __m256 vd = _mm256_set1_ps(d), vid = _mm256_set1_ps(id);
    const __m256 r0 = residual(x[0], vd, vid), r1 = residual(x[1], vd, vid), r2 = residual(x[2], vd, vid),
                 r3 = residual(x[3], vd, vid);
    const float e = hsum8(_mm256_add_ps(_mm256_fmadd_ps(r2, r2, _mm256_mul_ps(r0, r0)),
                                        _mm256_fmadd_ps(r3, r3, _mm256_mul_ps(r1, r1))));
    if (e < best_err) {
      best_err = e;
      best_d = d;
    }
  }
  const __m256 vid = _mm256_set1_ps(1.f / best_d);
  for (int i = 0; i < 4; ++i) {
    const __m256 qv = _mm256_round_ps(_mm256_mul_ps(x[i], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 8 * i), _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(qv, lo), hi)));
  }
  return best_d;
}
#define GL_AVX512F __attribute__((target("avx512f,avx512dq")))
GL_AVX512F inline __m512 q4_levels512(__m512 x, __m512 id, __m512 lo, __m512 hi) {  // round(x / d) clamped to [-8, 7]
  return _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(x, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
}
GL_AVX512F inline __m512 q4_residual512(__m512 x, __m512 d, __m512 id, __m512 lo, __m512 hi) {
  return _mm512_fnmadd_ps(d, q4_levels512(x, id, lo, hi), x);
}
GL_AVX512F float quant_block32_q4_avx512(const float* src, int* q) {
  const __m512 x0 = _mm512_loadu_ps(src), x1 = _mm512_loadu_ps(src + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x1), _mm512_abs_ps(x0)));
  if (!(amax > 0.f)) {
    for (int j = 0; j < 32; ++j) q[j] = 0;
    return 0.f;
  }
  const float vmax = q4_vmax(src, amax);
  const __m512 lo = _mm512_set1_ps(-8.f), hi = _mm512_set1_ps(7.f);
  float best_d = 0.f, best_err = INFINITY;
  for (int step = 0; step < kQ4Steps; ++step) {
    const float d = vmax / q4_t(step), id = 1.f / d;
    const __m512 vd = _mm512_set1_ps(d), vid = _mm512_set1_ps(id);
    const __m512 r0 = q4_residual512(x0, vd, vid, lo, hi), r1 = q4_residual512(x1, vd, vid, lo, hi);
    const __m512 e16 = _mm512_fmadd_ps(r1, r1, _mm512_mul_ps(r0, r0));  // lanes 0-7 as AVX2's first half, 8-15 its second
    const float e = hsum8(_mm256_add_ps(_mm512_castps512_ps256(e16), _mm512_extractf32x8_ps(e16, 1)));
    if (e < best_err) {
      best_err = e;
      best_d = d;
    }
  }
  const __m512 vid = _mm512_set1_ps(1.f / best_d);
  _mm512_storeu_si512(q, _mm512_cvtps_epi32(q4_levels512(x0, vid, lo, hi)));
  _mm512_storeu_si512(q + 16, _mm512_cvtps_epi32(q4_levels512(x1, vid, lo, hi)));
  return best_d;
}
}  // namespace

QuantWeights quant_alloc(int64_t N, int64_t K, int bits) {
  if (K % 64 != 0) throw InternalError("quantised weights: K must be a multiple of 64");
  if (bits != 8 && bits != 4) throw InternalError("quantised weights: bits must be 8 or 4");
  QuantWeights r;
  r.N = N;
  r.K = K;
  r.bits = bits;
  r.q.resize(static_cast<size_t>(N) * K * bits / 8);
  r.d.resize(static_cast<size_t>(N) * (K / 32));
  return r;
}

void quant_rows(QuantWeights& r, const float* w, int64_t r0, int64_t n) {
  const int64_t K = r.K, row_bytes = K * r.bits / 8;
  float (*const q4)(const float*, int*) = cpu_class() >= CpuClass::Avx512 ? quant_block32_q4_avx512 : quant_block32_q4;
#pragma omp parallel for if (n > 64)
  for (int64_t i = 0; i < n; ++i) {
    uint8_t* dst = r.q.data() + (r0 + i) * row_bytes;
    float* d = r.d.data() + (r0 + i) * (K / 32);
    const float* src = w + i * K;
    if (r.bits == 8) {
      for (int64_t b = 0; b < K / 32; ++b) {
        int q[32], sum;
        d[b] = quant_block32(src + b * 32, -127, 127, q, &sum);
        for (int j = 0; j < 32; ++j) dst[b * 32 + j] = static_cast<uint8_t>(q[j] + 128);
      }
    } else {
      for (int64_t p = 0; p < K / 64; ++p) {  // two blocks -> 32 bytes
        int lo[32], hi[32];
        d[2 * p] = q4(src + p * 64, lo);
        d[2 * p + 1] = q4(src + p * 64 + 32, hi);
        for (int j = 0; j < 32; ++j) dst[p * 32 + j] = static_cast<uint8_t>((lo[j] + 8) | ((hi[j] + 8) << 4));
      }
    }
  }
}

QuantWeights quant_weights(const float* w, int64_t N, int64_t K, int bits) {
  QuantWeights r = quant_alloc(N, K, bits);
  quant_rows(r, w, 0, N);
  return r;
}

void quant_row(const QuantWeights& w, int64_t n, float* out) {
  // 8 values at a time on AVX2 (the baseline): bytes zero-extended to int32, the offset taken away, times the scale.
  const int64_t K = w.K;
  const float* d = w.d.data() + n * (K / 32);
  auto put8 = [](const __m128i bytes8, int offset, float scale, float* dst) {
    const __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes8), _mm256_set1_epi32(offset));
    _mm256_storeu_ps(dst, _mm256_mul_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(v)));
  };
  if (w.bits == 8) {
    const uint8_t* q = w.q.data() + n * K;
    for (int64_t k = 0; k < K; k += 8) put8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k)), 128, d[k / 32], out + k);
  } else {
    const uint8_t* q = w.q.data() + n * (K / 2);
    const __m128i m15 = _mm_set1_epi8(15);
    for (int64_t p = 0; p < K / 64; ++p)
      for (int j = 0; j < 32; j += 8) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + p * 32 + j));
        put8(_mm_and_si128(b, m15), 8, d[2 * p], out + p * 64 + j);
        put8(_mm_and_si128(_mm_srli_epi16(b, 4), m15), 8, d[2 * p + 1], out + p * 64 + 32 + j);
      }
  }
}

namespace {

#define GL_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq")))

// Activation rows quantised: xq [M, K] int8, per pair of blocks (64 values) the lane vectors the kernel needs:
// sum = sum(xq of the block) in the 8 lanes of each block (vpdpbusd sums (q + offset) * x, offset 128 for int8
// weights and 8 for int4: the kernel subtracts offset * sum spread over 8 lanes, i.e. (offset / 8) * sum per lane),
// and dx = the two block scales, 8 lanes each.
struct XQ {
  std::vector<int8_t> q;
  std::vector<int32_t> sum;  // [M, K/64, 16]
  std::vector<float> dx;     // [M, K/64, 16]
};

void quantize_x(const float* x, int64_t M, int64_t K, XQ& o) {
  const int64_t P = K / 64;
  o.q.resize(static_cast<size_t>(M) * K);
  o.sum.resize(static_cast<size_t>(M) * P * 16);
  o.dx.resize(static_cast<size_t>(M) * P * 16);
#pragma omp parallel for if (M > 4)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K / 32; ++b) {
      int q[32], sum;
      const float d = quant_block32(x + m * K + b * 32, -127, 127, q, &sum);
      int8_t* dst = o.q.data() + m * K + b * 32;
      for (int j = 0; j < 32; ++j) dst[j] = static_cast<int8_t>(q[j]);
      const int64_t p = b / 2, half = (b % 2) * 8;
      for (int l = 0; l < 8; ++l) {
        o.sum[(m * P + p) * 16 + half + l] = sum;
        o.dx[(m * P + p) * 16 + half + l] = d;
      }
    }
}

// The 64 unsigned weight bytes (value + offset) of pair-of-blocks p in row n.
template <int BITS>
GL_VNNI inline __m512i load_w(const uint8_t* row, int64_t p) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(row + p * 64);
  } else {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p * 32));
    const __m256i m = _mm256_set1_epi8(15);
    const __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
}

// Weight row n against MB activation rows from m0: y[m0 + i, n].
template <int MB, int BITS>
GL_VNNI inline void row_kernel(const QuantWeights& w, const XQ& xq, int64_t n, int64_t m0, float* y, int64_t ldy) {
  const int64_t K = w.K, P = K / 64, row_bytes = K * BITS / 8;
  constexpr int kShift = BITS == 8 ? 4 : 0;  // offset / 8 lanes: 128 / 8 = 16 = 1 << 4; 8 / 8 = 1
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  const uint8_t* wq = w.q.data() + n * row_bytes;
  const float* wd = w.d.data() + n * (K / 32);
  for (int64_t p = 0; p < P; ++p) {
    const __m512i wv = load_w<BITS>(wq, p);
    const __m512 dw = _mm512_insertf32x8(_mm512_set1_ps(wd[2 * p]), _mm256_set1_ps(wd[2 * p + 1]), 1);
    for (int i = 0; i < MB; ++i) {
      const int64_t m = m0 + i;
      const __m512i xv = _mm512_loadu_si512(xq.q.data() + m * K + p * 64);
      __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
      dot = _mm512_sub_epi32(dot, _mm512_slli_epi32(_mm512_loadu_si512(xq.sum.data() + (m * P + p) * 16), kShift));
      const __m512 s = _mm512_mul_ps(dw, _mm512_loadu_ps(xq.dx.data() + (m * P + p) * 16));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[i]);
    }
  }
  for (int i = 0; i < MB; ++i) y[(m0 + i) * ldy + n] = _mm512_reduce_add_ps(acc[i]);
}

// Weight rows [n0, n1) against MB activation rows from m0, one kernel per CPU class.
template <int MB, int BITS>
GL_VNNI void rows_vnni512(const QuantWeights& w, const XQ& xq, int64_t n0, int64_t n1, int64_t m0, float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) row_kernel<MB, BITS>(w, xq, n, m0, y, ldy);
}

// The sum of 8 lanes in the order _mm512_reduce_add_ps adds a zmm's halves (lo + hi, then 4, 2, 1 lanes), so the
// AVX-VNNI kernel, whose lanes hold the VNNI-512 kernel's values, gives its results bit for bit.
inline float hsum_like512(__m256 lo, __m256 hi) {
  const __m256 t3 = _mm256_add_ps(hi, lo);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, _MM_SHUFFLE(0, 0, 0, 1)));
}

// The two blocks (32 weights each) of pair p as unsigned bytes, value + offset (128 for int8, 8 for int4).
template <int BITS>
inline void load_w256(const uint8_t* row, int64_t p, __m256i& b0, __m256i& b1) {
  if constexpr (BITS == 8) {
    b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p * 64));
    b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p * 64 + 32));
  } else {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p * 32)), m = _mm256_set1_epi8(15);
    b0 = _mm256_and_si256(b, m);
    b1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
  }
}

// AVX-VNNI: the VNNI-512 kernel on ymm, a block per register (lanes 0-7 of the zmm in lo, 8-15 in hi).
template <int MB, int BITS>
__attribute__((target("avxvnni"))) void rows_avxvnni(const QuantWeights& w, const XQ& xq, int64_t n0, int64_t n1, int64_t m0,
                                                      float* y, int64_t ldy) {
  const int64_t K = w.K, P = K / 64, row_bytes = K * BITS / 8;
  constexpr int kShift = BITS == 8 ? 4 : 0;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 lo[MB], hi[MB];
    for (int i = 0; i < MB; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
    const uint8_t* wq = w.q.data() + n * row_bytes;
    const float* wd = w.d.data() + n * (K / 32);
    for (int64_t p = 0; p < P; ++p) {
      __m256i w0, w1;
      load_w256<BITS>(wq, p, w0, w1);
      const __m256 d0 = _mm256_set1_ps(wd[2 * p]), d1 = _mm256_set1_ps(wd[2 * p + 1]);
      for (int i = 0; i < MB; ++i) {
        const int64_t m = m0 + i;
        const int8_t* xv = xq.q.data() + m * K + p * 64;
        const int32_t* sum = xq.sum.data() + (m * P + p) * 16;
        const float* dx = xq.dx.data() + (m * P + p) * 16;
        __m256i t0 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xv)));
        __m256i t1 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xv + 32)));
        t0 = _mm256_sub_epi32(t0, _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sum)), kShift));
        t1 = _mm256_sub_epi32(t1, _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sum + 8)), kShift));
        lo[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t0), _mm256_mul_ps(d0, _mm256_loadu_ps(dx)), lo[i]);
        hi[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t1), _mm256_mul_ps(d1, _mm256_loadu_ps(dx + 8)), hi[i]);
      }
    }
    for (int i = 0; i < MB; ++i) y[(m0 + i) * ldy + n] = hsum_like512(lo[i], hi[i]);
  }
}

// AVX2: vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16 with saturation, so the int8
// weights go in as |q| against the activations carrying q's sign (|q| * x <= 127 * 127: a pair stays below 32767);
// int4 weights go in as q + 8 <= 15 (a pair <= 2 * 15 * 127) with the offset taken away as in the VNNI kernel.
// vpmaddwd by ones adds the int16 pairs into the same 8 int32 lanes (4 bytes each) vpdpbusd fills.
template <int MB, int BITS>
void rows_avx2(const QuantWeights& w, const XQ& xq, int64_t n0, int64_t n1, int64_t m0, float* y, int64_t ldy) {
  const int64_t K = w.K, P = K / 64, row_bytes = K * BITS / 8;
  const __m256i ones16 = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t n = n0; n < n1; ++n) {
    __m256 lo[MB], hi[MB];
    for (int i = 0; i < MB; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
    const uint8_t* wq = w.q.data() + n * row_bytes;
    const float* wd = w.d.data() + n * (K / 32);
    for (int64_t p = 0; p < P; ++p) {
      __m256i w0, w1;
      load_w256<BITS>(wq, p, w0, w1);
      __m256i s0 = w0, s1 = w1;  // int8: the signed values q (stored q + 128); int4: unused
      if constexpr (BITS == 8) {
        s0 = _mm256_xor_si256(w0, flip);
        s1 = _mm256_xor_si256(w1, flip);
        w0 = _mm256_abs_epi8(s0);
        w1 = _mm256_abs_epi8(s1);
      }
      const __m256 d0 = _mm256_set1_ps(wd[2 * p]), d1 = _mm256_set1_ps(wd[2 * p + 1]);
      for (int i = 0; i < MB; ++i) {
        const int64_t m = m0 + i;
        const int8_t* xv = xq.q.data() + m * K + p * 64;
        const float* dx = xq.dx.data() + (m * P + p) * 16;
        __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xv)),
                x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xv + 32));
        if constexpr (BITS == 8) {
          x0 = _mm256_sign_epi8(x0, s0);
          x1 = _mm256_sign_epi8(x1, s1);
        }
        __m256i t0 = _mm256_madd_epi16(_mm256_maddubs_epi16(w0, x0), ones16);
        __m256i t1 = _mm256_madd_epi16(_mm256_maddubs_epi16(w1, x1), ones16);
        if constexpr (BITS == 4) {
          const int32_t* sum = xq.sum.data() + (m * P + p) * 16;
          t0 = _mm256_sub_epi32(t0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sum)));
          t1 = _mm256_sub_epi32(t1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sum + 8)));
        }
        lo[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t0), _mm256_mul_ps(d0, _mm256_loadu_ps(dx)), lo[i]);
        hi[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t1), _mm256_mul_ps(d1, _mm256_loadu_ps(dx + 8)), hi[i]);
      }
    }
    for (int i = 0; i < MB; ++i) y[(m0 + i) * ldy + n] = hsum_like512(lo[i], hi[i]);
  }
}

// Blocks of kRowsPerBlock weight rows in parallel; each block meets every activation row (in groups of 8 / 4 / 1)
// while it sits in L1/L2, so a prefill reads the weights from memory once instead of once per group of rows.
constexpr int64_t kRowsPerBlock = 16;

template <int BITS>
void matmul_bits(const QuantWeights& w, const XQ& xq, int64_t M, float* y, int64_t ldy) {
  const int64_t N = w.N, nblocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  const QuantKernelPath path = quant_kernel_path();
#pragma omp parallel for schedule(static)
  for (int64_t nb = 0; nb < nblocks; ++nb) {
    const int64_t n0 = nb * kRowsPerBlock, n1 = std::min(N, n0 + kRowsPerBlock);
    int64_t m = 0;
    switch (path) {
      case QuantKernelPath::Vnni512:
        for (; m + 8 <= M; m += 8) rows_vnni512<8, BITS>(w, xq, n0, n1, m, y, ldy);
        for (; m + 4 <= M; m += 4) rows_vnni512<4, BITS>(w, xq, n0, n1, m, y, ldy);
        for (; m < M; ++m) rows_vnni512<1, BITS>(w, xq, n0, n1, m, y, ldy);
        break;
      case QuantKernelPath::AvxVnni:  // 16 ymm registers: groups of 4 rows (8 accumulators)
        for (; m + 4 <= M; m += 4) rows_avxvnni<4, BITS>(w, xq, n0, n1, m, y, ldy);
        for (; m < M; ++m) rows_avxvnni<1, BITS>(w, xq, n0, n1, m, y, ldy);
        break;
      case QuantKernelPath::Avx2Maddubs:
        for (; m + 4 <= M; m += 4) rows_avx2<4, BITS>(w, xq, n0, n1, m, y, ldy);
        for (; m < M; ++m) rows_avx2<1, BITS>(w, xq, n0, n1, m, y, ldy);
        break;
    }
  }
}

}  // namespace

void quant_matmul(const QuantWeights& w, const float* x, int64_t M, float* y, int64_t ldy) {
  if (!quant_supported(w.K)) throw InternalError("quantised weights need K % 64 == 0");
  thread_local XQ xq;
  quantize_x(x, M, w.K, xq);
  if (w.bits == 8)
    matmul_bits<8>(w, xq, M, y, ldy);
  else
    matmul_bits<4>(w, xq, M, y, ldy);
}

}  // namespace gemmalens::ops
