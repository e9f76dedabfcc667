// The oneDNN boundary: everything that touches dnnl.hpp lives here.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <functional>
#include <limits>
#include <map>
#include <tuple>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <utility>
#include <vector>

#include "ops/gemv_bf16.h"
#include "ops/vmath.h"
#include "ops/linear.h"
#include "ops/quant.h"
#include "ops/pages.h"

namespace gemmalens::ops {

namespace {
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

dnnl::engine& engine() {
  // The CPU class is decided (and oneDNN capped to it) before oneDNN's first primitive.
  static dnnl::engine e = (cpu_state(), dnnl::engine(dnnl::engine::kind::cpu, 0));
  return e;
}

// A oneDNN failure as the project's typed error: out of memory is a ResourceError (MemoryError in Python), anything
// else an InternalError (a bug to report). `what` names the operation and its sizes.
[[noreturn]] void dnnl_failed(const dnnl::error& e, const std::string& what) {
  if (e.status == dnnl_out_of_memory) throw ResourceError(what + ": out of memory (" + e.what() + ")");
  throw InternalError(what + ": " + e.what());
}

std::string dims_str(int64_t N, int64_t K) { return "[" + std::to_string(N) + " x " + std::to_string(K) + "]"; }

// Weights are reordered for this M; other Ms reuse the layout (oneDNN's brgemm handles any M).
constexpr int64_t kLayoutM = 64;


// x [n] f32 as bf16 in this thread's buffer (one buffer shared by every layer: a buffer per layer cost ~80 MB at
// 512 tokens), converted in parallel when large.
const uint16_t* bf16_activations(const float* x, int64_t n) {
  thread_local std::vector<uint16_t> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  uint16_t* const b = buf.data();  // the parallel loop takes the pointer (thread_local is per thread)
  if (n > 65536) {
    const int64_t chunk = (n / omp_get_max_threads() + 15) / 16 * 16;
#pragma omp parallel for
    for (int64_t i0 = 0; i0 < n; i0 += chunk) f32_to_bf16_n(x + i0, b + i0, std::min(chunk, n - i0));
  } else {
    f32_to_bf16_n(x, b, n);
  }
  return b;
}

// Rows [r0, r0 + n) of a plain (row-major [N, K]) weight buffer from f32 rows, in the buffer's dtype.
void store_plain_rows(const dnnl::memory& m, dt wdt, const float* src, int64_t r0, int64_t n, int64_t K) {
  if (wdt == dt::f32) {
    std::copy(src, src + n * K, static_cast<float*>(m.get_data_handle()) + r0 * K);
  } else {
    uint16_t* dst = static_cast<uint16_t*>(m.get_data_handle()) + r0 * K;
#pragma omp parallel for if (n * K > (1 << 20))
    for (int64_t i = 0; i < n * K; ++i) dst[i] = f32_to_bf16(src[i]);
  }
}

}  // namespace

struct Linear::Impl {
  // Every Impl is made here: its stream is a oneDNN object, whose failure is typed like the others.
  static std::shared_ptr<Impl> make() {
    try {
      return std::make_shared<Impl>();
    } catch (const dnnl::error& e) {
      dnnl_failed(e, "oneDNN could not create a stream");
    }
  }
  dt wdt;
  dnnl::memory::desc w_desc;  // blocked layout chosen by oneDNN
  dnnl::memory weights;       // over wbuf
  struct Free {
    void operator()(void* p) const { weight_free(p); }
  };
  std::unique_ptr<void, Free> wbuf;
  // The weights' storage, ours rather than oneDNN's so that it sits on 2 MB pages, in the weight arena or a buffer of
  // its own (ops/pages.h, weight_alloc); oneDNN's padding of a blocked layout (if any) zeroed.
  dnnl::memory alloc_weights(const dnnl::memory::desc& d, const dnnl::engine& eng) {
    const size_t n = std::max<size_t>(d.get_size(), 64);
    void* p = weight_alloc(n);
    wbuf.reset(p);
    size_t dense = dnnl::memory::data_type_size(d.get_data_type());
    for (auto x : d.get_dims()) dense *= static_cast<size_t>(x);
    if (dense != d.get_size()) std::memset(p, 0, n);
    return dnnl::memory(d, eng, p);
  }
  std::map<std::pair<int64_t, int64_t>, dnnl::matmul> prims;  // (M, ldy) -> primitive
  // The f32 matmuls of the widened path: (M, ldy, columns of the block) -> primitive and its operands' layouts.
  struct BlockMatmul {
    dnnl::matmul prim;
    dnnl::memory::desc a, b, c;
  };
  std::map<std::tuple<int64_t, int64_t, int64_t>, BlockMatmul> block_prims;
  dnnl::stream stream{engine()};
  bool plain = false;      // the caller reads rows (row(), to_rowmajor): the tied embedding
  bool quantized = false;
  bool blocked64 = false;  // bf16 weights in "BA16a64b2a": small M runs gemv_bf16_blocked64
  bool rows = false;       // weights row-major [N, K] (plain layers; bf16 layers of the widened path the layout cannot take)
  // bf16 weights computed in f32 (Bf16MatmulPath::WidenedF32): prefill-sized matmuls widen a block of columns at a
  // time for oneDNN's f32 matmul; oneDNN never sees them as bf16 (its bf16 matmul is missing or slow in the class).
  bool widened = false;
  // f32 weights as 64-column panels [K][64] (f32_own_panels(): the AVX2 classes): every M runs gemm_panels32, whose
  // rows do not depend on the rows beside them; oneDNN never sees them.
  bool panels32 = false;
  QuantWeights qw;

