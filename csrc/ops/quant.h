// Weights kept quantised in memory, blocks of 32 along K with one f32 scale each, symmetric:
//   int8: q = round(w / d) in [-127, 127], d = max|w| / 127 (like ggml's Q8_0);
//   int4: q = round(w / d) in [-8, 7],     d = max|w| / 7   (like ggml's Q4_0 without its sign trick).
// Multiplied with activations quantised on the fly to int8 blocks (d = max|x| / 127): exact integer dot products per
// block (vpdpbusd on AVX-512 VNNI or AVX-VNNI, vpmaddubsw on AVX2), times both block scales, summed in f32.
//
// Stored in tiles of kQuantTile = 16 weight rows (N padded up to a multiple of 16 with zero rows), interleaved so
// that one 64-byte vector holds 4 consecutive values of each of the tile's 16 rows: one vpdpbusd against 4 activation
// bytes broadcast to every lane sums into the 16 rows' outputs, so a step loads each weight vector once for all its
// activation rows and needs no horizontal sums (llama.cpp repacks its Q8_0 / Q4_0 blocks for its AVX-512 and ARM
// kernels in the same spirit: ggml-cpu's repack.cpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common.h"
#include "ops/pages.h"

namespace gemmalens::ops {

constexpr int64_t kQuantTile = 16;
inline int64_t quant_tiles(int64_t N) { return (N + kQuantTile - 1) / kQuantTile; }

struct QuantWeights {
  int64_t N = 0, K = 0;  // K % 64 == 0
  int bits = 8;          // 8 or 4
  // Tile t (rows 16t .. 16t + 15) is 16 * K * bits / 8 bytes from t * 16 * K * bits / 8:
  // bits 8: [K / 4][16][4] bytes, byte (g, r, j) = value (16t + r, 4g + j) + 128 (vpdpbusd takes the unsigned operand).
  // bits 4: [K / 64][8][16][4] bytes, byte (p, v, r, j) = value (16t + r, 64p + 4v + j) + 8 in its low nibble and
  //         value (16t + r, 64p + 32 + 4v + j) + 8 in its high nibble: an and (or a shift and an and) gives the 8
  //         vectors of block 2p (2p + 1) in the int8 layout.
  weight_vector<uint8_t> q;  // (both in the weight arena: ops/pages.h)
  weight_vector<float> d;    // [N / 16][K / 32][16] block scales: d of (16t + r, block b) at (t * K / 32 + b) * 16 + r
  size_t nbytes() const { return q.size() + d.size() * sizeof(float); }
};

int quant_bits(WeightQuant w);  // 0 (none), 8, 4
// K is a multiple of 64 (every CPU class has the kernels).
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
