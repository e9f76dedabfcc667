// pybind11 module gemmalens._core: thin bindings; conveniences live in python/gemmalens/.
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "io/arrays.h"
#include "io/gguf.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "ops/dequant.h"
#include "model/config.h"
#include "model/gemma3.h"
#include "model/hooks.h"
#include "model/kv_cache.h"
#include "model/sae.h"
#include <map>
#include "ops/kernels.h"
#include "ops/linear.h"
#include "ops/quant.h"

namespace py = pybind11;
using namespace gemmalens;

namespace {

py::object optional_cap(double v) { return v > 0 ? py::object(py::float_(v)) : py::object(py::none()); }

template <class T>
const T* checked_ptr(const py::array& a, const char* what, int ndim) {
  if (!py::isinstance<py::array_t<T>>(a) || !(a.flags() & py::array::c_style) || a.ndim() != ndim)
    throw ValueError(std::string(what) + ": internal binding expects a C-contiguous " + std::to_string(ndim) + "-D array of the right dtype");
  return static_cast<const T*>(a.data());
}

// Ctrl-C during a long native call: between layers, Python's pending signal handlers run (KeyboardInterrupt is
// raised into the forward, which unwinds before the cache is advanced). Only the main thread receives signals in
// Python; the GIL is taken at most every 20 ms, so decode steps of small models never take it and a thread that
// holds the GIL elsewhere is not waited on per layer.
std::function<void()> interrupt_check() {
  static const unsigned long main_ident = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  if (PyThread_get_thread_ident() != main_ident) return nullptr;
  auto last = std::make_shared<std::chrono::steady_clock::time_point>(std::chrono::steady_clock::now());
  return [last] {
    const auto now = std::chrono::steady_clock::now();
    if (now - *last < std::chrono::milliseconds(20)) return;
    *last = now;
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  };
}

void register_config(py::module_& m) {
  py::class_<Gemma3Config>(m, "Gemma3Config", "Gemma 3 text config with HF field names.")
      .def(py::init<>())
      .def_readwrite("hidden_size", &Gemma3Config::hidden_size)
      .def_readwrite("intermediate_size", &Gemma3Config::intermediate_size)
      .def_readwrite("num_hidden_layers", &Gemma3Config::num_hidden_layers)
      .def_readwrite("num_attention_heads", &Gemma3Config::num_attention_heads)
      .def_readwrite("num_key_value_heads", &Gemma3Config::num_key_value_heads)
      .def_readwrite("head_dim", &Gemma3Config::head_dim)
      .def_readwrite("vocab_size", &Gemma3Config::vocab_size)
      .def_readwrite("sliding_window", &Gemma3Config::sliding_window)
      .def_readwrite("layer_types", &Gemma3Config::layer_types)
      .def_readwrite("rope_theta", &Gemma3Config::rope_theta)
      .def_readwrite("rope_local_base_freq", &Gemma3Config::rope_local_base_freq)
      .def_readwrite("rope_scaling_factor", &Gemma3Config::rope_scaling_factor)
      .def_readwrite("query_pre_attn_scalar", &Gemma3Config::query_pre_attn_scalar)
      .def_readwrite("rms_norm_eps", &Gemma3Config::rms_norm_eps)
      .def_property("final_logit_softcapping", [](const Gemma3Config& c) { return optional_cap(c.final_logit_softcapping); },
                    [](Gemma3Config& c, const py::object& v) { c.final_logit_softcapping = v.is_none() ? 0.0 : v.cast<double>(); })
      .def_property("attn_logit_softcapping", [](const Gemma3Config& c) { return optional_cap(c.attn_logit_softcapping); },
                    [](Gemma3Config& c, const py::object& v) { c.attn_logit_softcapping = v.is_none() ? 0.0 : v.cast<double>(); })
      .def_property(
          "rope_scaling",
          [](const Gemma3Config& c) -> py::object {
            if (c.rope_scaling_factor == 1.0) return py::none();
            py::dict d;
            d["rope_type"] = "linear";
            d["factor"] = c.rope_scaling_factor;
            return d;
          },
          [](Gemma3Config& c, const py::object& v) {
            if (v.is_none()) { c.rope_scaling_factor = 1.0; return; }
            const py::dict d = v.cast<py::dict>();
            // Without a rope_type the setter reads the dict as linear (config.json reads it as default).
            const std::string type = d.contains("rope_type") ? d["rope_type"].cast<std::string>() : "linear";
            const double factor = d.contains("factor") ? d["factor"].cast<double>() : 0.0;
            c.rope_scaling_factor = rope_scaling_factor(type, d.contains("factor") ? &factor : nullptr, "Gemma3Config.rope_scaling");
          })
      .def_readwrite("max_position_embeddings", &Gemma3Config::max_position_embeddings)
      .def_readwrite("bos_token_id", &Gemma3Config::bos_token_id)
      .def_readwrite("eos_token_id", &Gemma3Config::eos_token_id)
      .def_readwrite("pad_token_id", &Gemma3Config::pad_token_id)
      .def("validate", &Gemma3Config::validate)
      .def("to_json", &Gemma3Config::to_json)
      .def_static("from_json", &Gemma3Config::from_json, py::arg("text"))
      .def_static("preset", &Gemma3Config::preset, py::arg("size"))
      .def_static("default_layer_types", &Gemma3Config::default_layer_types, py::arg("num_hidden_layers"), py::arg("pattern") = 6);
}

void register_cache(py::module_& m) {
  py::class_<KVCache>(m, "KVCache")
      .def(py::init([](const Gemma3Config& cfg, int batch, int64_t max_seq_len, const std::string& dtype) {
             cfg.validate();
             return std::make_unique<KVCache>(cfg, batch, max_seq_len, parse_dtype(dtype));
           }),
           py::arg("config"), py::arg("batch"), py::arg("max_seq_len"), py::arg("dtype") = "float32",
           "Usually made by Model.new_cache(); standalone for sizing.")
      .def_property_readonly("batch", &KVCache::batch)
      .def_property_readonly("max_seq_len", &KVCache::max_seq_len)
      .def_property_readonly("seq_len", &KVCache::seq_len)
      .def_property_readonly("nbytes", &KVCache::nbytes)
      .def_property_readonly("dtype", [](const KVCache& c) { return dtype_name(c.dtype()); })
      .def_property_readonly("row_start", &KVCache::row_start)
      .def("truncate", &KVCache::truncate, py::arg("n"))
      .def("copy", [](const KVCache& c) { return c.copy(); });
}

// HookSet with the Python side of callbacks: callables taking the activation (a fresh float32 array) and
// returning the array to write back (the Python wrapper validates shape and dtype).
struct PyHookSet : HookSet {
  using HookSet::HookSet;
  std::vector<py::object> callbacks;
};

void bridge(PyHookSet& hs) {
  hs.call = [&hs](int idx, Site, int, const ActView& v) {
    py::gil_scoped_acquire gil;
    py::array_t<float> arr(v.shape);
    v.copy_out(arr.mutable_data());
    py::object res = hs.callbacks[idx](arr);
    py::array_t<float, py::array::c_style | py::array::forcecast> out = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(res);
    if (!out || out.size() != v.numel()) throw ValueError("hook returned an array of the wrong size");
    v.copy_in(out.data());
  };
}

Site site_from_int(int s) {
  if (s < 0 || s >= static_cast<int>(Site::Count)) throw ValueError("bad hook site id " + std::to_string(s));
  return static_cast<Site>(s);
}

void register_hooks(py::module_& m) {
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
             float scale, std::vector<int64_t> heads, bool mean) {
            HookAction a;
            static const std::map<std::string, HookAction::Kind> kinds = {
                {"add", HookAction::Add}, {"replace", HookAction::Replace}, {"scale", HookAction::Scale}, {"zero", HookAction::Zero},
                {"ablate_heads", HookAction::AblateHeads}, {"project_out", HookAction::ProjectOut}};
            auto it = kinds.find(kind);
            if (it == kinds.end()) throw ValueError("unknown intervention '" + kind + "'");
            a.kind = it->second;
            if (!values.is_none()) {
              auto arr = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(values);
              if (!arr) throw ValueError("intervention values must be a float array");
              a.values.assign(arr.data(), arr.data() + arr.size());
              for (py::ssize_t d = 0; d < arr.ndim(); ++d) a.values_shape.push_back(arr.shape(d));
            }
            a.positions = std::move(positions);
            a.scale = scale;
            a.heads = std::move(heads);
            a.mean = mean;
            hs.at(site_from_int(site), layer).push_back(std::move(a));
          },
          py::arg("site"), py::arg("layer"), py::arg("kind"), py::arg("values") = py::none(), py::arg("positions") = std::vector<int64_t>{},
          py::arg("scale") = 1.f, py::arg("heads") = std::vector<int64_t>{}, py::arg("mean") = false)
      .def(
          "add_ablate_features",
          [](PyHookSet& hs, int site, int layer, py::array_t<float, py::array::c_style | py::array::forcecast> enc,
             py::array_t<float, py::array::c_style | py::array::forcecast> b_enc, py::object threshold,
             py::array_t<float, py::array::c_style | py::array::forcecast> dec, py::object b_dec, std::vector<int64_t> positions) {
            HookAction a;
            a.kind = HookAction::AblateFeatures;
            a.f_enc.assign(enc.data(), enc.data() + enc.size());
            a.f_b_enc.assign(b_enc.data(), b_enc.data() + b_enc.size());
            a.f_dec.assign(dec.data(), dec.data() + dec.size());
            if (!threshold.is_none()) {
              auto t = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(threshold);
              a.f_threshold.assign(t.data(), t.data() + t.size());
            }
            if (!b_dec.is_none()) {
              auto t = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(b_dec);
              a.f_b_dec.assign(t.data(), t.data() + t.size());
            }
            a.positions = std::move(positions);
            hs.at(site_from_int(site), layer).push_back(std::move(a));
          })
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

