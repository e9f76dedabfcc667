// Model and KVCache: the forward pass and its cache (model/gemma3.h, model/kv_cache.h).
#include <pybind11/stl.h>

#include <chrono>
#include <functional>
#include <memory>
#include <set>

#include "bindings/bindings.h"
#include "model/gemma3.h"
#include "model/kv_cache.h"
#include "ops/grad.h"

namespace gemmalens {

namespace {

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

void bind_cache(py::module_& m) {
  py::class_<KVCache>(m, "KVCache",
                      "A preallocated key/value cache for incremental decoding (model.new_cache(batch, max_seq_len)). "
                      "Sliding-window layers keep their last sliding_window positions in ring buffers, full-attention "
                      "layers max_seq_len; its dtype follows the model's, or is int8 (new_cache(kv_dtype='int8')). forward / "
                      "next_token_logits / generate append "
                      "to it (positions continue from seq_len); it is refused by a model of another geometry.\n\n"
                      ">>> cache = model.new_cache(batch=1)\n"
                      ">>> model.forward(ids, cache=cache)                   # prefill\n"
                      ">>> step = model.next_token_logits([818], cache=cache)  # one decode step")
      .def(py::init([](const Gemma3Config& cfg, int batch, int64_t max_seq_len, const std::string& dtype,
                       const py::object& kv_dtype) {
             cfg.validate();
             const DType d = parse_dtype(dtype);
             return std::make_unique<KVCache>(cfg, batch, max_seq_len, d, parse_kv_dtype(kv_dtype, d));
           }),
           py::arg("config"), py::arg("batch"), py::arg("max_seq_len"), py::arg("dtype") = "float32",
           py::arg("kv_dtype") = py::none(),
           "Usually made by Model.new_cache(); standalone for sizing.")
      .def_property_readonly("batch", &KVCache::batch, "Rows it was made for.")
      .def_property_readonly("max_seq_len", &KVCache::max_seq_len, "The most positions it can hold.")
      .def_property_readonly("seq_len", &KVCache::seq_len, "Positions held so far (the next token's position).")
      .def_property_readonly("nbytes", &KVCache::nbytes, "Bytes of its key/value buffers.")
      .def_property_readonly("dtype", [](const KVCache& c) { return dtype_name(c.dtype()); },
                             "The model's dtype (float32 or bfloat16), which passes over it compute in.")
      .def_property_readonly("kv_dtype", [](const KVCache& c) { return c.int8() ? "int8" : dtype_name(c.dtype()); },
                             "How it holds keys and values: the model's dtype, or int8 (blocks of 32 with a scale each).")
      .def_property_readonly("row_start", &KVCache::row_start, "Left-padding count of each row.")
      .def("truncate", &KVCache::truncate, py::arg("n"),
           "Forget every position from n on (seq_len becomes n): back up to a shared prefix and decode again. A "
           "ValueError where a sliding-window ring no longer holds the window before n (copy() the cache there "
           "instead).")
      .def("copy", [](const KVCache& c) { return c.copy(); },
           "An independent copy (its own buffers: a full copy's memory), e.g. to branch from one prefill.")
      .def(
          "row_valid", [](const KVCache& c, int r) {
            if (r < 0 || r >= c.batch()) throw ValueError("row_valid: row " + std::to_string(r) + " is out of range");
            return c.row_valid(r);
          },
          py::arg("row"), "Whether the row holds every slot of its sequence (False once a pass with cache_rows left it out).")
      .def("place_row", &KVCache::place_row, py::arg("row"), py::arg("src"), py::arg("src_row") = 0,
           py::call_guard<py::gil_scoped_release>(),
           "Copy row src_row of src (another cache of this model) into row `row`, its sequence ending at this seq_len.")
      .def("shift", &KVCache::shift, py::arg("d"), py::call_guard<py::gil_scoped_release>(),
           "Move every valid row's slots by d (row_start and seq_len with them).");
}

}  // namespace

void bind_model(py::module_& m) {
  m.def(
      "cross_entropy_grad",
      [](const FloatArray& logits, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& targets,
         const FloatArray& weights, bool with_grad) {
        if (logits.ndim() != 2 || targets.ndim() != 1 || weights.ndim() != 1 || targets.shape(0) != logits.shape(0) ||
            weights.shape(0) != logits.shape(0))
          throw ValueError("cross_entropy_grad: logits [M, V], targets [M], weights [M]");
        const int64_t M = logits.shape(0), V = logits.shape(1);
        for (int64_t i = 0; i < M; ++i)
          if (weights.data()[i] != 0.f && (targets.data()[i] < 0 || targets.data()[i] >= V))
            throw ValueError("cross_entropy_grad: target token id " + std::to_string(targets.data()[i]) +
                             " is out of range [0, vocab_size = " + std::to_string(V) + ")");
        py::array_t<float> grad = with_grad ? py::array_t<float>({M, V}) : py::array_t<float>();
        float* g = with_grad ? grad.mutable_data() : nullptr;
        double total;
        {
          py::gil_scoped_release release;
          total = ops::cross_entropy_grad(logits.data(), M, V, targets.data(), weights.data(), g);
        }
        return py::make_tuple(total, with_grad ? py::object(grad) : py::object(py::none()));
      },
      py::arg("logits"), py::arg("targets"), py::arg("weights"), py::arg("with_grad") = true,
      "(sum_m w_m CE(logits_m, target_m), its gradient [M, V] or None): the next-token loss's native kernel.");
  bind_cache(m);
  // (GradTape and HookSet, bind_hooks, are registered before Model so that its signatures name them)
  py::class_<GradTape>(m, "GradTape",
                      "What a forward keeps for a reverse pass (forward(..., tape=)). keep_bytes: the most memory the "
                      "blocks' intermediates may take for the reverse pass to use them rather than recompute them.")
      .def(py::init([](int64_t keep_bytes) {
             if (keep_bytes < 0) throw ValueError("GradTape: keep_bytes must be >= 0");
             GradTape t;
             t.keep_bytes = keep_bytes;
             return t;
           }),
           py::arg("keep_bytes") = int64_t(2) << 30)
      .def_property_readonly("ready", [](const GradTape& t) { return t.ready; })
      .def_property_readonly("kept_layers", [](const GradTape& t) { return t.layers.size(); });
  py::class_<Gemma3Model>(m, "Model")
      .def_property_readonly("config", &Gemma3Model::config)
      .def_property_readonly("dtype", [](const Gemma3Model& g) { return dtype_name(g.dtype()); })
      .def_property_readonly("weight_nbytes", &Gemma3Model::weight_nbytes)
      .def_property_readonly("weights", [](const Gemma3Model& m) { return weight_quant_name(m.weight_quant()); })
      .def_readwrite("threads", &Gemma3Model::threads)
      .def_readwrite("prefill_chunk", &Gemma3Model::prefill_chunk)
      .def(
          "export_tensors",
          [](const Gemma3Model& g, py::object names) {
            // {HF name: float32 array in HF layout}; names: only these (unknown ones are an error)
            py::dict d;
            std::set<std::string> only;
            if (!names.is_none()) {
              for (auto n : names) only.insert(py::cast<std::string>(n));
              std::set<std::string> known;
              for_each_weight(g.config(), [&](const WeightSpec& w) { known.insert(w.name); });
              for (const auto& n : only)
                if (!known.count(n)) throw ValueError("export_tensors: the model has no weight named '" + n + "'");
            }
            std::function<bool(const std::string&)> want;
            if (!names.is_none()) want = [&only](const std::string& n) { return only.count(n) > 0; };
            g.export_tensors(
                [&](const std::string& name, const std::vector<int64_t>& shape, const float* data) {
                  py::array_t<float> a(shape);
                  std::copy(data, data + numel(shape), a.mutable_data());
                  d[py::str(name)] = a;
                },
                want);
            return d;
          },
          py::arg("names") = py::none())
      .def(
          "unembed",
          [](Gemma3Model& g, FloatArray x) {
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
          [](const Gemma3Model& g, int batch, int64_t max_seq_len, const py::object& kv_dtype) {
            return std::make_unique<KVCache>(g.config(), batch, max_seq_len, g.dtype(), parse_kv_dtype(kv_dtype, g.dtype()));
          },
          py::arg("batch"), py::arg("max_seq_len"), py::arg("kv_dtype") = py::none())
      .def(
          "forward",
          [](Gemma3Model& g, const py::array& tokens, const py::object& row_start, KVCache* cache, const std::string& logits,
             PyHookSet* hooks, int stop_at_layer, bool allow_longer, GradTape* tape, const py::object& cache_rows) {
            const int32_t* tok = checked_ptr<int32_t>(tokens, "tokens", 2);
            const int B = static_cast<int>(tokens.shape(0)), T = static_cast<int>(tokens.shape(1));
            const int32_t* rs = nullptr;
            py::array rs_arr;
            if (!row_start.is_none()) {
              rs_arr = row_start.cast<py::array>();
              rs = checked_ptr<int32_t>(rs_arr, "row_start", 1);
              if (rs_arr.shape(0) != B) throw ValueError("row_start must have one entry per row");
            }
            py::array rows_arr;
            const int32_t* rows = nullptr;
            if (!cache_rows.is_none()) {
              rows_arr = cache_rows.cast<py::array>();
              rows = checked_ptr<int32_t>(rows_arr, "cache_rows", 1);
              if (rows_arr.shape(0) != B) throw ValueError("cache_rows must have one entry per row");
            }
            ForwardArgs a;
            a.tokens = tok; a.B = B; a.T = T; a.row_start = rs; a.cache = cache; a.cache_rows = rows;
            a.hooks = (hooks && !hooks->empty()) ? hooks : nullptr;
            a.stop_at_layer = stop_at_layer;
            a.allow_longer = allow_longer;
            a.tape = tape;
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
              check_fits_memory(uint64_t(4) * B * T * V,
                                "forward: the logits of every position, a float32 [" + std::to_string(B) + ", " + std::to_string(T) +
                                    ", " + std::to_string(V) + "] array,",
                                "next_token_logits() computes the last position's only (generation, the next token); "
                                "return_type=None skips the logits (hooks still fire); or run a shorter input");
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
          py::arg("hooks") = nullptr, py::arg("stop_at_layer") = -1, py::arg("allow_longer") = false, py::arg("tape") = nullptr,
          py::arg("cache_rows") = py::none(),
          "tokens: int32 [batch, pos] C-contiguous; row_start: int32 [batch] left-padding counts or None; tape: keep "
          "what backward() needs; cache_rows: int32 [batch], the cache row of each row (some of the cache's rows), or None.")
      .def(
          "backward",
          [](Gemma3Model& g, GradTape& tape, const py::array& dlogits, const py::object& logits, PyHookSet* grad_hooks,
             PyHookSet* forward_hooks) {
            if (!tape.ready) throw ValueError("backward: the tape holds no forward pass (pass tape= to forward first)");
            const int64_t V = g.config().vocab_size;
            const float* dl = checked_ptr<float>(dlogits, "dlogits", 3);
            if (dlogits.shape(0) != tape.B || dlogits.shape(1) != tape.T || dlogits.shape(2) != V)
              throw ValueError("backward: dlogits must have the logits' shape");
            BackwardArgs b;
            b.tape = &tape;
            b.dlogits = dl;
            py::array lg;
            if (!logits.is_none()) {
              lg = logits.cast<py::array>();
              b.logits = checked_ptr<float>(lg, "logits", 3);
              if (lg.shape(0) != tape.B || lg.shape(1) != tape.T || lg.shape(2) != V) throw ValueError("backward: logits must match the tape");
            }
            b.grad_hooks = (grad_hooks && !grad_hooks->empty()) ? grad_hooks : nullptr;
            b.forward_hooks = (forward_hooks && !forward_hooks->empty()) ? forward_hooks : nullptr;
            b.interrupt_check = interrupt_check();
            py::gil_scoped_release release;
            g.backward(b);
          },
          py::arg("tape"), py::arg("dlogits"), py::arg("logits") = py::none(), py::arg("grad_hooks") = nullptr,
          py::arg("forward_hooks") = nullptr,
          "The reverse pass of the forward recorded in tape: dlogits float32 [batch, pos, vocab] C-contiguous; the "
          "grad_hooks' sites fire with the gradients arriving there; forward_hooks (the forward's) are replayed and "
          "their edits' VJPs applied.");
}

}  // namespace gemmalens
