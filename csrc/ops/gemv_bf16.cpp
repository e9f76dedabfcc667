#include "ops/gemv_bf16.h"

#include "common.h"
#include "ops/cpu.h"
#include "ops/prefetch.h"
#include "ops/vmath.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace gemmalens::ops {

namespace {

#define GL_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))
#define GL_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
// AVX2 + FMA is the build's baseline (-march=x86-64-v3): those kernels need no attribute.

// ---------------------------------------------------------------------------------------------------------------
// vdpbf16ps (class avx512_bf16 and amx)

GL_BF16 inline __m512i pair_broadcast(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// The panel kernels below stream each panel once (a decode step's weights come from memory) and ask for the lines
// ahead of the ones they load (prefetch_stream, ops/prefetch.h; past a panel's end that is the next panel, the
// thread's next under schedule(static)). On an Intel Xeon (2026-11-27, 2 threads) a vdpbf16ps gemv over the 335 MB
// LM head went from 22 to 30-31 GB/s with the lines 2 KB ahead into L1 (1-3 KB measured alike; 4 KB and more less).
// The lines 4 KB ahead into L2 beside it, alternated builds on the Xeon (2026-11-28, real 270M bf16 decode at context
// 128, fraction of the bandwidth bound as bench:isa computes it): amx 0.87-0.90 -> 0.89-0.94 (53-54 -> 56-58 tok/s),
// avx512 0.87 -> 0.91, avx2 0.83-0.85 -> 0.84-0.85; 3 KB measured between, 5-6 KB less than none.
// One 64-column panel ([K/2][64][2] contiguous) against MB activation rows: 4 x MB accumulators of 16 columns. Every
// MB sums in the same order, so a row's outputs do not depend on the rows beside it (continuous batching's rows are
// bit-equal to each alone: tests/test_continuous_batching.py). On the Xeon, one row with two accumulator sets (8
// chains, another order) read the LM head at 24-25 GB/s against 22.5 without the prefetch, and at 30.3-30.4 against
// 30.8-31.0 with it: the chains' latency is hidden once the lines arrive in time.
template <int MB>
GL_BF16 void panel64(const uint16_t* wp, int64_t K, const uint16_t* x, int64_t K_ld, float* y, int64_t ldy) {
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  const int64_t KP = K / 2;
  for (int64_t kp = 0; kp < KP; ++kp) {
    const uint16_t* wv = wp + kp * 128;
    prefetch_stream(wv, 4);
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

GL_BF16 void blocked64_bf16(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M, float* y, int64_t ldy) {
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

// The row-major kernels below read R rows side by side, a vector of each at a time: an order the hardware
// prefetchers follow badly (a test program reading 4-8 rows that way, without arithmetic, got 12-13 GB/s on a Zen 5
// where a sequential read got 40). So each step also prefetches the same columns of the next R rows (pf: the task's
// next group, or null), and the memory system sees R + R streams it is asked for ahead of time.
inline void prefetch_rows(const uint16_t* pf, int R, int64_t K, int64_t k) {
  for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf + r * K + k), _MM_HINT_T0);
}

// R consecutive rows of row-major W against one activation row: R accumulators of 16 pair-sums, reduced at the end.
template <int R>
GL_BF16 inline void rows_dot(const uint16_t* w, int64_t K, const uint16_t* x, float* out, const uint16_t* pf = nullptr) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    if (pf) prefetch_rows(pf, R, K, k);
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + r * K + k), xv);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

GL_BF16 void rows_bf16(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M, float* y, int64_t ldy) {
  const int64_t groups = N / 4;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t n = 4 * g;
    const uint16_t* pf = g + 1 < groups ? w + (n + 4) * K : nullptr;
    float out[4];
    for (int64_t m = 0; m < M; ++m) {  // the 4 rows stay in L1 across m
      rows_dot<4>(w + n * K, K, x + m * K, out, m == 0 ? pf : nullptr);
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

// ---------------------------------------------------------------------------------------------------------------
// Widening (classes without bf16 hardware). A 32-bit lane of the pair layout holds (k even) in its low half and
// (k odd) in its high half: lane << 16 is the even element as f32, lane & 0xffff0000 the odd one.

// One 64-column panel against MB f32 activation rows (x holds bf16 values), AVX-512: 4 x MB accumulators, each
// taking a k-pair's odd product, then its even one. Every MB sums in this order, so a row's outputs do not depend on
// the rows beside it (tests/test_continuous_batching.py). One and two rows once had the even and odd products in
// accumulators of their own (more independent FMA chains), which broke that; with the prefetch, a decode step's
// chains wait on memory, not on the FMA latency.
template <int MB>
GL_AVX512 void panel64_w512(const uint16_t* wp, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy) {
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const int64_t KP = K / 2;
  for (int64_t kp = 0; kp < KP; ++kp) {
    prefetch_stream(wp + kp * 128, 4);
    __m512 we[4], wo[4];
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512(wp + kp * 128 + 32 * j);
      we[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      wo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 xe = _mm512_set1_ps(x[m * ldx + 2 * kp]), xo = _mm512_set1_ps(x[m * ldx + 2 * kp + 1]);
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_fmadd_ps(we[j], xe, _mm512_fmadd_ps(wo[j], xo, acc[m][j]));
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + m * ldy + 16 * j, acc[m][j]);
}

// Half h of a panel (columns 32h .. 32h + 31: panel64_w512's accumulators j = 2h, 2h + 1) against MB rows, for many
// rows: the widening (a shift and a mask per 16 weights, on the FMA ports, as the FMAs are) is shared by 2 x MB FMAs
// per vector instead of panel64_w512<4>'s 8, so the FMA ports spend 2 / (2 + 2 MB) of their time on it instead of
// 1 / 5. Each accumulator takes the same operations in the same order as in panel64_w512 (odd product, then even,
// k-pair by k-pair), so a row's outputs are the same bits whichever kernel ran it. pf: the first pass over the panel
// (rows from 0, half 0) asks for the panel's lines ahead (the other passes find it in L2).
template <int MB>
GL_AVX512 void half_panel_w512(const uint16_t* wp, int64_t K, int h, bool pf, const float* x, int64_t ldx, float* y,
                               int64_t ldy) {
  __m512 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const int64_t KP = K / 2;
  const uint16_t* wh = wp + 64 * h;
  for (int64_t kp = 0; kp < KP; ++kp) {
    if (pf) prefetch_stream(wp + kp * 128, 4);
    const __m512i v0 = _mm512_loadu_si512(wh + kp * 128), v1 = _mm512_loadu_si512(wh + kp * 128 + 32);
    const __m512 we0 = _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16)), wo0 = _mm512_castsi512_ps(_mm512_and_si512(v0, hi));
    const __m512 we1 = _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16)), wo1 = _mm512_castsi512_ps(_mm512_and_si512(v1, hi));
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const __m512 xe = _mm512_set1_ps(x[m * ldx + 2 * kp]), xo = _mm512_set1_ps(x[m * ldx + 2 * kp + 1]);
      acc[m][0] = _mm512_fmadd_ps(we0, xe, _mm512_fmadd_ps(wo0, xo, acc[m][0]));
      acc[m][1] = _mm512_fmadd_ps(we1, xe, _mm512_fmadd_ps(wo1, xo, acc[m][1]));
    }
  }
  for (int m = 0; m < MB; ++m) {
    _mm512_storeu_ps(y + m * ldy + 32 * h, acc[m][0]);
    _mm512_storeu_ps(y + m * ldy + 32 * h + 16, acc[m][1]);
  }
}
constexpr int kHalfRows = 12;  // 24 accumulators, 4 widened vectors and the broadcasts: 30 of 32 zmm registers