void register_sae(py::module_& m) {
  using F = py::array_t<float, py::array::c_style | py::array::forcecast>;
  py::class_<SAE>(m, "SAE")
      .def(py::init([](F W_enc, F b_enc, py::object threshold, F W_dec, F b_dec, py::object W_skip, const std::string& arch, int k,
                       bool apply_b_dec, const std::string& dtype) {
             // Optional arrays stay alive in thr / skip while the SAE copies them.
             F thr, skip;
             auto array = [](const F& a) { return SAE::Array{a.data(), std::vector<int64_t>(a.shape(), a.shape() + a.ndim())}; };
             auto optional = [&](const py::object& o, F& keep, const char* what) {
               if (o.is_none()) return SAE::Array{};
               keep = F::ensure(o);
               if (!keep) throw ValueError(std::string("SAE: ") + what + " must be a float array");
               return array(keep);
             };
             const SAE::Weights w{array(W_enc), array(b_enc), optional(threshold, thr, "threshold"), array(W_dec), array(b_dec),
                                  optional(W_skip, skip, "affine_skip_connection")};
             const SAE::Arch a = SAE::parse_arch(arch);
             const DType d = parse_dtype(dtype);
             py::gil_scoped_release r;
             return std::make_unique<SAE>(w, a, k, apply_b_dec, d);
           }),
           py::arg("W_enc"), py::arg("b_enc"), py::arg("threshold"), py::arg("W_dec"), py::arg("b_dec"), py::arg("W_skip"),
           py::arg("architecture"), py::arg("k"), py::arg("apply_b_dec_to_input"), py::arg("dtype"))
      .def("encode",
           [](SAE& s, F x) {
             if (x.ndim() != 2 || x.shape(1) != s.d_in) throw ValueError("SAE.encode: x must be [n, d_in = " + std::to_string(s.d_in) + "]");
             py::array_t<float> out({x.shape(0), static_cast<py::ssize_t>(s.d_sae)});
             py::gil_scoped_release r;
             s.encode(x.data(), x.shape(0), out.mutable_data());
             return out;
           })
      .def("decode",
           [](SAE& s, F acts, py::object x) {
             if (acts.ndim() != 2 || acts.shape(1) != s.d_sae) throw ValueError("SAE.decode: acts must be [n, d_sae = " + std::to_string(s.d_sae) + "]");
             F xin;
             const float* xp = nullptr;
             if (!x.is_none()) {
               xin = F::ensure(x);
               if (xin.ndim() != 2 || xin.shape(0) != acts.shape(0) || xin.shape(1) != s.d_in) throw ValueError("SAE.decode: x must be [n, d_in]");
               xp = xin.data();
             }
             py::array_t<float> out({acts.shape(0), static_cast<py::ssize_t>(s.d_out)});
             py::gil_scoped_release r;
             s.decode(acts.data(), acts.shape(0), xp, out.mutable_data());
             return out;
           }, py::arg("acts"), py::arg("x") = py::none())
      .def("encode_topk", [](SAE& s, F x, int k) {
        if (x.ndim() != 2 || x.shape(1) != s.d_in) throw ValueError("SAE.encode_topk: x must be [n, d_in = " + std::to_string(s.d_in) + "]");
        py::array_t<int32_t> idx({x.shape(0), static_cast<py::ssize_t>(k)});
        py::array_t<float> val({x.shape(0), static_cast<py::ssize_t>(k)});
        {
          py::gil_scoped_release r;
          s.encode_topk(x.data(), x.shape(0), k, idx.mutable_data(), val.mutable_data());
        }
        return py::make_tuple(idx, val);
      });
}

