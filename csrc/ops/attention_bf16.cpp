// Prefill attention as two bf16 matmuls per block of queries (QK^T, then PV) with an f32 softmax between them
// (fused with the scaling, the mask and the rounding of the probabilities, row by row; past 4096 keys, chunks of keys
// with the online softmax), for CPUs where oneDNN's bf16 matmul outruns f32 FMAs (attention_prefill_bf16_matmul: AMX
// tiles, or AVX512_BF16 on AMD). The matmuls come from ops/linear.h (oneDNN stays in linear_dnnl.cpp); the visible-key
// rule and the row lookup from attention.h.
#include <immintrin.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "ops/attention.h"
#include "ops/cpu.h"
#include "ops/gemv_bf16.h"
#include "ops/linear.h"
#include "ops/vmath.h"

namespace gemmalens::ops {

namespace {

#define GL_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))

// Lanes [0, n - c) of a 16-lane step (all 16 from n - c >= 16 on).
inline __mmask16 tail_mask(int64_t n, int64_t c) {
  return n - c >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - c)) - 1);
}

// The first pass over a row's n visible scores x[0, n), in place: x_c *= scale (soft-capped when softcap > 0).
// Returns max(m0, the largest x_c).
GL_AVX512_BF16 float scale_and_max(float* x, int64_t n, float scale, float softcap, float m0) {
  __m512 vmx = _mm512_set1_ps(m0);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = tail_mask(n, c);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + c), sc);
    if (softcap > 0.f) {  // rare (no released Gemma 3 sets it): scalar
      alignas(64) float t[16];
      _mm512_store_ps(t, v);
      for (int i = 0; i < 16; ++i) t[i] = softcap * tanh_f32(t[i] / softcap);
      v = _mm512_load_ps(t);
    }
    _mm512_mask_storeu_ps(x + c, k, v);
    vmx = _mm512_mask_max_ps(vmx, k, vmx, v);
  }
  return _mm512_reduce_max_ps(vmx);
}

// One row of raw scores s[0, S) (q . k), in place, to probabilities in bf16 at p[0, S): x_c = s[c] * scale
// (soft-capped when softcap > 0) over the visible columns [c_lo, c_hi], p = softmax(x) there (exp_f32's polynomial,
// 16 lanes), rounded as f32_to_bf16_n rounds on these CPUs (vcvtneps2bf16: AVX512_BF16, which every CPU with AMX
// has); 0 outside them, and everywhere when none is visible (a padding row). The row (S floats, 128 KB at 32k keys)
// stays in L2 over the three passes. Before, separate loops (scale and mask, softmax_rows, rounding) each went over the
// whole block of rows in memory: ~45% of a 32k-token prefill of the 270M (int8 weights) on an Intel Xeon with AMX
// (2026-11-28, 2 threads), which this took from 728 to 1129 tok/s (8192 tokens: 1716 -> 2268).
GL_AVX512_BF16 void softmax_row_bf16(float* s, int64_t S, int64_t c_lo, int64_t c_hi, float scale, float softcap,
                                     uint16_t* p) {
  c_lo = std::max<int64_t>(c_lo, 0);
  c_hi = std::min<int64_t>(c_hi, S - 1);
  const int64_t n = std::max<int64_t>(0, c_hi - c_lo + 1);
  float* x = s + c_lo;
  const float mx = scale_and_max(x, n, scale, softcap, -std::numeric_limits<float>::infinity());
  if (mx == -std::numeric_limits<float>::infinity()) {  // (NaN scores stay NaN, as in softmax_rows)
    std::fill(p, p + S, uint16_t(0));
    return;
  }
  const __m512 m = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = tail_mask(n, c);
    const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + c), m)));
    _mm512_mask_storeu_ps(x + c, k, e);
    acc = _mm512_add_ps(acc, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(acc));
  std::fill(p, p + c_lo, uint16_t(0));
  for (int64_t c = 0; c < n; c += 16) {  // normalised and rounded as f32_to_bf16_n rounds on these CPUs
    const __mmask16 k = tail_mask(n, c);
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + c), inv));
    _mm256_mask_storeu_epi16(p + c_lo + c, k, h);
  }
  std::fill(p + c_lo + n, p + S, uint16_t(0));
}

