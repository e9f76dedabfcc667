#include "ops/quant.h"
#include "ops/pages.h"
#include "ops/prefetch.h"
#include "ops/cpu.h"
#include "ops/row_groups.h"
#include "ops/steal.h"
#include "ops/vmath.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>

namespace gemmalens::ops {

int quant_bits(WeightQuant w) { return w == WeightQuant::Int8 ? 8 : w == WeightQuant::Int4 ? 4 : 0; }

// Every CPU class has a kernel (ops/cpu.h, quant_kernel_path()); only the shape limits it.
bool quant_supported(int64_t K) { return K % 64 == 0 && K > 0; }

namespace {
// Round to nearest, ties to even (as std::nearbyint in the default rounding mode) for |x| < 2^22: adding and taking
// away 1.5 * 2^23 leaves the integer part in the float's mantissa. Unlike the nearbyint call, it vectorises: the
// int4 scale search below went from the larger part of an int4 load to a small one.
inline float round_even(float x) {
  // nearbyint in the default rounding mode: half to even, one vroundps. Not the (x + 1.5 * 2^23) - 1.5 * 2^23 trick:
  // GCC fused the caller's product into that add (an FMA rounds the exact product), and an activation whose f32
  // product is a tie (-65.5 from -65.4999989) took the other level than round(x * id) of the f32 product, which is
  // what q8_blocks (tests) and ggml's quantize_row_q8_0 compute.
  return std::nearbyint(x);
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
  // The padding rows of the last tile hold the value 0 (stored 0 + 128, or 8 in both nibbles) with scale 0.
  const int64_t rows = quant_tiles(N) * kQuantTile;
  r.q.assign(static_cast<size_t>(rows * K * bits / 8), static_cast<uint8_t>(bits == 8 ? 128 : 0x88));
  r.d.assign(static_cast<size_t>(rows * (K / 32)), 0.f);
  return r;
}

void quant_rows(QuantWeights& r, const float* w, int64_t r0, int64_t n) {
  const int64_t K = r.K, nb = K / 32, tile_bytes = kQuantTile * K * r.bits / 8;
  float (*const q4)(const float*, int*) = cpu_class() >= CpuClass::Avx512 ? quant_block32_q4_avx512 : quant_block32_q4;
  // rows in contiguous runs per thread: rows of one tile share cache lines (their bytes interleave)
#pragma omp parallel for schedule(static) if (n > 64)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = r0 + i, t = row / kQuantTile, lane = row % kQuantTile;
    uint8_t* dst = r.q.data() + t * tile_bytes + lane * 4;  // the row's 4 bytes of each 64-byte vector
    float* d = r.d.data() + t * nb * kQuantTile + lane;
    const float* src = w + i * K;
    if (r.bits == 8) {
      for (int64_t b = 0; b < nb; ++b) {
        int q[32], sum;
        d[b * kQuantTile] = quant_block32(src + b * 32, -127, 127, q, &sum);
        for (int j = 0; j < 32; ++j) dst[(b * 8 + j / 4) * 64 + j % 4] = static_cast<uint8_t>(q[j] + 128);
      }
    } else {
      for (int64_t p = 0; p < K / 64; ++p) {  // two blocks -> 8 vectors of 64 bytes
        int lo[32], hi[32];
        d[2 * p * kQuantTile] = q4(src + p * 64, lo);
        d[(2 * p + 1) * kQuantTile] = q4(src + p * 64 + 32, hi);
        for (int j = 0; j < 32; ++j)
          dst[p * 512 + (j / 4) * 64 + j % 4] = static_cast<uint8_t>((lo[j] + 8) | ((hi[j] + 8) << 4));
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
  // On AVX2 (the baseline): the row's 4-byte groups sit 64 bytes apart, so one gather of 8 fetches a block of 32
  // values in order; 8 at a time, bytes zero-extended to int32, the offset taken away, times the scale.
  const int64_t K = w.K, nb = K / 32, lane = n % kQuantTile;
  const uint8_t* src = w.q.data() + n / kQuantTile * (kQuantTile * K * w.bits / 8) + lane * 4;
  const float* d = w.d.data() + n / kQuantTile * nb * kQuantTile + lane;
  const __m256i idx = _mm256_setr_epi32(0, 64, 128, 192, 256, 320, 384, 448);
  auto put32 = [](__m256i bytes, int offset, float scale, float* dst) {
    const __m128i halves[2] = {_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1)};
    const __m256 s = _mm256_set1_ps(scale);
    const __m256i off = _mm256_set1_epi32(offset);
    for (int j = 0; j < 4; ++j) {
      const __m128i b8 = j % 2 ? _mm_srli_si128(halves[j / 2], 8) : halves[j / 2];
      const __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(b8), off);
      _mm256_storeu_ps(dst + 8 * j, _mm256_mul_ps(s, _mm256_cvtepi32_ps(v)));
    }
  };
  auto gather = [&idx](const uint8_t* p) { return _mm256_i32gather_epi32(reinterpret_cast<const int*>(p), idx, 1); };
  if (w.bits == 8) {
    for (int64_t b = 0; b < nb; ++b) put32(gather(src + b * 512), 128, d[b * kQuantTile], out + b * 32);
  } else {
    const __m256i m15 = _mm256_set1_epi8(15);
    for (int64_t p = 0; p < K / 64; ++p) {
      const __m256i g = gather(src + p * 512);
      put32(_mm256_and_si256(g, m15), 8, d[2 * p * kQuantTile], out + p * 64);
      put32(_mm256_and_si256(_mm256_srli_epi16(g, 4), m15), 8, d[(2 * p + 1) * kQuantTile], out + p * 64 + 32);
    }
  }
}

namespace {

#define GL_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq")))

// Activation rows quantised per block of 32 (d = max|x| / 127, as the weights' int8): xq [M, K] int8, and per row
// and block its scale dx and corr = -offset * sum(xq of the block). The kernels sum (stored weight) * xq, whose
// stored weight is value + offset (128 for int8 and 8 for int4 on vpdpbusd, 8 for int4 on AVX2; 0 for AVX2's int8,
// which takes the sign apart instead), so corr brings each block's integer dot product back to value * xq.
struct XQ {
  std::vector<int8_t> q;      // [M, K]
  std::vector<int32_t> corr;  // [M, K / 32]
  std::vector<float> dx;      // [M, K / 32]
};

void quantize_x(const float* x, int64_t M, int64_t K, int offset, XQ& o) {
  const int64_t nb = K / 32;
  o.q.resize(static_cast<size_t>(M) * K);
  o.corr.resize(static_cast<size_t>(M) * nb);
  o.dx.resize(static_cast<size_t>(M) * nb);
#pragma omp parallel for if (M * K >= (int64_t{1} << 15))  // a decode step's few rows: one thread (ops/kernels.cpp)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      int q[32], sum;
      o.dx[m * nb + b] = quant_block32(x + m * K + b * 32, -127, 127, q, &sum);
      o.corr[m * nb + b] = -offset * sum;
      int8_t* dst = o.q.data() + m * K + b * 32;
      for (int j = 0; j < 32; ++j) dst[j] = static_cast<int8_t>(q[j]);
    }
}

// The kernels. A tile (16 weight rows) against MB activation rows, block by block (32 values): each of the block's
// 8 weight vectors (4 values of each of the 16 rows) is loaded once and multiplied with 4 int8 values of every
// activation row in turn, broadcast to all lanes; the lanes are the tile's rows, so a row's accumulator ends as its 16
// outputs. Per row and block: the exact integer dot product s (plus corr), then acc = fma(float(s), dw * dx, acc), in
// block order. Every class computes exactly these operations in this order, so all of them give the same bits.

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// vpdpbusd chains per row: a chain's dot products wait on each other (latency ~5 cycles, 2 issue per cycle), so with
// few rows the block's 8 are spread over several accumulators, summed at the end of the block.
template <int MB>
constexpr int kChains = MB <= 2 ? 4 : MB <= 4 ? 2 : 1;

// Weight vector g of block b of a tile as unsigned bytes in the int8 layout (int4: pair b / 2's nibbles).
template <int BITS>
GL_VNNI inline __m512i block_w512(const uint8_t* tile, int64_t b, int g) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(tile + (b * 8 + g) * 64);
  } else {
    const __m512i v = _mm512_loadu_si512(tile + (b / 2) * 512 + g * 64);
    return _mm512_and_si512(b % 2 ? _mm512_srli_epi16(v, 4) : v, _mm512_set1_epi8(15));
  }
}