void register_model(py::module_& m) {
  py::class_<Gemma3Model>(m, "Model")
      .def_property_readonly("config", &Gemma3Model::config)
      .def_property_readonly("dtype", [](const Gemma3Model& g) { return dtype_name(g.dtype()); })
      .def_property_readonly("weight_nbytes", &Gemma3Model::weight_nbytes)
      .def_property_readonly("weights", [](const Gemma3Model& m) { return weight_quant_name(m.weight_quant()); })
      .def_readwrite("threads", &Gemma3Model::threads)
      .def(
          "export_tensors",
          [](const Gemma3Model& g) {
            // {HF name: float32 array in HF layout}
            py::dict d;
            g.export_tensors([&](const std::string& name, const std::vector<int64_t>& shape, const float* data) {
              py::array_t<float> a(shape);
              int64_t n = 1;
              for (auto x : shape) n *= x;
              std::copy(data, data + n, a.mutable_data());
              d[py::str(name)] = a;
            });
            return d;
          })
      .def(
          "unembed",
          [](Gemma3Model& g, py::array_t<float, py::array::c_style | py::array::forcecast> x) {
            const int64_t D = g.config().hidden_size;
            if (x.ndim() < 1 || x.shape(x.ndim() - 1) != D)
              throw ValueError("unembed: the last axis must be d_model = " + std::to_string(D));
            const int64_t M = x.size() / D;
            std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
            shape.back() = g.config().vocab_size;
            py::array_t<float> out(shape);
            {
              py::gil_scoped_release r;
              g.unembed(x.data(), M, out.mutable_data());
            }
            return out;
          },
          py::arg("x"))
      .def(
          "new_cache",
          [](const Gemma3Model& g, int batch, int64_t max_seq_len) {
            return std::make_unique<KVCache>(g.config(), batch, max_seq_len, g.dtype());
          },
          py::arg("batch"), py::arg("max_seq_len"))
      .def(
          "forward",
          [](Gemma3Model& g, const py::array& tokens, const py::object& row_start, KVCache* cache, const std::string& logits,
             PyHookSet* hooks, int stop_at_layer, bool allow_longer) {
            const int32_t* tok = checked_ptr<int32_t>(tokens, "tokens", 2);
            const int B = static_cast<int>(tokens.shape(0)), T = static_cast<int>(tokens.shape(1));
            const int32_t* rs = nullptr;
            py::array rs_arr;
            if (!row_start.is_none()) {
              rs_arr = row_start.cast<py::array>();
              rs = checked_ptr<int32_t>(rs_arr, "row_start", 1);
              if (rs_arr.shape(0) != B) throw ValueError("row_start must have one entry per row");
            }
            ForwardArgs a;
            a.tokens = tok; a.B = B; a.T = T; a.row_start = rs; a.cache = cache;
            a.hooks = (hooks && !hooks->empty()) ? hooks : nullptr;
            a.stop_at_layer = stop_at_layer;
            a.allow_longer = allow_longer;
            a.interrupt_check = interrupt_check();
            if (stop_at_layer >= 0) {
              py::array_t<float> resid({static_cast<int64_t>(B), static_cast<int64_t>(T), static_cast<int64_t>(g.config().hidden_size)});
              a.resid_out = resid.mutable_data();
              a.logits_mode = LogitsMode::None;
              {
                py::gil_scoped_release release;
                g.forward(a);
              }
              return py::object(resid);
            }
            const int64_t V = g.config().vocab_size;
            py::array_t<float> out;
            if (logits == "all") {
              a.logits_mode = LogitsMode::All;
              out = py::array_t<float>({static_cast<int64_t>(B), static_cast<int64_t>(T), V});
            } else if (logits == "last") {
              a.logits_mode = LogitsMode::Last;
              out = py::array_t<float>({static_cast<int64_t>(B), V});
            } else if (logits == "none") {
              a.logits_mode = LogitsMode::None;
            } else {
              throw ValueError("logits must be 'all', 'last' or 'none', got '" + logits + "'");
            }
            if (a.logits_mode != LogitsMode::None) a.logits = out.mutable_data();
            {
              py::gil_scoped_release release;
              g.forward(a);
            }
            if (a.logits_mode == LogitsMode::None) return py::object(py::none());
            return py::object(out);
          },
          py::arg("tokens"), py::arg("row_start") = py::none(), py::arg("cache") = nullptr, py::arg("logits") = "all",
          py::arg("hooks") = nullptr, py::arg("stop_at_layer") = -1, py::arg("allow_longer") = false,
          "tokens: int32 [batch, pos] C-contiguous; row_start: int32 [batch] left-padding counts or None.");
}

