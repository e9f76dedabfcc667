// Sparse autoencoders and transcoders (Gemma Scope 2 / SAELens), computed with the ops layer (oneDNN matmuls).
//   pre  = (x - b_dec * apply_b_dec_to_input) W_enc + b_enc          W_enc [d_in, d_sae]
//   acts = jumprelu: relu(pre) * (pre > threshold) | relu: relu(pre) | topk: relu of the k largest pre
//          | jumprelu_signed: pre * (pre > threshold) (circuit-tracer's JumpReLU: no ReLU, so a negative threshold
//            lets negative activations through; the same as jumprelu wherever threshold >= 0)
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
  enum class Arch { JumpReLU, ReLU, TopK, JumpReLUSigned };
  static Arch parse_arch(const std::string& name);  // "jumprelu" | "relu" | "topk" | "jumprelu_signed"; ValueError otherwise
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
  // Reverse pass (float32, through the weights as stored): the decoder's VJP g_acts [M, d_sae] = g_out [M, d_out]
  // W_dec^T (b_dec and the skip connection do not reach the features), and the encoder's g_x [M, d_in] = g_pre
  // [M, d_sae] W_enc^T at the pre-activations (the activation function's mask is the caller's to apply).
  void decode_vjp(const float* g_out, int64_t M, float* g_acts) const;
  void encode_vjp(const float* g_pre, int64_t M, float* g_x) const;
  // The stored encoder / decoder weights back as f32 (bf16 storage widened): W_enc [d_in, d_sae], W_dec [d_sae, d_out].
  void export_weights(float* W_enc, float* W_dec) const;

 private:
  void activate(float* pre, int64_t M);
  ops::Linear enc_, dec_, skip_;
  std::vector<float> b_enc_, threshold_, b_dec_;
  bool has_skip_ = false;
};

}  // namespace gemmalens
