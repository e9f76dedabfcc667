#include "model/config.h"

#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common.h"

namespace gemmalens {
using json = nlohmann::json;

namespace {

std::string fmt(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

void check(bool ok, const std::string& field, const std::string& value, const std::string& rule) {
  if (!ok) throw ValueError("Gemma3Config." + field + " = " + value + ": " + rule);
}

template <class T>
T get_num(const json& j, const char* key, T fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number()) throw ValueError(std::string("config.json: field '") + key + "' must be a number, got " + it->dump());
  return it->get<T>();
}

// Parse an HF rope dict ({"rope_type": "linear", "factor": 8.0}); only "default" and "linear" exist in Gemma 3.
double rope_factor(const json& rs, const char* where) {
  if (rs.is_null()) return 1.0;
  if (!rs.is_object()) throw ValueError(std::string("config.json: ") + where + " must be an object or null, got " + rs.dump());
  std::string type = rs.value("rope_type", rs.value("type", std::string("default")));
  if (type == "default") return 1.0;
  if (type != "linear")
    throw ValueError(std::string("config.json: ") + where + ".rope_type = '" + type +
                     "' is not supported (Gemma 3 uses 'default' or 'linear')");
  auto f = rs.find("factor");
  if (f == rs.end() || !f->is_number()) throw ValueError(std::string("config.json: ") + where + " is linear but has no numeric 'factor'");
  return f->get<double>();
}

}  // namespace

std::vector<std::string> Gemma3Config::default_layer_types(int n_layers, int pattern) {
  std::vector<std::string> t;
  for (int i = 0; i < n_layers; ++i)
    t.push_back((pattern > 0 && (i + 1) % pattern == 0) ? "full_attention" : "sliding_attention");
  return t;
}

void Gemma3Config::validate() const {
  auto pos = [&](int v, const char* f) { check(v > 0, f, std::to_string(v), "must be > 0"); };
  pos(hidden_size, "hidden_size");
  pos(intermediate_size, "intermediate_size");
  pos(num_hidden_layers, "num_hidden_layers");
  pos(num_attention_heads, "num_attention_heads");
  pos(num_key_value_heads, "num_key_value_heads");
  pos(head_dim, "head_dim");
  pos(vocab_size, "vocab_size");
  pos(sliding_window, "sliding_window");
  pos(max_position_embeddings, "max_position_embeddings");
  check(num_attention_heads % num_key_value_heads == 0, "num_key_value_heads", std::to_string(num_key_value_heads),
        "must divide num_attention_heads = " + std::to_string(num_attention_heads));
  check(head_dim % 2 == 0, "head_dim", std::to_string(head_dim), "must be even (rotate-half RoPE)");
  check((int)layer_types.size() == num_hidden_layers, "layer_types", "[" + std::to_string(layer_types.size()) + " entries]",
        "needs one entry per layer (num_hidden_layers = " + std::to_string(num_hidden_layers) + ")");
  for (size_t i = 0; i < layer_types.size(); ++i)
    check(layer_types[i] == "sliding_attention" || layer_types[i] == "full_attention", "layer_types[" + std::to_string(i) + "]",
          "'" + layer_types[i] + "'", "must be 'sliding_attention' or 'full_attention'");
  check(rope_theta > 0, "rope_theta", fmt(rope_theta), "must be > 0");
  check(rope_local_base_freq > 0, "rope_local_base_freq", fmt(rope_local_base_freq), "must be > 0");
  check(rope_scaling_factor >= 1.0, "rope_scaling.factor", fmt(rope_scaling_factor), "must be >= 1");
  check(query_pre_attn_scalar > 0, "query_pre_attn_scalar", fmt(query_pre_attn_scalar), "must be > 0");
  check(rms_norm_eps > 0 && rms_norm_eps < 1, "rms_norm_eps", fmt(rms_norm_eps), "must be in (0, 1)");
  check(final_logit_softcapping >= 0, "final_logit_softcapping", fmt(final_logit_softcapping), "must be >= 0 (0 or null = off)");
  check(attn_logit_softcapping >= 0, "attn_logit_softcapping", fmt(attn_logit_softcapping), "must be >= 0 (0 or null = off)");
  auto id = [&](int v, const char* f) {
    check(v >= 0 && v < vocab_size, f, std::to_string(v), "must be a token id in [0, vocab_size = " + std::to_string(vocab_size) + ")");
  };
  id(bos_token_id, "bos_token_id");
  id(pad_token_id, "pad_token_id");
  for (int e : eos_token_id) id(e, "eos_token_id");
}

Gemma3Config Gemma3Config::from_json(const std::string& text) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& e) {
    throw CheckpointError(std::string("config.json is not valid JSON: ") + e.what());
  }
  if (!root.is_object()) throw CheckpointError("config.json must hold a JSON object");
  const json* j = &root;
  // Multimodal Gemma3Config: the language model's fields sit under text_config.
  if (root.contains("text_config") && root["text_config"].is_object()) j = &root["text_config"];
  std::string model_type = j->value("model_type", std::string("gemma3_text"));
  if (model_type != "gemma3_text" && model_type != "gemma3")
    throw ValueError("config.json: model_type = '" + model_type + "' is not Gemma 3 ('gemma3_text' or 'gemma3')");
  if (j->value("use_bidirectional_attention", false))
    throw ValueError("config.json: use_bidirectional_attention = true (EmbeddingGemma) is not supported");
  if (j->contains("hidden_activation") && (*j)["hidden_activation"].is_string() &&
      (*j)["hidden_activation"] != "gelu_pytorch_tanh")
    throw ValueError("config.json: hidden_activation = " + (*j)["hidden_activation"].dump() + " is not supported (Gemma 3 uses gelu_pytorch_tanh)");
  if (j->value("attention_bias", false)) throw ValueError("config.json: attention_bias = true is not supported by Gemma 3");

  Gemma3Config c;
  try {
    c.hidden_size = get_num<int>(*j, "hidden_size", 0);
    c.intermediate_size = get_num<int>(*j, "intermediate_size", 0);
    c.num_hidden_layers = get_num<int>(*j, "num_hidden_layers", 0);
    c.num_attention_heads = get_num<int>(*j, "num_attention_heads", 0);
    c.num_key_value_heads = get_num<int>(*j, "num_key_value_heads", c.num_attention_heads);
    c.head_dim = get_num<int>(*j, "head_dim", c.num_attention_heads ? c.hidden_size / c.num_attention_heads : 0);
    c.vocab_size = get_num<int>(*j, "vocab_size", 0);
    c.sliding_window = get_num<int>(*j, "sliding_window", 4096);
    c.query_pre_attn_scalar = get_num<double>(*j, "query_pre_attn_scalar", 256.0);
    c.rms_norm_eps = get_num<double>(*j, "rms_norm_eps", 1e-6);
    c.final_logit_softcapping = get_num<double>(*j, "final_logit_softcapping", 0.0);
    c.attn_logit_softcapping = get_num<double>(*j, "attn_logit_softcapping", 0.0);
    c.max_position_embeddings = get_num<int>(*j, "max_position_embeddings", 32768);
    c.bos_token_id = get_num<int>(*j, "bos_token_id", 2);
    c.pad_token_id = get_num<int>(*j, "pad_token_id", 0);
    if (j->contains("eos_token_id") && !(*j)["eos_token_id"].is_null()) {
      const json& e = (*j)["eos_token_id"];
      c.eos_token_id = e.is_array() ? e.get<std::vector<int>>() : std::vector<int>{e.get<int>()};
    } else if (root.contains("eos_token_id") && root["eos_token_id"].is_array()) {
      c.eos_token_id = root["eos_token_id"].get<std::vector<int>>();
    }
    // RoPE: transformers v5 writes rope_parameters per layer type; v4 writes three flat fields.
    if (j->contains("rope_parameters") && (*j)["rope_parameters"].is_object() &&
        (*j)["rope_parameters"].contains("full_attention")) {
      const json& rp = (*j)["rope_parameters"];
      c.rope_theta = get_num<double>(rp["full_attention"], "rope_theta", 1000000.0);
      c.rope_scaling_factor = rope_factor(rp["full_attention"], "rope_parameters.full_attention");
      if (rp.contains("sliding_attention")) {
        c.rope_local_base_freq = get_num<double>(rp["sliding_attention"], "rope_theta", 10000.0);
        if (rope_factor(rp["sliding_attention"], "rope_parameters.sliding_attention") != 1.0)
          throw ValueError("config.json: rope scaling on sliding layers is not part of Gemma 3");
      }
    } else {
      c.rope_theta = get_num<double>(*j, "rope_theta", 1000000.0);
      c.rope_local_base_freq = get_num<double>(*j, "rope_local_base_freq", 10000.0);
      c.rope_scaling_factor = j->contains("rope_scaling") ? rope_factor((*j)["rope_scaling"], "rope_scaling") : 1.0;
    }
    if (j->contains("layer_types") && (*j)["layer_types"].is_array()) {
      c.layer_types = (*j)["layer_types"].get<std::vector<std::string>>();
    } else {
      int pattern = get_num<int>(*j, "sliding_window_pattern", get_num<int>(*j, "_sliding_window_pattern", 6));
      c.layer_types = default_layer_types(c.num_hidden_layers, pattern);
    }
  } catch (const json::exception& e) {
    throw ValueError(std::string("config.json: a field has the wrong type: ") + e.what());
  }
  c.validate();
  return c;
}

