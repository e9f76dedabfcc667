// pybind11 module gemmalens._core: thin bindings, one file per bound area (bindings.h); conveniences live in
// python/gemmalens/. Here: the module, its exception mapping, and the build's versions.
#include <cstring>
#include <limits>

#include "bindings/bindings.h"
#include "common.h"
#include "ops/cpu.h"
#include "ops/pages.h"
#include "ops/linear.h"

using namespace gemmalens;

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
  bind_config(m);
  bind_hooks(m);  // before bind_model: Model's signatures name HookSet
  bind_model(m);
  bind_testing(m);
  bind_io(m);
  bind_sae(m);
  // The CPU class, decided here, at import: a bad GEMMALENS_MAX_ISA fails the import with the accepted values; so
  // does a bad GEMMALENS_HUGE_PAGES.
  ops::cpu_state();
  ops::huge_pages_enabled();
  m.def("cpu_info", [] {
    const ops::CpuState& s = ops::cpu_state();
    py::dict d;
    d["class"] = ops::cpu_class_name(s.active);
    d["detected"] = ops::cpu_class_name(s.detected);
    d["cap"] = s.cap.empty() ? py::object(py::none()) : py::object(py::str(s.cap));
    py::list supported;
    for (ops::CpuClass c : s.supported) supported.append(ops::cpu_class_name(c));
    d["supported"] = supported;
    d["onednn_isa"] = s.onednn_isa;
    d["onednn_user_cap"] = s.onednn_user_cap;
    for (const auto& [op, path] : ops::cpu_paths()) d[py::str(op)] = path;
    // The row counts where the paths change (matmuls of M rows): bf16 weights take our own kernels up to
    // bf16_own_max_rows (None: every M), quantised weights the dequantised path from int8_prefill_min_rows (None: never).
    const int64_t own = ops::bf16_own_max_m(), deq = ops::quant_dequant_min_m(), never = std::numeric_limits<int64_t>::max();
    d["bf16_own_max_rows"] = own == never ? py::object(py::none()) : py::object(py::int_(own));
    d["int8_prefill_min_rows"] = deq == never ? py::object(py::none()) : py::object(py::int_(deq));
    return d;
  }, "The CPU class gemmalens runs (after GEMMALENS_MAX_ISA), what the CPU has, and the path each op family takes.");
  m.def("dnnl_version", &ops::dnnl_version);
  m.def("max_threads", &ops::get_max_threads);
}