GL_AVX512 void blocked64_w512(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, int64_t ldy) {
  const int64_t panels = N / 64;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    const uint16_t* wp = w + p * 64 * K;
    float* yp = y + p * 64;
    int64_t m = 0;
    for (; m + kHalfRows <= M; m += kHalfRows)
      for (int h = 0; h < 2; ++h) half_panel_w512<kHalfRows>(wp, K, h, m == 0 && h == 0, x + m * K, K, yp + m * ldy, ldy);
    if (m + 8 <= M) {
      for (int h = 0; h < 2; ++h) half_panel_w512<8>(wp, K, h, m == 0 && h == 0, x + m * K, K, yp + m * ldy, ldy);
      m += 8;
    }
    for (; m + 4 <= M; m += 4) panel64_w512<4>(wp, K, x + m * K, K, yp + m * ldy, ldy);
    switch (M - m) {
      case 3: panel64_w512<3>(wp, K, x + m * K, K, yp + m * ldy, ldy); break;
      case 2: panel64_w512<2>(wp, K, x + m * K, K, yp + m * ldy, ldy); break;
      case 1: panel64_w512<1>(wp, K, x + m * K, K, yp + m * ldy, ldy); break;
      default: break;
    }
  }
}

// AVX2: NV groups of 8 columns from column c0 of a panel against MB rows: MB * NV <= 8 accumulators (8 independent
// FMA chains, enough to hide the FMA latency), each group's weights loaded (a bf16 pair widened) once for the MB rows
// (16 ymm registers). W = uint16_t: a panel of the blocked bf16 layout ([K/2][64][2]); W = float: one of
// gemm_panels32's f32 panels ([K][64]), the same products in the same order. A pass reads whole 64-byte lines of
// each k-pair; the other passes find the panel in L2.
template <typename W, int MB, int NV>
void panel_w256(const W* wp, int64_t K, int c0, const float* x, int64_t ldx, float* y, int64_t ldy) {
  __m256 acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const int64_t KP = K / 2;
  for (int64_t kp = 0; kp < KP; ++kp) {
    // the first pass over the panel (the others find it in L2): a k-pair's 4 lines (bf16) or 8 (f32)
    if (c0 == 0) prefetch_stream(wp + kp * 128, static_cast<int>(128 * sizeof(W) / 64));
    for (int v = 0; v < NV; ++v) {
      __m256 we, wo;  // the pair's even and odd k
      if constexpr (sizeof(W) == 2) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + kp * 128 + 2 * c0 + 16 * v));
        we = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
        wo = _mm256_castsi256_ps(_mm256_and_si256(raw, hi));
      } else {
        we = _mm256_loadu_ps(wp + kp * 128 + c0 + 8 * v);
        wo = _mm256_loadu_ps(wp + kp * 128 + 64 + c0 + 8 * v);
      }
      for (int m = 0; m < MB; ++m)
        acc[m][v] = _mm256_fmadd_ps(we, _mm256_broadcast_ss(x + m * ldx + 2 * kp),
                                    _mm256_fmadd_ps(wo, _mm256_broadcast_ss(x + m * ldx + 2 * kp + 1), acc[m][v]));
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(y + m * ldy + c0 + 8 * v, acc[m][v]);
}