// The first pass over a tile (its first group of rows) asks for the weight lines ahead of each block it reads
// (prefetch_stream, ops/prefetch.h: tiles are contiguous, so past a tile's end that is the next tile, the thread's
// next in its share). On an Intel Xeon (2026-11-27, real 270M int8 decode at context 128, 2 threads), 2 KB ahead into
// L1 against asking for the same block of the next tile (a whole tile ahead, 10-40 KB) took AVX-512 VNNI from 72-75
// to 79-84 tok/s and AVX2 from 62-64 to 72, and left AVX-VNNI where it was (69-72); 4 KB ahead gave 73, and asking
// for the scales' lines too 77-79. int4 (2 KB = 8 blocks ahead): 96-98 -> 103-105 tok/s on AVX-512 VNNI, 78-81 ->
// 88-92 on AVX2. The lines 4 KB ahead into L2 beside it, alternated builds on the Xeon (2026-11-28, fraction of the
// bandwidth bound as bench:isa computes it): amx 0.77-0.81 -> 0.82-0.87 (86-89 -> 87-96 tok/s), avx512 0.76-0.79 ->
// 0.81, avx2_vnni 0.81 -> 0.85-0.86, avx2 0.77-0.79 -> 0.81-0.82; int4 on amx 0.77 -> 0.79-0.82. 3 and 5-6 KB
// measured alike or less, 8 KB as none; the scales' lines too (4-16 blocks ahead, T0 or T1) no better.

