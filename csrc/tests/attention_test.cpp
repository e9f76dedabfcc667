// Every attention variant of ops/attention.h against the naive double-precision reference of attention_reference.h
// (written from the definition, not from visible_range / kv_row), over the cases the model meets: prefill and decode, a KV cache in
// f32 or bf16 as a plain buffer or a sliding-window ring that has wrapped, left padding (queries with no visible key
// give z = 0), sliding windows, GQA groups, soft-capping, and decode steps (T = 1..4) over a long past, which the
// dispatcher sends to split-K.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "ops/attention.h"
#include "ops/cpu.h"  // attention_prefill_bf16_matmul(): whether attention_bf16_matmul runs here
#include "tests/attention_reference.h"
#include "tests/test.h"

namespace gemmalens::ops {
namespace {
using namespace testing;

// Runs every f32 variant on one shape: the reference kernel, the tiled kernel (where it applies), split-K, the
// dispatcher, and the materialised path (scores, softmax_rows, attention_apply; each checked).
void check_variants(const Shape& shape, uint32_t seed) {
  INFO(shape.describe());
  const Problem p(shape, seed);
  const Reference r = reference(p);
  std::vector<float> z(p.z_size());
  auto run = [&](const char* name, const std::function<void(const AttentionArgs&)>& kernel) {
    INFO("variant ", name);
    std::fill(z.begin(), z.end(), kNaN);  // every value must be written
    kernel(p.args(z.data()));
    check_z(p, r, z, kZTol);
  };
  run("attention_reference", attention_reference);
  if (attention_tiled_ok(p.args(z.data())))
    run("attention_tiled", attention_tiled);
  else
    NOTE("attention_tiled not run for Hd=", shape.Hd, ": it needs AVX-512 and Hd % 16 == 0");
  run("attention_decode_splitk", attention_decode_splitk);
  run("attention (dispatcher)", attention);

  INFO("variant attention_scores -> softmax_rows -> attention_apply");
  std::vector<float> scores(p.scores_size(), kNaN), pattern(p.scores_size(), kNaN);
  attention_scores(p.args(nullptr), scores.data());
  CHECK_CLOSE(scores.data(), r.scores.data(), p.scores_size(), kScoreTol, kScoreTol);  // -inf exactly where masked
  softmax_rows(scores.data(), static_cast<int64_t>(shape.B) * shape.H * shape.T, p.S, pattern.data());
  CHECK_CLOSE(pattern.data(), r.pattern.data(), p.scores_size(), 1e-6, 1e-5);
  std::fill(z.begin(), z.end(), kNaN);
  attention_apply(p.args(nullptr), pattern.data(), z.data());
  check_z(p, r, z, kZTol);
}

}  // namespace

// The shared rules of attention.h: where a ring slot lives, which slots a query sees, where a row comes from.
TEST(attention_rules) {
  KVRing ring;
  ring.KV = 2, ring.Hd = 3, ring.cap = 5;
  CHECK_EQ(ring.offset(0, 0, 0), 0);
  CHECK_EQ(ring.offset(0, 1, 4), (1 * 5 + 4) * 3);
  CHECK_EQ(ring.offset(1, 1, 12), ((1 * 2 + 1) * 5 + 2) * 3);  // slot 12 of a 5-slot ring: position 2
  CHECK_EQ(ring.offset(1, 0, 7), ring.offset(1, 0, 2));

  std::vector<float> q(1), kn(2 * 2 * 3), vn(2 * 2 * 3);
  std::vector<float> kf(2 * 2 * 5 * 3), vf(kf.size());
  std::vector<uint16_t> kh(kf.size()), vh(kf.size());
  const int32_t row_start[2] = {0, 8};
  AttentionArgs a;
  a.B = 2, a.T = 2, a.H = 2, a.KV = 2, a.Hd = 3;
  a.k_new = kn.data(), a.v_new = vn.data();
  a.cache = ring;
  a.cache.k = kf.data(), a.cache.v = vf.data();
  a.past = 10;  // the ring holds slots 5..9; the chunk is slots 10, 11
  a.row_start = row_start;
  // visible_range: [row_start, i], cut to the window (counting the query's own slot); empty for padding queries.
  CHECK_EQ(visible_range(a, 0, 10).lo, 0);
  CHECK_EQ(visible_range(a, 0, 10).hi, 10);
  CHECK_EQ(visible_range(a, 1, 10).lo, 8);
  a.window = 4;
  CHECK_EQ(visible_range(a, 0, 10).lo, 7);
  CHECK_EQ(visible_range(a, 1, 10).lo, 8);
  const int32_t late_start[2] = {0, 12};
  a.row_start = late_start;
  CHECK(visible_range(a, 1, 11).lo > visible_range(a, 1, 11).hi);
  // kv_row: the chunk for j >= past, the ring for the slots it holds, nothing for older ones.
  CHECK(key_row(a, 1, 0, 11).f == kn.data() + ((1 * 2 + 1) * 2 + 0) * 3);
  CHECK(value_row(a, 0, 1, 10).f == vn.data() + ((0 * 2 + 0) * 2 + 1) * 3);
  CHECK(key_row(a, 1, 1, 9).f == kf.data() + ring.offset(1, 1, 9));
  CHECK(value_row(a, 1, 1, 5).f == vf.data() + ring.offset(1, 1, 5));
  CHECK(key_row(a, 1, 1, 4).f == nullptr && key_row(a, 1, 1, 4).h == nullptr);
  a.cache.dtype = DType::BF16;
  a.cache.k = kh.data(), a.cache.v = vh.data();
  CHECK(key_row(a, 0, 1, 6).h == kh.data() + ring.offset(0, 1, 6) && key_row(a, 0, 1, 6).f == nullptr);
  CHECK(value_row(a, 0, 1, 11).f == vn.data() + ((0 * 2 + 1) * 2 + 1) * 3);
}

// Prefill without a cache: several 64-key tiles and query blocks, GQA groups 1 to 8, windows, soft-capping, and a
// head_dim the tiled kernel does not take (Hd % 16 != 0: the dispatcher falls back to the reference kernel).
TEST(attention_prefill) {
  check_variants(Shape(2, 150, 4, 2, 32), 1);
  check_variants(Shape(2, 150, 8, 1, 64).sliding(5), 2);
  check_variants(Shape(1, 70, 2, 2, 16).sliding(70).capped(2.f, 0.3f), 3);
  check_variants(Shape(2, 33, 4, 4, 24), 4);
  check_variants(Shape(1, 1, 1, 1, 16), 5);
}

// Left padding: rows whose first real slot is past some (or all) of the chunk's queries; those queries see no key
// and must give z = 0, the others must ignore the padding slots. With and without a window and a cache.
TEST(attention_left_padding) {
  check_variants(Shape(4, 80, 4, 2, 32).padded({0, 7, 79, 100}), 11);
  check_variants(Shape(3, 20, 4, 2, 32).padded({0, 30, 45}).cached(40, 48, DType::F32).sliding(16), 12);
  check_variants(Shape(2, 3, 2, 1, 16).padded({0, 2}), 13);  // a few queries, one of them padding
  check_variants(Shape(3, 17, 2, 2, 48).padded({3, 0, 50}).cached(33, 64, DType::BF16), 14);
}

// A sliding-window ring that has wrapped (slot s at s % cap, the oldest overwritten), in f32 and bf16; a chunk longer
// than the ring; a ring larger than the window; a ring not yet full (its unused positions hold NaN).
TEST(attention_ring_cache) {
  for (DType d : {DType::F32, DType::BF16}) {
    check_variants(Shape(2, 37, 8, 2, 64).cached(130, 48, d).sliding(48), 21);
    check_variants(Shape(1, 100, 4, 1, 32).cached(70, 32, d).sliding(32), 22);
    check_variants(Shape(2, 9, 4, 2, 16).cached(150, 64, d).sliding(40), 23);
    check_variants(Shape(1, 10, 2, 1, 32).cached(20, 48, d).sliding(48), 24);
  }
}

// A plain cache (cap = max_seq_len, no wrap) in f32 and bf16, with soft-capping and with a window narrower than it.
TEST(attention_full_cache) {
  for (DType d : {DType::F32, DType::BF16}) {
    check_variants(Shape(2, 50, 4, 2, 128).cached(200, 512, d).capped(2.f, 0.3f), 31);
    check_variants(Shape(1, 66, 4, 1, 64).cached(130, 512, d).sliding(37), 32);
  }
}

// Decode steps, T = 1..4 new positions over a long past (the dispatcher takes split-K for these), with the 270M's
// geometry (H 4, KV 1, Hd 256): a full cache, a wrapped 512-slot ring, left-padded rows, soft-capping; and other
// groups and head_dims over bf16 caches (the AVX-512 kernel's permuted order). Split-K's chunking depends on the
// thread count, so it also runs with 1, 3 and 8 threads.
TEST(attention_decode) {
  for (int T = 1; T <= 4; ++T) {
    check_variants(Shape(1, T, 4, 1, 256).cached(700, 1024, DType::BF16), 40 + T);
    check_variants(Shape(2, T, 4, 1, 256).cached(1500, 512, DType::F32).sliding(512).padded({0, 300}), 50 + T);
    check_variants(Shape(2, T, 8, 2, 128).cached(300, 1024, DType::F32).capped(5.f, 0.2f).padded({17, 0}), 60 + T);
    // bf16 caches with other group sizes (query rows per KV head: 2T, 3T, 8T) and head_dims 128 and 64
    check_variants(Shape(2, T, 8, 4, 128).cached(300, 1024, DType::BF16).padded({17, 0}), 80 + T);
    check_variants(Shape(1, T, 6, 2, 64).cached(500, 512, DType::BF16).capped(5.f, 0.2f), 85 + T);
    check_variants(Shape(1, T, 8, 1, 64).cached(900, 128, DType::BF16).sliding(100), 90 + T);
  }
  const int threads = omp_get_max_threads();
  for (int n : {1, 3, 8}) {
    INFO("split-K with ", n, " threads");
    omp_set_num_threads(n);
    const Problem p(Shape(2, 2, 4, 1, 256).cached(1500, 512, DType::BF16).sliding(512).padded({0, 900}), 70 + n);
    const Reference r = reference(p);
    std::vector<float> z(p.z_size(), kNaN);
    attention_decode_splitk(p.args(z.data()));
    check_z(p, r, z, kZTol);
  }
  omp_set_num_threads(threads);
}

// Sliding layers cost O(n x window): every fast variant skips the keys outside the window before computing a score
// (not by masking). The keys and values of every slot no query sees are NaN here, in a plain cache that still
// holds them (cap >= past): a kernel that reads one, even to mask its score or weight it by 0, gets NaN in z.
// Slots up to the window's first visible one are poisoned: not even a tile's worth of slack. Also a prefill chunk
// far longer than the window (T >> window) with no cache, against the reference.
TEST(attention_window_skips_outside) {
  for (DType d : {DType::F32, DType::BF16}) {
    check_variants(Shape(1, 200, 4, 1, 64).cached(3000, 4096, d).sliding(100).poisoned(3000 - 100 + 1), 101);
    check_variants(Shape(2, 70, 8, 2, 32).cached(1000, 1100, d).sliding(64).poisoned(1000 - 64 + 1), 102);
    for (int T = 1; T <= 4; ++T)  // decode steps (split-K) with the 270M's geometry at a long past
      check_variants(Shape(1, T, 4, 1, 256).cached(5000, 8192, d).sliding(512).poisoned(5000 - 512 + 1), 110 + T);
  }
  check_variants(Shape(1, 1200, 4, 1, 64).sliding(48), 120);
}

// A bf16 model's attention through the dispatcher: prefill of 64+ positions goes to attention_bf16_matmul where
// oneDNN's bf16 matmul is fast (AMX, AVX512_BF16 on AMD: attention_prefill_bf16_matmul; q, k, v and the probabilities
// rounded to bf16), else to the f32 kernels. Elsewhere attention_bf16_matmul must return false and leave z alone.
TEST(attention_bf16_matmul) {
  const std::vector<Shape> shapes = {Shape(2, 300, 4, 1, 64).sliding(37),  // two 256-query blocks
                                     Shape(1, 80, 8, 2, 32).cached(200, 1024, DType::BF16).capped(2.f, 0.3f),
                                     Shape(2, 70, 4, 2, 64).cached(100, 48, DType::BF16).sliding(48).padded({0, 120}),
                                     // More than 4096 keys for a block: the chunked online softmax (row 0; row 1, with
                                     // 150 slots of padding, stays at one chunk), and a window of 4050 that masks part
                                     // of the first chunk for the later queries
                                     Shape(2, 100, 4, 1, 64).cached(4100, 4300, DType::BF16).padded({0, 150}),
                                     Shape(1, 100, 4, 1, 64).cached(5000, 5200, DType::BF16).sliding(4050)};
  for (size_t i = 0; i < shapes.size(); ++i) {
    INFO(shapes[i].describe());
    const Problem p(shapes[i], 80 + static_cast<uint32_t>(i));
    std::vector<float> z(p.z_size(), kNaN), z2(p.z_size(), kNaN);
    attention(p.args(z.data(), DType::BF16));
    if (attention_prefill_bf16_matmul()) {
      // Against the reference on bf16-rounded q, k, v: what is left is the bf16 rounding of the probabilities
      // (relative 2^-9 each): measured on these shapes at 0.21-0.25% of the scale (max) and 0.15-0.16% (mean) with
      // oneDNN's bf16 matmul on AVX512_BF16 (same algorithm), as tests/test_ops.py measured on AMX; its bounds.
      // The padding queries' z must still be exactly 0.
      const Reference r = reference(p, /*bf16_inputs=*/true);
      auto check_bf16 = [&](const std::vector<float>& out) {
        double max_err = 0, max_ref = 0, sum_err = 0, sum_ref = 0;
        for (int64_t e = 0; e < p.z_size(); ++e) {
          const double err = std::fabs(out[e] - r.z[e]);
          max_err = std::isnan(err) ? INFINITY : std::max(max_err, err);
          max_ref = std::max(max_ref, std::fabs(r.z[e]));
          sum_err += err, sum_ref += std::fabs(r.z[e]);
        }
        CHECK_NEAR(max_err / max_ref, 0.0, 1e-2);
        CHECK_NEAR(sum_err / sum_ref, 0.0, 3e-3);
        check_z(p, r, out, INFINITY);  // (only the exact zeros)
      };
      check_bf16(z);
      INFO("attention_bf16_matmul called directly");
      CHECK(attention_bf16_matmul(p.args(z2.data(), DType::BF16)));
      check_bf16(z2);
    } else {
      check_z(p, reference(p), z, kZTol);  // the f32 kernels
      CHECK(!attention_bf16_matmul(p.args(z2.data(), DType::BF16)));
      CHECK(std::all_of(z2.begin(), z2.end(), [](float x) { return std::isnan(x); }));
    }
  }
  // An f32 model, or a cache that is not bf16: never the bf16 matmuls, on any CPU.
  const Problem f32_cache(Shape(1, 64, 2, 1, 32).cached(10, 64, DType::F32), 90);
  std::vector<float> z(f32_cache.z_size(), kNaN);
  CHECK(!attention_bf16_matmul(f32_cache.args(z.data(), DType::BF16)));
  CHECK(!attention_bf16_matmul(f32_cache.args(z.data(), DType::F32)));
  CHECK(std::all_of(z.begin(), z.end(), [](float x) { return std::isnan(x); }));
  if (!attention_prefill_bf16_matmul())
    SKIP("attention_bf16_matmul itself: not on this CPU class (AMX, or AVX512_BF16 on AMD); the dispatcher's f32 "
         "fallback was checked");
}

}  // namespace gemmalens::ops