// The same for one chunk of a longer row, online (the flash-attention recurrence): m_prev the row's running max over
// the chunks before (-inf: none); returns the new one, m = max(m_prev, max x_c over the visible columns), and writes
// exp(x_c - m) rounded to bf16 (not normalised: the caller rescales its partial sums by exp(m_prev - m) and divides by
// the total at the end) and their f32 sum to *sum.
GL_AVX512_BF16 float softmax_chunk_bf16(float* s, int64_t S, int64_t c_lo, int64_t c_hi, float scale, float softcap,
                                        float m_prev, float* sum, uint16_t* p) {
  c_lo = std::max<int64_t>(c_lo, 0);
  c_hi = std::min<int64_t>(c_hi, S - 1);
  const int64_t n = std::max<int64_t>(0, c_hi - c_lo + 1);
  float* x = s + c_lo;
  const float mx = scale_and_max(x, n, scale, softcap, m_prev);
  *sum = 0.f;
  if (n == 0 || mx == -std::numeric_limits<float>::infinity()) {
    std::fill(p, p + S, uint16_t(0));
    return mx;
  }
  const __m512 m = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  std::fill(p, p + c_lo, uint16_t(0));
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = tail_mask(n, c);
    const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + c), m)));
    acc = _mm512_add_ps(acc, e);
    _mm256_mask_storeu_epi16(p + c_lo + c, k, (__m256i)_mm512_cvtneps_pbh(e));
  }
  std::fill(p + c_lo + n, p + S, uint16_t(0));
  *sum = _mm512_reduce_add_ps(acc);
  return mx;
}

}  // namespace

