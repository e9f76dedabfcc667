// Weights handed over as arrays under their HF names, in HF layout, by formats read in Python (Orbax, gemma_pytorch).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/gemma3.h"

namespace gemmalens {

struct ArraySource {
  std::vector<std::string> names;  // every array held, in the holder's order
  // The shape of array `name` into `shape`; false when there is no such array.
  std::function<bool(const std::string& name, std::vector<int64_t>& shape)> shape;
  // Its values as f32, row-major (called once per weight, as the model takes it).
  std::function<std::vector<float>(const std::string& name)> read;
};

// Every weight present with its shape, and no other array, checked before anything is allocated; then the model.
// Throws CheckpointError.
// `progress`, when given, counts the weights handed to the model (io/load_progress.h).
struct LoadProgress;
std::unique_ptr<Gemma3Model> load_arrays(const ArraySource& arrays, const Gemma3Config& cfg, DType dtype, WeightQuant quant,
                                         LoadProgress* progress = nullptr);

}  // namespace gemmalens