  // y[:, n0 + ...] = x W_block^T for blocks of `block` output columns: fill(n0, nn, buf) writes the block's weights
  // as f32, [K][nn] row-major (b_kn) or [nn][K] row-major; oneDNN's f32 matmul takes it from there. The f32 copy is
  // one block (a few MB), never the layer.
  void forward_f32_blocks(const float* x, int64_t M, int64_t N, int64_t K, float* y, int64_t ldy, int64_t block, bool b_kn,
                          const std::function<void(int64_t n0, int64_t nn, float* out)>& fill);
};

namespace {
// A plain (tied) bf16 layer of these dimensions is stored in the small-M kernels' blocked layout, not row-major: a
// decode step reads the LM head as 64-row panels, each one contiguous stream, at the speed of a sequential read,
// where row-major rows read side by side ran 20-25% slower (Linear::row gathers a row back from the panels).
bool tied_blocked64(dt wdt, int64_t N, int64_t K) { return wdt == dt::bf16 && N % 64 == 0 && K % 32 == 0; }
// f32 weights where our own panels run every M (the plain ones too: Linear::row gathers a row back).
bool use_panels32(dt wdt, int64_t K) { return wdt == dt::f32 && f32_own_panels() && K % 2 == 0; }
// The size of N x K f32 weights in that layout, N rounded up to whole panels (ours; oneDNN only counts the bytes).
dnnl::memory::desc panels32_desc(int64_t N, int64_t K) { return dnnl::memory::desc({K, (N + 63) / 64 * 64}, dt::f32, tag::ab); }

// The small-M kernels' layout of a bf16 [K, N] weight ("BA16a64b2a"), and whether oneDNN's matmul takes it (for the
// calls of many rows it runs).
dnnl::memory::desc blocked64_desc(int64_t N, int64_t K) { return dnnl::memory::desc({K, N}, dt::bf16, tag::BA16a64b2a); }
bool onednn_takes_blocked64(int64_t N, int64_t K) {
  try {
    dnnl::matmul::primitive_desc pd(engine(), dnnl::memory::desc({kLayoutM, K}, dt::bf16, tag::ab), blocked64_desc(N, K),
                                    dnnl::memory::desc({kLayoutM, N}, dt::f32, tag::ab));
    return true;
  } catch (const dnnl::error&) {
    return false;
  }
}

void check_dims(int64_t N, int64_t K) {  // a zero dimension reaches a division inside oneDNN's reorder (SIGFPE)
  if (N < 1 || K < 1) throw ValueError("a linear layer needs both dimensions >= 1, got " + dims_str(N, K));
}
}  // namespace

Linear::Linear(const float* w, int64_t N, int64_t K, DType dtype, bool plain, WeightQuant quant) : N_(N), K_(K) {
  check_dims(N, K);
  if (quant != WeightQuant::None && quant_supported(K)) {
    auto impl = Impl::make();
    impl->quantized = true;
    impl->plain = plain;
    impl->rows = true;
    impl->qw = quant_weights(w, N, K, quant_bits(quant));
    impl_ = std::move(impl);
    return;
  }
  auto impl = Impl::make();
  try {
    impl->wdt = dtype == DType::F32 ? dt::f32 : dt::bf16;
    impl->plain = plain;
    auto& eng = engine();
    if (use_panels32(impl->wdt, K)) {
      impl->panels32 = true;
      impl->w_desc = panels32_desc(N, K);
      impl->weights = impl->alloc_weights(impl->w_desc, eng);
      pack_panels_f32(w, N, K, static_cast<float*>(impl->weights.get_data_handle()));
      impl_ = std::move(impl);
      return;
    }
    if (impl->wdt == dt::bf16 && bf16_matmul_path() == Bf16MatmulPath::WidenedF32) {
      // No bf16 matmul of oneDNN's is asked for: the layout is ours, packed here (plain ones too: tied_blocked64).
      impl->widened = true;
      if (N % 64 == 0 && K % 32 == 0) {
        impl->blocked64 = true;
        impl->w_desc = blocked64_desc(N, K);
        impl->weights = impl->alloc_weights(impl->w_desc, eng);
        pack_blocked64(w, N, K, static_cast<uint16_t*>(impl->weights.get_data_handle()));
      } else {
        impl->rows = true;
        impl->w_desc = dnnl::memory::desc({K, N}, dt::bf16, tag::ba);
        impl->weights = impl->alloc_weights(impl->w_desc, eng);
        store_plain_rows(impl->weights, impl->wdt, w, 0, N, K);
      }
      impl_ = std::move(impl);
      return;
    }
    if (plain && !tied_blocked64(impl->wdt, N, K)) {
      impl->rows = true;
      impl->w_desc = dnnl::memory::desc({K, N}, impl->wdt, tag::ba);
    } else {
      dnnl::memory::desc src_md({kLayoutM, K}, impl->wdt, tag::ab);
      dnnl::memory::desc w_any({K, N}, impl->wdt, tag::any);
      dnnl::memory::desc dst_md({kLayoutM, N}, dt::f32, tag::ab);
      dnnl::matmul::primitive_desc pd(eng, src_md, w_any, dst_md);
      impl->w_desc = pd.weights_desc();
      if (impl->wdt == dt::bf16 && N % 64 == 0 && K % 32 == 0) {
        // The layout our small-M kernel reads. It is oneDNN's own choice for bf16 brgemm on AVX-512/AMX; where
        // oneDNN picked another, ask for this one (and keep oneDNN's choice if it cannot take it).
        const dnnl::memory::desc b64 = blocked64_desc(N, K);
        if (impl->w_desc == b64 || onednn_takes_blocked64(N, K)) {
          impl->w_desc = b64;
          impl->blocked64 = true;
        }
      }
      if (plain && !impl->blocked64) {  // row() needs one of the two layouts it reads
        impl->rows = true;
        impl->w_desc = dnnl::memory::desc({K, N}, impl->wdt, tag::ba);
      }
    }
    impl->weights = impl->alloc_weights(impl->w_desc, eng);
    if (impl->rows) {  // no reorder: write the stored dtype straight into the buffer (no temporary copy)
      store_plain_rows(impl->weights, impl->wdt, w, 0, N, K);
      impl_ = std::move(impl);
      return;
    }
    if (impl->blocked64) {  // our own layout: packed straight from the f32 rows on every thread (no temporary, no reorder)
      pack_blocked64(w, N, K, static_cast<uint16_t*>(impl->weights.get_data_handle()));
      impl_ = std::move(impl);
      return;
    }
    // The stored [N, K] row-major matrix is W^T [K, N] in format "ba".
    std::unique_ptr<uint16_t[]> wbf16;  // not zero-filled: every element is written below
    void* src_ptr = const_cast<float*>(w);
    if (dtype == DType::BF16) {
      const int64_t n = N * K;
      wbf16.reset(new uint16_t[static_cast<size_t>(n)]);
      uint16_t* const b = wbf16.get();
#pragma omp parallel for schedule(static) if (n > (1 << 20))
      for (int64_t i0 = 0; i0 < n; i0 += 65536) f32_to_bf16_n(w + i0, b + i0, std::min<int64_t>(65536, n - i0));
      src_ptr = b;
    }
    dnnl::memory user(dnnl::memory::desc({K, N}, impl->wdt, tag::ba), eng, src_ptr);
    dnnl::reorder(user, impl->weights).execute(impl->stream, user, impl->weights);
    impl->stream.wait();
    impl_ = std::move(impl);
  } catch (const dnnl::error& e) {
    dnnl_failed(e, "oneDNN could not set up a matmul " + dims_str(N, K));
  }
}

namespace {
const char* isa_name(dnnl::cpu_isa isa) {
  switch (isa) {
    case dnnl::cpu_isa::sse41: return "sse41";
    case dnnl::cpu_isa::avx: return "avx";
    case dnnl::cpu_isa::avx2: return "avx2";
    case dnnl::cpu_isa::avx2_vnni: return "avx2_vnni";
    case dnnl::cpu_isa::avx2_vnni_2: return "avx2_vnni_2";
    case dnnl::cpu_isa::avx512_core: return "avx512_core";
    case dnnl::cpu_isa::avx512_core_vnni: return "avx512_core_vnni";
    case dnnl::cpu_isa::avx512_core_bf16: return "avx512_core_bf16";
    case dnnl::cpu_isa::avx512_core_fp16: return "avx512_core_fp16";
    case dnnl::cpu_isa::avx512_core_amx: return "avx512_core_amx";
    case dnnl::cpu_isa::avx512_core_amx_fp16: return "avx512_core_amx_fp16";
    default: return "other";
  }
}
}  // namespace

void onednn_limit_isa(CpuClass c) {
  // oneDNN's ISA for each class: its f32 brgemm / gemm and, from avx512_bf16 on, its bf16 brgemm.
  const dnnl::cpu_isa isa = c == CpuClass::Avx2       ? dnnl::cpu_isa::avx2
                            : c == CpuClass::Avx2Vnni   ? dnnl::cpu_isa::avx2_vnni
                            : c == CpuClass::Avx512     ? dnnl::cpu_isa::avx512_core_vnni
                            : c == CpuClass::Avx512Bf16 ? dnnl::cpu_isa::avx512_core_bf16
                                                        : dnnl::cpu_isa::isa_default;
  // Refused only once oneDNN has read its setting (a primitive made before the class was decided: a bug here).
  if (dnnl::set_max_cpu_isa(isa) != dnnl::status::success)
    throw InternalError("oneDNN's ISA could not be capped (it was already in use); GEMMALENS_MAX_ISA needs it unset");
}

CpuClass onednn_class() {
  const unsigned eff = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  auto has = [eff](dnnl::cpu_isa isa) { return (eff & static_cast<unsigned>(isa)) == static_cast<unsigned>(isa); };
  if (has(dnnl::cpu_isa::avx512_core_amx)) return CpuClass::Amx;
  if (has(dnnl::cpu_isa::avx512_core_bf16)) return CpuClass::Avx512Bf16;
  if (has(dnnl::cpu_isa::avx512_core_vnni)) return CpuClass::Avx512;
  if (has(dnnl::cpu_isa::avx2_vnni)) return CpuClass::Avx2Vnni;
  return CpuClass::Avx2;
}

std::string onednn_isa() { return isa_name(dnnl::get_effective_cpu_isa()); }

std::string onednn_matmul_impl(int64_t M, int64_t K, int64_t N, DType dtype) {
  const dt d = dtype == DType::F32 ? dt::f32 : dt::bf16;
  try {
    dnnl::matmul::primitive_desc pd(engine(), dnnl::memory::desc({M, K}, d, tag::ab), dnnl::memory::desc({K, N}, d, tag::any),
                                    dnnl::memory::desc({M, N}, dt::f32, tag::ab));
    return pd.impl_info_str();
  } catch (const dnnl::error& e) {
    return std::string("none: ") + e.what();
  }
}

Linear Linear::plain_from_rows(int64_t N, int64_t K, DType dtype, WeightQuant quant,
                               const std::function<void(int64_t r0, int64_t n, float* out)>& fill) {
  check_dims(N, K);
  constexpr int64_t kBlockBytes = 16 << 20;  // f32 rows converted per block
  // (a multiple of 64 rows, so that a block fills whole panels of the blocked layout)
  const int64_t block = (std::max<int64_t>(1, kBlockBytes / (4 * std::max<int64_t>(K, 1))) + 63) / 64 * 64;
  std::vector<float> buf(static_cast<size_t>(std::min(block, N) * K));
  Linear L;
  L.N_ = N;
  L.K_ = K;
  auto impl = Impl::make();
  impl->plain = true;
  if (quant != WeightQuant::None && quant_supported(K)) {
    impl->quantized = true;
    impl->rows = true;
    impl->qw = quant_alloc(N, K, quant_bits(quant));
    for (int64_t r0 = 0; r0 < N; r0 += block) {
      const int64_t n = std::min(block, N - r0);
      fill(r0, n, buf.data());
      quant_rows(impl->qw, buf.data(), r0, n);
    }
    L.impl_ = std::move(impl);
    return L;
  }
  try {
    impl->wdt = dtype == DType::F32 ? dt::f32 : dt::bf16;
    impl->widened = impl->wdt == dt::bf16 && bf16_matmul_path() == Bf16MatmulPath::WidenedF32;
    // (oneDNN must take the layout for its matmuls of many rows, unless the widened path runs them)
    impl->blocked64 = tied_blocked64(impl->wdt, N, K) && (impl->widened || onednn_takes_blocked64(N, K));
    impl->panels32 = use_panels32(impl->wdt, K);
    impl->rows = !impl->blocked64 && !impl->panels32;
    impl->w_desc = impl->blocked64   ? blocked64_desc(N, K)
                   : impl->panels32 ? panels32_desc(N, K)
                                    : dnnl::memory::desc({K, N}, impl->wdt, tag::ba);
    impl->weights = impl->alloc_weights(impl->w_desc, engine());
  } catch (const dnnl::error& e) {
    dnnl_failed(e, "oneDNN could not allocate a " + dims_str(N, K) + " weight");
  }
  for (int64_t r0 = 0; r0 < N; r0 += block) {
    const int64_t n = std::min(block, N - r0);
    fill(r0, n, buf.data());
    if (impl->blocked64)  // r0 is a multiple of 64: the block fills panels r0 / 64 onwards
      pack_blocked64(buf.data(), n, K, static_cast<uint16_t*>(impl->weights.get_data_handle()) + r0 * K);
    else if (impl->panels32)  // the same for the f32 panels (the last block's last panel padded with zeros)
      pack_panels_f32(buf.data(), n, K, static_cast<float*>(impl->weights.get_data_handle()) + r0 * K);
    else
      store_plain_rows(impl->weights, impl->wdt, buf.data(), r0, n, K);
  }
  L.impl_ = std::move(impl);
  return L;
}

namespace {
// Columns per block of the widened-f32 path: about 4 MB of f32 weights, a multiple of 64 columns (from 2 to 8 MB
// the rate moved within the noise of a shared machine).
int64_t widen_block_cols(int64_t N, int64_t K) {
  constexpr int64_t kBytes = int64_t{4} << 20;
  return std::min(std::max<int64_t>(64, kBytes / (4 * K) / 64 * 64), N);
}

// x rounded to bf16 precision as f32, in this thread's buffer: with weights that are bf16 values the f32 matmul
// then multiplies exactly what a bf16 matmul multiplies (the products are exact in f32), summed in f32.
const float* bf16_rounded_activations(const float* x, int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  float* const b = buf.data();
  const int64_t chunk = std::max<int64_t>(4096, (n / omp_get_max_threads() + 15) / 16 * 16);
#pragma omp parallel for if (n > 65536)
  for (int64_t i0 = 0; i0 < n; i0 += chunk) round_bf16_n(x + i0, b + i0, std::min(chunk, n - i0));
  return b;
}
}  // namespace

void Linear::Impl::forward_f32_blocks(const float* x, int64_t M, int64_t N, int64_t K, float* y, int64_t ldy, int64_t block,
                                      bool b_kn, const std::function<void(int64_t n0, int64_t nn, float* out)>& fill) {
  thread_local std::vector<float> wbuf;  // this thread's block of widened weights, reused by every layer
  if (wbuf.size() < static_cast<size_t>(std::min(block, N) * K)) wbuf.resize(static_cast<size_t>(std::min(block, N) * K));
  auto& eng = engine();
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t nn = std::min(block, N - n0);
    fill(n0, nn, wbuf.data());
    try {
      auto key = std::make_tuple(M, ldy, nn);
      auto it = block_prims.find(key);
      if (it == block_prims.end()) {
        dnnl::memory::desc a_md({M, K}, dt::f32, tag::ab);
        dnnl::memory::desc b_md({K, nn}, dt::f32, b_kn ? dnnl::memory::dims{nn, 1} : dnnl::memory::dims{1, K});
        dnnl::memory::desc c_md({M, nn}, dt::f32, dnnl::memory::dims{ldy, 1});
        dnnl::matmul prim(dnnl::matmul::primitive_desc(eng, a_md, b_md, c_md));
        it = block_prims.emplace(key, BlockMatmul{prim, a_md, b_md, c_md}).first;
      }
      const BlockMatmul& bm = it->second;
      dnnl::memory a(bm.a, eng, const_cast<float*>(x)), b(bm.b, eng, wbuf.data()), c(bm.c, eng, y + n0);
      bm.prim.execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
      stream.wait();
    } catch (const dnnl::error& e) {
      dnnl_failed(e, "oneDNN f32 matmul failed (M=" + std::to_string(M) + ", K=" + std::to_string(K) + ", N=" + std::to_string(nn) + ")");
    }
  }
}