// Text from a file that may not be UTF-8: undecodable bytes become lone surrogates (Python's surrogateescape).
py::str file_str(const std::string& s) {
  return py::reinterpret_steal<py::str>(PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "surrogateescape"));
}

py::object gguf_value(const GGUFValue& v) {
  switch (v.type) {
    case GGUFValue::U8: case GGUFValue::U16: case GGUFValue::U32: case GGUFValue::U64: return py::int_(v.u);
    case GGUFValue::I8: case GGUFValue::I16: case GGUFValue::I32: case GGUFValue::I64: return py::int_(v.i);
    case GGUFValue::F32: case GGUFValue::F64: return py::float_(v.f);
    case GGUFValue::BOOL: return py::bool_(v.u != 0);
    case GGUFValue::STRING: return file_str(v.s);
    case GGUFValue::ARRAY: {
      py::list l(v.size());
      for (size_t k = 0; k < v.size(); ++k) l[k] = gguf_value(v.at(k));
      return l;
    }
  }
  return py::none();
}

void register_gguf(py::module_& m) {
  py::class_<GGUFFile>(m, "GGUFFile", "A parsed, memory-mapped GGUF file.")
      .def(py::init([](const std::string& path) {
             py::gil_scoped_release r;
             return std::make_unique<GGUFFile>(path);
           }),
           py::arg("path"))
      .def_property_readonly("version", &GGUFFile::version)
      .def_property_readonly("metadata", [](const GGUFFile& f) {
        py::dict d;
        for (const auto& kv : f.metadata()) d[file_str(kv.first)] = gguf_value(kv.second);
        return d;
      })
      .def_property_readonly("tensors", [](const GGUFFile& f) {
        py::list l;
        for (const auto& t : f.tensors()) l.append(py::make_tuple(file_str(t.name), t.shape(), ops::ggml_type_name(t.type)));
        return l;
      })
      .def(
          "get",
          [](const GGUFFile& f, const std::string& key, const py::object& dflt, int64_t max_len) -> py::object {
            const GGUFValue* v = f.find(key);
            if (!v) return dflt;
            if (max_len >= 0 && v->type == GGUFValue::ARRAY && v->size() > static_cast<size_t>(max_len))
              throw CheckpointError("GGUF metadata '" + key + "' holds " + std::to_string(v->size()) + " values, more than the " +
                                    std::to_string(max_len) + " expected");
            return gguf_value(*v);
          },
          py::arg("key"), py::arg("default") = py::none(), py::arg("max_len") = -1,
          "One metadata value (arrays as lists); max_len >= 0 refuses longer arrays before converting them.")
      .def("config", &config_from_gguf)
      .def(
          "dequantize",
          [](const GGUFFile& f, const std::string& name) {
            const GGUFTensor* t = f.tensor(name);
            if (!t) throw ValueError("GGUF file has no tensor '" + name + "'");
            std::vector<float> v;
            {
              py::gil_scoped_release r;
              v = f.dequantize(*t);
            }
            py::array_t<float> out(t->shape());
            std::copy(v.begin(), v.end(), out.mutable_data());
            return out;
          },
          py::arg("name"), "Dequantise one tensor to float32 with its row-major shape (ne reversed).");
}