// What every ISA's tile kernel reads for tile t and the activation rows from m0: the tile's weights and scales, where
// to prefetch from (next: the tile's start on the first pass, block b's lines from next + b * 64 * BITS; null after
// it), the rows' int8 values, offset corrections and scales.
struct TileOperands {
  int64_t K, nb;
  const uint8_t* tile;
  const float* dw;
  bool ahead;
  const uint8_t* next;
  const int8_t* x;
  const int32_t* corr;
  const float* dx;
};
template <int BITS>
inline TileOperands tile_operands(const QuantWeights& w, const XQ& xq, int64_t t, int64_t m0) {
  const int64_t K = w.K, nb = K / 32;
  const uint8_t* tile = w.q.data() + t * kQuantTile * K * BITS / 8;
  const bool ahead = m0 == 0;
  return {K, nb, tile, w.d.data() + t * nb * kQuantTile, ahead, ahead ? tile : nullptr,
          xq.q.data() + m0 * K, xq.corr.data() + m0 * nb, xq.dx.data() + m0 * nb};
}

// AVX-512 VNNI: vpdpbusd on zmm, 16 lanes = the whole tile.
template <int MB, int BITS>
GL_VNNI void tile_vnni512(const QuantWeights& w, const XQ& xq, int64_t t, int64_t m0, float* y, int64_t ldy) {
  constexpr int C = kChains<MB>;
  const auto [K, nb, tile, dw, ahead, next, x, corr, dx] = tile_operands<BITS>(w, xq, t, m0);
  __m512 acc[MB];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (ahead) prefetch_stream(next + b * 64 * BITS, BITS);
    __m512i s[MB][C];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      s[i][0] = _mm512_set1_epi32(corr[i * nb + b]);
#pragma GCC unroll 4
      for (int c = 1; c < C; ++c) s[i][c] = _mm512_setzero_si512();
    }
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
      const __m512i wv = block_w512<BITS>(tile, b, g);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i)
        s[i][g % C] = _mm512_dpbusd_epi32(s[i][g % C], wv, _mm512_set1_epi32(load4(x + i * K + b * 32 + 4 * g)));
    }
    const __m512 d = _mm512_loadu_ps(dw + b * kQuantTile);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      __m512i si = s[i][0];
