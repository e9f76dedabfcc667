#include "model/config.h"

#include <cmath>
#include <limits>
#include <type_traits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common.h"
#include "json_limits.h"

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

// Integers from config.json must be integral and fit an int (2**40 + 2 must not load as 2 layers); floats must be
// finite (JSON has no NaN/inf, but a value beyond double's range parses as inf).
template <class T>
T get_num(const json& j, const char* key, T fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number()) throw ValueError(std::string("config.json: field '") + key + "' must be a number, got " + it->dump());
  if constexpr (std::is_integral_v<T>) {
    bool ok = false;
    long double v = 0;
    if (it->is_number_unsigned()) {
      const uint64_t u = it->get<uint64_t>();
      ok = u <= static_cast<uint64_t>(std::numeric_limits<T>::max());
      v = static_cast<long double>(u);
    } else if (it->is_number_integer()) {
      const int64_t i = it->get<int64_t>();
      ok = i >= static_cast<int64_t>(std::numeric_limits<T>::min()) && i <= static_cast<int64_t>(std::numeric_limits<T>::max());
      v = static_cast<long double>(i);
    } else {
      const double d = it->get<double>();
      ok = std::isfinite(d) && d == std::floor(d) && d >= static_cast<double>(std::numeric_limits<T>::min()) &&
           d <= static_cast<double>(std::numeric_limits<T>::max());
      v = static_cast<long double>(d);
    }
    if (!ok)
      throw ValueError(std::string("config.json: field '") + key + "' = " + it->dump() + " is not an integer in [" +
                       std::to_string(std::numeric_limits<T>::min()) + ", " + std::to_string(std::numeric_limits<T>::max()) + "]");
    return static_cast<T>(v);
  } else {
    const double d = it->get<double>();
    if (!std::isfinite(d)) throw ValueError(std::string("config.json: field '") + key + "' = " + it->dump() + " is not finite");
    return static_cast<T>(d);
  }
}

// An id or a list of ids (eos_token_id), each an int.
std::vector<int> int_list(const json& e, const char* key) {
  json wrap = json::object();
  std::vector<int> out;
  if (!e.is_array()) {
    wrap[key] = e;
    out.push_back(get_num<int>(wrap, key, 0));
    return out;
  }
  if (e.size() > 64) throw ValueError(std::string("config.json: ") + key + " lists " + std::to_string(e.size()) + " ids (at most 64)");
  for (const auto& x : e) {
    wrap[key] = x;
    out.push_back(get_num<int>(wrap, key, 0));
  }
  return out;
}

// An HF rope dict from config.json ({"rope_type": "linear", "factor": 8.0}, transformers v4 also writes "type").
double rope_factor(const json& rs, const char* where) {
  if (rs.is_null()) return 1.0;
  if (!rs.is_object()) throw ValueError(std::string("config.json: ") + where + " must be an object or null, got " + rs.dump());
  const std::string type = rs.value("rope_type", rs.value("type", std::string("default")));
  auto f = rs.find("factor");
  const bool has_factor = f != rs.end() && f->is_number();
  const double factor = has_factor ? f->get<double>() : 0.0;
  return rope_scaling_factor(type, has_factor ? &factor : nullptr, std::string("config.json: ") + where);
}

}  // namespace

double rope_scaling_factor(const std::string& rope_type, const double* factor, const std::string& where) {
  if (rope_type == "default") return 1.0;
  if (rope_type != "linear")
    throw ValueError(where + ".rope_type = '" + rope_type + "' is not supported (Gemma 3 uses 'default' or 'linear')");
  if (!factor) throw ValueError(where + " is linear but has no numeric 'factor'");
  if (!std::isfinite(*factor)) throw ValueError(where + ".factor = " + fmt(*factor) + " is not finite");
  return *factor;
}

std::vector<std::string> Gemma3Config::default_layer_types(int n_layers, int pattern) {
  // Bounded before anything is built: a corrupt layer count must not make billions of strings.
  check(n_layers > 0 && n_layers <= kMaxLayers, "num_hidden_layers", std::to_string(n_layers),
        "must be in [1, " + std::to_string(kMaxLayers) + "]");
  std::vector<std::string> t;
  t.reserve(n_layers);
  for (int i = 0; i < n_layers; ++i)
    t.push_back((pattern > 0 && (i + 1) % pattern == 0) ? "full_attention" : "sliding_attention");
  return t;
}

