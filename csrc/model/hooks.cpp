#include "model/hooks.h"

#include <cmath>
#include <cstring>
#include <string>

#include "common.h"

namespace gemmalens {

const HookSiteInfo kHookSites[static_cast<int>(Site::Count)] = {
    {Site::Embed, "hook_embed", false},
    {Site::ResidPre, "hook_resid_pre", true},
    {Site::Ln1Scale, "ln1.hook_scale", true},
    {Site::Ln1Normalized, "ln1.hook_normalized", true},
    {Site::Ln1Out, "ln1.hook_out", true},
    {Site::Q, "attn.hook_q", true},
    {Site::K, "attn.hook_k", true},
    {Site::V, "attn.hook_v", true},
    {Site::QNormScale, "attn.q_norm.hook_scale", true},
    {Site::QNormNormalized, "attn.q_norm.hook_normalized", true},
    {Site::QNormOut, "attn.q_norm.hook_out", true},
    {Site::QNormed, "attn.hook_q_normed", true},
    {Site::KNormScale, "attn.k_norm.hook_scale", true},
    {Site::KNormNormalized, "attn.k_norm.hook_normalized", true},
    {Site::KNormOut, "attn.k_norm.hook_out", true},
    {Site::KNormed, "attn.hook_k_normed", true},
    {Site::RotQ, "attn.hook_rot_q", true},
    {Site::RotK, "attn.hook_rot_k", true},
    {Site::AttnScores, "attn.hook_attn_scores", true},
    {Site::Pattern, "attn.hook_pattern", true},
    {Site::Z, "attn.hook_z", true},
    {Site::Ln1PostScale, "ln1_post.hook_scale", true},
    {Site::Ln1PostNormalized, "ln1_post.hook_normalized", true},
    {Site::Ln1PostOut, "ln1_post.hook_out", true},
    {Site::AttnOut, "hook_attn_out", true},
    {Site::ResidMid, "hook_resid_mid", true},
    {Site::Ln2Scale, "ln2.hook_scale", true},
    {Site::Ln2Normalized, "ln2.hook_normalized", true},
    {Site::Ln2Out, "ln2.hook_out", true},
    {Site::MlpPre, "mlp.hook_pre", true},
    {Site::MlpPreLinear, "mlp.hook_pre_linear", true},
    {Site::MlpPost, "mlp.hook_post", true},
    {Site::Ln2PostScale, "ln2_post.hook_scale", true},
    {Site::Ln2PostNormalized, "ln2_post.hook_normalized", true},
    {Site::Ln2PostOut, "ln2_post.hook_out", true},
    {Site::MlpOut, "hook_mlp_out", true},
    {Site::ResidPost, "hook_resid_post", true},
    {Site::LnFinalScale, "ln_final.hook_scale", false},
    {Site::LnFinalNormalized, "ln_final.hook_normalized", false},
    {Site::LnFinalOut, "ln_final.hook_out", false},
};

std::vector<std::string> hook_names(int n_layers) {
  std::vector<std::string> out{"hook_embed"};
  for (int i = 0; i < n_layers; ++i)
    for (const auto& s : kHookSites)
      if (s.per_layer) out.push_back("blocks." + std::to_string(i) + "." + s.suffix);
  for (const auto& s : kHookSites)
    if (!s.per_layer && s.site != Site::Embed) out.push_back(s.suffix);
  return out;
}

int64_t ActView::numel() const { return gemmalens::numel(shape); }

// Row-wise copies: the innermost axis is contiguous in every view the forward pass makes.
template <class F>
static void for_rows(const ActView& v, F&& f) {  // f(float* row, int64_t row_index), row length shape.back()
  const int nd = static_cast<int>(v.shape.size());
  int64_t rows = 1;
  for (int d = 0; d < nd - 1; ++d) rows *= v.shape[d];
#pragma omp parallel for if (rows * v.shape[nd - 1] > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    int64_t rem = r, off = 0;
    for (int d = nd - 2; d >= 0; --d) {
      off += (rem % v.shape[d]) * v.strides[d];
      rem /= v.shape[d];
    }
    f(v.data + off, r);
  }
}