#pragma GCC unroll 4
      for (int c = 1; c < C; ++c) si = _mm512_add_epi32(si, s[i][c]);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), _mm512_mul_ps(d, _mm512_set1_ps(dx[i * nb + b])), acc[i]);
    }
  }
  const int64_t n0 = t * kQuantTile, nn = std::min<int64_t>(kQuantTile, w.N - n0);
  const __mmask16 keep = static_cast<__mmask16>((1u << nn) - 1);
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) _mm512_mask_storeu_ps(y + (m0 + i) * ldy + n0, keep, acc[i]);
}

// Half h of vector g of block b (rows 8h .. 8h + 7: bytes 32h .. 32h + 31), for the ymm kernels; `half` = tile + 32h.
template <int BITS>
inline __m256i block_w256(const uint8_t* half, int64_t b, int g) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half + (b * 8 + g) * 64));
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half + (b / 2) * 512 + g * 64));
    return _mm256_and_si256(b % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
  }
}

// 8 outputs of a row (columns n0 .. n0 + 7, fewer at the end of N).
inline void store8(float* y, __m256 v, int64_t nn) {
  if (nn >= 8) {
    _mm256_storeu_ps(y, v);
  } else if (nn > 0) {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    std::copy(tmp, tmp + nn, y);
  }
}

// AVX-VNNI: the VNNI-512 kernel on ymm, half a tile at a time (16 registers: up to 4 rows of 2 chains).
template <int MB, int BITS>
__attribute__((target("avxvnni"))) void tile_avxvnni(const QuantWeights& w, const XQ& xq, int64_t t, int64_t m0, float* y,
                                                      int64_t ldy) {
  constexpr int C = kChains<MB>;
  const auto [K, nb, tile, dw, ahead, next, x, corr, dx] = tile_operands<BITS>(w, xq, t, m0);
  if constexpr (MB == 1) {  // one row: both halves in one pass (see tile_avx2)
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; ++b) {
      if (ahead) prefetch_stream(next + b * 64 * BITS, BITS);
      __m256i s[2][C];
      for (int h = 0; h < 2; ++h) {
        s[h][0] = _mm256_set1_epi32(corr[b]);
#pragma GCC unroll 4
        for (int c = 1; c < C; ++c) s[h][c] = _mm256_setzero_si256();
      }
#pragma GCC unroll 8
      for (int g = 0; g < 8; ++g) {
        const __m256i xv = _mm256_set1_epi32(load4(x + b * 32 + 4 * g));
        for (int h = 0; h < 2; ++h) s[h][g % C] = _mm256_dpbusd_avx_epi32(s[h][g % C], block_w256<BITS>(tile + 32 * h, b, g), xv);
      }
      for (int h = 0; h < 2; ++h) {
        __m256i si = s[h][0];
#pragma GCC unroll 4
        for (int c = 1; c < C; ++c) si = _mm256_add_epi32(si, s[h][c]);
        const __m256 d = _mm256_loadu_ps(dw + b * kQuantTile + 8 * h);
        acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_mul_ps(d, _mm256_set1_ps(dx[b])), acc[h]);
      }
    }
    for (int h = 0; h < 2 && t * kQuantTile + 8 * h < w.N; ++h)
      store8(y + m0 * ldy + t * kQuantTile + 8 * h, acc[h], w.N - (t * kQuantTile + 8 * h));
    return;
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t n0 = t * kQuantTile + 8 * h;
    if (n0 >= w.N) break;
    __m256 acc[MB];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      if (ahead && h == 0) prefetch_stream(next + b * 64 * BITS, BITS);  // both halves read the same cache lines
      __m256i s[MB][C];
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        s[i][0] = _mm256_set1_epi32(corr[i * nb + b]);
#pragma GCC unroll 4
        for (int c = 1; c < C; ++c) s[i][c] = _mm256_setzero_si256();
      }
