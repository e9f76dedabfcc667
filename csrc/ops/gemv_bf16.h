// Small-M bf16 matmuls (decode: one row per sequence) on AVX512_BF16 `vdpbf16ps`, streaming the weights once.
// Decode is bound by the bytes of weights read per token; these kernels read each weight byte once per call,
// in order, from one parallel region, and keep the activation rows (M <= kGemvMaxM) in registers or L1.
#pragma once
#include <cstdint>

namespace gemmalens::ops {

constexpr int64_t kGemvMaxM = 4;  // above it oneDNN wins where AMX is usable (batch-8 decode measured 190 vs 139 tok/s)

// The CPU has AVX512F/BW and AVX512_BF16.
bool bf16_gemv_supported();

// y[i] = bf16(x[i]), round to nearest even (vcvtneps2bf16 where the CPU has it; like it, the scalar fallback
// quietens NaNs). Runs on the calling thread.
void f32_to_bf16_n(const float* x, uint16_t* y, int64_t n);

// y[m, n] (row stride ldy) = sum_k x[m, k] * W[k, n] for W in oneDNN's "BA16a64b2a" layout of a {K, N} matrix:
// blocks of 64 columns (outer) by 32 rows of K (inner), each block [16 k-pairs][64 n][2 k] (the VNNI pairing
// `vdpbf16ps` multiplies). Needs N % 64 == 0, K % 32 == 0, M <= kGemvMaxM. x is [M, K] bf16 bits.
void gemv_bf16_blocked64(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M, float* y, int64_t ldy);

// The same for row-major W [N, K] (the tied embedding as the LM head). Needs K % 32 == 0.
void gemv_bf16_rows(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M, float* y, int64_t ldy);

}  // namespace gemmalens::ops
