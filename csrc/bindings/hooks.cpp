// HookSet: captures, Python callbacks and native interventions at the hook sites (model/hooks.h).
#include <pybind11/stl.h>

#include <map>
#include <memory>

#include "bindings/bindings.h"

namespace gemmalens {

namespace {

void bridge(PyHookSet& hs) {
  // Forward: fn(activation) -> the activation to go on with. The reverse pass of a gradient run calls the same
  // object's replay(activation) (the forward's output again) and vjp(gradient at the output) -> the gradient at the
  // input, or None for unchanged; before the gradient hooks at the site, inject(gradient at the output) -> it with
  // what came back through readers of the site added, or None (hooks.build_hookset(..., grad=True) registers
  // objects that have all three).
  hs.call = [&hs](int idx, Site, int, const ActView& v, HookSet::CallMode mode) {
    py::gil_scoped_acquire gil;
    const py::object& fn = hs.callbacks[idx];
    using Mode = HookSet::CallMode;
    const char* method = mode == Mode::Replay ? "replay" : mode == Mode::Vjp ? "vjp" : mode == Mode::Inject ? "inject" : nullptr;
    if (mode == Mode::Inject && !py::hasattr(fn, method)) return;  // most hooks read nothing for later sites
    if (method && !py::hasattr(fn, method))
      throw InternalError("a Python hook without replay/vjp reached a reverse pass (gradient runs register them with grad=True)");
    py::array_t<float> arr(v.shape);
    v.copy_out(arr.mutable_data());
    py::object res = method ? fn.attr(method)(arr) : fn(arr);
    if ((mode == Mode::Vjp || mode == Mode::Inject) && res.is_none()) return;
    FloatArray out = FloatArray::ensure(res);
    if (!out || out.size() != v.numel()) throw ValueError("hook returned an array of the wrong size");
    v.copy_in(out.data());
  };
}

Site site_from_int(int s) {
  if (s < 0 || s >= static_cast<int>(Site::Count)) throw ValueError("bad hook site id " + std::to_string(s));
  return static_cast<Site>(s);
}

}  // namespace

void bind_hooks(py::module_& m) {
  py::class_<PyHookSet>(m, "HookSet")
      .def(py::init([](int n_layers) {
             auto hs = std::make_unique<PyHookSet>(n_layers);
             bridge(*hs);
             return hs;
           }),
           py::arg("n_layers"))
      .def("add_capture",
           [](PyHookSet& hs, int site, int layer) {
             HookAction a;
             a.kind = HookAction::Capture;
             hs.at(site_from_int(site), layer).push_back(a);
           })
      .def("add_callback",
           [](PyHookSet& hs, int site, int layer, py::object fn) {
             HookAction a;
             a.kind = HookAction::Callback;
             a.callback = static_cast<int>(hs.callbacks.size());
             hs.callbacks.push_back(std::move(fn));
             hs.at(site_from_int(site), layer).push_back(a);
           })
      .def(
          "add_intervention",
          [](PyHookSet& hs, int site, int layer, const std::string& kind, py::object values, std::vector<int64_t> positions,
             float scale, std::vector<int64_t> heads, bool mean, std::vector<int64_t> rows) {
            HookAction a;
            static const std::map<std::string, HookAction::Kind> kinds = {
                {"add", HookAction::Add}, {"replace", HookAction::Replace}, {"scale", HookAction::Scale}, {"zero", HookAction::Zero},
                {"ablate_heads", HookAction::AblateHeads}, {"project_out", HookAction::ProjectOut}};
            auto it = kinds.find(kind);
            if (it == kinds.end()) throw ValueError("unknown intervention '" + kind + "'");
            a.kind = it->second;
            if (!values.is_none()) {
              auto arr = FloatArray::ensure(values);
              if (!arr) throw ValueError("intervention values must be a float array");
              a.values.assign(arr.data(), arr.data() + arr.size());
              for (py::ssize_t d = 0; d < arr.ndim(); ++d) a.values_shape.push_back(arr.shape(d));
            }
            a.positions = std::move(positions);
            a.scale = scale;
            a.heads = std::move(heads);
            a.mean = mean;
            a.rows = std::move(rows);
            hs.at(site_from_int(site), layer).push_back(std::move(a));
          },
          py::arg("site"), py::arg("layer"), py::arg("kind"), py::arg("values") = py::none(), py::arg("positions") = std::vector<int64_t>{},
          py::arg("scale") = 1.f, py::arg("heads") = std::vector<int64_t>{}, py::arg("mean") = false,
          py::arg("rows") = std::vector<int64_t>{})
      .def(
          "add_ablate_features",
          [](PyHookSet& hs, int site, int layer, FloatArray enc,
             FloatArray b_enc, py::object threshold,
             FloatArray dec, py::object b_dec, std::vector<int64_t> positions, std::vector<int64_t> rows) {
            HookAction a;
            a.kind = HookAction::AblateFeatures;
            a.f_enc.assign(enc.data(), enc.data() + enc.size());
            a.f_b_enc.assign(b_enc.data(), b_enc.data() + b_enc.size());
            a.f_dec.assign(dec.data(), dec.data() + dec.size());
            if (!threshold.is_none()) {
              auto t = FloatArray::ensure(threshold);
              a.f_threshold.assign(t.data(), t.data() + t.size());
            }
            if (!b_dec.is_none()) {
              auto t = FloatArray::ensure(b_dec);
              a.f_b_dec.assign(t.data(), t.data() + t.size());
            }
            a.positions = std::move(positions);
            a.rows = std::move(rows);
            hs.at(site_from_int(site), layer).push_back(std::move(a));
          },
          py::arg("site"), py::arg("layer"), py::arg("enc"), py::arg("b_enc"), py::arg("threshold"), py::arg("dec"),
          py::arg("b_dec"), py::arg("positions") = std::vector<int64_t>{}, py::arg("rows") = std::vector<int64_t>{})
      .def("take_captures",
           [](PyHookSet& hs) {
             // [(site, layer, array)] in registration order; arrays own their buffers (no copy).
             py::list out;
             for (int layer = -1; layer < hs.n_layers(); ++layer)
               for (int s = 0; s < static_cast<int>(Site::Count); ++s)
                 for (auto& a : hs.at(static_cast<Site>(s), layer)) {
                   if (a.kind != HookAction::Capture || !a.captured) continue;
                   auto holder = new std::shared_ptr<float[]>(a.captured);
                   py::capsule owner(holder, [](void* p) { delete static_cast<std::shared_ptr<float[]>*>(p); });
                   std::vector<int64_t> strides(a.captured_shape.size());
                   int64_t st = sizeof(float);
                   for (int d = static_cast<int>(strides.size()) - 1; d >= 0; --d) {
                     strides[d] = st;
                     st *= a.captured_shape[d];
                   }
                   out.append(py::make_tuple(s, layer, py::array_t<float>(a.captured_shape, strides, a.captured.get(), owner)));
                   a.captured.reset();
                 }
             return out;
           })
      .def("clear", [](PyHookSet& hs) {
        hs.clear();
        hs.callbacks.clear();
      })
      .def_property_readonly("empty", &PyHookSet::empty);
  m.def("hook_names", &hook_names, py::arg("n_layers"));
  m.def("hook_sites", [] {
    py::list l;
    for (const auto& s : kHookSites) l.append(py::make_tuple(static_cast<int>(s.site), s.suffix, s.per_layer));
    return l;
  });
}

}  // namespace gemmalens
