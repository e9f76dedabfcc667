#include "io/hf_checkpoint.h"

#include <cstring>

#include "io/checked_source.h"
#include "io/load_progress.h"
#include "io/safetensors.h"

namespace gemmalens {

namespace {
bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
}  // namespace

std::unique_ptr<Gemma3Model> load_hf_safetensors(const std::string& weights_path, const Gemma3Config& cfg, DType dtype,
                                                 WeightQuant quant, LoadProgress* progress) {
  auto store = TensorStore::open(weights_path);
  // Where the text model's "model.*" tensors live: Gemma3ForCausalLM ("model."), multimodal checkpoints
  // written by transformers v4 ("language_model.model.") and v5 ("model.language_model.").
  std::string root;
  for (const char* r : {"model.", "language_model.model.", "model.language_model."})
    if (store->find(std::string(r) + "embed_tokens.weight")) { root = r; break; }
  if (root.empty())
    throw CheckpointError("'" + weights_path + "' is not a Gemma 3 checkpoint: no 'model.embed_tokens.weight' (nor a multimodal "
                          "'language_model.model.' / 'model.language_model.' variant) among its " + std::to_string(store->tensors().size()) + " tensors");
  CheckedSource<TensorInfo> src({"checkpoint '" + weights_path + "'", "; does config.json belong to these weights?",
                                  [&](const std::string& hf_name) { return root + hf_name.substr(std::strlen("model.")); },
                                  [&](const std::string& name) { return store->find(name); },
                                  [](const TensorInfo& t) { return t.shape; }});
  TensorGetter get = [&](const std::string& hf_name, const std::vector<int64_t>& shape) {
    const TensorInfo& t = src.take(hf_name, shape);
    std::vector<float> out(static_cast<size_t>(t.numel()));
    tensor_to_f32(t, out.data());
    TensorStore::release(t);
    return out;
  };
  RowGetter rows = [&](const std::string& hf_name, const std::vector<int64_t>& shape, int64_t r0, int64_t n, float* out) {
    const TensorInfo& t = src.take(hf_name, shape);
    TensorInfo part = t;  // a view of rows [r0, r0 + n): same dtype, rows of shape[1] elements
    const size_t row_bytes = t.nbytes / static_cast<size_t>(shape[0]);
    part.shape = {n, shape[1]};
    part.data = t.data + r0 * row_bytes;
    part.nbytes = n * row_bytes;
    tensor_to_f32(part, out);
    TensorStore::release(part);
  };
  if (progress) progress->start(cfg);
  auto model = std::make_unique<Gemma3Model>(cfg, dtype, counted(get, progress), quant, counted(rows, progress),
                                             src.checker());

  for (const auto& kv : store->tensors()) {
    const std::string& n = kv.first;
    if (src.taken(n)) continue;
    // Multimodal checkpoints: the vision tower and projector are not part of the text model.
    if (starts_with(n, "vision_tower.") || starts_with(n, "multi_modal_projector.") || starts_with(n, "model.vision_tower.") ||
        starts_with(n, "model.multi_modal_projector."))
      continue;
    if (n == "lm_head.weight" || n == "language_model.lm_head.weight") {
      // Gemma 3 ties the LM head to the embedding; accept an explicit copy only if it is identical.
      const TensorInfo* e = store->find(root + "embed_tokens.weight");
      if (kv.second.shape == e->shape && kv.second.dtype == e->dtype && std::memcmp(kv.second.data, e->data, e->nbytes) == 0) continue;
      throw CheckpointError("tensor '" + n + "' differs from the embedding; Gemma 3 ties them (an untied LM head is not supported)");
    }
    throw src.unexpected(n, &kv.second.shape);
  }
  return model;
}

}  // namespace gemmalens