// Prefill-sized matmuls on quantised weights where the CPU has AMX (quant_dequant_min_m()): the weights dequantised
// to bf16 a block at a time for oneDNN's matmul on AMX tiles, with bf16 activations.
void Linear::forward_dequantized(const float* x, int64_t M, float* y, int64_t ldy) {
  const QuantWeights& qw = impl_->qw;
  const int64_t K = K_;
  // In chunks of output rows, so the bf16 copy stays small (a chunk, not the layer).
  constexpr int64_t kChunk = 4096;
  thread_local std::vector<uint16_t> wbuf;  // this thread's; the parallel loop gets the plain pointer
  wbuf.resize(static_cast<size_t>(std::min(N_, kChunk)) * K_);
  uint16_t* const wb = wbuf.data();
  const uint16_t* xb = bf16_activations(x, M * K_);
  for (int64_t n0 = 0; n0 < N_; n0 += kChunk) {
    const int64_t nn = std::min(kChunk, N_ - n0);
#pragma omp parallel
    {
      std::vector<float> row(static_cast<size_t>(K));
#pragma omp for schedule(static)
      for (int64_t n = 0; n < nn; ++n) {
        quant_row(qw, n0 + n, row.data());
        f32_to_bf16_n(row.data(), wb + n * K, K);
      }
    }
    matmul_bf16(xb, M, K, wb, nn, /*b_nk=*/true, y + n0, ldy);
  }
}

