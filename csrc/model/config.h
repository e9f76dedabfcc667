// Gemma3Config: one plain struct with HF field names; the single source of truth for the model shape.
// Parsed from an HF config.json (Gemma3TextConfig, or the text_config of a multimodal Gemma3Config;
// transformers v4 `rope_theta`/`rope_local_base_freq`/`rope_scaling` and v5 `rope_parameters` forms).
#pragma once
#include <string>
#include <vector>

namespace gemmalens {

// Upper bounds checked by validate() before anything is sized from a config (files from the internet). Every
// published Gemma 3 is far inside them (27b: 62 layers, D 5376, F 21504, 32 heads, head_dim 128, vocab 262208,
// context 131072).
constexpr int kMaxLayers = 512;
constexpr int kMaxHidden = 65536;
constexpr int kMaxIntermediate = 1 << 20;
constexpr int kMaxHeads = 1024;
constexpr int kMaxHeadDim = 4096;
constexpr int kMaxVocab = 1 << 24;
constexpr int kMaxPositions = 1 << 24;

struct Gemma3Config {
  int hidden_size = 0;           // D
  int intermediate_size = 0;     // F
  int num_hidden_layers = 0;     // L
  int num_attention_heads = 0;   // H
  int num_key_value_heads = 0;   // KV
  int head_dim = 0;              // Hd
  int vocab_size = 0;            // V
  int sliding_window = 0;        // keys visible on sliding layers, the current token included
  std::vector<std::string> layer_types;  // "sliding_attention" | "full_attention", one per layer
  double rope_theta = 1000000.0;          // RoPE base on full-attention layers
  double rope_local_base_freq = 10000.0;  // RoPE base on sliding layers
  double rope_scaling_factor = 1.0;       // linear scaling on full layers (1 = none)
  double query_pre_attn_scalar = 256.0;   // scores *= query_pre_attn_scalar ** -0.5
  double rms_norm_eps = 1e-6;
  double final_logit_softcapping = 0.0;   // 0 = not set (null in HF)
  double attn_logit_softcapping = 0.0;    // 0 = not set (null in HF)
  int max_position_embeddings = 32768;
  int bos_token_id = 2;
  std::vector<int> eos_token_id = {1, 106};
  int pad_token_id = 0;

  bool is_sliding(int layer) const { return layer_types[layer] == "sliding_attention"; }

  // Throws ValueError naming the offending field and value.
  void validate() const;
  // Parse HF config.json text. `layer_types` is derived when absent (sliding unless (i+1) % 6 == 0).
  static Gemma3Config from_json(const std::string& text);
  std::string to_json() const;  // HF Gemma3TextConfig (transformers v4 field names)
  static Gemma3Config preset(const std::string& size);  // "270m" | "1b" | "4b" | "12b" | "27b"
  static std::vector<std::string> default_layer_types(int n_layers, int pattern = 6);
};

// The RoPE scaling factor of an HF rope dict: 1 for rope_type "default", `factor` for "linear" (given and finite);
// ValueError naming `where` otherwise. The one parser behind config.json and the Gemma3Config.rope_scaling setter.
double rope_scaling_factor(const std::string& rope_type, const double* factor, const std::string& where);

}  // namespace gemmalens
