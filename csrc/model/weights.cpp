// Building Weights from any format through a TensorGetter (HF names, HF layouts).
#include <string>

#include "model/gemma3.h"

namespace gemmalens {

namespace {

std::vector<float> concat_rows(std::vector<std::vector<float>> parts) {
  size_t n = 0;
  for (auto& p : parts) n += p.size();
  std::vector<float> out;
  out.reserve(n);
  for (auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

}  // namespace

void for_each_weight(const Gemma3Config& cfg, const TensorChecker& fn) {
  const int64_t D = cfg.hidden_size, F = cfg.intermediate_size, H = cfg.num_attention_heads, KV = cfg.num_key_value_heads,
                Hd = cfg.head_dim, V = cfg.vocab_size;
  fn("model.embed_tokens.weight", {V, D});
  for (int i = 0; i < cfg.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    fn(p + "input_layernorm.weight", {D});
    fn(p + "self_attn.q_proj.weight", {H * Hd, D});
    fn(p + "self_attn.k_proj.weight", {KV * Hd, D});
    fn(p + "self_attn.v_proj.weight", {KV * Hd, D});
    fn(p + "self_attn.q_norm.weight", {Hd});
    fn(p + "self_attn.k_norm.weight", {Hd});
    fn(p + "self_attn.o_proj.weight", {D, H * Hd});
    fn(p + "post_attention_layernorm.weight", {D});
    fn(p + "pre_feedforward_layernorm.weight", {D});
    fn(p + "mlp.gate_proj.weight", {F, D});
    fn(p + "mlp.up_proj.weight", {F, D});
    fn(p + "mlp.down_proj.weight", {D, F});
    fn(p + "post_feedforward_layernorm.weight", {D});
  }
  fn("model.norm.weight", {D});
}

Gemma3Model::Gemma3Model(const Gemma3Config& cfg, DType dtype, const TensorGetter& get, WeightQuant quant, const RowGetter& rows,
                         const TensorChecker& check)
    : cfg_(cfg), dtype_(dtype) {
  cfg_.validate();
  if (check) for_each_weight(cfg_, check);  // every tensor present and shaped as the config says, before any allocation
  const int64_t D = cfg.hidden_size, F = cfg.intermediate_size, H = cfg.num_attention_heads, KV = cfg.num_key_value_heads,
                Hd = cfg.head_dim, V = cfg.vocab_size;
  // int4 keeps the tied embedding / LM head at int8: 4-bit logits cost far more than 4-bit layers (+40% perplexity
  // against a few percent on the real 270M; llama.cpp's Q4_K_M files likewise keep token_embd at Q8_0 / Q6_K).
  const WeightQuant embed_quant = quant == WeightQuant::Int4 ? WeightQuant::Int8 : quant;
  if (rows) {
    w_.embed = ops::Linear::plain_from_rows(V, D, dtype, embed_quant, [&](int64_t r0, int64_t n, float* out) {
      rows("model.embed_tokens.weight", {V, D}, r0, n, out);
    });
  } else {
    auto e = get("model.embed_tokens.weight", {V, D});
    w_.embed = ops::Linear(e.data(), V, D, dtype, /*plain=*/true, embed_quant);
  }
  for (int i = 0; i < cfg.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LayerWeights L;
    L.input_layernorm = get(p + "input_layernorm.weight", {D});
    {
      auto qkv = concat_rows({get(p + "self_attn.q_proj.weight", {H * Hd, D}), get(p + "self_attn.k_proj.weight", {KV * Hd, D}),
                              get(p + "self_attn.v_proj.weight", {KV * Hd, D})});
      L.qkv = ops::Linear(qkv.data(), (H + 2 * KV) * Hd, D, dtype, false, quant);
    }
    L.q_norm = get(p + "self_attn.q_norm.weight", {Hd});
    L.k_norm = get(p + "self_attn.k_norm.weight", {Hd});
    {
      auto o = get(p + "self_attn.o_proj.weight", {D, H * Hd});
      L.o_proj = ops::Linear(o.data(), D, H * Hd, dtype, false, quant);
    }
    L.post_attention_layernorm = get(p + "post_attention_layernorm.weight", {D});
    L.pre_feedforward_layernorm = get(p + "pre_feedforward_layernorm.weight", {D});
    {
      auto gu = concat_rows({get(p + "mlp.gate_proj.weight", {F, D}), get(p + "mlp.up_proj.weight", {F, D})});
      L.gate_up = ops::Linear(gu.data(), 2 * F, D, dtype, false, quant);
    }
    {
      auto d = get(p + "mlp.down_proj.weight", {D, F});
      L.down_proj = ops::Linear(d.data(), D, F, dtype, false, quant);
    }
    L.post_feedforward_layernorm = get(p + "post_feedforward_layernorm.weight", {D});
    w_.layers.push_back(std::move(L));
  }
  w_.final_norm = get("model.norm.weight", {D});
  quant_ = w_.embed.is_quantized() ? quant : WeightQuant::None;
}

size_t Gemma3Model::weight_nbytes() const {
  size_t n = w_.embed.nbytes() + w_.final_norm.size() * 4;
  for (const auto& L : w_.layers)
    n += L.qkv.nbytes() + L.o_proj.nbytes() + L.gate_up.nbytes() + L.down_proj.nbytes() +
         4 * (L.input_layernorm.size() + L.q_norm.size() + L.k_norm.size() + L.post_attention_layernorm.size() +
              L.pre_feedforward_layernorm.size() + L.post_feedforward_layernorm.size());
  return n;
}

void Gemma3Model::export_tensors(
    const std::function<void(const std::string&, const std::vector<int64_t>&, const float*)>& fn) const {
  const int64_t D = cfg_.hidden_size, F = cfg_.intermediate_size, H = cfg_.num_attention_heads, KV = cfg_.num_key_value_heads,
                Hd = cfg_.head_dim, V = cfg_.vocab_size;
  {
    std::vector<float> e(static_cast<size_t>(V) * D);
    w_.embed.to_rowmajor(e.data());
    fn("model.embed_tokens.weight", {V, D}, e.data());
  }
  for (int i = 0; i < cfg_.num_hidden_layers; ++i) {
    const LayerWeights& L = w_.layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    fn(p + "input_layernorm.weight", {D}, L.input_layernorm.data());
    std::vector<float> qkv(static_cast<size_t>((H + 2 * KV) * Hd) * D);
    L.qkv.to_rowmajor(qkv.data());
    fn(p + "self_attn.q_proj.weight", {H * Hd, D}, qkv.data());
    fn(p + "self_attn.k_proj.weight", {KV * Hd, D}, qkv.data() + H * Hd * D);
    fn(p + "self_attn.v_proj.weight", {KV * Hd, D}, qkv.data() + (H + KV) * Hd * D);
    fn(p + "self_attn.q_norm.weight", {Hd}, L.q_norm.data());
    fn(p + "self_attn.k_norm.weight", {Hd}, L.k_norm.data());
    std::vector<float> o(static_cast<size_t>(D) * H * Hd);
    L.o_proj.to_rowmajor(o.data());
    fn(p + "self_attn.o_proj.weight", {D, H * Hd}, o.data());
    fn(p + "post_attention_layernorm.weight", {D}, L.post_attention_layernorm.data());
    fn(p + "pre_feedforward_layernorm.weight", {D}, L.pre_feedforward_layernorm.data());
    std::vector<float> gu(static_cast<size_t>(2 * F) * D);
    L.gate_up.to_rowmajor(gu.data());
    fn(p + "mlp.gate_proj.weight", {F, D}, gu.data());
    fn(p + "mlp.up_proj.weight", {F, D}, gu.data() + F * D);
    std::vector<float> dn(static_cast<size_t>(D) * F);
    L.down_proj.to_rowmajor(dn.data());
    fn(p + "mlp.down_proj.weight", {D, F}, dn.data());
    fn(p + "post_feedforward_layernorm.weight", {D}, L.post_feedforward_layernorm.data());
  }
  fn("model.norm.weight", {D}, w_.final_norm.data());
}

}  // namespace gemmalens