void Linear::forward(const float* x, int64_t M, float* y, int64_t ldy) {
  if (!impl_) throw InternalError("Linear::forward on an empty layer");
  if (M < 0) throw InternalError("Linear::forward with M = " + std::to_string(M));
  // No rows (an empty batch, an SAE fed no activations): nothing to write, on every path (the own kernels' shape
  // checks, which refuse M = 0, and oneDNN's zero-sized matmul alike).
  if (M == 0) return;
  if (ldy == 0) ldy = N_;
  if (impl_->quantized) {
    if (M >= quant_dequant_min_m()) {
      forward_dequantized(x, M, y, ldy);
      return;
    }
    quant_matmul(impl_->qw, x, M, y, ldy);
    return;
  }
  if (impl_->panels32) {
    gemm_panels32(static_cast<const float*>(impl_->weights.get_data_handle()), N_, K_, x, M, y, ldy);
    return;
  }
  auto& eng = engine();
  Impl& im = *impl_;
  const uint16_t* w16 = im.wdt == dt::bf16 ? static_cast<const uint16_t*>(im.weights.get_data_handle()) : nullptr;
  const bool own_blocked = im.blocked64 && M <= bf16_own_max_m(), own_rows = im.rows && w16 && M <= kGemvMaxM;
  if (w16 && !im.widened && (own_blocked || (own_rows && K_ % 32 == 0))) {  // vdpbf16ps
    const uint16_t* xb = bf16_activations(x, M * K_);
    if (im.blocked64)
      gemv_bf16_blocked64(w16, N_, K_, xb, M, y, ldy);
    else
      gemv_bf16_rows(w16, N_, K_, xb, M, y, ldy);
    return;
  }
  if (w16 && im.blocked64 && !own_blocked && bf16_large_m_widened()) {  // AVX512_BF16 on Intel: f32 FMAs, not oneDNN
    gemm_widen_blocked64(w16, N_, K_, bf16_rounded_activations(x, M * K_), M, y, ldy);
    return;
  }
  if (im.widened) {  // bf16 weights, f32 compute
    const float* xr = bf16_rounded_activations(x, M * K_);
    if (own_blocked) {
      gemm_widen_blocked64(w16, N_, K_, xr, M, y, ldy);
      return;
    }
    if (own_rows) {
      gemv_widen_rows(w16, N_, K_, xr, M, y, ldy);
      return;
    }
    // a block of columns widened at a time for oneDNN's f32 matmul
    const uint16_t* w = w16;
    const int64_t K = K_;
    if (im.blocked64)
      im.forward_f32_blocks(xr, M, N_, K, y, ldy, widen_block_cols(N_, K), /*b_kn=*/true,
                            [w, K](int64_t n0, int64_t nn, float* out) { widen_blocked64_cols(w, K, n0, nn, out); });
    else
      im.forward_f32_blocks(xr, M, N_, K, y, ldy, widen_block_cols(N_, K), /*b_kn=*/false,
                            [w, K](int64_t n0, int64_t nn, float* out) { widen_rows(w, K, n0, nn, out); });
    return;
  }
  try {
    dnnl::memory::desc src_md({M, K_}, im.wdt, tag::ab);
    dnnl::memory::desc dst_md({M, N_}, dt::f32, dnnl::memory::dims{ldy, 1});
    auto key = std::make_pair(M, ldy);
    auto it = im.prims.find(key);
    if (it == im.prims.end()) {
      dnnl::matmul::primitive_desc pd(eng, src_md, im.w_desc, dst_md);
      it = im.prims.emplace(key, dnnl::matmul(pd)).first;
    }
    void* src_ptr = const_cast<float*>(x);
    if (im.wdt == dt::bf16) src_ptr = const_cast<uint16_t*>(bf16_activations(x, M * K_));
    dnnl::memory src(src_md, eng, src_ptr);
    dnnl::memory dst(dst_md, eng, y);
    it->second.execute(im.stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, im.weights}, {DNNL_ARG_DST, dst}});
    im.stream.wait();
  } catch (const dnnl::error& e) {
    dnnl_failed(e, "oneDNN matmul failed (M=" + std::to_string(M) + ", K=" + std::to_string(K_) + ", N=" + std::to_string(N_) + ")");
  }
}

