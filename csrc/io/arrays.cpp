#include "io/arrays.h"

#include <map>

#include "io/checked_source.h"
#include "io/load_progress.h"

namespace gemmalens {

std::unique_ptr<Gemma3Model> load_arrays(const ArraySource& arrays, const Gemma3Config& cfg, DType dtype, WeightQuant quant,
                                         LoadProgress* progress) {
  cfg.validate();
  std::map<std::string, std::vector<int64_t>> shapes;  // asked once per weight
  CheckedSource<std::vector<int64_t>> src({"checkpoint", "", [](const std::string& hf_name) { return hf_name; },
                                           [&](const std::string& name) -> const std::vector<int64_t>* {
                                             std::vector<int64_t> s;
                                             if (!arrays.shape(name, s)) return nullptr;
                                             return &(shapes[name] = std::move(s));
                                           },
                                           [](const std::vector<int64_t>& s) { return s; }});
  for_each_weight(cfg, [&](const WeightSpec& w) { src.take(w.name, w.shape); });
  for (const auto& n : arrays.names)
    if (!src.taken(n)) throw src.unexpected(n);
  // Checked above: the getter only converts.
  TensorGetter get = [&](const std::string& name, const std::vector<int64_t>&) { return arrays.read(name); };
  if (progress) progress->start(cfg);
  return std::make_unique<Gemma3Model>(cfg, dtype, counted(get, progress), quant);
}

}  // namespace gemmalens
