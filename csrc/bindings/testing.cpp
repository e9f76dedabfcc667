// _core._testing: kernels bound for the tests against numpy references, and the rates bench/run.py measures.
// Not part of the API.
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <vector>

#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bindings/bindings.h"
#include "ops/attention.h"
#include "ops/cpu.h"
#include "ops/kernels.h"
#include "ops/linear.h"
#include "ops/pages.h"
#include "ops/quant.h"
#include "ops/steal.h"

namespace gemmalens {

void bind_testing(py::module_& m) {
  auto t = m.def_submodule("_testing", "Kernels for the tests against numpy references, and rates for bench/run.py (not API).");
  t.def("rmsnorm", [](FloatArray x, FloatArray w, float eps) {
    if (x.ndim() != 2 || w.ndim() != 1 || w.shape(0) != x.shape(1)) throw ValueError("rmsnorm: x [M, D], w [D]");
    py::array_t<float> y({x.shape(0), x.shape(1)});
    ops::rmsnorm(x.data(), x.shape(1), w.data(), eps, x.shape(0), static_cast<int>(x.shape(1)), y.mutable_data(), x.shape(1));
    return y;
  });
  t.def("parallel_steal", [](int64_t n, double slow_us) {
    if (n < 0 || n > (int64_t{1} << 24)) throw ValueError("parallel_steal: n must be in [0, 2^24]");
    std::vector<std::atomic<int>> runs(static_cast<size_t>(n));
    std::vector<int> by(static_cast<size_t>(n), -1);
    const int64_t first_end = n / std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>(std::max<int64_t>(n, 1))));
    const long caller = syscall(SYS_gettid);
    {
      py::gil_scoped_release nogil;
      ops::parallel_steal(n, [&](int64_t i) {
        // 0: the calling thread (the team's master); 1: another. By the kernel's thread id: omp_get_thread_num, which
        // GCC treats as a const function, answered one value for every task in this lambda.
        const bool master = syscall(SYS_gettid) == caller;
        runs[i].fetch_add(1);
        by[i] = master ? 0 : 1;
        if (master && i < first_end) {  // the master's own share runs slow: the others take it
          const auto t0 = std::chrono::steady_clock::now();
          while (std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() < slow_us) {
          }
        }
      });
    }
    py::array_t<int32_t> r(n), b(n);
    for (int64_t i = 0; i < n; ++i) r.mutable_data()[i] = runs[i].load(), b.mutable_data()[i] = by[i];
    return py::make_tuple(r, b);
  }, py::arg("n"), py::arg("slow_us") = 0.0,
     "ops/steal.h on tasks 0 .. n-1: (how many times each ran, 0 where the calling thread ran it and 1 where another "
     "did); the tasks of the caller's own share spin slow_us microseconds each when the caller runs them.");
  t.def("omp_max_threads", [] { return omp_get_max_threads(); }, "The OpenMP threads a parallel region gets here.");
  t.def("weight_arena_chunks", [] { return ops::weight_arena_chunks(); },
        "Chunks of the weight arena (ops/pages.h) held now: buffers of weights under 16 MiB share them.");
  t.def("read_bandwidth", [](int64_t nbytes, int reps) {
    // Under 1 MiB the buffer sits in cache (and under 256 bytes no thread reads anything): not a memory bandwidth.
    if (nbytes < (int64_t{1} << 20) || reps < 1)
      throw ValueError("read_bandwidth: nbytes must be at least 1 MiB (1048576) and reps at least 1, got nbytes=" +
                       std::to_string(nbytes) + ", reps=" + std::to_string(reps));
    py::gil_scoped_release r;
    return ops::measure_read_bandwidth(nbytes, reps);
  }, py::arg("nbytes") = int64_t(1) << 30, py::arg("reps") = 5, "Streaming read bandwidth (bytes/s), all threads: the best of reps reads, plain and with lines asked for 2 KB ahead.");
  t.def("gelu_tanh_mul", [](FloatArray g, FloatArray u) {
    if (g.ndim() != 2 || u.ndim() != 2 || g.shape(0) != u.shape(0) || g.shape(1) != u.shape(1)) throw ValueError("gelu_tanh_mul: gate, up [M, F]");
    py::array_t<float> y({g.shape(0), g.shape(1)});
    // gate and up in separate arrays: run row by row with ld = F.
    ops::gelu_tanh_mul(g.data(), u.data(), g.shape(1), g.shape(0), static_cast<int>(g.shape(1)), y.mutable_data());
    return y;
  });
  t.def("rope", [](FloatArray x, py::array_t<int32_t, py::array::c_style | py::array::forcecast> pos, double base, double scaling) {
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
  t.def("linear", [](FloatArray x, FloatArray w, const std::string& dtype, bool int8, bool plain, bool int4) {
    if (x.ndim() != 2 || w.ndim() != 2 || w.shape(1) != x.shape(1)) throw ValueError("linear: x [M, K], w [N, K]");
    const WeightQuant q = int4 ? WeightQuant::Int4 : int8 ? WeightQuant::Int8 : WeightQuant::None;
    ops::Linear lin(w.data(), w.shape(0), w.shape(1), parse_dtype(dtype), plain, q);
    if (q != WeightQuant::None && !lin.is_quantized()) throw ValueError("linear: int8/int4 need K % 64 == 0");
    py::array_t<float> y({x.shape(0), w.shape(0)});
    lin.forward(x.data(), x.shape(0), y.mutable_data());
    return y;
  }, py::arg("x"), py::arg("w"), py::arg("dtype") = "float32", py::arg("int8") = false, py::arg("plain") = false, py::arg("int4") = false);
  t.def("tied_table", [](FloatArray w, const std::string& dtype, FloatArray x, py::array_t<int64_t, py::array::c_style | py::array::forcecast> ids,
                         FloatArray dy, bool from_rows) {
    // The tied embedding's Linear (plain: row-major, or the bf16 panels where N % 64 == 0 and K % 32 == 0), made as a
    // model load makes it (from_rows: Linear::plain_from_rows, blocks of rows; else the constructor): its LM head
    // x W^T, its rows `ids` (the embedding lookup), the whole table back row-major, and dy W (the reverse pass).
    if (w.ndim() != 2 || x.ndim() != 2 || x.shape(1) != w.shape(1) || dy.ndim() != 2 || dy.shape(1) != w.shape(0))
      throw ValueError("tied_table: w [N, K], x [M, K], dy [M2, N]");
    const int64_t N = w.shape(0), K = w.shape(1);
    for (int64_t i = 0; i < ids.size(); ++i)
      if (ids.data()[i] < 0 || ids.data()[i] >= N) throw ValueError("tied_table: ids in [0, N)");
    const float* wp = w.data();
    ops::Linear lin = from_rows ? ops::Linear::plain_from_rows(N, K, parse_dtype(dtype), WeightQuant::None,
                                                               [wp, K](int64_t r0, int64_t n, float* out) {
                                                                 std::copy(wp + r0 * K, wp + (r0 + n) * K, out);
                                                               })
                                : ops::Linear(wp, N, K, parse_dtype(dtype), /*plain=*/true);
    py::array_t<float> y({x.shape(0), N}), rows({ids.size(), K}), table({N, K}), dx({dy.shape(0), K});
    lin.forward(x.data(), x.shape(0), y.mutable_data());
    for (int64_t i = 0; i < ids.size(); ++i) lin.row(ids.data()[i], rows.mutable_data() + i * K);
    lin.to_rowmajor(table.mutable_data());
    lin.backward_input(dy.data(), dy.shape(0), dx.mutable_data());
    return py::make_tuple(y, rows, table, dx);
  }, py::arg("w"), py::arg("dtype"), py::arg("x"), py::arg("ids"), py::arg("dy"), py::arg("from_rows") = false);
  t.def("onednn_matmul_impl", [](int64_t M, int64_t K, int64_t N, const std::string& dtype) {
    return ops::onednn_matmul_impl(M, K, N, parse_dtype(dtype));
  }, "The implementation oneDNN picks for an [M, K] x [K, N] matmul in dtype (brg:avx512_core, gemm:jit:f32, ...).");
  t.def("bf16_attention_matmul", &ops::attention_prefill_bf16_matmul,
        "Whether a bf16 model's prefill attention runs as oneDNN bf16 matmuls here (AMX, or AVX512_BF16 on AMD).");
  t.def("quantize", [](FloatArray w, int bits) {
    // The weights as the int8 / int4 mode stores them, dequantised back to f32.
    if (w.ndim() != 2 || w.shape(1) % 64 != 0) throw ValueError("quantize: w [N, K] with K % 64 == 0");
    if (bits != 8 && bits != 4) throw ValueError("quantize: bits must be 8 or 4");
    ops::QuantWeights q = ops::quant_weights(w.data(), w.shape(0), w.shape(1), bits);
    py::array_t<float> out({w.shape(0), w.shape(1)});
    for (int64_t n = 0; n < w.shape(0); ++n) ops::quant_row(q, n, out.mutable_data() + n * w.shape(1));
    return out;
  }, py::arg("w"), py::arg("bits"));
  t.def("matmul_rate", [](int64_t M, int64_t K, int64_t N, const std::string& dtype, int reps, const std::string& weights, bool plain) {
    // Attainable matmul rate: weights prepared once (as a model layer holds them), then `reps` timed calls.
    if (M < 1 || K < 1 || N < 1 || reps < 1) throw ValueError("matmul_rate: M, K, N and reps must be positive");
    const WeightQuant q = parse_weight_quant(weights);
    std::vector<float> w(static_cast<size_t>(N) * K), x(static_cast<size_t>(M) * K), y(static_cast<size_t>(M) * N);
    uint32_t s = 12345;  // any values in [-0.5, 0.5) do: a fixed LCG keeps runs comparable
    for (auto* buf : {&w, &x})
      for (auto& v : *buf) v = static_cast<float>((s = s * 1664525u + 1013904223u) >> 8) / 16777216.f - 0.5f;
    py::gil_scoped_release r;
    ops::Linear lin(w.data(), N, K, parse_dtype(dtype), plain, q);
    lin.forward(x.data(), M, y.data());
    double best = 1e30;
    for (int i = 0; i < reps; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      lin.forward(x.data(), M, y.data());
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return 2.0 * M * K * N / best;
  }, py::arg("M"), py::arg("K"), py::arg("N"), py::arg("dtype") = "bfloat16", py::arg("reps") = 5, py::arg("weights") = "native",
     py::arg("plain") = false,
     "FLOP/s of x [M, K] @ W^T [K, N] through the model's Linear (best of reps); weights native, int8 or int4; plain: "
     "the tied embedding's Linear (the LM head: bf16 in 64-row panels where N % 64 == 0 and K % 32 == 0, else "
     "row-major).");
  t.def("attention", [](FloatArray q, FloatArray k, FloatArray v, int64_t window, float scale, float softcap, bool bf16, int64_t past,
                        const std::string& decode_kernel, bool kv_int8) {
    // q [B, T, H, Hd] for positions past .. past + T - 1; k/v [B, past + T, KV, Hd]: the first `past` positions go
    // to a KV cache (bf16 for a bf16 model, else f32; a ring of `window` slots on a sliding layer, so it wraps once
    // past > window), the last T are the pass's own. past = 0: no cache (prefill; the oneDNN bf16 path where oneDNN
    // runs bf16 on AMX); a few new positions over a long past: the decode kernel. decode_kernel "vdpbf16ps": a bf16
    // model's decode step takes the vdpbf16ps kernels wherever the class has AVX512_BF16, even where the CPU's
    // choice is another (ops/cpu.h, attention_decode_vdpbf16ps); "auto": the CPU's choice. kv_int8: the cache holds
    // the past positions as an int8 KV cache does (blocks of 32 with a scale each; needs Hd % 32 == 0).
    if (decode_kernel != "auto" && decode_kernel != "vdpbf16ps")
      throw ValueError("attention: decode_kernel is 'auto' or 'vdpbf16ps', got '" + decode_kernel + "'");
    if (decode_kernel == "vdpbf16ps" && ops::cpu_class() < ops::CpuClass::Avx512Bf16)
      throw ValueError("attention: decode_kernel 'vdpbf16ps' needs the avx512_bf16 or amx class, this process runs " +
                       std::string(ops::cpu_class_name(ops::cpu_class())) + "; pass decode_kernel='auto'");
    if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4) throw ValueError("attention: q [B, T, H, Hd], k/v [B, past + T, KV, Hd]");
    if (past < 0) throw ValueError("attention: past >= 0");
    ops::AttentionArgs a;
    a.B = static_cast<int>(q.shape(0)); a.T = static_cast<int>(q.shape(1)); a.H = static_cast<int>(q.shape(2));
    a.Hd = static_cast<int>(q.shape(3)); a.KV = static_cast<int>(k.shape(2));
    if (k.shape(0) != a.B || k.shape(1) != past + a.T || k.shape(3) != a.Hd || a.H % a.KV != 0 ||
        v.shape(0) != k.shape(0) || v.shape(1) != k.shape(1) || v.shape(2) != k.shape(2) || v.shape(3) != k.shape(3))
      throw ValueError("attention: shape mismatch");
    const int B = a.B, T = a.T, KV = a.KV, Hd = a.Hd;
    const int64_t cap = window > 0 ? std::min(window, std::max<int64_t>(past, 1)) : std::max<int64_t>(past, 1);
    // The new positions' rows, and the cache [B, KV, cap, Hd] holding the last `cap` of the past ones.
    std::vector<float> kn(static_cast<size_t>(B) * T * KV * Hd), vn(kn.size());
    std::vector<float> kf(bf16 || kv_int8 ? 0 : static_cast<size_t>(B) * KV * cap * Hd), vf(kf.size());
    std::vector<uint16_t> kh(bf16 && !kv_int8 ? static_cast<size_t>(B) * KV * cap * Hd : 0), vh(kh.size());
    if (kv_int8 && Hd % ops::kKVBlock != 0) throw ValueError("attention: kv_int8 needs Hd % 32 == 0");
    // int8 rows: float storage for alignment (the scales), kv_int8_row_bytes(Hd) bytes a row
    std::vector<float> k8(kv_int8 ? static_cast<size_t>(B) * KV * cap * ops::kv_int8_row_bytes(Hd) / 4 : 0), v8(k8.size());
    a.cache.KV = KV, a.cache.Hd = Hd, a.cache.cap = cap, a.cache.dtype = bf16 ? DType::BF16 : DType::F32;
    a.cache.int8 = kv_int8;
    for (int b = 0; b < B; ++b)
      for (int64_t j = 0; j < past + T; ++j)
        for (int h = 0; h < KV; ++h) {
          const size_t src = ((static_cast<size_t>(b) * (past + T) + j) * KV + h) * Hd;
          if (j >= past) {
            const size_t dst = ((static_cast<size_t>(b) * T + (j - past)) * KV + h) * Hd;
            std::copy(k.data() + src, k.data() + src + Hd, kn.data() + dst);
            std::copy(v.data() + src, v.data() + src + Hd, vn.data() + dst);
            continue;
          }
          const int64_t off = a.cache.offset(b, h, j);
          if (kv_int8) {
            ops::kv_int8_quantize(k.data() + src, Hd, reinterpret_cast<int8_t*>(k8.data()) + off);
            ops::kv_int8_quantize(v.data() + src, Hd, reinterpret_cast<int8_t*>(v8.data()) + off);
            continue;
          }
          for (int d = 0; d < Hd; ++d) {
            if (bf16)
              kh[off + d] = f32_to_bf16(k.data()[src + d]), vh[off + d] = f32_to_bf16(v.data()[src + d]);
            else
              kf[off + d] = k.data()[src + d], vf[off + d] = v.data()[src + d];
          }
        }
    if (past > 0) {
      a.cache.k = kv_int8 ? static_cast<const void*>(k8.data()) : bf16 ? static_cast<const void*>(kh.data()) : kf.data();
      a.cache.v = kv_int8 ? static_cast<const void*>(v8.data()) : bf16 ? static_cast<const void*>(vh.data()) : vf.data();
    }
    py::array_t<float> z({q.shape(0), q.shape(1), q.shape(2), q.shape(3)});
    a.q = q.data(); a.k_new = kn.data(); a.v_new = vn.data(); a.past = past;
    a.window = window; a.scale = scale; a.softcap = softcap; a.z = z.mutable_data();
    if (bf16) a.compute = DType::BF16;
    if (decode_kernel == "vdpbf16ps") a.decode_kernel = ops::DecodeKernelChoice::Vdpbf16ps;
    py::gil_scoped_release r;
    ops::attention(a);
    return z;
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("window"), py::arg("scale"), py::arg("softcap"), py::arg("bf16") = false,
     py::arg("past") = 0, py::arg("decode_kernel") = "auto", py::arg("kv_int8") = false);
  t.def("attention_seconds", [](int T, int64_t past, int H, int KV, int Hd, int64_t window, const std::string& dtype, int reps,
                                bool kv_int8) {
    // Seconds of one attention call (median of reps, after a warm-up) as a layer of a model in `dtype` makes it:
    // T new positions after `past` cached ones (batch 1), a bf16 cache for a bf16 model, the cache a ring of
    // `window` slots on a sliding layer (window > 0) and past slots on a global one. Random q, k, v: the time does
    // not depend on the values. bench/longctx_bench.py times a layer's attention against the context length with it.
    if (T < 1 || past < 0 || H < 1 || KV < 1 || H % KV != 0 || Hd < 1 || window < 0 || reps < 1)
      throw ValueError("attention_seconds: T, H, KV, Hd, reps >= 1, H % KV == 0, past, window >= 0");
    const DType d = parse_dtype(dtype);
    if (kv_int8 && Hd % ops::kKVBlock != 0) throw ValueError("attention_seconds: kv_int8 needs Hd % 32 == 0");
    const int64_t cap = window > 0 ? std::min<int64_t>(window, std::max<int64_t>(past, 1)) : std::max<int64_t>(past, 1);
    const size_t row = kv_int8 ? static_cast<size_t>(ops::kv_int8_row_bytes(Hd)) : static_cast<size_t>(Hd) * (d == DType::F32 ? 4 : 2);
    std::vector<float> q(static_cast<size_t>(T) * H * Hd), k(static_cast<size_t>(T) * KV * Hd), v(k.size()), z(q.size());
    // The cache on huge pages, as the model's KV cache is (ops/pages.h).
    std::vector<uint8_t> kc, vc;
    ops::assign_huge(kc, static_cast<size_t>(KV) * cap * row, uint8_t{0});
    ops::assign_huge(vc, kc.size(), uint8_t{0});
    uint32_t s = 12345;  // values in [-1, 1): a fixed LCG
    auto next = [&s] { return static_cast<float>((s = s * 1664525u + 1013904223u) >> 8) / 8388608.f - 1.f; };
    for (auto* buf : {&q, &k, &v})
      for (auto& x : *buf) x = next();
    for (auto* buf : {&kc, &vc})
      if (kv_int8) {
        std::vector<float> x(Hd);
        for (size_t r = 0; r < buf->size() / row; ++r) {
          for (auto& e : x) e = next();
          ops::kv_int8_quantize(x.data(), Hd, reinterpret_cast<int8_t*>(buf->data() + r * row));
        }
      } else if (d == DType::F32)
        for (size_t i = 0; i < buf->size() / 4; ++i) reinterpret_cast<float*>(buf->data())[i] = next();
      else
        for (size_t i = 0; i < buf->size() / 2; ++i) reinterpret_cast<uint16_t*>(buf->data())[i] = f32_to_bf16(next());
    ops::AttentionArgs a;
    a.B = 1, a.T = T, a.H = H, a.KV = KV, a.Hd = Hd;
    a.q = q.data(), a.k_new = k.data(), a.v_new = v.data(), a.z = z.data();
    if (past > 0) {
      a.cache.k = kc.data(), a.cache.v = vc.data(), a.cache.dtype = d, a.cache.KV = KV, a.cache.Hd = Hd, a.cache.cap = cap;
      a.cache.int8 = kv_int8;
    }
    a.past = past, a.window = window, a.scale = 1.f / std::sqrt(static_cast<float>(Hd)), a.compute = d;
    py::gil_scoped_release r;
    ops::attention(a);
    std::vector<double> ts;
    for (int i = 0; i < reps; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      ops::attention(a);
      ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2];
  }, py::arg("T"), py::arg("past"), py::arg("H"), py::arg("KV"), py::arg("Hd"), py::arg("window") = 0,
     py::arg("dtype") = "bfloat16", py::arg("reps") = 5, py::arg("kv_int8") = false,
     "Median seconds of one attention call: T new positions after `past` cached (bf16 cache for bfloat16; kv_int8: an "
     "int8 cache), a sliding layer when window > 0.");
}

}  // namespace gemmalens