const void* Linear::plain_data() const {
  if (!impl_ || !impl_->rows || impl_->quantized)
    throw InternalError("Linear::plain_data on a blocked or quantised layer");
  return impl_->weights.get_data_handle();
}

bool Linear::is_quantized() const { return impl_ && impl_->quantized; }

void Linear::row(int64_t n, float* out) const {
  if (!impl_) throw InternalError("Linear::row on an empty layer");
  if (impl_->quantized) {
    quant_row(impl_->qw, n, out);
    return;
  }
  if (impl_->blocked64 && impl_->plain) {  // panel n / 64, pair kp of row n at kp * 128 + (n % 64) * 2
    const uint16_t* p = static_cast<const uint16_t*>(impl_->weights.get_data_handle()) + (n / 64) * 64 * K_ + (n % 64) * 2;
    for (int64_t kp = 0; kp < K_ / 2; ++kp) {
      out[2 * kp] = bf16_to_f32(p[kp * 128]);
      out[2 * kp + 1] = bf16_to_f32(p[kp * 128 + 1]);
    }
    return;
  }
  if (impl_->panels32) {  // panel n / 64, element k of row n at k * 64 + n % 64
    const float* p = static_cast<const float*>(impl_->weights.get_data_handle()) + (n / 64) * 64 * K_ + n % 64;
    for (int64_t k = 0; k < K_; ++k) out[k] = p[k * 64];
    return;
  }
  if (!impl_->rows) throw InternalError("Linear::row on a blocked layer");
  if (impl_->wdt == dt::f32) {
    const float* p = static_cast<const float*>(impl_->weights.get_data_handle()) + n * K_;
    std::copy(p, p + K_, out);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(impl_->weights.get_data_handle()) + n * K_;
    for (int64_t k = 0; k < K_; ++k) out[k] = bf16_to_f32(p[k]);
  }
}

