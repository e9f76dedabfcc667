// Gemma3Config: HF field names as attributes; parsing and validation live in model/config.cpp.
#include <pybind11/stl.h>

#include "bindings/bindings.h"
#include "model/config.h"

namespace gemmalens {

namespace {

py::object optional_cap(double v) { return v > 0 ? py::object(py::float_(v)) : py::object(py::none()); }

}  // namespace

void bind_config(py::module_& m) {
  m.def(
      "dtype_name", [](const std::string& s) { return std::string(dtype_name(parse_dtype(s))); }, py::arg("dtype"),
      "The canonical name of a dtype= value (the one alias table, common.h's parse_dtype); ValueError otherwise.");
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

}  // namespace gemmalens
