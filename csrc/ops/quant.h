// Weights kept quantised in memory, blocks of 32 along K with one f32 scale each, symmetric:
//   int8: q = round(w / d) in [-127, 127], d = max|w| / 127 (like ggml's Q8_0);
//   int4: q = round(w / d) in [-8, 7],     d = max|w| / 7   (like ggml's Q4_0 without its sign trick).
// Multiplied with activations quantised on the fly to int8 blocks (d = max|x| / 127) on AVX-512 VNNI (vpdpbusd).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common.h"

namespace gemmalens::ops {

struct QuantWeights {
  int64_t N = 0, K = 0;  // K % 64 == 0
  int bits = 8;          // 8 or 4
  // bits 8: [N, K] bytes, value + 128 (vpdpbusd takes the unsigned operand).
  // bits 4: [N, K / 2] bytes; each group of 64 values (two blocks) is 32 bytes: byte i holds value i + 8 in its
  //         low nibble and value 32 + i + 8 in its high nibble, so one and + shift give the int8 kernel's layout.
  std::vector<uint8_t> q;
  std::vector<float> d;  // [N, K / 32] block scales
  size_t nbytes() const { return q.size() + d.size() * sizeof(float); }
};

int quant_bits(WeightQuant w);  // 0 (none), 8, 4
// The CPU has AVX-512 VNNI and K is a multiple of 64.
bool quant_supported(int64_t K);
// w [N, K] row-major f32 -> blocks.
QuantWeights quant_weights(const float* w, int64_t N, int64_t K, int bits);
// Storage for [N, K] (values unset) and quantisation of rows [r0, r0 + n) from w (n x K f32).
QuantWeights quant_alloc(int64_t N, int64_t K, int bits);
void quant_rows(QuantWeights& r, const float* w, int64_t r0, int64_t n);
// y [M, N] (row stride ldy) = x [M, K] W^T, x quantised per row and block of 32.
void quant_matmul(const QuantWeights& w, const float* x, int64_t M, float* y, int64_t ldy);
// Row n dequantised into out [K].
void quant_row(const QuantWeights& w, int64_t n, float* out);

}  // namespace gemmalens::ops