#pragma GCC unroll 8
      for (int g = 0; g < 8; ++g) {
        const __m256i wv = block_w256<BITS>(tile + 32 * h, b, g);
#pragma GCC unroll 8
        for (int i = 0; i < MB; ++i)
          s[i][g % C] = _mm256_dpbusd_avx_epi32(s[i][g % C], wv, _mm256_set1_epi32(load4(x + i * K + b * 32 + 4 * g)));
      }
      const __m256 d = _mm256_loadu_ps(dw + b * kQuantTile + 8 * h);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        __m256i si = s[i][0];
#pragma GCC unroll 4
        for (int c = 1; c < C; ++c) si = _mm256_add_epi32(si, s[i][c]);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_mul_ps(d, _mm256_set1_ps(dx[i * nb + b])), acc[i]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) store8(y + (m0 + i) * ldy + n0, acc[i], w.N - n0);
  }
}

// AVX2: vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16 with saturation, then vpmaddwd by
// ones adds the pairs into the int32 lanes vpdpbusd fills. int8 weights go in as |q| against the activations
// carrying q's sign (|q| * x <= 127 * 127: a pair stays below 32767). int4 weights go in as q + 8 <= 15: a pair is at
// most 2 * 15 * 127, so the block's 8 vectors add up in int16 (at most 8 * 3810 = 30480) before one vpmaddwd per
// block, and corr takes the offset away.
template <int MB, int BITS>
__attribute__((noinline)) void tile_avx2(const QuantWeights& w, const XQ& xq, int64_t t, int64_t m0, float* y, int64_t ldy) {
  const auto [K, nb, tile, dw, ahead, next, x, corr, dx] = tile_operands<BITS>(w, xq, t, m0);
  const __m256i ones16 = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  if constexpr (MB == 1) {
    // One row (a decode step): both halves of each 64-byte vector in one pass, so a line is used whole when it
    // arrives and the loads from memory overlap all of the arithmetic (two passes left the second one without any).
    // The same operations in the same order per half: the same bits. Real 270M int8 decode at context 128 on an Intel
    // Xeon (2 threads, 2026-11-27): 79.4-80.5 -> 83.1-84.1 tok/s forced to avx2, 83.8-85.1 -> 86.2-86.8 on avx2_vnni.
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; ++b) {
      if (ahead) prefetch_stream(next + b * 64 * BITS, BITS);
      __m256i s[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 2
      for (int g = 0; g < 8; ++g) {
        const __m256i x4 = _mm256_set1_epi32(load4(x + b * 32 + 4 * g));
        for (int h = 0; h < 2; ++h) {
          const __m256i wv = block_w256<BITS>(tile + 32 * h, b, g);
          if constexpr (BITS == 8) {
            const __m256i sq = _mm256_xor_si256(wv, flip);
            s[h] = _mm256_add_epi32(s[h], _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(sq), _mm256_sign_epi8(x4, sq)), ones16));
          } else {
            s[h] = _mm256_add_epi16(s[h], _mm256_maddubs_epi16(wv, x4));
          }
        }
      }
      for (int h = 0; h < 2; ++h) {
        __m256i si = s[h];
        if constexpr (BITS == 4) si = _mm256_add_epi32(_mm256_madd_epi16(si, ones16), _mm256_set1_epi32(corr[b]));
        const __m256 d = _mm256_loadu_ps(dw + b * kQuantTile + 8 * h);
        acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_mul_ps(d, _mm256_set1_ps(dx[b])), acc[h]);
      }
    }
    for (int h = 0; h < 2 && t * kQuantTile + 8 * h < w.N; ++h)
      store8(y + m0 * ldy + t * kQuantTile + 8 * h, acc[h], w.N - (t * kQuantTile + 8 * h));
    return;
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t n0 = t * kQuantTile + 8 * h;
    if (n0 >= w.N) break;
    __m256 acc[MB];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      if (ahead && h == 0) prefetch_stream(next + b * 64 * BITS, BITS);
      __m256i s[MB];  // int8: int32 lanes; int4: int16 pairs until the end of the block
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) s[i] = _mm256_setzero_si256();
#pragma GCC unroll 1  // rolled: unrolled, GCC spilled the accumulators (16 ymm registers)
      for (int g = 0; g < 8; ++g) {
        const __m256i wv = block_w256<BITS>(tile + 32 * h, b, g);
        if constexpr (BITS == 8) {
          const __m256i sq = _mm256_xor_si256(wv, flip), aq = _mm256_abs_epi8(sq);
#pragma GCC unroll 8
          for (int i = 0; i < MB; ++i) {
            const __m256i xv = _mm256_sign_epi8(_mm256_set1_epi32(load4(x + i * K + b * 32 + 4 * g)), sq);
            s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(_mm256_maddubs_epi16(aq, xv), ones16));
          }
        } else {
#pragma GCC unroll 8
          for (int i = 0; i < MB; ++i)
            s[i] = _mm256_add_epi16(s[i], _mm256_maddubs_epi16(wv, _mm256_set1_epi32(load4(x + i * K + b * 32 + 4 * g))));
        }
      }
      const __m256 d = _mm256_loadu_ps(dw + b * kQuantTile + 8 * h);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        __m256i si = s[i];
        if constexpr (BITS == 4) si = _mm256_add_epi32(_mm256_madd_epi16(si, ones16), _mm256_set1_epi32(corr[i * nb + b]));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_mul_ps(d, _mm256_set1_ps(dx[i * nb + b])), acc[i]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) store8(y + (m0 + i) * ldy + n0, acc[i], w.N - n0);
  }
}

