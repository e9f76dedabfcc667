// Shared by the binding files of gemmalens._core: one file per bound area, each with a bind_* function that
// module.cpp's PYBIND11_MODULE calls. Bindings convert and release the GIL; the logic lives in model/, io/, ops/.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <vector>

#include "common.h"
#include "model/hooks.h"

namespace py = pybind11;

namespace gemmalens {

// Any array-like argument as float32, C-contiguous (converted when it is not).
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

// HookSet with the Python side of callbacks: callables taking the activation (a fresh float32 array) and
// returning the array to write back (the Python wrapper validates shape and dtype).
struct PyHookSet : HookSet {
  using HookSet::HookSet;
  std::vector<py::object> callbacks;
};

// `kv_dtype=` of a KV cache: None or the model's dtype (its keys and values as the model computes them), or "int8"
// (true). Anything else: a ValueError naming the choices.
inline bool parse_kv_dtype(const py::object& kv, DType model) {
  if (kv.is_none()) return false;
  std::string s = "a " + std::string(py::str(kv.get_type().attr("__name__")));
  if (py::isinstance<py::str>(kv)) {
    s = kv.cast<std::string>();
    if (s == "int8") return true;
    if (s == dtype_name(model)) return false;
    s = "'" + s + "'";
  }
  throw ValueError("kv_dtype must be None (the model's dtype, " + std::string(dtype_name(model)) + ") or 'int8', got " + s);
}

void bind_config(py::module_& m);   // Gemma3Config
void bind_model(py::module_& m);    // Model, KVCache
void bind_hooks(py::module_& m);    // HookSet, hook names and sites
void bind_sae(py::module_& m);      // SAE
void bind_io(py::module_& m);       // GGUFFile, the loaders, read_safetensors
void bind_testing(py::module_& m);  // _core._testing: kernels and rates for tests and benchmarks

}  // namespace gemmalens
