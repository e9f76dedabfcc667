// SAE: sparse autoencoders and transcoders (model/sae.h checks the shapes).
#include <memory>

#include "bindings/bindings.h"
#include "model/sae.h"

namespace gemmalens {

void bind_sae(py::module_& m) {
  using F = FloatArray;
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
      })
      .def("decode_vjp",
           [](const SAE& s, F g) {
             if (g.ndim() != 2 || g.shape(1) != s.d_out) throw ValueError("SAE.decode_vjp: g must be [n, d_out = " + std::to_string(s.d_out) + "]");
             py::array_t<float> out({g.shape(0), static_cast<py::ssize_t>(s.d_sae)});
             py::gil_scoped_release r;
             s.decode_vjp(g.data(), g.shape(0), out.mutable_data());
             return out;
           }, py::arg("g"), "The decoder's VJP: g [n, d_out] -> g W_dec^T [n, d_sae].")
      .def("encode_vjp",
           [](const SAE& s, F g) {
             if (g.ndim() != 2 || g.shape(1) != s.d_sae) throw ValueError("SAE.encode_vjp: g must be [n, d_sae = " + std::to_string(s.d_sae) + "]");
             py::array_t<float> out({g.shape(0), static_cast<py::ssize_t>(s.d_in)});
             py::gil_scoped_release r;
             s.encode_vjp(g.data(), g.shape(0), out.mutable_data());
             return out;
           }, py::arg("g"), "The encoder's VJP at the pre-activations: g [n, d_sae] -> g W_enc^T [n, d_in].")
      .def("weights",
           [](const SAE& s) {
             py::array_t<float> we({static_cast<py::ssize_t>(s.d_in), static_cast<py::ssize_t>(s.d_sae)});
             py::array_t<float> wd({static_cast<py::ssize_t>(s.d_sae), static_cast<py::ssize_t>(s.d_out)});
             {
               py::gil_scoped_release r;
               s.export_weights(we.mutable_data(), wd.mutable_data());
             }
             return py::make_tuple(we, wd);
           }, "(W_enc [d_in, d_sae], W_dec [d_sae, d_out]) as stored, in float32.");
}

}  // namespace gemmalens