void ActView::copy_out(float* dst) const {
  const int64_t w = shape.back();
  if (strides.back() == 1) {
    for_rows(*this, [&](float* row, int64_t r) { std::memcpy(dst + r * w, row, sizeof(float) * w); });
    return;
  }
  int64_t k = 0;
  for_each([&](float& x, const int64_t*) { dst[k++] = x; });
}

void ActView::copy_in(const float* src) const {
  const int64_t w = shape.back();
  if (strides.back() == 1) {
    for_rows(*this, [&](float* row, int64_t r) { std::memcpy(row, src + r * w, sizeof(float) * w); });
    return;
  }
  int64_t k = 0;
  for_each([&](float& x, const int64_t*) { x = src[k++]; });
}

namespace {

// positions -> mask over the position axis
std::vector<char> position_mask(const std::vector<int64_t>& positions, int64_t T) {
  std::vector<char> m(T, positions.empty() ? 1 : 0);
  for (auto p : positions) {
    const int64_t q = p < 0 ? p + T : p;
    if (q >= 0 && q < T) m[q] = 1;
  }
  return m;
}

// rows -> mask over the batch axis (out-of-range rows select nothing)
std::vector<char> row_mask(const std::vector<int64_t>& rows, int64_t B) {
  std::vector<char> m(B, rows.empty() ? 1 : 0);
  for (auto r : rows)
    if (r >= 0 && r < B) m[r] = 1;
  return m;
}

// Product of the dims up to and including the position axis (the number of position vectors).
int64_t position_rows(const ActView& v) {
  int64_t n = 1;
  for (int d = 0; d <= v.pos_axis; ++d) n *= v.shape[d];
  return n;
}

// Product of the dims after the position axis (the "inner" vector a position holds, heads included).
int64_t inner_size(const ActView& v) {
  int64_t n = 1;
  for (size_t d = v.pos_axis + 1; d < v.shape.size(); ++d) n *= v.shape[d];
  return n;
}
int64_t inner_index(const ActView& v, const int64_t* idx) {
  int64_t k = 0;
  for (size_t d = v.pos_axis + 1; d < v.shape.size(); ++d) k = k * v.shape[d] + idx[d];
  return k;
}

// f(x, row) for every selected position's vector x[inner] of the selected batch rows: the axes after the position
// axis must be contiguous, as in every view the forward pass makes ([batch, pos, ...], [batch, head, pos, d_head],
// [batch, head, pos, key]). row numbers all the vectors (selected or not) in row-major order of the axes up to the
// position axis.
template <class F>
void for_each_position(const ActView& v, const std::vector<char>& pmask, const std::vector<char>& bmask, const char* what, F&& f) {
  int64_t expect = 1;
  for (int d = static_cast<int>(v.shape.size()) - 1; d > v.pos_axis; --d) {
    if (v.strides[d] != expect)
      throw ValueError(std::string(what) + " needs the values of one position contiguous, not the view " + shape_str(v.shape));
    expect *= v.shape[d];
  }
  const int64_t rows = position_rows(v);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t rem = r, off = 0, t = 0, b = 0;
    for (int d = v.pos_axis; d >= 0; --d) {
      const int64_t i = rem % v.shape[d];
      rem /= v.shape[d];
      off += i * v.strides[d];
      if (d == v.pos_axis) t = i;
      if (d == 0) b = i;
    }
    if (pmask[t] && bmask[b]) f(v.data + off, r);
  }
}

// The head axis of a per-head view: [B, T, heads, Hd] (q, k, v, z, rot_q, ...) or [B, heads, T, X] (q_norm's sites,
// hook_q_normed, attn_scores, pattern).
int head_axis(const ActView& v) {
  if (v.shape.size() != 4 || (v.pos_axis != 1 && v.pos_axis != 2))
    throw ValueError("interventions.ablate_heads applies to per-head activations ([batch, pos, head, d_head] such as attn.hook_z, "
                     "or [batch, head, pos, ...] such as attn.hook_pattern), not " + shape_str(v.shape));
  return v.pos_axis == 1 ? 2 : 1;
}

