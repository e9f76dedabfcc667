// What every loader does between the model's weight list (for_each_weight: HF names and shapes) and a format's
// tensor table: find each weight under the format's own name, refuse it when absent or shaped otherwise than the
// config says, and remember what was taken so that whatever else the file holds can be refused afterwards.
#pragma once
#include <functional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "model/gemma3.h"

namespace gemmalens {

// T: the format's tensor record (safetensors' TensorInfo, a GGUFTensor, an array's shape).
template <class T>
class CheckedSource {
 public:
  struct Format {
    std::string where;       // how messages name the source: "checkpoint 'x'", "GGUF file 'x'"
    std::string shape_hint;  // appended to a shape mismatch
    std::function<std::string(const std::string& hf_name)> name;  // the format's name for an HF name
    std::function<const T*(const std::string& name)> find;        // null when the source lacks it
    std::function<std::vector<int64_t>(const T&)> shape;
  };
  explicit CheckedSource(Format f) : f_(std::move(f)) {}

  // The tensor of HF weight `hf_name`, present and of shape `want` (CheckpointError otherwise); remembered as taken.
  const T& take(const std::string& hf_name, const std::vector<int64_t>& want) {
    const std::string name = f_.name(hf_name);
    const T* t = f_.find(name);
    if (!t)
      throw CheckpointError(f_.where + " is missing tensor '" + name + "' (" + (name != hf_name ? "HF '" + hf_name + "', " : "") +
                            "expected shape " + shape_str(want) + ")");
    const std::vector<int64_t> got = f_.shape(*t);
    if (got != want) throw shape_mismatch(name, got, want, f_.shape_hint);
    taken_.insert(name);
    return *t;
  }
  // take() as the model's pre-check (every weight, before anything is allocated).
  TensorChecker checker() {
    return [this](const std::string& hf_name, const std::vector<int64_t>& shape) { take(hf_name, shape); };
  }
  bool taken(const std::string& name) const { return taken_.count(name) > 0; }
  // The error for a tensor of the source that the model did not take (`shape` where the format knows it).
  CheckpointError unexpected(const std::string& name, const std::vector<int64_t>* shape = nullptr) const {
    return CheckpointError(f_.where + " has unexpected tensor '" + name + "'" + (shape ? " of shape " + shape_str(*shape) : "") +
                           "; it does not belong to a Gemma 3 model with this config");
  }

 private:
  Format f_;
  std::set<std::string> taken_;
};

}  // namespace gemmalens
