// Checkpoint formats (io/): GGUFFile, the loaders, read_safetensors. Loaders release the GIL except load_arrays,
// which reads Python objects.
#include <pybind11/stl.h>

#include <memory>

#include "bindings/bindings.h"
#include "io/arrays.h"
#include "io/gguf.h"
#include "io/hf_checkpoint.h"
#include "io/load_progress.h"
#include "io/safetensors.h"
#include "model/gemma3.h"
#include "ops/dequant.h"

namespace gemmalens {

namespace {

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

// A dict key as text: lone surrogates (a name from a pickle can hold them) are escaped rather than an encoding error.
std::string key_str(const py::handle& key) {
  auto utf8 = py::reinterpret_steal<py::object>(PyUnicode_AsEncodedString(py::str(key).ptr(), "utf-8", "backslashreplace"));
  if (!utf8) throw py::error_already_set();
  return utf8.cast<std::string>();
}

}  // namespace

void bind_io(py::module_& m) {
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
  // Polled from another Python thread while a loader (GIL released) fills it: gl.load's progress bar.
  py::class_<LoadProgress>(m, "LoadProgress", "Weights' elements handed to the model so far (done) of all (total).")
      .def(py::init<>())
      .def_property_readonly("done", [](const LoadProgress& p) { return p.done.load(); })
      .def_property_readonly("total", [](const LoadProgress& p) { return p.total.load(); });
  m.def(
      "planned_weight_bytes",
      [](const Gemma3Config& cfg, const std::string& dtype, const std::string& weights) {
        return planned_weight_bytes(cfg, parse_dtype(dtype), parse_weight_quant(weights));
      },
      py::arg("config"), py::arg("dtype") = "float32", py::arg("weights") = "native",
      "About how many bytes the weights of a model of this config take once loaded (checked before a load allocates).");
  m.def("available_memory_bytes", &available_memory_bytes,
        "Memory this process may still take: MemAvailable, or the cgroup v2 limit's headroom when lower (0: unknown).");
  m.def(
      "load_arrays",
      [](py::dict arrays, const Gemma3Config& cfg, const std::string& dtype, const std::string& weights,
         LoadProgress* progress) {
        // A model from {HF name: array in HF layout} (formats read in Python: Orbax, gemma_pytorch). The GIL is
        // held: shapes and values are read from Python objects.
        const DType d = parse_dtype(dtype);
        const WeightQuant q = parse_weight_quant(weights);
        ArraySource src;
        for (auto item : arrays) src.names.push_back(key_str(item.first));
        src.shape = [&](const std::string& name, std::vector<int64_t>& shape) {
          if (!arrays.contains(name)) return false;
          for (auto x : py::getattr(arrays[py::str(name)], "shape", py::tuple()).cast<py::tuple>()) shape.push_back(x.cast<int64_t>());
          return true;
        };
        src.read = [&](const std::string& name) {
          auto a = FloatArray::ensure(arrays[py::str(name)]);
          if (!a) throw CheckpointError("tensor '" + name + "' is not a numeric array");
          return std::vector<float>(a.data(), a.data() + a.size());
        };
        return load_arrays(src, cfg, d, q, progress);
      },
      py::arg("arrays"), py::arg("config"), py::arg("dtype") = "float32", py::arg("weights") = "native",
      py::arg("progress") = nullptr);
  m.def(
      "load_gguf",
      [](const std::string& path, const std::string& dtype, const std::string& weights, LoadProgress* progress) {
        DType d = parse_dtype(dtype);
        const WeightQuant q = parse_weight_quant(weights);
        py::gil_scoped_release release;
        return load_gguf(path, d, nullptr, q, progress);
      },
      py::arg("path"), py::arg("dtype") = "float32", py::arg("weights") = "native", py::arg("progress") = nullptr);
  m.def(
      "load_gguf",
      [](const GGUFFile& f, const std::string& dtype, const std::string& weights, LoadProgress* progress) {
        DType d = parse_dtype(dtype);
        const WeightQuant q = parse_weight_quant(weights);
        py::gil_scoped_release release;
        return load_gguf(f, d, nullptr, q, progress);
      },
      py::arg("file"), py::arg("dtype") = "float32", py::arg("weights") = "native", py::arg("progress") = nullptr,
      "The model from an already parsed GGUFFile.");
  m.def(
      "load_hf",
      [](const std::string& weights_path, const Gemma3Config& cfg, const std::string& dtype, const std::string& weights,
         LoadProgress* progress) {
        DType d = parse_dtype(dtype);
        const WeightQuant q = parse_weight_quant(weights);
        py::gil_scoped_release release;
        return load_hf_safetensors(weights_path, cfg, d, q, progress);
      },
      py::arg("weights_path"), py::arg("config"), py::arg("dtype") = "float32", py::arg("weights") = "native",
      py::arg("progress") = nullptr);
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
}

}  // namespace gemmalens