void apply(HookAction& a, const ActView& v) {
  const int64_t T = v.shape[v.pos_axis];
  const auto pmask = position_mask(a.positions, T);
  const auto bmask = row_mask(a.rows, v.shape[0]);
  auto sel = [&](const int64_t* idx) { return pmask[idx[v.pos_axis]] && bmask[idx[0]]; };  // this element is edited
  switch (a.kind) {
    case HookAction::Capture: {
      a.captured = std::shared_ptr<float[]>(new float[static_cast<size_t>(v.numel())]);
      a.captured_shape = v.shape;
      v.copy_out(a.captured.get());
      break;
    }
    case HookAction::Add: {
      const int64_t inner = inner_size(v);
      if (static_cast<int64_t>(a.values.size()) != inner)
        throw ValueError("interventions.add: the vector has " + std::to_string(a.values.size()) + " values but the activation " +
                         shape_str(v.shape) + " holds " + std::to_string(inner) + " per position");
      v.for_each([&](float& x, const int64_t* idx) {
        if (sel(idx)) x += a.scale * a.values[inner_index(v, idx)];
      });
      break;
    }
    case HookAction::Replace: {
      // values: the full activation shape, or without the batch axis (broadcast over the batch).
      const int64_t n = v.numel(), per_b = n / v.shape[0];
      const bool full = static_cast<int64_t>(a.values.size()) == n;
      if (!full && static_cast<int64_t>(a.values.size()) != per_b)
        throw ValueError("interventions.replace: values of shape " + shape_str(a.values_shape) + " do not fit the activation " +
                         shape_str(v.shape));
      int64_t k = 0;
      v.for_each([&](float& x, const int64_t* idx) {
        if (sel(idx)) x = a.values[full ? k : k % per_b];
        ++k;
      });
      break;
    }
    case HookAction::Scale:
      v.for_each([&](float& x, const int64_t* idx) {
        if (sel(idx)) x *= a.scale;
      });
      break;
    case HookAction::Zero:
      v.for_each([&](float& x, const int64_t* idx) {
        if (sel(idx)) x = 0.f;
      });
      break;
    case HookAction::AblateHeads: {
      const int ha = head_axis(v), xa = 3;  // head and last axis
      const int64_t nh = v.shape[ha], hd = v.shape[xa];
      std::vector<char> hm(nh, 0);
      for (auto h : a.heads) {
        if (h < 0 || h >= nh) throw ValueError("interventions.ablate_heads: head " + std::to_string(h) + " out of range [0, " + std::to_string(nh) + ")");
        hm[h] = 1;
      }
      // mean: each ablated head's values averaged over the selected batch rows and positions
      std::vector<double> mean(nh * hd, 0.0);
      if (a.mean) {
        std::vector<int64_t> cnt(nh, 0);
        v.for_each([&](float& x, const int64_t* idx) {
          if (!sel(idx)) return;
          mean[idx[ha] * hd + idx[xa]] += x;
          if (idx[xa] == 0) ++cnt[idx[ha]];
        });
        for (int64_t h = 0; h < nh; ++h)
          for (int64_t d = 0; d < hd; ++d) mean[h * hd + d] /= std::max<int64_t>(cnt[h], 1);
      }
      v.for_each([&](float& x, const int64_t* idx) {
        if (sel(idx) && hm[idx[ha]]) x = static_cast<float>(mean[idx[ha] * hd + idx[xa]]);
      });
      break;
    }
    case HookAction::ProjectOut: {
      const int64_t inner = inner_size(v);
      if (static_cast<int64_t>(a.values.size()) != inner)
        throw ValueError("interventions.project_out: the direction has " + std::to_string(a.values.size()) + " values but the activation " +
                         shape_str(v.shape) + " holds " + std::to_string(inner) + " per position");
      double nn = 0;
      for (float d : a.values) nn += static_cast<double>(d) * d;
      if (nn == 0) throw ValueError("interventions.project_out: the direction is zero");
      // x <- x - (x . d) d / |d|^2, per position
      for_each_position(v, pmask, bmask, "interventions.project_out", [&](float* x, int64_t) {
        double dot = 0;
        for (int64_t k = 0; k < inner; ++k) dot += static_cast<double>(x[k]) * a.values[k];
        const double c = dot / nn;
        for (int64_t k = 0; k < inner; ++k) x[k] = static_cast<float>(x[k] - c * a.values[k]);
      });
      break;
    }
    case HookAction::AblateFeatures: {
      // x <- x - sum_f act_f(x) W_dec[f]: the features' contributions removed, everything else (the SAE's
      // reconstruction of other features and its error) kept.
      const int64_t inner = inner_size(v);
      const int64_t nf = static_cast<int64_t>(a.f_b_enc.size());
      if (static_cast<int64_t>(a.f_enc.size()) != nf * inner)
        throw ValueError("interventions.ablate_features: the SAE's d_in (" + std::to_string(a.f_enc.size() / std::max<int64_t>(nf, 1)) +
                         ") does not match the activation " + shape_str(v.shape) + " (" + std::to_string(inner) + " per position)");
      std::vector<double> act(nf);
      a.f_on.assign(static_cast<size_t>(position_rows(v) * nf), 0);
      for_each_position(v, pmask, bmask, "interventions.ablate_features", [&](float* x, int64_t row) {
        for (int64_t f = 0; f < nf; ++f) {
          double pre = a.f_b_enc[f];
          for (int64_t j = 0; j < inner; ++j) pre += (static_cast<double>(x[j]) - (a.f_b_dec.empty() ? 0.0 : a.f_b_dec[j])) * a.f_enc[f * inner + j];
          const bool on = pre > 0 && (a.f_threshold.empty() || pre > a.f_threshold[f]);
          act[f] = on ? pre : 0.0;
          a.f_on[row * nf + f] = on;
        }
        for (int64_t f = 0; f < nf; ++f)
          if (act[f] != 0.0)
            for (int64_t j = 0; j < inner; ++j) x[j] = static_cast<float>(x[j] - act[f] * a.f_dec[f * inner + j]);
      });
      break;
    }
    case HookAction::Callback:
      break;
  }
}

