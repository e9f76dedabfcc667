// KVCache (model/kv_cache.h): staged positions stay invisible until commit(), so a pass abandoned part-way leaves
// the cache as it was; after commit a sliding layer's ring holds the last `cap` slots at s % cap; truncate() and
// copy(); and the attention reading a ring that the cache wrote.
#include <vector>

#include "model/kv_cache.h"
#include "tests/attention_reference.h"
#include "tests/test.h"

namespace gemmalens {
namespace {

// Two layers: 0 sliding (a ring of `window` slots), 1 full attention (max_seq_len slots).
Gemma3Config two_layers(int KV, int Hd, int window) {
  Gemma3Config c;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2 * KV;
  c.num_key_value_heads = KV;
  c.head_dim = Hd;
  c.vocab_size = 16;
  c.eos_token_id = {1};
  c.sliding_window = window;
  c.layer_types = {"sliding_attention", "full_attention"};
  return c;
}

constexpr int kB = 2, kKV = 2, kHd = 32, kWindow = 4;

// The caches the storage tests run on: f32, bf16, and int8 (blocks of 32, a scale each; a float32 model's).
struct Kind {
  DType dt;
  bool int8;
};
const Kind kKinds[] = {{DType::F32, false}, {DType::BF16, false}, {DType::F32, true}};
const char* kind_name(const Kind& k) { return k.int8 ? "int8" : dtype_name(k.dt); }

// Element d of the row the ring holds at element (int8: byte) offset `off`.
float read(const KVCache& c, const void* base, int64_t off, int d) {
  if (c.int8()) {
    const int8_t* q = static_cast<const int8_t*>(base) + off;
    return static_cast<float>(q[d]) * reinterpret_cast<const float*>(q + kHd)[d / ops::kKVBlock];
  }
  return c.dtype() == DType::F32 ? static_cast<const float*>(base)[off + d] : bf16_to_f32(static_cast<const uint16_t*>(base)[off + d]);
}
// What a cache of c's kind reads back for element d of the row x [kHd]: x[d], rounded to bf16, or quantised.
float stored(const KVCache& c, const float* x, int d) {
  if (c.int8()) {
    alignas(4) int8_t q[kHd + kHd / ops::kKVBlock * 4];
    ops::kv_int8_quantize(x, kHd, q);
    return static_cast<float>(q[d]) * reinterpret_cast<const float*>(q + kHd)[d / ops::kKVBlock];
  }
  return c.dtype() == DType::F32 ? x[d] : round_bf16(x[d]);
}
constexpr int64_t kMaxSeq = 16;

// The value a pass of generation `gen` gives K (kv 0) or V (kv 1) of layer l, row b, slot s, head h, element d:
// every slot, layer and pass tells apart (exact in f32; a bf16 cache holds it rounded).
float value(int gen, int l, int kv, int b, int64_t s, int h, int d) {
  return (kv ? -1.f : 1.f) * (gen * 1000.f + s * 10.f + l * 4.f + b * 2.f + h + d / 16.f);
}

// k or v [B, T, KV, Hd] of layer l for slots first .. first + T - 1.
std::vector<float> chunk(int gen, int l, int kv, int64_t first, int64_t T) {
  std::vector<float> x(static_cast<size_t>(kB) * T * kKV * kHd);
  for (int b = 0; b < kB; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int h = 0; h < kKV; ++h)
        for (int d = 0; d < kHd; ++d) x[((b * T + t) * kKV + h) * kHd + d] = value(gen, l, kv, b, first + t, h, d);
  return x;
}

// What a forward pass does to the cache: every layer stages T new positions (layers < n_layers: a pass abandoned
// after them), then commit() when the pass completes.
void pass(KVCache& c, int gen, int64_t T, bool commit, int n_layers = 2, std::vector<int32_t> row_start = {0, 0}) {
  for (int l = 0; l < n_layers; ++l) {
    const std::vector<float> k = chunk(gen, l, 0, c.seq_len(), T), v = chunk(gen, l, 1, c.seq_len(), T);
    c.stage(l, k.data(), v.data(), T);
  }
  if (commit) c.commit(T, row_start);
}

// view(l) holds slot s (for s in [max(0, seq_len - cap + skip), seq_len)) at offset(b, h, s), with the value of the
// pass gen[s] wrote. skip = 1 after a truncate: the next query needs only the last cap - 1 slots.
void check_view(const KVCache& c, int l, const std::vector<int>& gen, int64_t skip = 0) {
  const ops::KVRing r = c.view(l);
  CHECK_EQ(r.cap, l == 0 ? std::min<int64_t>(kWindow, c.max_seq_len()) : c.max_seq_len());
  int64_t bad = 0, first_bad = -1;
  for (int64_t s = std::max<int64_t>(0, c.seq_len() - r.cap + skip); s < c.seq_len(); ++s)
    for (int kv = 0; kv < 2; ++kv)
      for (int b = 0; b < kB; ++b)
        for (int h = 0; h < kKV; ++h) {
          float want[kHd];
          for (int d = 0; d < kHd; ++d) want[d] = value(gen[s], l, kv, b, s, h, d);
          for (int d = 0; d < kHd; ++d)
            if (read(c, kv ? r.v : r.k, r.offset(b, h, s), d) != stored(c, want, d) && bad++ == 0) first_bad = s;
        }
  if (bad) test::fail(__FILE__, __LINE__, test::str("layer ", l, ": ", bad, " values of the held slots differ from what was committed, first at slot ",
                                                     first_bad, " (seq_len ", c.seq_len(), ", want generation ", gen[first_bad], ")"));
}

}  // namespace

// Chunks of 3, 1, 6 (longer than the 4-slot ring), 1, 2 positions: after every commit seq_len grows and both
// layers hold their last cap slots where offset() says; row_start is the first commit's.
TEST(kv_cache_commit) {
  for (const Kind& kind : kKinds) {
    INFO("cache ", kind_name(kind));
    const DType dt = kind.dt;
    KVCache c(two_layers(kKV, kHd, kWindow), kB, kMaxSeq, dt, kind.int8);
    std::vector<int> gen;
    int g = 0;
    for (int64_t T : {3, 1, 6, 1, 2}) {
      ++g;
      INFO("pass ", g, " of ", T, " positions");
      pass(c, g, T, true, 2, g == 1 ? std::vector<int32_t>{0, 2} : std::vector<int32_t>{5, 5});
      gen.insert(gen.end(), T, g);
      CHECK_EQ(c.seq_len(), static_cast<int64_t>(gen.size()));
      check_view(c, 0, gen);
      check_view(c, 1, gen);
      CHECK(c.row_start() == (std::vector<int32_t>{0, 2}));
    }
  }
}

// A pass abandoned before commit() (an error, Ctrl-C, stop_at_layer) leaves view() and seq_len() as they were,
// whether it staged every layer or only the first; the next pass stages anew. commit() of layers that were not
// staged for that T is refused before anything changes; so is a pass past max_seq_len.
TEST(kv_cache_abandoned_pass) {
  for (const Kind& kind : kKinds) {
    INFO("cache ", kind_name(kind));
    const DType dt = kind.dt;
    KVCache c(two_layers(kKV, kHd, kWindow), kB, kMaxSeq, dt, kind.int8);
    CHECK_THROWS(c.commit(1, {0, 0}), InternalError);  // nothing staged yet
    pass(c, 1, 5, true);
    std::vector<int> gen(5, 1);
    pass(c, 2, 3, false);  // every layer staged, no commit
    CHECK_EQ(c.seq_len(), 5);
    check_view(c, 0, gen);
    check_view(c, 1, gen);
    pass(c, 3, 2, false, /*n_layers=*/1);  // abandoned after layer 0
    CHECK_EQ(c.seq_len(), 5);
    check_view(c, 0, gen);
    check_view(c, 1, gen);
    // layers staged for different T (the stale layer 1 from the pass of 3): refused, nothing changes
    const std::vector<float> k = chunk(9, 0, 0, 5, 2), v = chunk(9, 0, 1, 5, 2);
    c.stage(0, k.data(), v.data(), 2);
    CHECK_THROWS(c.commit(2, {0, 0}), InternalError);
    CHECK_EQ(c.seq_len(), 5);
    check_view(c, 0, gen);
    check_view(c, 1, gen);
    // the next complete pass: its positions, not the abandoned ones
    pass(c, 4, 2, true);
    gen.insert(gen.end(), 2, 4);
    CHECK_EQ(c.seq_len(), 7);
    check_view(c, 0, gen);
    check_view(c, 1, gen);
    // past max_seq_len: refused at stage(), the cache as it was
    const std::vector<float> big(static_cast<size_t>(kB) * 10 * kKV * kHd, 1.f);
    CHECK_THROWS(c.stage(0, big.data(), big.data(), 10), ValueError);
    CHECK_EQ(c.seq_len(), 7);
    check_view(c, 0, gen);
  }
}

// truncate(n) keeps the first n slots: refused past seq_len, and for a ring that no longer holds the window before n;
// the next pass continues from n. truncate(0) forgets row_start. copy() is deep.
TEST(kv_cache_truncate_copy) {
  for (const Kind& kind : kKinds) {
    INFO("cache ", kind_name(kind));
    const DType dt = kind.dt;
    KVCache c(two_layers(kKV, kHd, kWindow), kB, kMaxSeq, dt, kind.int8);
    pass(c, 1, 5, true, 2, {1, 0});
    pass(c, 2, 6, true);  // slots 5..10; the ring holds 7..10
    std::vector<int> gen(5, 1);
    gen.insert(gen.end(), 6, 2);
    CHECK_THROWS(c.truncate(12), ValueError);
    CHECK_THROWS(c.truncate(-1), ValueError);
    CHECK_THROWS(c.truncate(9), ValueError);  // slot 10's query needs 6..9; the ring lost 6
    CHECK_EQ(c.seq_len(), 11);
    const std::unique_ptr<KVCache> saved = c.copy();
    c.truncate(10);
    CHECK_EQ(c.seq_len(), 10);
    gen.resize(10);
    check_view(c, 0, gen, /*skip=*/1);
    check_view(c, 1, gen);
    pass(c, 3, 1, true);  // slot 10 again, from a new pass
    gen.push_back(3);
    CHECK_EQ(c.seq_len(), 11);
    check_view(c, 0, gen);
    check_view(c, 1, gen);
    // the copy still holds the first pass's slot 10, and its own seq_len
    std::vector<int> saved_gen(5, 1);
    saved_gen.insert(saved_gen.end(), 6, 2);
    CHECK_EQ(saved->seq_len(), 11);
    check_view(*saved, 0, saved_gen);
    check_view(*saved, 1, saved_gen);
    CHECK(saved->row_start() == (std::vector<int32_t>{1, 0}));
    c.truncate(0);
    CHECK_EQ(c.seq_len(), 0);
    CHECK(c.row_start() == (std::vector<int32_t>{0, 0}));
    pass(c, 4, 2, true, 2, {0, 1});
    CHECK(c.row_start() == (std::vector<int32_t>{0, 1}));
    check_view(c, 0, {4, 4});
    check_view(c, 1, {4, 4});
  }
}

// The attention over a cache the KVCache wrote (chunks of 7, 5, 9 slots: a 8-slot ring that wrapped, a full layer,
// left padding recorded by the first commit), for a chunk of 3 new positions: the reference and the dispatcher
// against the naive attention over the whole sequence.
TEST(kv_cache_attention) {
  using namespace ops::testing;
  constexpr int KV = 2, Hd = 16, window = 8;
  for (DType dt : {DType::F32, DType::BF16}) {
    INFO("cache dtype ", dtype_name(dt));
    KVCache c(two_layers(KV, Hd, window), 2, 32, dt);
    // The problem as a plain cache would hold it: its k_all / v_all are the sequence (bf16-rounded for a bf16 cache).
    const Problem full(Shape(2, 3, 2 * KV, KV, Hd).cached(21, 32, dt).padded({0, 3}), 7);
    const size_t row = static_cast<size_t>(KV) * Hd;
    int64_t first = 0;
    for (int64_t T : {7, 5, 9}) {
      std::vector<float> k(2 * T * row), v(2 * T * row);
      for (int b = 0; b < 2; ++b) {
        std::copy_n(full.k_all.data() + (b * full.S + first) * row, T * row, k.data() + b * T * row);
        std::copy_n(full.v_all.data() + (b * full.S + first) * row, T * row, v.data() + b * T * row);
      }
      c.stage(0, k.data(), v.data(), T);
      c.stage(1, k.data(), v.data(), T);
      c.commit(T, full.s.row_start);
      first += T;
    }
    CHECK_EQ(c.seq_len(), 21);
    for (int l = 0; l < 2; ++l) {
      INFO("layer ", l, l == 0 ? " (sliding, ring of 8)" : " (full)");
      Problem p = full;
      if (l == 0) p.s.window = window, p.s.cap = window;
      const Reference r = reference(p);
      for (auto kernel : {ops::attention_reference, ops::attention}) {
        std::vector<float> z(p.z_size(), kNaN);
        ops::AttentionArgs a = p.args(z.data());
        a.cache = c.view(l);
        a.row_start = c.row_start().data();
        kernel(a);
        check_z(p, r, z, kZTol);
      }
    }
  }
}

namespace {

// What cache row `row` of layer l holds at slot s, K (kv 0) or V (kv 1), head h, element d (a bf16 cache: rounded).
float held(const KVCache& c, int l, int kv, int row, int64_t s, int h, int d) {
  const ops::KVRing r = c.view(l);
  return read(c, kv ? r.v : r.k, r.offset(row, h, s), d);
}

// Cache row `row` holds, at slots [lo, seq_len) that its layers still hold, value(gen, l, kv, b, s - off, h, d): the
// sequence of a pass's row b (written there with slot s - off).
void check_row(const KVCache& c, int row, int64_t lo, int64_t off, int b, int gen_of_slot_lo, int gen_split, int gen_hi) {
  int64_t bad = 0, first_bad = -1;
  for (int l = 0; l < 2; ++l) {
    const int64_t cap = c.view(l).cap;
    for (int64_t s = std::max(lo, c.seq_len() - cap); s < c.seq_len(); ++s)
      for (int kv = 0; kv < 2; ++kv)
        for (int h = 0; h < kKV; ++h) {
          const int64_t src = s - off;
          float want[kHd];
          for (int d = 0; d < kHd; ++d) want[d] = value(src < gen_split ? gen_of_slot_lo : gen_hi, l, kv, b, src, h, d);
          for (int d = 0; d < kHd; ++d)
            if (held(c, l, kv, row, s, h, d) != stored(c, want, d) && bad++ == 0) first_bad = s;
        }
  }
  if (bad) test::fail(__FILE__, __LINE__, test::str("cache row ", row, ": ", bad, " values differ, first at slot ", first_bad));
}

}  // namespace

// A pass over some of the cache's rows (continuous batching): pass row b goes to cache row rows[b], the rows left
// out stop being valid; row_start is recorded for the rows of the first pass.
TEST(kv_cache_rows) {
  for (const Kind& kind : kKinds) {
    INFO("cache ", kind_name(kind));
    const DType dt = kind.dt;
    KVCache c(two_layers(kKV, kHd, kWindow), 3, kMaxSeq, dt, kind.int8);
    const int32_t rows[2] = {2, 0};  // pass row 0 -> cache row 2, pass row 1 -> cache row 0
    int64_t first = 0;
    int gen = 0;
    for (int64_t T : {3, 6}) {  // 9 slots: the 4-slot ring wrapped
      ++gen;
      for (int l = 0; l < 2; ++l) {
        const std::vector<float> k = chunk(gen, l, 0, first, T), v = chunk(gen, l, 1, first, T);
        c.stage(l, k.data(), v.data(), T, rows, 2);
      }
      c.commit(T, {0, 1}, rows);
      first += T;
    }
    CHECK_EQ(c.seq_len(), 9);
    CHECK(c.row_start() == (std::vector<int32_t>{1, 0, 0}));
    CHECK(c.row_valid(0) && !c.row_valid(1) && c.row_valid(2));
    check_row(c, 2, 0, 0, 0, 1, 3, 2);
    check_row(c, 0, 1, 0, 1, 1, 3, 2);
    const int32_t bad_rows[2] = {1, 1};
    const std::vector<float> k = chunk(3, 0, 0, 9, 1);
    CHECK_THROWS(c.stage(0, k.data(), k.data(), 1, bad_rows, 2), ValueError);
  }
}

// place_row puts a sequence prefilled in its own cache into a row, ending at seq_len (its ring tail included);
// shift moves every valid row's slots, both ways; the bounds are refused.
TEST(kv_cache_place_row_shift) {
  for (const Kind& kind : kKinds) {
    INFO("cache ", kind_name(kind));
    const DType dt = kind.dt;
    KVCache src(two_layers(kKV, kHd, kWindow), kB, kMaxSeq, dt, kind.int8);
    pass(src, 1, 3, true, 2, {0, 2});  // row 1 is left-padded by 2
    pass(src, 2, 4, true);             // 7 slots; the ring holds 3..6
    KVCache c(two_layers(kKV, kHd, kWindow), 3, kMaxSeq, dt, kind.int8);
    CHECK_THROWS(c.place_row(0, src, 0), ValueError);  // src (7 slots) is longer than c's sequence (0)
    c.shift(9);                                         // an empty cache: seq_len 9, no row holds anything yet
    CHECK_EQ(c.seq_len(), 9);
    c.place_row(1, src, 1);  // src slots [2, 7) -> [4, 9)
    c.place_row(0, src, 0);  // src slots [0, 7) -> [2, 9)
    CHECK(c.row_start() == (std::vector<int32_t>{2, 4, 9}));
    check_row(c, 0, 2, 2, 0, 1, 3, 2);
    check_row(c, 1, 4, 2, 1, 1, 3, 2);
    c.shift(-2);  // give back the slots before row 0
    CHECK_EQ(c.seq_len(), 7);
    CHECK(c.row_start() == (std::vector<int32_t>{0, 2, 7}));
    check_row(c, 0, 0, 0, 0, 1, 3, 2);
    check_row(c, 1, 2, 0, 1, 1, 3, 2);
    c.shift(5);   // room before every row (a longer sequence joins)
    CHECK_EQ(c.seq_len(), 12);
    CHECK(c.row_start() == (std::vector<int32_t>{5, 7, 12}));
    check_row(c, 0, 5, 5, 0, 1, 3, 2);
    check_row(c, 1, 7, 5, 1, 1, 3, 2);
    CHECK_THROWS(c.shift(-6), ValueError);  // row 0 would start before slot 0
    CHECK_THROWS(c.shift(5), ValueError);   // past max_seq_len
    CHECK_THROWS(c.place_row(3, src, 0), ValueError);
    CHECK_THROWS(c.place_row(0, src, 2), ValueError);
    CHECK_THROWS(c.place_row(0, c, 0), ValueError);
    KVCache other(two_layers(kKV, kHd, kWindow + 1), 1, kMaxSeq, dt, kind.int8);
    CHECK_THROWS(c.place_row(2, other, 0), ValueError);
    KVCache other_kind(two_layers(kKV, kHd, kWindow), kB, kMaxSeq, dt, !kind.int8);  // the same model, int8 or not
    pass(other_kind, 1, 3, true);
    CHECK_THROWS(c.place_row(2, other_kind, 0), ValueError);
    CHECK_EQ(c.seq_len(), 12);
    check_row(c, 0, 5, 5, 0, 1, 3, 2);
  }
}

}  // namespace gemmalens