void Linear::to_rowmajor(float* out) const {
  if (!impl_) throw InternalError("Linear::to_rowmajor on an empty layer");
  if (impl_->quantized) {
    for (int64_t n = 0; n < N_; ++n) quant_row(impl_->qw, n, out + n * K_);
    return;
  }
  if (impl_->blocked64) {  // our own layout ([K/2][64][2] per panel of 64 rows): no oneDNN reorder needed
    const uint16_t* w = static_cast<const uint16_t*>(impl_->weights.get_data_handle());
    const int64_t K = K_;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N_; ++n)
      for (int64_t k = 0; k < K; ++k) out[n * K + k] = bf16_to_f32(w[(n / 64) * 64 * K + (k / 2) * 128 + (n % 64) * 2 + k % 2]);
    return;
  }
  if (impl_->rows || impl_->panels32) {
#pragma omp parallel for schedule(static) if (impl_->panels32)
    for (int64_t n = 0; n < N_; ++n) row(n, out + n * K_);
    return;
  }
  try {
    auto& eng = engine();
    dnnl::memory user(dnnl::memory::desc({K_, N_}, dt::f32, tag::ba), eng, out);
    dnnl::stream st(eng);
    dnnl::reorder(impl_->weights, user).execute(st, impl_->weights, user);
    st.wait();
  } catch (const dnnl::error& e) {
    dnnl_failed(e, "oneDNN could not reorder weights back");
  }
}

