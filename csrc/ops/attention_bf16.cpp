// Prefill attention as two bf16 matmuls per block of queries (QK^T, then PV) with an f32 softmax between them
// (fused with the scaling, the mask and the rounding of the probabilities, row by row), for CPUs where oneDNN runs
// bf16 on AMX tiles. The matmuls come from ops/linear.h (oneDNN stays in linear_dnnl.cpp); the visible-key rule and
// the row lookup from attention.h.
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

// One row of raw scores s[0, S) (q . k), in place, to probabilities in bf16 at p[0, S): x_c = s[c] * scale
// (soft-capped when softcap > 0) over the visible columns [c_lo, c_hi], p = softmax(x) there (exp_f32's polynomial,
// 16 lanes), rounded as f32_to_bf16_n rounds on these CPUs (vcvtneps2bf16: every CPU with AMX has AVX512_BF16); 0
// outside them, and everywhere when none is visible (a padding row). The row (S floats, 128 KB at 32k keys) stays in
// L2 over the three passes. Before, separate loops (scale and mask, softmax_rows, rounding) each went over the whole
// block of rows in memory: ~45% of a 32k-token prefill of the 270M (int8 weights) on an Intel Xeon with AMX
// (2026-11-28, 2 threads), which this took from 728 to 1129 tok/s (8192 tokens: 1716 -> 2268).
GL_AVX512_BF16 void softmax_row_bf16(float* s, int64_t S, int64_t c_lo, int64_t c_hi, float scale, float softcap, uint16_t* p) {
  c_lo = std::max<int64_t>(c_lo, 0);
  c_hi = std::min<int64_t>(c_hi, S - 1);
  const int64_t n = c_hi - c_lo + 1;
  float* x = s + c_lo;
  __m512 vmx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  if (n > 0) {
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t c = 0; c < n; c += 16) {
      const __mmask16 k = n - c >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - c)) - 1);
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
  }
  const float mx = _mm512_reduce_max_ps(vmx);
  if (mx == -std::numeric_limits<float>::infinity()) {  // (NaN scores stay NaN, as in softmax_rows)
    std::fill(p, p + S, uint16_t(0));
    return;
  }
  const __m512 m = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = n - c >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - c)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + c), m)));
    _mm512_mask_storeu_ps(x + c, k, e);
    acc = _mm512_add_ps(acc, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(acc));
  std::fill(p, p + c_lo, uint16_t(0));
  for (int64_t c = 0; c < n; c += 16) {  // normalised and rounded as f32_to_bf16_n rounds on these CPUs
    const __mmask16 k = n - c >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - c)) - 1);
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + c), inv));
    _mm256_mask_storeu_epi16(p + c_lo + c, k, h);
  }
  std::fill(p + c_lo + n, p + S, uint16_t(0));
}

}  // namespace

bool attention_bf16_matmul(const AttentionArgs& a) {
  if (!use_amx() || a.compute != DType::BF16 || (a.past > 0 && a.cache.dtype != DType::BF16)) return false;
  const int B = a.B, T = a.T, H = a.H, KV = a.KV, Hd = a.Hd, group = H / KV;
  constexpr int kQB = 256;  // query positions per block: scores [kQB * group, keys] f32
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
  // on the Xeon: 1162 -> 1305 tok/s; 8192 tokens: 2276 -> 2440).
  const int64_t rows_max = static_cast<int64_t>(std::min(kQB, T)) * group;
  const std::unique_ptr<uint16_t[]> Qb(new uint16_t[rows_max * Hd]), Kb(new uint16_t[SJ_max * Hd]),
      Vb(new uint16_t[SJ_max * Hd]), Pb(new uint16_t[rows_max * S_max]);
  const std::unique_ptr<float[]> Sc(new float[rows_max * S_max]), Zf(new float[rows_max * Hd]);
  for (int b = 0; b < B; ++b) {
    const int64_t SJ = a.past + T - J0[b];
    for (int kvh = 0; kvh < KV; ++kvh) {
#pragma omp parallel for schedule(static)
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
        } else {  // the ring no longer holds it (never visible: the window fits the ring)
          std::fill_n(kd, Hd, uint16_t(0));
          std::fill_n(vd, Hd, uint16_t(0));
        }
      }
      for (int t0 = 0; t0 < T; t0 += kQB) {
        const int nt = std::min(kQB, T - t0), rows = nt * group;
        const int64_t j_lo = block_lo(b, t0), j_hi = a.past + t0 + nt - 1;
        const int64_t S = j_hi - j_lo + 1;
        const uint16_t* kb = Kb.get() + (j_lo - J0[b]) * Hd;
        const uint16_t* vb = Vb.get() + (j_lo - J0[b]) * Hd;
#pragma omp parallel for schedule(static)
        for (int r = 0; r < rows; ++r)  // rows in (position, head of the group) order
          f32_to_bf16_n(a.q + ((static_cast<int64_t>(b) * T + t0 + r / group) * H + kvh * group + r % group) * Hd,
                        Qb.get() + static_cast<size_t>(r) * Hd, Hd);
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
          std::copy_n(Zf.get() + static_cast<size_t>(r) * Hd, Hd,
                      a.z + ((static_cast<int64_t>(b) * T + t0 + r / group) * H + kvh * group + r % group) * Hd);
      }
    }
  }
  return true;
}

}  // namespace gemmalens::ops