// The VJP of one action at gradient g (the gradient at the action's output -> at its input).
void apply_vjp(const HookAction& a, const ActView& g) {
  const int64_t T = g.shape[g.pos_axis];
  const auto pmask = position_mask(a.positions, T);
  const auto bmask = row_mask(a.rows, g.shape[0]);
  auto sel = [&](const int64_t* idx) { return pmask[idx[g.pos_axis]] && bmask[idx[0]]; };
  switch (a.kind) {
    case HookAction::Capture:
    case HookAction::Add:  // x + c: identity
      break;
    case HookAction::Replace:  // a constant where it applies
    case HookAction::Zero:
      g.for_each([&](float& x, const int64_t* idx) {
        if (sel(idx)) x = 0.f;
      });
      break;
    case HookAction::Scale:
      g.for_each([&](float& x, const int64_t* idx) {
        if (sel(idx)) x *= a.scale;
      });
      break;
    case HookAction::AblateHeads: {
      const int ha = head_axis(g), xa = 3;
      const int64_t nh = g.shape[ha], hd = g.shape[xa];
      std::vector<char> hm(nh, 0);
      for (auto h : a.heads) hm[h] = 1;
      // zero: no dependence. mean: out = mean over the selected (b, t) of x, so each selected input gets the sum of
      // the selected outputs' gradients / count.
      std::vector<double> sum(nh * hd, 0.0);
      std::vector<int64_t> cnt(nh, 0);
      if (a.mean)
        g.for_each([&](float& x, const int64_t* idx) {
          if (!sel(idx)) return;
          sum[idx[ha] * hd + idx[xa]] += x;
          if (idx[xa] == 0) ++cnt[idx[ha]];
        });
      g.for_each([&](float& x, const int64_t* idx) {
        if (sel(idx) && hm[idx[ha]])
          x = a.mean ? static_cast<float>(sum[idx[ha] * hd + idx[xa]] / std::max<int64_t>(cnt[idx[ha]], 1)) : 0.f;
      });
      break;
    }
    case HookAction::ProjectOut: {  // the projection is symmetric: g - (g . d) d / |d|^2
      const int64_t inner = inner_size(g);
      double nn = 0;
      for (float d : a.values) nn += static_cast<double>(d) * d;
      for_each_position(g, pmask, bmask, "interventions.project_out", [&](float* x, int64_t) {
        double dot = 0;
        for (int64_t k = 0; k < inner; ++k) dot += static_cast<double>(x[k]) * a.values[k];
        for (int64_t k = 0; k < inner; ++k) x[k] = static_cast<float>(x[k] - dot / nn * a.values[k]);
      });
      break;
    }
    case HookAction::AblateFeatures: {  // x - sum_f act_f(x) dec_f, act_f = pre_f(x) where on: g - sum_on enc_f (dec_f . g)
      const int64_t inner = inner_size(g), nf = static_cast<int64_t>(a.f_b_enc.size());
      if (a.f_on.size() != static_cast<size_t>(position_rows(g) * nf))
        throw InternalError("interventions.ablate_features: its VJP ran before its forward");
      std::vector<double> gin(inner);
      for_each_position(g, pmask, bmask, "interventions.ablate_features", [&](float* x, int64_t row) {
        for (int64_t j = 0; j < inner; ++j) gin[j] = x[j];
        for (int64_t f = 0; f < nf; ++f) {
          if (!a.f_on[row * nf + f]) continue;
          double dot = 0;
          for (int64_t j = 0; j < inner; ++j) dot += static_cast<double>(x[j]) * a.f_dec[f * inner + j];
          for (int64_t j = 0; j < inner; ++j) gin[j] -= dot * a.f_enc[f * inner + j];
        }
        for (int64_t j = 0; j < inner; ++j) x[j] = static_cast<float>(gin[j]);
      });
      break;
    }
    case HookAction::Callback:
      throw InternalError("a Python hook's VJP is run by HookSet::run_vjp");
  }
}

}  // namespace