std::string Gemma3Config::to_json() const {
  json j;
  j["architectures"] = {"Gemma3ForCausalLM"};
  j["model_type"] = "gemma3_text";
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["vocab_size"] = vocab_size;
  j["sliding_window"] = sliding_window;
  j["layer_types"] = layer_types;
  j["rope_theta"] = rope_theta;
  j["rope_local_base_freq"] = rope_local_base_freq;
  j["rope_scaling"] = rope_scaling_factor == 1.0 ? json(nullptr) : json{{"rope_type", "linear"}, {"factor", rope_scaling_factor}};
  // HF types it as int (256, 168); keep a non-integral value as a float.
  if (query_pre_attn_scalar == std::floor(query_pre_attn_scalar))
    j["query_pre_attn_scalar"] = static_cast<int64_t>(query_pre_attn_scalar);
  else
    j["query_pre_attn_scalar"] = query_pre_attn_scalar;
  j["rms_norm_eps"] = rms_norm_eps;
  j["final_logit_softcapping"] = final_logit_softcapping > 0 ? json(final_logit_softcapping) : json(nullptr);
  j["attn_logit_softcapping"] = attn_logit_softcapping > 0 ? json(attn_logit_softcapping) : json(nullptr);
  j["max_position_embeddings"] = max_position_embeddings;
  j["bos_token_id"] = bos_token_id;
  j["eos_token_id"] = eos_token_id;
  j["pad_token_id"] = pad_token_id;
  j["hidden_activation"] = "gelu_pytorch_tanh";
  j["attention_bias"] = false;
  j["tie_word_embeddings"] = true;
  return j.dump(2);
}