void register_ops(py::module_& m) {
  // Kernels exposed for tests against numpy references.
  auto ops_m = m.def_submodule("ops", "Low-level kernels (for tests).");
  ops_m.def("rmsnorm", [](py::array_t<float, py::array::c_style | py::array::forcecast> x, py::array_t<float, py::array::c_style | py::array::forcecast> w, float eps) {
    if (x.ndim() != 2 || w.ndim() != 1 || w.shape(0) != x.shape(1)) throw ValueError("rmsnorm: x [M, D], w [D]");
    py::array_t<float> y({x.shape(0), x.shape(1)});
    ops::rmsnorm(x.data(), x.shape(1), w.data(), eps, x.shape(0), static_cast<int>(x.shape(1)), y.mutable_data(), x.shape(1));
    return y;
  });
  ops_m.def("read_bandwidth", [](int64_t nbytes, int reps) {
    py::gil_scoped_release r;
    return ops::measure_read_bandwidth(nbytes, reps);
  }, py::arg("nbytes") = int64_t(1) << 30, py::arg("reps") = 5, "Streaming read bandwidth (bytes/s), all threads.");
  ops_m.def("gelu_tanh_mul", [](py::array_t<float, py::array::c_style | py::array::forcecast> g, py::array_t<float, py::array::c_style | py::array::forcecast> u) {
    if (g.ndim() != 2 || u.ndim() != 2 || g.shape(0) != u.shape(0) || g.shape(1) != u.shape(1)) throw ValueError("gelu_tanh_mul: gate, up [M, F]");
    py::array_t<float> y({g.shape(0), g.shape(1)});
    // gate and up in separate arrays: run row by row with ld = F.
    ops::gelu_tanh_mul(g.data(), u.data(), g.shape(1), g.shape(0), static_cast<int>(g.shape(1)), y.mutable_data());
    return y;
  });
  ops_m.def("rope", [](py::array_t<float, py::array::c_style | py::array::forcecast> x, py::array_t<int32_t, py::array::c_style | py::array::forcecast> pos, double base, double scaling) {
    if (x.ndim() != 3 || pos.ndim() != 1 || pos.shape(0) != x.shape(0)) throw ValueError("rope: x [M, heads, Hd], positions [M]");
    const int64_t M = x.shape(0);
    const int nh = static_cast<int>(x.shape(1)), Hd = static_cast<int>(x.shape(2));
    std::vector<float> c(M * Hd / 2), s(M * Hd / 2);
    ops::rope_tables(pos.data(), M, Hd, base, scaling, c.data(), s.data());
    py::array_t<float> y({x.shape(0), x.shape(1), x.shape(2)});
    std::copy(x.data(), x.data() + x.size(), y.mutable_data());
    ops::rope_apply(y.mutable_data(), M, nh, Hd, c.data(), s.data());
    return y;
  });
  ops_m.def("linear", [](py::array_t<float, py::array::c_style | py::array::forcecast> x, py::array_t<float, py::array::c_style | py::array::forcecast> w, const std::string& dtype, bool int8, bool plain, bool int4) {
    if (x.ndim() != 2 || w.ndim() != 2 || w.shape(1) != x.shape(1)) throw ValueError("linear: x [M, K], w [N, K]");
    const WeightQuant q = int4 ? WeightQuant::Int4 : int8 ? WeightQuant::Int8 : WeightQuant::None;
    ops::Linear lin(w.data(), w.shape(0), w.shape(1), parse_dtype(dtype), plain, q);
    if (q != WeightQuant::None && !lin.is_quantized()) throw ValueError("linear: int8/int4 need AVX-512 VNNI and K % 64 == 0");
    py::array_t<float> y({x.shape(0), w.shape(0)});
    lin.forward(x.data(), x.shape(0), y.mutable_data());
    return y;
  }, py::arg("x"), py::arg("w"), py::arg("dtype") = "float32", py::arg("int8") = false, py::arg("plain") = false, py::arg("int4") = false);
  ops_m.def("amx_bf16", &ops::amx_bf16, "Whether oneDNN runs bf16 on AMX here (the AMX prefill paths run).");
  ops_m.def("quantize", [](py::array_t<float, py::array::c_style | py::array::forcecast> w, int bits) {
    // The weights as the int8 / int4 mode stores them, dequantised back to f32.
    if (w.ndim() != 2 || w.shape(1) % 64 != 0) throw ValueError("quantize: w [N, K] with K % 64 == 0");
    if (bits != 8 && bits != 4) throw ValueError("quantize: bits must be 8 or 4");
    ops::QuantWeights q = ops::quant_weights(w.data(), w.shape(0), w.shape(1), bits);
    py::array_t<float> out({w.shape(0), w.shape(1)});
    for (int64_t n = 0; n < w.shape(0); ++n) ops::quant_row(q, n, out.mutable_data() + n * w.shape(1));
    return out;
  }, py::arg("w"), py::arg("bits"));
  ops_m.def("matmul_rate", [](int64_t M, int64_t K, int64_t N, const std::string& dtype, int reps) {
    // Attainable matmul rate: weights prepared once (as a model layer holds them), then `reps` timed calls.
    if (M < 1 || K < 1 || N < 1 || reps < 1) throw ValueError("matmul_rate: M, K, N and reps must be positive");
    std::vector<float> w(static_cast<size_t>(N) * K), x(static_cast<size_t>(M) * K), y(static_cast<size_t>(M) * N);
    uint32_t s = 12345;
    for (auto& v : w) v = static_cast<float>((s = s * 1664525u + 1013904223u) >> 8) / 16777216.f - 0.5f;
    for (auto& v : x) v = static_cast<float>((s = s * 1664525u + 1013904223u) >> 8) / 16777216.f - 0.5f;
    py::gil_scoped_release r;
    ops::Linear lin(w.data(), N, K, parse_dtype(dtype));
    lin.forward(x.data(), M, y.data());
    double best = 1e30;
    for (int i = 0; i < reps; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      lin.forward(x.data(), M, y.data());
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return 2.0 * M * K * N / best;
  }, py::arg("M"), py::arg("K"), py::arg("N"), py::arg("dtype") = "bfloat16", py::arg("reps") = 5,
     "FLOP/s of x [M, K] @ W^T [K, N] through the model's Linear (best of reps).");
  ops_m.def("attention", [](py::array_t<float, py::array::c_style | py::array::forcecast> q, py::array_t<float, py::array::c_style | py::array::forcecast> k,
                            py::array_t<float, py::array::c_style | py::array::forcecast> v, int64_t window, float scale, float softcap,
                            bool bf16) {
    // q [B, T, H, Hd], k/v [B, T, KV, Hd], no cache, no padding. bf16: as in a bf16 model (bf16 cache), which takes
    // the oneDNN bf16 path for prefill chunks where oneDNN runs bf16 on AMX.
    if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4) throw ValueError("attention: q [B, T, H, Hd], k/v [B, T, KV, Hd]");
    ops::AttentionArgs a;
    a.B = static_cast<int>(q.shape(0)); a.T = static_cast<int>(q.shape(1)); a.H = static_cast<int>(q.shape(2));
    a.Hd = static_cast<int>(q.shape(3)); a.KV = static_cast<int>(k.shape(2));
    if (k.shape(0) != a.B || k.shape(1) != a.T || k.shape(3) != a.Hd || a.H % a.KV != 0) throw ValueError("attention: shape mismatch");
    py::array_t<float> z({q.shape(0), q.shape(1), q.shape(2), q.shape(3)});
    a.q = q.data(); a.k_new = k.data(); a.v_new = v.data(); a.window = window; a.scale = scale; a.softcap = softcap; a.z = z.mutable_data();
    if (bf16) a.compute = DType::BF16;
    ops::attention(a);
    return z;
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("window"), py::arg("scale"), py::arg("softcap"), py::arg("bf16") = false);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "gemmalens native core (private; use the gemmalens package).";
  static py::exception<CheckpointError> checkpoint_error(m, "CheckpointError", PyExc_ValueError);
  // Messages can quote bytes from a file (tensor names, metadata strings): decode them leniently so that the
  // error is the typed one, not a UnicodeDecodeError raised while reporting it.
  py::register_exception_translator([](std::exception_ptr p) {
    auto set = [](PyObject* type, const char* what) {
      PyObject* msg = PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(std::strlen(what)), "backslashreplace");
      if (!msg) {
        PyErr_Clear();
        msg = PyUnicode_FromString("(unprintable message)");
      }
      PyErr_SetObject(type, msg);
      Py_XDECREF(msg);
    };
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CheckpointError& e) {
      set(checkpoint_error.ptr(), e.what());
    } catch (const ValueError& e) {
      set(PyExc_ValueError, e.what());
    } catch (const IOError& e) {
      set(PyExc_OSError, e.what());
    } catch (const ResourceError& e) {
      set(PyExc_MemoryError, e.what());
    } catch (const InternalError& e) {
      set(PyExc_RuntimeError, (std::string("gemmalens internal error (please report it): ") + e.what()).c_str());
    }
  });
  register_config(m);
  register_cache(m);
  register_model(m);
  register_ops(m);
  register_gguf(m);
  register_hooks(m);
  register_sae(m);
  m.def(
      "load_arrays",
      [](py::dict arrays, const Gemma3Config& cfg, const std::string& dtype, const std::string& weights) {
        // A model from {HF name: array in HF layout} (formats read in Python: Orbax, gemma_pytorch). The GIL is
        // held: shapes and values are read from Python objects.
        const DType d = parse_dtype(dtype);
        const WeightQuant q = parse_weight_quant(weights);
        ArraySource src;
        for (auto item : arrays) src.names.push_back(py::str(item.first));
        src.shape = [&](const std::string& name, std::vector<int64_t>& shape) {
          if (!arrays.contains(name)) return false;
          for (auto x : py::getattr(arrays[py::str(name)], "shape", py::tuple()).cast<py::tuple>()) shape.push_back(x.cast<int64_t>());
          return true;
        };
        src.read = [&](const std::string& name) {
          auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(arrays[py::str(name)]);
          if (!a) throw CheckpointError("tensor '" + name + "' is not a numeric array");
          return std::vector<float>(a.data(), a.data() + a.size());
        };
        return load_arrays(src, cfg, d, q);
      },
      py::arg("arrays"), py::arg("config"), py::arg("dtype") = "float32", py::arg("weights") = "native");
  m.def(
      "load_gguf",
      [](const std::string& path, const std::string& dtype, const std::string& weights) {
        DType d = parse_dtype(dtype);
        const WeightQuant q = parse_weight_quant(weights);
        py::gil_scoped_release release;
        return load_gguf(path, d, nullptr, q);
      },
      py::arg("path"), py::arg("dtype") = "float32", py::arg("weights") = "native");
  m.def(
      "load_gguf",
      [](const GGUFFile& f, const std::string& dtype, const std::string& weights) {
        DType d = parse_dtype(dtype);
        const WeightQuant q = parse_weight_quant(weights);
        py::gil_scoped_release release;
        return load_gguf(f, d, nullptr, q);
      },
      py::arg("file"), py::arg("dtype") = "float32", py::arg("weights") = "native", "The model from an already parsed GGUFFile.");
  m.def(
      "load_hf",
      [](const std::string& weights_path, const Gemma3Config& cfg, const std::string& dtype, const std::string& weights) {
        DType d = parse_dtype(dtype);
        const WeightQuant q = parse_weight_quant(weights);
        py::gil_scoped_release release;
        return load_hf_safetensors(weights_path, cfg, d, q);
      },
      py::arg("weights_path"), py::arg("config"), py::arg("dtype") = "float32", py::arg("weights") = "native");
  m.def(
      "read_safetensors",
      [](const std::string& path) {
        auto store = TensorStore::open(path);
        py::dict d;
        for (const auto& kv : store->tensors()) {
          py::array_t<float> a(kv.second.shape);
          tensor_to_f32(kv.second, a.mutable_data());
          d[py::str(kv.first)] = a;
        }
        return d;
      },
      py::arg("path"), "Read every tensor of a .safetensors file as float32 (F32/F16/BF16 on disk).");
  m.def("dnnl_version", &ops::dnnl_version);
  m.def("max_threads", &ops::get_max_threads);
}
