// How far a load has got, for a progress bar that another thread polls while the load runs (gl.load's tqdm bar):
// the weights' elements handed to the model so far, against all of them. Counted by the loaders' getters; the model
// converts each weight right after its getter returns, so `done` runs at most one weight ahead of the work.
#pragma once
#include <atomic>
#include <cstdint>

#include "common.h"
#include "model/gemma3.h"

namespace gemmalens {

struct LoadProgress {
  std::atomic<int64_t> done{0};
  std::atomic<int64_t> total{0};

  // The total for a model of this config (every weight of for_each_weight).
  void start(const Gemma3Config& cfg) {
    int64_t t = 0;
    for_each_weight(cfg, [&](const WeightSpec& w) { t += numel(w.shape); });
    done = 0;
    total = t;
  }
  void add(int64_t n) { done += n; }
};

// The getters below, counting into `p` (a null `p` leaves them as they are).
inline TensorGetter counted(TensorGetter get, LoadProgress* p) {
  if (!p) return get;
  return [get = std::move(get), p](const std::string& name, const std::vector<int64_t>& shape) {
    auto v = get(name, shape);
    p->add(numel(shape));
    return v;
  };
}
inline RowGetter counted(RowGetter rows, LoadProgress* p) {
  if (!p || !rows) return rows;
  return [rows = std::move(rows), p](const std::string& name, const std::vector<int64_t>& shape, int64_t r0, int64_t n,
                                     float* out) {
    rows(name, shape, r0, n, out);
    p->add(n * (shape.size() > 1 ? shape[1] : 1));
  };
}

}  // namespace gemmalens
