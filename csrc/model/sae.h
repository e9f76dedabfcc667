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
  SAE(const float* W_enc, const float* b_enc, const float* threshold, const float* W_dec, const float* b_dec,
      const float* W_skip, int d_in, int d_sae, int d_out, Arch arch, int k, bool apply_b_dec_to_input, DType dtype);
  int d_in, d_sae, d_out, k;
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