template <typename W, int MB, int NV>
void panel_w256_all(const W* wp, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy) {
  for (int c0 = 0; c0 < 64; c0 += 8 * NV) panel_w256<W, MB, NV>(wp, K, c0, x, ldx, y, ldy);
}

// `rows` rows of x (row stride K) against one panel, in groups of 4 (then 3, 2, 1) -> y (the panel's 64 columns).
template <typename W>
void panel_w256_rows(const W* wp, int64_t K, const float* x, int64_t rows, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) panel_w256_all<W, 4, 2>(wp, K, x + m * K, K, y + m * ldy, ldy);
  switch (rows - m) {
    case 3: panel_w256_all<W, 3, 2>(wp, K, x + m * K, K, y + m * ldy, ldy); break;
    case 2: panel_w256_all<W, 2, 4>(wp, K, x + m * K, K, y + m * ldy, ldy); break;
    case 1: panel_w256_all<W, 1, 8>(wp, K, x + m * K, K, y + m * ldy, ldy); break;
    default: break;
  }
}

void blocked64_w256(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, int64_t ldy) {
  const int64_t panels = N / 64;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < panels; ++p) panel_w256_rows(w + p * 64 * K, K, x, M, y + p * 64, ldy);
}

// AVX2, more than 16 rows: each 64-column panel is widened once into an f32 [K][64] scratch (a thread's own, L2), then
// register tiles of 6 rows x 16 columns run over it with FMAs only -- the widening costs one pass per panel and
// thread instead of one per group of 4 rows, which on 16 ymm registers costs more than it does on AVX-512 (measured
// 2026-11-27, 512 x 2048 x 640 on 2 threads: ~10-20% above the register-widening kernel, at oneDNN's f32 rate on a
// Zen 5 and a Sapphire Rapids Xeon). On AVX-512 the register-widening kernel keeps up: an AVX-512 version of this one
// (6 x 64 tiles, x packed per tile) ran the 270M's four shapes at 311-352 GFLOP/s on the Xeon's 2 threads against
// 340-358 (2026-11-27), and the register kernel of 12 rows (half_panel_w512) runs them at 335-387 (2026-11-28). The
// tiles sum each k-pair's odd product, then its even one (panel_w256's order, so the rows of any M agree to the bit;
// it also ran 5-10% faster than k in order). Tasks are (panel, block of rows), so a small
// N still spreads over every thread; consecutive tasks of a thread share the panel, widened once.
constexpr int64_t kPanelRows = 96;  // rows of x per task