bool attention_bf16_matmul(const AttentionArgs& a) {
  if (!attention_prefill_bf16_matmul() || a.compute != DType::BF16 || (a.past > 0 && a.cache.dtype != DType::BF16))
    return false;
  const int B = a.B, T = a.T, H = a.H, KV = a.KV, Hd = a.Hd, group = H / KV;
  constexpr int kQB = 256;  // query positions per block: scores [kQB * group, keys] f32
  // Past kKC keys a block's scores are made and consumed a chunk of kKC keys at a time, with the online softmax
  // (softmax_chunk_bf16): [1024, 4096] f32 scores (16 MB) instead of [1024, 32768] (128 MB) at a 32k context, which
  // went through memory between the two matmuls. Blocks of up to kKC keys keep the one-chunk path (the probabilities
  // normalised before they are rounded to bf16, as HF's bf16 attention does). Measured on the Xeon (2026-11-28,
  // `_core._testing.attention_seconds(n, 0, 4, 1, 256, 0, "bfloat16", 1)`): a global layer at n = 32768 4594 -> 2838
  // ms, 16384 1069 -> 760; the 270M's int8 prefill of 32768 tokens 1231 -> 1606 tok/s; chunks of 2048 keys measured
  // the same or slower (2891-2983 against 2793-2909 ms at 32768).
  constexpr int64_t kKC = 4096;
  // The first key any query block of row b sees: keys [J0, past + T) are gathered (and the chunk's own rounded to
  // bf16) once per (row, KV head), not once per query block (at a 32k-token prefill a global layer's 128 blocks
  // each converted up to 32k keys again).
  auto block_lo = [&](int b, int t0) { return std::min(visible_range(a, b, a.past + t0).lo, a.past + t0); };
  std::vector<int64_t> J0(B, a.past);
  int64_t SJ_max = 0, S_max = 0;
  for (int b = 0; b < B; ++b) {
    for (int t0 = 0; t0 < T; t0 += kQB) J0[b] = std::min(J0[b], block_lo(b, t0));
    for (int t0 = 0; t0 < T; t0 += kQB) S_max = std::max(S_max, a.past + std::min(T, t0 + kQB) - block_lo(b, t0));
    SJ_max = std::max(SJ_max, a.past + T - J0[b]);
  }
  // Buffers sized once for the call and left uninitialised (every element read is written first): growing vectors
  // block by block copied the scores (128 MB at 32k keys) and zeroed them (the 270M's int8 prefill of 32768 tokens
  // on the Xeon: 1162 -> 1305 tok/s; 8192 tokens: 2265-2293 -> 2405-2476).
  const int64_t rows_max = static_cast<int64_t>(std::min(kQB, T)) * group;
  const std::unique_ptr<uint16_t[]> Qb(new uint16_t[rows_max * Hd]), Kb(new uint16_t[SJ_max * Hd]),
      Vb(new uint16_t[SJ_max * Hd]), Pb(new uint16_t[rows_max * std::min(S_max, kKC)]);
  const std::unique_ptr<float[]> Sc(new float[rows_max * std::min(S_max, kKC)]), Zf(new float[rows_max * Hd]);
  const std::unique_ptr<float[]> Za(new float[S_max > kKC ? rows_max * Hd : 0]);  // the chunks' running z
  std::vector<float> m_run(rows_max), l_run(rows_max), corr(rows_max);
  for (int b = 0; b < B; ++b) {
    const int64_t SJ = a.past + T - J0[b];
    for (int kvh = 0; kvh < KV; ++kvh) {
#pragma omp parallel
      {
        std::vector<float> row(a.cache.int8 ? Hd : 0);  // an int8 cache row's values
#pragma omp for schedule(static)
        for (int64_t c = 0; c < SJ; ++c) {
          uint16_t* kd = Kb.get() + c * Hd;
          uint16_t* vd = Vb.get() + c * Hd;
          const KVRow k = key_row(a, b, kvh, J0[b] + c), v = value_row(a, b, kvh, J0[b] + c);
          if (k.f) {  // this chunk's keys (f32)
            f32_to_bf16_n(k.f, kd, Hd);
            f32_to_bf16_n(v.f, vd, Hd);
          } else if (k.h) {  // the bf16 cache
            std::copy_n(k.h, Hd, kd);
            std::copy_n(v.h, Hd, vd);
          } else if (k.q) {  // the int8 cache: its values rounded to bf16, as a bf16 model's matmul inputs are
            kv_row_f32(k, Hd, row.data());
            f32_to_bf16_n(row.data(), kd, Hd);
            kv_row_f32(v, Hd, row.data());
            f32_to_bf16_n(row.data(), vd, Hd);
          } else {  // the ring no longer holds it (never visible: the window fits the ring)
            std::fill_n(kd, Hd, uint16_t(0));
            std::fill_n(vd, Hd, uint16_t(0));
          }
        }
      }
      for (int t0 = 0; t0 < T; t0 += kQB) {
        const int nt = std::min(kQB, T - t0), rows = nt * group;
        const int64_t j_lo = block_lo(b, t0), j_hi = a.past + t0 + nt - 1;
        const int64_t S = j_hi - j_lo + 1;
        const uint16_t* kb = Kb.get() + (j_lo - J0[b]) * Hd;
        const uint16_t* vb = Vb.get() + (j_lo - J0[b]) * Hd;
        // Row r's offset in q and z ([B, T, H, Hd]): rows in (position, head of the group) order.
        const auto head_row = [&](int r) {
          return ((static_cast<int64_t>(b) * T + t0 + r / group) * H + kvh * group + r % group) * Hd;
        };
#pragma omp parallel for schedule(static)
        for (int r = 0; r < rows; ++r) f32_to_bf16_n(a.q + head_row(r), Qb.get() + static_cast<size_t>(r) * Hd, Hd);
        if (S <= kKC) {
          matmul_bf16(Qb.get(), rows, Hd, kb, S, /*b_nk=*/true, Sc.get(), S);
          // Scaled (soft-capped), masked, softmaxed and rounded to bf16, a row at a time while it sits in L2.
#pragma omp parallel for schedule(static)
          for (int r = 0; r < rows; ++r) {
            const SlotRange vis = visible_range(a, b, a.past + t0 + r / group);
            softmax_row_bf16(Sc.get() + static_cast<size_t>(r) * S, S, vis.lo - j_lo, vis.hi - j_lo, a.scale, a.softcap,
                             Pb.get() + static_cast<size_t>(r) * S);
          }
          matmul_bf16(Pb.get(), rows, S, vb, Hd, /*b_nk=*/false, Zf.get(), Hd);
#pragma omp parallel for schedule(static)
          for (int r = 0; r < rows; ++r)
            std::copy_n(Zf.get() + static_cast<size_t>(r) * Hd, Hd, a.z + head_row(r));
          continue;
        }
        std::fill_n(m_run.begin(), rows, -std::numeric_limits<float>::infinity());
        std::fill_n(l_run.begin(), rows, 0.f);
        std::fill_n(Za.get(), static_cast<size_t>(rows) * Hd, 0.f);
        for (int64_t c0 = 0; c0 < S; c0 += kKC) {
          const int64_t kc = std::min(kKC, S - c0);
          matmul_bf16(Qb.get(), rows, Hd, kb + c0 * Hd, kc, /*b_nk=*/true, Sc.get(), kc);
#pragma omp parallel for schedule(static)
          for (int r = 0; r < rows; ++r) {
            const SlotRange vis = visible_range(a, b, a.past + t0 + r / group);
            float sum;
            const float mx = softmax_chunk_bf16(Sc.get() + static_cast<size_t>(r) * kc, kc, vis.lo - j_lo - c0,
                                                vis.hi - j_lo - c0, a.scale, a.softcap, m_run[r], &sum,
                                                Pb.get() + static_cast<size_t>(r) * kc);
            corr[r] = m_run[r] == -std::numeric_limits<float>::infinity() ? 0.f : exp_f32(m_run[r] - mx);
            l_run[r] = l_run[r] * corr[r] + sum;
            m_run[r] = mx;
          }
          matmul_bf16(Pb.get(), rows, kc, vb + c0 * Hd, Hd, /*b_nk=*/false, Zf.get(), Hd);
#pragma omp parallel for schedule(static)
          for (int r = 0; r < rows; ++r) {
            float* za = Za.get() + static_cast<size_t>(r) * Hd;
            const float* zf = Zf.get() + static_cast<size_t>(r) * Hd;
            for (int d = 0; d < Hd; ++d) za[d] = za[d] * corr[r] + zf[d];
          }
        }
#pragma omp parallel for schedule(static)
        for (int r = 0; r < rows; ++r) {  // padding rows (no visible key): z = 0 (NaN scores stay NaN)
          const float inv = l_run[r] == 0.f ? 0.f : 1.f / l_run[r];
          const float* za = Za.get() + static_cast<size_t>(r) * Hd;
          float* z = a.z + head_row(r);
          for (int d = 0; d < Hd; ++d) z[d] = za[d] * inv;
        }
      }
    }
  }
  return true;
}

}  // namespace gemmalens::ops