size_t Linear::nbytes() const { return impl_ ? (impl_->quantized ? impl_->qw.nbytes() : impl_->w_desc.get_size()) : 0; }

void matmul_bf16(const uint16_t* A, int64_t M, int64_t K, const uint16_t* B, int64_t N, bool b_nk, float* C, int64_t ldc) {
  try {
    auto& eng = engine();
    dnnl::memory::desc a_md({M, K}, dt::bf16, tag::ab), b_md({K, N}, dt::bf16, b_nk ? tag::ba : tag::ab),
        c_md({M, N}, dt::f32, dnnl::memory::dims{ldc, 1});
    dnnl::matmul::primitive_desc pd(eng, a_md, b_md, c_md);  // primitives come from oneDNN's cache after the first
    dnnl::matmul prim(pd);
    dnnl::stream st(eng);
    dnnl::memory a(a_md, eng, const_cast<uint16_t*>(A)), b(b_md, eng, const_cast<uint16_t*>(B)), c(c_md, eng, C);
    prim.execute(st, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
    st.wait();
  } catch (const dnnl::error& e) {
    dnnl_failed(e, "oneDNN bf16 matmul failed (M=" + std::to_string(M) + ", K=" + std::to_string(K) + ", N=" + std::to_string(N) + ")");
  }
}

void matmul_f32(const float* A, int64_t M, int64_t K, int64_t lda, const float* B, int64_t N, float* C, int64_t ldc, bool accumulate) {
  matmul_f32_strided(A, M, K, lda, 1, B, N, N, 1, C, ldc, accumulate);
}

void matmul_f32_strided(const float* A, int64_t M, int64_t K, int64_t sa_m, int64_t sa_k, const float* B, int64_t N, int64_t sb_k,
                        int64_t sb_n, float* C, int64_t ldc, bool accumulate) {
  try {
    auto& eng = engine();
    dnnl::memory::desc a_md({M, K}, dt::f32, dnnl::memory::dims{sa_m, sa_k}), b_md({K, N}, dt::f32, dnnl::memory::dims{sb_k, sb_n}),
        c_md({M, N}, dt::f32, dnnl::memory::dims{ldc, 1});
    dnnl::primitive_attr attr;
    if (accumulate) {
      dnnl::post_ops po;
      po.append_sum(1.f);
      attr.set_post_ops(po);
    }
    dnnl::matmul::primitive_desc pd(eng, a_md, b_md, c_md, attr);
    dnnl::matmul prim(pd);
    dnnl::stream st(eng);
    dnnl::memory a(a_md, eng, const_cast<float*>(A)), b(b_md, eng, const_cast<float*>(B)), c(c_md, eng, C);
    prim.execute(st, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
    st.wait();
  } catch (const dnnl::error& e) {
    dnnl_failed(e, "oneDNN f32 matmul failed (M=" + std::to_string(M) + ", K=" + std::to_string(K) + ", N=" + std::to_string(N) + ")");
  }
}

namespace {
// The widened weights of backward_input, reused across its calls (no page faults per layer) until the reverse pass
// gives them back (release_backward_scratch): one layer's f32 weights, up to ~1 GB for the largest Gemma 3.
std::vector<float>& backward_scratch() {
  thread_local std::vector<float> w;
  return w;
}
}  // namespace

void release_backward_scratch() { std::vector<float>().swap(backward_scratch()); }

void Linear::backward_input(const float* dy, int64_t M, float* dx, bool accumulate) const {
  if (!impl_) throw InternalError("Linear::backward_input on an empty layer");
  std::vector<float>& w = backward_scratch();
  if (!impl_->rows && !impl_->quantized && !impl_->plain) {  // a layer in a blocked layout: back to row-major for the call
    if (w.size() < static_cast<size_t>(N_) * K_) w.resize(static_cast<size_t>(N_) * K_);
    to_rowmajor(w.data());
    matmul_f32(dy, M, N_, N_, w.data(), K_, dx, K_, accumulate);
    return;
  }
  if (impl_->rows && !impl_->quantized && impl_->wdt == dt::f32) {  // row-major f32 already: no copy
    matmul_f32(dy, M, N_, N_, static_cast<const float*>(impl_->weights.get_data_handle()), K_, dx, K_, accumulate);
    return;
  }
  // The embedding / LM head (up to 262144 rows; row-major or blocked bf16) or quantised: blocks of rows widened to f32.
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 22) / K_);
  if (w.size() < static_cast<size_t>(std::min(rows, N_)) * K_) w.resize(static_cast<size_t>(std::min(rows, N_)) * K_);
  float* const wp = w.data();  // the parallel loop below takes the pointer (thread_local is per thread)
  for (int64_t n0 = 0; n0 < N_; n0 += rows) {
    const int64_t nr = std::min(rows, N_ - n0);
#pragma omp parallel for if (nr > 64)
    for (int64_t n = 0; n < nr; ++n) row(n0 + n, wp + n * K_);
    matmul_f32(dy + n0, M, nr, N_, wp, K_, dx, K_, accumulate || n0 > 0);
  }
}

const char* dnnl_version() {
  static std::string v = [] {
    const dnnl_version_t* ver = ::dnnl_version();
    return std::to_string(ver->major) + "." + std::to_string(ver->minor) + "." + std::to_string(ver->patch);
  }();
  return v.c_str();
}

void set_num_threads(int n) { omp_set_num_threads(n); }
int get_max_threads() { return omp_get_max_threads(); }

}  // namespace gemmalens::ops