// Panel p of the blocked layout ([K/2][64][2] bf16) as f32 [K][64].
void widen_panel(const uint16_t* wp, int64_t K, float* out) {
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t kp = 0; kp < K / 2; ++kp)
    for (int c = 0; c < 64; c += 8) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + kp * 128 + 2 * c));
      _mm256_storeu_ps(out + (2 * kp) * 64 + c, _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)));
      _mm256_storeu_ps(out + (2 * kp + 1) * 64 + c, _mm256_castsi256_ps(_mm256_and_si256(raw, hi)));
    }
}

// AVX2: MR rows x 16 columns (2 ymm per row), 4 passes over the panel's 64 columns: MR = 6 gives 12 accumulators,
// 2 weight registers and a broadcast (15 of 16).
template <int MR>
void tile_f32_256(const float* wf, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy, bool add) {
  for (int c0 = 0; c0 < 64; c0 += 16) {
    __m256 acc[MR][2];
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = add ? _mm256_loadu_ps(y + m * ldy + c0) : _mm256_setzero_ps();
      acc[m][1] = add ? _mm256_loadu_ps(y + m * ldy + c0 + 8) : _mm256_setzero_ps();
    }
    // Rows 0-2 from xa and 3-5 from xb, each at 0, 1 or 2 row strides: one addressing mode per broadcast.
    const float* xa = x;
    const float* xb = MR > 3 ? x + 3 * ldx : x;
    const float* w = wf + c0;
    for (int64_t k0 = 0; k0 < K; k0 += 2, xa += 2, xb += 2, w += 128)
      for (int j : {1, 0}) {  // a pair's odd product, then its even one: panel_w256's order
        const __m256 w0 = _mm256_loadu_ps(w + j * 64), w1 = _mm256_loadu_ps(w + j * 64 + 8);
        for (int m = 0; m < MR; ++m) {
          const __m256 xv = _mm256_broadcast_ss((m < 3 ? xa : xb) + (m % 3) * ldx + j);
          acc[m][0] = _mm256_fmadd_ps(w0, xv, acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(w1, xv, acc[m][1]);
        }
      }
    for (int m = 0; m < MR; ++m) {
      _mm256_storeu_ps(y + m * ldy + c0, acc[m][0]);
      _mm256_storeu_ps(y + m * ldy + c0 + 8, acc[m][1]);
    }
  }
}