// Each tile meets every activation row (in groups of 8 on zmm, 4 on ymm) while it sits in L1/L2, so a step reads
// the weights from memory once, whatever the rows.
template <int BITS>
void matmul_bits(const QuantWeights& w, const XQ& xq, int64_t M, float* y, int64_t ldy) {
  const int64_t tiles = quant_tiles(w.N);
  const QuantKernelPath path = quant_kernel_path();
  parallel_steal(tiles, [&](int64_t t) {
    switch (path) {
      case QuantKernelPath::Vnni512:
        row_groups<8>(M, [&](auto mb, int64_t m) { tile_vnni512<decltype(mb)::value, BITS>(w, xq, t, m, y, ldy); });
        break;
      case QuantKernelPath::AvxVnni:
        row_groups<4>(M, [&](auto mb, int64_t m) { tile_avxvnni<decltype(mb)::value, BITS>(w, xq, t, m, y, ldy); });
        break;
      case QuantKernelPath::Avx2Maddubs:
        row_groups<4>(M, [&](auto mb, int64_t m) { tile_avx2<decltype(mb)::value, BITS>(w, xq, t, m, y, ldy); });
        break;
    }
  });
}

}  // namespace

void quant_matmul(const QuantWeights& w, const float* x, int64_t M, float* y, int64_t ldy) {
  if (!quant_supported(w.K)) throw InternalError("quantised weights need K % 64 == 0");
  // the stored weights' offset, taken away through corr (AVX2's int8 kernel takes the sign apart: none)
  const int offset = w.bits == 4 ? 8 : quant_kernel_path() == QuantKernelPath::Avx2Maddubs ? 0 : 128;
  thread_local XQ xq;
  quantize_x(x, M, w.K, offset, xq);
  if (w.bits == 8)
    matmul_bits<8>(w, xq, M, y, ldy);
  else
    matmul_bits<4>(w, xq, M, y, ldy);
}

}  // namespace gemmalens::ops
