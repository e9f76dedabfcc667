// Linear layer y = x W^T on oneDNN matmul. The only oneDNN user in the project is linear_dnnl.cpp.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common.h"
#include "ops/cpu.h"

namespace gemmalens::ops {

class Linear {
 public:
  Linear() = default;
  // w [N, K] row-major f32 (HF layout: out_features x in_features). Stored in `dtype`, reordered once
  // into oneDNN's preferred blocked layout, or into gemmalens's 64-column panels where its own kernels run every
  // call (bf16 without bf16 hardware, f32 on the AVX2 classes: ops/gemv_bf16.h).
  // plain = true keeps w row-major [N, K] (no reorder), so plain_data() can serve other uses
  // (the tied embedding table is both the lookup table and the LM head).
  // quant = Int8 / Int4 keeps the weights as quantised blocks (ops/quant.h) when the CPU and K allow it, else as
  // `dtype`.
  Linear(const float* w, int64_t N, int64_t K, DType dtype, bool plain = false, WeightQuant quant = WeightQuant::None);
  // A plain layer filled a block of rows at a time: fill(r0, n, out) writes rows [r0, r0 + n) as f32 into out.
  // Peak memory is the stored weights plus one block, not a whole f32 copy.
  static Linear plain_from_rows(int64_t N, int64_t K, DType dtype, WeightQuant quant,
                                const std::function<void(int64_t r0, int64_t n, float* out)>& fill);
  // x [M, K] f32 -> y [M, N] f32 with row stride ldy (0 = N; M = 0 writes nothing). With bf16 weights x is rounded
  // to bf16 first (bf16 x bf16 products, f32 accumulation). Not thread-safe: one caller at a time.
  void forward(const float* x, int64_t M, float* y, int64_t ldy = 0);
  int64_t out_features() const { return N_; }
  int64_t in_features() const { return K_; }
  size_t nbytes() const;  // bytes of the stored weights
  bool empty() const { return !impl_; }
  // Row-major [N, K] weights in the stored dtype (f32 or bf16 bits); only for plain layers.
  const void* plain_data() const;
  // Row n of the weights as f32 (plain or quantised layers): the embedding lookup.
  void row(int64_t n, float* out) const;
  bool is_quantized() const;  // int8 or int4 blocks
  // The reverse pass: dx [M, K] = dy [M, N] W (+= with accumulate), through the weights as stored (dequantised /
  // widened to f32 a block of rows at a time; no lasting second copy).
  void backward_input(const float* dy, int64_t M, float* dx, bool accumulate = false) const;
  // The weights back as row-major f32 [N, K] (reordered out of the blocked layout): out holds N * K floats.
  void to_rowmajor(float* out) const;

 private:
  void forward_dequantized(const float* x, int64_t M, float* y, int64_t ldy);
  struct Impl;
  std::shared_ptr<Impl> impl_;
  int64_t N_ = 0, K_ = 0;
};

// C [M, N] f32 (row stride ldc) = A [M, K] bf16 (row-major) x B, with B bf16 row-major as [N, K] (b_nk) or [K, N];
// f32 accumulation. The raw matmul the bf16 attention prefill (ops/attention_bf16.cpp) runs on.
void matmul_bf16(const uint16_t* A, int64_t M, int64_t K, const uint16_t* B, int64_t N, bool b_nk, float* C, int64_t ldc);
// Frees the calling thread's buffer of widened weights that Linear::backward_input reuses across a reverse pass.
void release_backward_scratch();
// C [M, N] f32 (row stride ldc) = A [M, K] f32 (row stride lda) x B [K, N] f32 row-major; += with accumulate.
void matmul_f32(const float* A, int64_t M, int64_t K, int64_t lda, const float* B, int64_t N, float* C, int64_t ldc, bool accumulate);
// The same with any element strides: A(m, k) at A[m * sa_m + k * sa_k], B(k, n) at B[k * sb_k + n * sb_n] (a
// transposed operand is a stride swap), C(m, n) at C[m * ldc + n].
void matmul_f32_strided(const float* A, int64_t M, int64_t K, int64_t sa_m, int64_t sa_k, const float* B, int64_t N, int64_t sb_k,
                        int64_t sb_n, float* C, int64_t ldc, bool accumulate);
// oneDNN's ISA capped to what class c uses (dnnl::set_max_cpu_isa), before oneDNN's first ISA query; ops/cpu.cpp
// calls it once when GEMMALENS_MAX_ISA lowers the class.
void onednn_limit_isa(CpuClass c);
// The class oneDNN's effective ISA amounts to (its cap, the user's ONEDNN_MAX_CPU_ISA, the CPU), and the ISA's name.
CpuClass onednn_class();
std::string onednn_isa();
// The implementation oneDNN picks for an [M, K] x [K, N] matmul in dtype with weights as a layer stores them
// ("brg:avx512_core", "gemm:jit:f32", ...): the tests check that a forced class reaches oneDNN too.
std::string onednn_matmul_impl(int64_t M, int64_t K, int64_t N, DType dtype);
// Library version string of the linked oneDNN ("3.2.0").
const char* dnnl_version();
// Number of threads oneDNN's OpenMP runtime will use for the calling thread.
void set_num_threads(int n);
int get_max_threads();

}  // namespace gemmalens::ops