// Rows [m0, m1) of x against the f32 panel wf [K][64] -> y (64 columns), K in slices of kKc rows of the panel
// (kKc x 64 f32 = 32 KB: L1) that every row tile of the block passes over before the next slice.
constexpr int64_t kKc = 128;

// touch: each slice is asked into L1 in address order before its tiles (a panel this thread has not read yet).
void panel_rows(const float* wf, int64_t K, const float* x, int64_t m0, int64_t m1, float* y, int64_t ldy,
                bool touch = false) {
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = std::min(kKc, K - k0);
    const bool add = k0 > 0;
    const float* w = wf + k0 * 64;
    if (touch)  // the slice asked for line by line, in order (see gemm_panels32)
      for (int64_t l = 0; l < kc * 64; l += 16) _mm_prefetch(reinterpret_cast<const char*>(w + l), _MM_HINT_T0);
    int64_t m = m0;
    for (; m + 6 <= m1; m += 6) tile_f32_256<6>(w, kc, x + m * K + k0, K, y + m * ldy, ldy, add);
    switch (m1 - m) {
      case 5: tile_f32_256<5>(w, kc, x + m * K + k0, K, y + m * ldy, ldy, add); break;
      case 4: tile_f32_256<4>(w, kc, x + m * K + k0, K, y + m * ldy, ldy, add); break;
      case 3: tile_f32_256<3>(w, kc, x + m * K + k0, K, y + m * ldy, ldy, add); break;
      case 2: tile_f32_256<2>(w, kc, x + m * K + k0, K, y + m * ldy, ldy, add); break;
      case 1: tile_f32_256<1>(w, kc, x + m * K + k0, K, y + m * ldy, ldy, add); break;
      default: break;
    }
  }
}

void gemm_panels_f32(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, int64_t ldy) {
  const int64_t panels = N / 64, mblocks = (M + kPanelRows - 1) / kPanelRows;
#pragma omp parallel
  {
    thread_local std::vector<float> scratch;
    if (scratch.size() < static_cast<size_t>(K * 64)) scratch.resize(static_cast<size_t>(K * 64));
    float* const wf = scratch.data();
    int64_t widened = -1;
#pragma omp for collapse(2) schedule(static)
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t mb = 0; mb < mblocks; ++mb) {
        if (widened != p) {
          widen_panel(w + p * 64 * K, K, wf);
          widened = p;
        }
        panel_rows(wf, K, x, mb * kPanelRows, std::min(M, (mb + 1) * kPanelRows), y + p * 64, ldy);
      }
  }
}

// R rows of row-major bf16 W against one f32 row x. A vector of 2L bf16 (L = 16 lanes on AVX-512, 8 on AVX2) read as
// L 32-bit lanes gives the even elements (lane << 16) and the odd ones (lane & 0xffff0000) with no shuffle; x is
// split the same way beforehand (xs: per 2L values, the L even then the L odd ones), so both meet with FMAs.
template <int L>
void split_pairs(const float* x, int64_t K, float* xs) {
  const int64_t body = K / (2 * L) * (2 * L);
  for (int64_t k0 = 0; k0 < body; k0 += 2 * L)
    for (int j = 0; j < L; ++j) {
      xs[k0 + j] = x[k0 + 2 * j];
      xs[k0 + L + j] = x[k0 + 2 * j + 1];
    }
  for (int64_t k = body; k < K; ++k) xs[k] = x[k];  // the tail stays in order (summed one by one)
}

template <int R>
GL_AVX512 inline void rows_dot_w512(const uint16_t* w, int64_t K, const float* xs, float* out, const uint16_t* pf = nullptr) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const int64_t body = K / 32 * 32;
  __m512 acco[R];  // the odd elements' own accumulators: 2R independent FMA chains
  for (int r = 0; r < R; ++r) acco[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < body; k += 32) {
    if (pf) prefetch_rows(pf, R, K, k);
    const __m512 xe = _mm512_loadu_ps(xs + k), xo = _mm512_loadu_ps(xs + k + 16);
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_loadu_si512(w + r * K + k);
      acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), xe, acc[r]);
      acco[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), xo, acco[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acco[r]));
    for (int64_t j = body; j < K; ++j) s += bf16_to_f32(w[r * K + j]) * xs[j];
    out[r] = s;
  }
}

