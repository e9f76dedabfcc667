// HF transformers checkpoints: config.json + safetensors (single or sharded), Gemma3ForCausalLM or the
// text part of a multimodal Gemma3ForConditionalGeneration.
#pragma once
#include <memory>
#include <string>

#include "model/gemma3.h"

namespace gemmalens {
struct LoadProgress;

// `weights_path`: a directory (model.safetensors or model.safetensors.index.json) or a .safetensors file.
// `progress`, when given, counts the weights handed to the model (io/load_progress.h).
std::unique_ptr<Gemma3Model> load_hf_safetensors(const std::string& weights_path, const Gemma3Config& cfg, DType dtype,
                                                 WeightQuant quant = WeightQuant::None, LoadProgress* progress = nullptr);

}  // namespace gemmalens