Gemma3Config Gemma3Config::preset(const std::string& size) {
  // Published Gemma 3 configs (see shared/reference/gemma3.md, "Sizes").
  Gemma3Config c;
  auto set = [&](int L, int D, int H, int KV, int Hd, int F, int W, double scale, double qscale, int V, int ctx) {
    c.num_hidden_layers = L; c.hidden_size = D; c.num_attention_heads = H; c.num_key_value_heads = KV;
    c.head_dim = Hd; c.intermediate_size = F; c.sliding_window = W; c.rope_scaling_factor = scale;
    c.query_pre_attn_scalar = qscale; c.vocab_size = V; c.max_position_embeddings = ctx;
  };
  if (size == "270m") set(18, 640, 4, 1, 256, 2048, 512, 1.0, 256, 262144, 32768);
  else if (size == "1b") set(26, 1152, 4, 1, 256, 6912, 512, 1.0, 256, 262144, 32768);
  else if (size == "4b") set(34, 2560, 8, 4, 256, 10240, 1024, 8.0, 256, 262208, 131072);
  else if (size == "12b") set(48, 3840, 16, 8, 256, 15360, 1024, 8.0, 256, 262208, 131072);
  else if (size == "27b") set(62, 5376, 32, 16, 128, 21504, 1024, 8.0, 168, 262208, 131072);
  else throw ValueError("Gemma3Config.preset: unknown size '" + size + "'; choose one of 270m, 1b, 4b, 12b, 27b");
  c.layer_types = default_layer_types(c.num_hidden_layers);
  c.validate();
  return c;
}

}  // namespace gemmalens