template <int R>
inline void rows_dot_w256(const uint16_t* w, int64_t K, const float* xs, float* out, const uint16_t* pf = nullptr) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const int64_t body = K / 16 * 16;
  __m256 acco[R];  // the odd elements' own accumulators: 2R independent FMA chains
  for (int r = 0; r < R; ++r) acco[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < body; k += 16) {
    if (pf && k % 32 == 0) prefetch_rows(pf, R, K, k);  // a 64-byte line every other step
    const __m256 xe = _mm256_loadu_ps(xs + k), xo = _mm256_loadu_ps(xs + k + 8);
    for (int r = 0; r < R; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k));
      acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, acc[r]);
      acco[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi)), xo, acco[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum8(_mm256_add_ps(acc[r], acco[r]));
    for (int64_t j = body; j < K; ++j) s += bf16_to_f32(w[r * K + j]) * xs[j];
    out[r] = s;
  }
}

template <bool W512>
void rows_widen(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, int64_t ldy) {
  std::vector<float> xs(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m) split_pairs<W512 ? 16 : 8>(x + m * K, K, xs.data() + m * K);
  const float* xsp = xs.data();
  constexpr int G = 8;  // rows per task
  const int64_t groups = N / G;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t n = G * g;
    const uint16_t* pf = g + 1 < groups ? w + (n + G) * K : nullptr;
    float out[G];
    for (int64_t m = 0; m < M; ++m) {
      if constexpr (W512)
        rows_dot_w512<G>(w + n * K, K, xsp + m * K, out, m == 0 ? pf : nullptr);
      else
        rows_dot_w256<G>(w + n * K, K, xsp + m * K, out, m == 0 ? pf : nullptr);
      std::memcpy(y + m * ldy + n, out, sizeof out);
    }
  }
  for (int64_t n = groups * G; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) {
      if constexpr (W512)
        rows_dot_w512<1>(w + n * K, K, xsp + m * K, y + m * ldy + n);
      else
        rows_dot_w256<1>(w + n * K, K, xsp + m * K, y + m * ldy + n);
    }
}

// f32 -> bf16 rounding on AVX2: round to nearest even (u + 0x7fff + lsb, as f32_to_bf16), NaNs quietened; the bf16
// bits in the high half of each lane (the f32 value rounded to bf16 precision).
inline __m256 round8_avx2(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
  const __m256i q = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));  // a NaN quietened (bit 6 of its bf16)
  const __m256i v = _mm256_blendv_epi8(r, q, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// f32 -> bf16 on AVX2: round8_avx2's bits, packed to 16 bits.
void cvt_bf16_avx2(const float* x, uint16_t* y, int64_t n) {
  auto cvt8 = [](const float* p) { return _mm256_srli_epi32(_mm256_castps_si256(round8_avx2(_mm256_loadu_ps(p))), 16); };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(cvt8(x + i), cvt8(x + i + 8)), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), packed);
  }
  for (; i < n; ++i) y[i] = f32_to_bf16(x[i]);
}

// x rounded to bf16 precision, kept as f32, 16 at a time (the rest left): the bits f32_to_bf16_n gives, shifted back
// up in the register. Returns how many it did.
GL_BF16 int64_t round_bf16_avx512(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
    _mm512_storeu_ps(y + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  return i;
}

}  // namespace

void f32_to_bf16_n(const float* x, uint16_t* y, int64_t n) {
  if (bf16_gemv_path() == Bf16GemvPath::Vdpbf16ps)
    cvt_bf16_avx512(x, y, n);
  else
    cvt_bf16_avx2(x, y, n);
}