void HookSet::run(Site s, int layer, const ActView& v, bool replay) {
  for (auto& a : actions_[index(s, layer)]) {
    if (a.kind == HookAction::Callback) {
      if (!call) throw InternalError("a Python hook is registered but no bridge is set");
      call(a.callback, s, layer, v, replay ? CallMode::Replay : CallMode::Forward);
    } else if (!(replay && a.kind == HookAction::Capture)) {
      apply(a, v);
    }
  }
}

void HookSet::run_vjp(Site s, int layer, const ActView& g) {
  auto& acts = actions_[index(s, layer)];
  for (auto it = acts.rbegin(); it != acts.rend(); ++it) {
    if (it->kind == HookAction::Callback) {
      if (!call) throw InternalError("a Python hook is registered but no bridge is set");
      call(it->callback, s, layer, g, CallMode::Vjp);
    } else {
      apply_vjp(*it, g);
    }
  }
}

void HookSet::run_inject(Site s, int layer, const ActView& g) {
  for (const auto& a : actions_[index(s, layer)])
    if (a.kind == HookAction::Callback) {
      if (!call) throw InternalError("a Python hook is registered but no bridge is set");
      call(a.callback, s, layer, g, CallMode::Inject);
    }
}

void HookSet::clear() {
  for (auto& v : actions_) v.clear();
}

bool HookSet::empty() const {
  for (const auto& v : actions_)
    if (!v.empty()) return false;
  return true;
}

}  // namespace gemmalens