void Gemma3Config::validate() const {
  // Every size is bounded before anything is sized from it. The limits admit every published Gemma 3 (27b: 62
  // layers, D 5376, F 21504, 32 heads, head_dim 128, vocab 262208, context 131072) with wide headroom, and keep
  // every product the model forms (V * D, (H + 2 KV) * Hd * D, ...) far inside int64.
  auto in = [&](int v, int lo, int hi, const char* f) {
    check(v >= lo && v <= hi, f, std::to_string(v), "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  };
  in(hidden_size, 1, kMaxHidden, "hidden_size");
  in(intermediate_size, 1, kMaxIntermediate, "intermediate_size");
  in(num_hidden_layers, 1, kMaxLayers, "num_hidden_layers");
  in(num_attention_heads, 1, kMaxHeads, "num_attention_heads");
  in(num_key_value_heads, 1, num_attention_heads, "num_key_value_heads");
  in(head_dim, 2, kMaxHeadDim, "head_dim");
  in(vocab_size, 1, kMaxVocab, "vocab_size");
  in(sliding_window, 1, kMaxPositions, "sliding_window");
  in(max_position_embeddings, 1, kMaxPositions, "max_position_embeddings");
  check(num_attention_heads % num_key_value_heads == 0, "num_key_value_heads", std::to_string(num_key_value_heads),
        "must divide num_attention_heads = " + std::to_string(num_attention_heads));
  check(head_dim % 2 == 0, "head_dim", std::to_string(head_dim), "must be even (rotate-half RoPE)");
  check((int)layer_types.size() == num_hidden_layers, "layer_types", "[" + std::to_string(layer_types.size()) + " entries]",
        "needs one entry per layer (num_hidden_layers = " + std::to_string(num_hidden_layers) + ")");
  for (size_t i = 0; i < layer_types.size(); ++i)
    check(layer_types[i] == "sliding_attention" || layer_types[i] == "full_attention", "layer_types[" + std::to_string(i) + "]",
          "'" + layer_types[i] + "'", "must be 'sliding_attention' or 'full_attention'");
  auto finite = [&](double v, const char* f) { check(std::isfinite(v), f, fmt(v), "must be finite"); };
  finite(rope_theta, "rope_theta");
  finite(rope_local_base_freq, "rope_local_base_freq");
  finite(rope_scaling_factor, "rope_scaling.factor");
  finite(query_pre_attn_scalar, "query_pre_attn_scalar");
  finite(final_logit_softcapping, "final_logit_softcapping");
  finite(attn_logit_softcapping, "attn_logit_softcapping");
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
  check(eos_token_id.size() <= 64, "eos_token_id", "[" + std::to_string(eos_token_id.size()) + " ids]", "must hold at most 64 ids");
  for (int e : eos_token_id) id(e, "eos_token_id");
}

Gemma3Config Gemma3Config::from_json(const std::string& text) {
  json root;
  try {
    root = parse_json_limited(text.begin(), text.end(), "config.json");
  } catch (const json::exception& e) {
    throw CheckpointError(std::string("config.json is not valid JSON: ") + e.what());
  }
  if (!root.is_object()) throw CheckpointError("config.json must hold a JSON object");
  Gemma3Config c;
  try {
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

    c.hidden_size = get_num<int>(*j, "hidden_size", 0);
    c.intermediate_size = get_num<int>(*j, "intermediate_size", 0);
    c.num_hidden_layers = get_num<int>(*j, "num_hidden_layers", 0);
    c.num_attention_heads = get_num<int>(*j, "num_attention_heads", 0);
    c.num_key_value_heads = get_num<int>(*j, "num_key_value_heads", c.num_attention_heads);
    // Default head_dim = D / H, divided only when both are valid (INT_MIN / -1 traps).
    c.head_dim = get_num<int>(*j, "head_dim", c.num_attention_heads > 0 && c.hidden_size > 0 ? c.hidden_size / c.num_attention_heads : 0);
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
      c.eos_token_id = int_list(e, "eos_token_id");
    } else if (root.contains("eos_token_id") && root["eos_token_id"].is_array()) {
      c.eos_token_id = int_list(root["eos_token_id"], "eos_token_id");
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
      if ((*j)["layer_types"].size() > static_cast<size_t>(kMaxLayers))
        throw ValueError("config.json: layer_types has " + std::to_string((*j)["layer_types"].size()) + " entries (at most " +
                         std::to_string(kMaxLayers) + " layers)");
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