void round_bf16_n(const float* x, float* y, int64_t n) {
  // bf16 bits in the high half of each f32: f32_to_bf16_n's rounding, kept in the register.
  int64_t i = 0;
  if (bf16_gemv_path() == Bf16GemvPath::Vdpbf16ps)
    i = round_bf16_avx512(x, y, n);
  else
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, round8_avx2(_mm256_loadu_ps(x + i)));
  if (i < n) {  // the tail through f32_to_bf16_n itself (vcvtneps2bf16 flushes denormals; the scalar rounding does not)
    uint16_t tmp[16];
    f32_to_bf16_n(x + i, tmp, n - i);
    for (int64_t j = 0; i + j < n; ++j) y[i + j] = bf16_to_f32(tmp[j]);
  }
}

void gemv_bf16_blocked64(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M, float* y, int64_t ldy) {
  if (bf16_gemv_path() != Bf16GemvPath::Vdpbf16ps || N % 64 != 0 || K % 32 != 0 || M < 1 || M > bf16_own_max_m())
    throw InternalError("gemv_bf16_blocked64: unsupported CPU class or shape");
  blocked64_bf16(w, N, K, x, M, y, ldy);
}

void gemv_bf16_rows(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M, float* y, int64_t ldy) {
  if (bf16_gemv_path() != Bf16GemvPath::Vdpbf16ps || K % 32 != 0 || M < 1 || M > kGemvMaxM)
    throw InternalError("gemv_bf16_rows: unsupported CPU class or shape");
  rows_bf16(w, N, K, x, M, y, ldy);
}

void gemm_widen_blocked64(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, int64_t ldy) {
  if (N % 64 != 0 || K % 32 != 0 || M < 1 || (M > bf16_own_max_m() && !bf16_large_m_widened()))
    throw InternalError("gemm_widen_blocked64: unsupported shape");
  if (bf16_gemv_path() != Bf16GemvPath::Avx2Widen)
    blocked64_w512(w, N, K, x, M, y, ldy);
  else if (M <= 16)
    blocked64_w256(w, N, K, x, M, y, ldy);
  else
    gemm_panels_f32(w, N, K, x, M, y, ldy);
}

void gemv_widen_rows(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, int64_t ldy) {
  if (M < 1 || M > kGemvMaxM) throw InternalError("gemv_widen_rows: unsupported shape");
  if (bf16_gemv_path() == Bf16GemvPath::Avx2Widen)
    rows_widen<false>(w, N, K, x, M, y, ldy);
  else
    rows_widen<true>(w, N, K, x, M, y, ldy);
}

// f32 weights on the AVX2 classes (f32_own_panels(), ops/cpu.h), stored as 64-column panels [K][64] f32: the
// panels of gemm_panels_f32 without the widening, so that every M takes kernels of one summation order (each k-pair's
// odd product, then its even one, k in order, one accumulator per output): a row's outputs are the same bits in a
// batch of any size as alone. Up to 4 rows (decode), panel_w256 streams each panel once, whole 64-byte lines, with
// the lines ahead asked for; past that, panel_rows' register tiles (faster from 6 rows on: 2026-11-28, forced to
// avx2, `matmul_rate(M, K, N, "float32")` on the 270M's shapes at M = 6-16 rose from 89-142 to 121-229 GFLOP/s).
void pack_panels_f32(const float* w, int64_t N, int64_t K, float* out) {
  const int64_t panels = (N + 63) / 64;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    // Written in address order, read from the panel's 64 rows side by side (a line of each serves 16 k).
    const int nc = static_cast<int>(std::min<int64_t>(64, N - p * 64));
    const float* src = w + p * 64 * K;
    float* dst = out + p * 64 * K;
    for (int64_t k = 0; k < K; ++k) {
      for (int c = 0; c < nc; ++c) dst[k * 64 + c] = src[c * K + k];
      for (int c = nc; c < 64; ++c) dst[k * 64 + c] = 0.f;  // the last panel's columns past N
    }
  }
}

