// Prefill attention as two bf16 matmuls per block of queries (QK^T, then PV) with an f32 softmax between them,
// for CPUs where oneDNN runs bf16 on AMX tiles. The matmuls come from ops/linear.h (oneDNN stays in
// linear_dnnl.cpp); the visible-key rule and the row lookup from attention.h.
#include <algorithm>
#include <limits>
#include <vector>

#include "ops/attention.h"
#include "ops/cpu.h"
#include "ops/gemv_bf16.h"
#include "ops/linear.h"
#include "ops/vmath.h"

namespace gemmalens::ops {

bool attention_bf16_matmul(const AttentionArgs& a) {
  if (!use_amx() || a.compute != DType::BF16 || (a.past > 0 && a.cache.dtype != DType::BF16)) return false;
  const int B = a.B, T = a.T, H = a.H, KV = a.KV, Hd = a.Hd, group = H / KV;
  constexpr int kQB = 256;  // query positions per block: scores [kQB * group, keys] f32
  std::vector<uint16_t> Qb, Kb, Vb, Pb;
  std::vector<float> Sc, Zf;
  for (int b = 0; b < B; ++b) {
    for (int kvh = 0; kvh < KV; ++kvh)
      for (int t0 = 0; t0 < T; t0 += kQB) {
        const int nt = std::min(kQB, T - t0), rows = nt * group;
        const int64_t j_lo = std::min(visible_range(a, b, a.past + t0).lo, a.past + t0), j_hi = a.past + t0 + nt - 1;
        const int64_t S = j_hi - j_lo + 1;
        Qb.resize(static_cast<size_t>(rows) * Hd);
        Kb.resize(static_cast<size_t>(S) * Hd);
        Vb.resize(static_cast<size_t>(S) * Hd);
        Pb.resize(static_cast<size_t>(rows) * S);
        Sc.resize(static_cast<size_t>(rows) * S);
        Zf.resize(static_cast<size_t>(rows) * Hd);
#pragma omp parallel for schedule(static)
        for (int r = 0; r < rows; ++r)  // rows in (position, head of the group) order
          f32_to_bf16_n(a.q + ((static_cast<int64_t>(b) * T + t0 + r / group) * H + kvh * group + r % group) * Hd,
                        Qb.data() + static_cast<size_t>(r) * Hd, Hd);
#pragma omp parallel for schedule(static)
        for (int64_t c = 0; c < S; ++c) {
          uint16_t* kd = Kb.data() + c * Hd;
          uint16_t* vd = Vb.data() + c * Hd;
          const KVRow k = key_row(a, b, kvh, j_lo + c), v = value_row(a, b, kvh, j_lo + c);
          if (k.f) {  // this chunk's keys (f32)
            f32_to_bf16_n(k.f, kd, Hd);
            f32_to_bf16_n(v.f, vd, Hd);
          } else if (k.h) {  // the bf16 cache
            std::copy_n(k.h, Hd, kd);
            std::copy_n(v.h, Hd, vd);
          } else {  // the ring no longer holds it (never visible: the window fits the ring)
            std::fill_n(kd, Hd, uint16_t(0));
            std::fill_n(vd, Hd, uint16_t(0));
          }
        }
        matmul_bf16(Qb.data(), rows, Hd, Kb.data(), S, /*b_nk=*/true, Sc.data(), S);
#pragma omp parallel for schedule(static)
        for (int r = 0; r < rows; ++r) {  // scaled (soft-capped) scores, -inf where masked
          const SlotRange vis = visible_range(a, b, a.past + t0 + r / group);
          const int64_t c_lo = vis.lo - j_lo, c_hi = vis.hi - j_lo;  // visible columns [c_lo, c_hi]
          float* s = Sc.data() + static_cast<size_t>(r) * S;
          for (int64_t c = 0; c < S; ++c) {
            float x = s[c] * a.scale;
            if (a.softcap > 0.f) x = a.softcap * tanh_f32(x / a.softcap);
            s[c] = c < c_lo || c > c_hi ? -std::numeric_limits<float>::infinity() : x;
          }
        }
        softmax_rows(Sc.data(), rows, S, Sc.data());  // the materialised path's softmax, in place; padding rows: 0
#pragma omp parallel for schedule(static)
        for (int r = 0; r < rows; ++r)
          f32_to_bf16_n(Sc.data() + static_cast<size_t>(r) * S, Pb.data() + static_cast<size_t>(r) * S, S);
        matmul_bf16(Pb.data(), rows, S, Vb.data(), Hd, /*b_nk=*/false, Zf.data(), Hd);
#pragma omp parallel for schedule(static)
        for (int r = 0; r < rows; ++r)
          std::copy_n(Zf.data() + static_cast<size_t>(r) * Hd, Hd,
                      a.z + ((static_cast<int64_t>(b) * T + t0 + r / group) * H + kvh * group + r % group) * Hd);
      }
  }
  return true;
}

}  // namespace gemmalens::ops
