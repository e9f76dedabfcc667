// Dequantisation of ggml block formats (layouts from ggml's ggml-common.h / gguf-py's quants.py).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace gemmalens::ops {

enum class GGMLType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9, Q2_K = 10, Q3_K = 11,
  Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};

// Name of a ggml type id ("Q4_K", "IQ2_XXS", ... or "type 77").
std::string ggml_type_name(uint32_t type);
// Elements per block and bytes per block; {0, 0} for a type gemmalens cannot dequantise.
struct BlockInfo { int64_t elems; int64_t bytes; };
BlockInfo ggml_block_info(uint32_t type);
// Dequantise n elements (a multiple of the block size) of `type` at src into f32 dst.
void dequantize(uint32_t type, const uint8_t* src, int64_t n, float* dst);

}  // namespace gemmalens::ops
