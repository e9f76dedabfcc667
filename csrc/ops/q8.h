// Int8 weights kept quantised in memory (blocks of 32 along K, one f32 scale each, symmetric: like ggml's Q8_0),
// multiplied with activations quantised on the fly to int8 blocks, on AVX-512 VNNI (vpdpbusd).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace gemmalens::ops {

struct Q8Weights {
  int64_t N = 0, K = 0;           // K % 64 == 0
  std::vector<uint8_t> q;         // [N, K]: int8 value + 128 (vpdpbusd takes the unsigned operand)
  std::vector<float> d;           // [N, K / 32] block scales
  size_t nbytes() const { return q.size() + d.size() * sizeof(float); }
};

bool q8_supported(int64_t K);  // the CPU has AVX-512 VNNI and K is a multiple of 64
// w [N, K] row-major f32 -> blocks: d = max|w| / 127, q = round(w / d).
Q8Weights q8_quantize(const float* w, int64_t N, int64_t K);
// Storage for [N, K] (uninitialised values) and quantisation of rows [r0, r0 + n) from w (n x K f32).
Q8Weights q8_alloc(int64_t N, int64_t K);
void q8_quantize_rows(Q8Weights& r, const float* w, int64_t r0, int64_t n);
// y [M, N] (row stride ldy) = x [M, K] W^T, x quantised per row and block of 32 (d = max|x| / 127).
void q8_matmul(const Q8Weights& w, const float* x, int64_t M, float* y, int64_t ldy);
// Row n dequantised into out [K].
void q8_row(const Q8Weights& w, int64_t n, float* out);

}  // namespace gemmalens::ops
