// Sparse autoencoders and transcoders (Gemma Scope 2 / SAELens), computed with the ops layer (oneDNN matmuls).
//   pre  = (x - b_dec * apply_b_dec_to_input) W_enc + b_enc          W_enc [d_in, d_sae]
//   acts = jumprelu: relu(pre) * (pre > threshold) | relu: relu(pre) | topk: relu of the k largest pre
//   out  = acts W_dec + b_dec (+ x W_skip for affine transcoders)     W_dec [d_sae, d_out]
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "ops/linear.h"

namespace gemmalens {

class SAE {
 public:
  enum class Arch { JumpReLU, ReLU, TopK };
  static Arch parse_arch(const std::string& name);  // "jumprelu" | "relu" | "topk"; ValueError otherwise
  // A float32 row-major array held by the caller, with its shape; data null for an optional one left out.
  struct Array {
    const float* data = nullptr;
    std::vector<int64_t> shape;
  };
  // The arrays as SAELens / Gemma Scope store them. The constructor checks their shapes (ValueError naming them).
  struct Weights {
    Array W_enc;      // [d_in, d_sae]
    Array b_enc;      // [d_sae]
    Array threshold;  // [d_sae]; jumprelu only
    Array W_dec;      // [d_sae, d_out]
    Array b_dec;      // [d_out]
    Array W_skip;     // [d_in, d_out]; affine transcoders only
  };
  SAE(const Weights& w, Arch arch, int k, bool apply_b_dec_to_input, DType dtype);
  int d_in = 0, d_sae = 0, d_out = 0, k = 0;
  Arch arch;
  bool apply_b_dec_to_input;
  void encode(const float* x, int64_t M, float* acts);                          // x [M, d_in] -> acts [M, d_sae]
  void decode(const float* acts, int64_t M, const float* x, float* out);       // -> out [M, d_out]; x for the skip
  // Top-k features per row without a dense [M, d_sae] result: idx/val [M, kk], by descending value.
  void encode_topk(const float* x, int64_t M, int kk, int32_t* idx, float* val);

 private:
  void activate(float* pre, int64_t M);
  ops::Linear enc_, dec_, skip_;
  std::vector<float> b_enc_, threshold_, b_dec_;
  bool has_skip_ = false;
};

}  // namespace gemmalens