namespace {
// `rows` rows of x (row stride K) against one f32 panel -> y (row stride ldy, the panel's 64 columns).
// touch: as panel_rows'.
void panel32_rows(const float* wp, int64_t K, const float* x, int64_t rows, float* y, int64_t ldy, bool touch) {
  if (rows > 4)
    panel_rows(wp, K, x, 0, rows, y, ldy, touch);
  else
    panel_w256_rows(wp, K, x, rows, y, ldy);
}
}  // namespace

void gemm_panels32(const float* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, int64_t ldy) {
  if (N < 1 || K % 2 != 0 || M < 1) throw InternalError("gemm_panels32: unsupported shape");
  // Tasks: (panel, block of rows), a thread's consecutive tasks sharing a panel (schedule(static)); up to 16 rows one
  // block. The first block of a panel asks for each slice of it in address order before the tiles run over it: the
  // tiles' passes read a slice from memory a line in four at a time, and a 512-token prefill of the real 270M forced to
  // avx2 ran ~5% below oneDNN's (2 threads, 2026-11-28: 754-781 tok/s in three runs alternated with oneDNN's 759-826;
  // with the slices asked for, 783-852 in seven).
  const int64_t panels = (N + 63) / 64, block = M <= 16 ? M : kPanelRows, mblocks = (M + block - 1) / block;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t mb = 0; mb < mblocks; ++mb) {
      const int64_t m0 = mb * block, m1 = std::min(M, m0 + block), nc = std::min<int64_t>(64, N - p * 64);
      if (nc == 64) {
        panel32_rows(w + p * 64 * K, K, x + m0 * K, m1 - m0, y + m0 * ldy + p * 64, ldy, mb == 0);
        continue;
      }
      // The last panel of an N that is not a multiple of 64: its 64 columns into a scratch, nc of them kept.
      float tmp[kPanelRows * 64];
      panel32_rows(w + p * 64 * K, K, x + m0 * K, m1 - m0, tmp, 64, mb == 0);
      for (int64_t m = m0; m < m1; ++m) std::copy(tmp + (m - m0) * 64, tmp + (m - m0) * 64 + nc, y + m * ldy + p * 64);
    }
}

void widen_blocked64_cols(const uint16_t* w, int64_t K, int64_t n0, int64_t nn, float* out) {
  // Panel p's k-pair row kp (64 pairs, 256 bytes) -> out rows 2 kp and 2 kp + 1, columns [p * 64 - n0, + 64).
  const int64_t p0 = n0 / 64, np = nn / 64, KP = K / 2;
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t p = 0; p < np; ++p)
    for (int64_t kp = 0; kp < KP; ++kp) {
      const uint16_t* src = w + (p0 + p) * 64 * K + kp * 128;
      float* even = out + (2 * kp) * nn + p * 64;
      float* odd = even + nn;
      for (int c = 0; c < 64; c += 8) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * c));
        _mm256_storeu_ps(even + c, _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)));
        _mm256_storeu_ps(odd + c, _mm256_castsi256_ps(_mm256_and_si256(raw, hi)));
      }
    }
}

void pack_blocked64(const float* w, int64_t N, int64_t K, uint16_t* out) {
  const int64_t KP = K / 2;
#pragma omp parallel
  {
    std::vector<uint16_t> row(static_cast<size_t>(K));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      f32_to_bf16_n(w + n * K, row.data(), K);
      uint16_t* dst = out + (n / 64) * 64 * K + (n % 64) * 2;
      for (int64_t kp = 0; kp < KP; ++kp) std::memcpy(dst + kp * 128, row.data() + 2 * kp, 4);
    }
  }
}

void widen_rows(const uint16_t* w, int64_t K, int64_t n0, int64_t nn, float* out) {
#pragma omp parallel for schedule(static) if (nn * K > 65536)
  for (int64_t n = 0; n < nn; ++n) {
    const uint16_t* src = w + (n0 + n) * K;
    float* dst = out + n * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
      _mm256_storeu_ps(dst + k, widen8_bf16(src + k));
    for (; k < K; ++k) dst[k] = bf16_to_f32(src[k]);
  }
}

}  // namespace gemmalens::ops
