// Small-M bf16 matmuls (decode: one row per sequence), streaming the weights once, and the bf16 <-> f32 conversions
// the bf16 paths share. Decode is bound by the bytes of weights read per token; these kernels read each weight byte
// once per call, in order, from one parallel region, and keep the activation rows (M <= kGemvMaxM) in registers or L1.
// The path follows the CPU class (ops/cpu.h, bf16_gemv_path()): AVX512_BF16 `vdpbf16ps`, or, on CPUs without bf16
// hardware, the bf16 pairs widened to f32 in registers (a shift and a mask) for FMAs on AVX-512 or AVX2 -- the same
// products (a product of two bf16 values is exact in f32) summed in f32, odd element first as vdpbf16ps does.
#pragma once
#include <cstdint>

namespace gemmalens::ops {

constexpr int64_t kGemvMaxM = 4;  // above it oneDNN wins where AMX is usable (batch-8 decode measured 190 vs 139 tok/s)

// y[i] = bf16(x[i]), round to nearest even (vcvtneps2bf16 where the CPU class has it; like it, the other paths
// quieten NaNs). Runs on the calling thread.
void f32_to_bf16_n(const float* x, uint16_t* y, int64_t n);
// y[i] = x[i] rounded to bf16 precision, kept as f32 (the activations of the widened-f32 bf16 matmuls).
void round_bf16_n(const float* x, float* y, int64_t n);

// y[m, n] (row stride ldy) = sum_k x[m, k] * W[k, n] for W in oneDNN's "BA16a64b2a" layout of a {K, N} matrix:
// blocks of 64 columns (outer) by 32 rows of K (inner), each block [16 k-pairs][64 n][2 k] (the VNNI pairing
// `vdpbf16ps` multiplies), so each 64-column panel is [K/2][64][2]. Needs N % 64 == 0, K % 32 == 0,
// M <= bf16_own_max_m() (ops/cpu.h): rows in groups of 4, each panel staying in L2 meanwhile.
// vdpbf16ps (class avx512_bf16 and up); x is [M, K] bf16 bits.
void gemv_bf16_blocked64(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M, float* y, int64_t ldy);
// The same for row-major W [N, K] (the tied embedding as the LM head). Needs K % 32 == 0, M <= kGemvMaxM.
void gemv_bf16_rows(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M, float* y, int64_t ldy);

// The same two on the widening paths (classes avx2 and avx512, and avx512_bf16 on Intel past bf16_own_max_m() rows:
// bf16_large_m_widened(); AVX2 or AVX-512 FMAs by the class); x is [M, K] f32
// holding bf16 values (round_bf16_n), so the products are those of a bf16 matmul. Any K for the rows.
void gemm_widen_blocked64(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, int64_t ldy);
void gemv_widen_rows(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, int64_t ldy);

// f32 weights as 64-column panels ([ceil(N / 64)][K][64] f32, the last panel's columns past N zero), the layout of
// f32 layers where f32_own_panels() (ops/cpu.h): y [M, N] (row stride ldy) = x [M, K] W^T on AVX2, every M summing
// each output in the same order (K even). pack_panels_f32 packs row-major f32 W [N, K] into out, in parallel.
void gemm_panels32(const float* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, int64_t ldy);
void pack_panels_f32(const float* w, int64_t N, int64_t K, float* out);

// bf16 weights in the "BA16a64b2a" layout <-> row-major f32 (K % 32 == 0, N % 64 == 0 for the whole matrix).
// Columns [n0, n0 + nn) (multiples of 64) widened to f32 [K][nn] row-major: a block for the widened-f32 matmul.
void widen_blocked64_cols(const uint16_t* w, int64_t K, int64_t n0, int64_t nn, float* out);
// Row-major f32 W [N, K] packed into the layout (round to nearest even), in parallel.
void pack_blocked64(const float* w, int64_t N, int64_t K, uint16_t* out);
// Rows [n0, n0 + nn) of row-major bf16 W [N, K] widened to f32 [nn][K].
void widen_rows(const uint16_t* w, int64_t K, int64_t n0, int64_t nn, float* out);

}  // namespace gemmalens::ops
