"""Long context: the same weights with every layer global (config.json's layer_types) against HF, KV cache bytes of
both patterns, decode steps over a long past through the split-K kernel's paths, and the clear errors a long input
gets instead of an O(T^2) or O(T x vocab) allocation that cannot fit. The kernels themselves (sliding layers skip
what lies outside the window, decode against the reference at long pasts) are tested in csrc/tests/attention_test.cpp
(tests/test_cpp_units.py)."""
import json
import os
import shutil

import numpy as np
import pytest

import gemmalens as gl
from conftest import build_hf, hf_logits, rel_err


def _all_global_copy(src, dst):
    """The checkpoint in src with every layer global: the same weights, config.json's layer_types all
    full_attention (how bench/longctx_bench.py builds its all-global models)."""
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f != "config.json":
            shutil.copy(os.path.join(src, f), dst)
    c = json.load(open(os.path.join(src, "config.json")))
    c["layer_types"] = ["full_attention"] * c["num_hidden_layers"]
    json.dump(c, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_all_global_matches_hf(hf_models, tmp_path):
    """Every layer global (the tiny model's window is 6; 40 positions): gemmalens equals HF built from the same
    config.json, and differs from the sliding-window model (the override took effect)."""
    from transformers import Gemma3ForCausalLM

    _, src = hf_models["mqa_scaled_softcap"]
    dst = _all_global_copy(src, str(tmp_path / "all-global"))
    model = gl.load(dst)
    assert model.config.layer_types == ["full_attention"] * model.config.num_hidden_layers
    hf = Gemma3ForCausalLM.from_pretrained(dst, attn_implementation="eager").eval()
    assert hf.config.layer_types == model.config.layer_types
    ids = np.random.default_rng(3).integers(0, 320, (2, 40))
    ref = hf_logits(hf, ids)
    ours = model.forward(ids)
    # f32 against HF's f32 eager attention: the same bound as tests/test_model_hf.py's
    assert rel_err(ours, ref) <= 1e-4
    assert rel_err(gl.load(src).forward(ids), ref) > 1e-2  # the 5:1 model sees less past
    # and decode steps over the all-global cache: the next-token logits of one forward
    cache = model.new_cache(batch=2, max_seq_len=48)
    model.forward(ids[:, :30], cache=cache)
    steps = np.concatenate([model.forward(ids[:, t:t + 1], cache=cache) for t in range(30, 40)], 1)
    assert rel_err(steps, ours[:, 30:]) <= 1e-5


@pytest.mark.parametrize("size", ["270m", "1b"])
def test_kv_bytes_at_32k_both_patterns(size):
    """KV cache bytes at 32768 positions, bf16, batch 1: sliding layers hold `sliding_window` slots, global layers
    every position; every layer global holds every position everywhere."""
    cfg = gl.Gemma3Config.preset(size)
    n = 32768
    per_pos = 2 * cfg.num_key_value_heads * cfg.head_dim * 2  # k and v, bf16
    n_full = cfg.layer_types.count("full_attention")
    sliding = gl.KVCache(cfg, 1, n, "bfloat16")
    assert sliding.nbytes == per_pos * (n_full * n + (cfg.num_hidden_layers - n_full) * cfg.sliding_window)
    cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    full = gl.KVCache(cfg, 1, n, "bfloat16")
    assert full.nbytes == per_pos * cfg.num_hidden_layers * n
    assert gl.KVCache(cfg, 2, n, "float32").nbytes == 4 * full.nbytes  # batch 2, f32
    print(f"{size}: KV cache at 32k, bf16: 5:1 {sliding.nbytes / 2**20:.0f} MiB, all global "
          f"{full.nbytes / 2**20:.0f} MiB ({full.nbytes / sliding.nbytes:.1f}x)")


@pytest.fixture(scope="module")
def hd64_dir(tmp_path_factory):
    """A tiny model with head_dim 64 (the decode kernel's AVX-512 path needs head_dim % 64 == 0; conftest's models
    have 16 to 32) and a window of 8."""
    d = str(tmp_path_factory.mktemp("hd64"))
    build_hf(d, seed=7, head_dim=64, sliding_window=8, num_attention_heads=4, num_key_value_heads=1)
    return d


def test_decode_over_long_past_equals_one_pass(hd64_dir):
    """Decode steps after a prompt many windows long (split-K over a global layer's past and a sliding layer's ring)
    give the logits of one pass over the whole sequence: f32 cache to summation order, bf16 cache (its rows widened
    in the decode kernel's permuted order) within what bf16 itself costs."""
    ids = np.random.default_rng(5).integers(0, 320, (1, 300))
    for dtype in ("float32", "bfloat16"):
        model = gl.load(hd64_dir, dtype=dtype)
        full = model.forward(ids)
        cache = model.new_cache(max_seq_len=320)
        model.forward(ids[:, :280], cache=cache)
        steps = np.concatenate([model.forward(ids[:, t:t + 1], cache=cache) for t in range(280, 298)]
                               + [model.forward(ids[:, 298:300], cache=cache)], 1)  # and a 2-position step
        if dtype == "float32":
            assert rel_err(steps, full[:, 280:]) <= 1e-5
        else:  # as tests/test_cache.py's bf16 case: bounded by the bf16 model's own distance from the f32 one
            ref32 = gl.load(hd64_dir).forward(ids)[:, 280:]
            assert rel_err(steps, full[:, 280:]) <= rel_err(full[:, 280:], ref32)
            assert (steps.argmax(-1) == full[:, 280:].argmax(-1)).all()


@pytest.fixture(scope="module")
def big_vocab_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("big-vocab"))
    build_hf(d, vocab_size=262144, hidden_size=32, intermediate_size=32, num_hidden_layers=1, head_dim=16,
             num_attention_heads=2, num_key_value_heads=1)
    return d


def test_long_input_allocations_refused_with_the_fix(big_vocab_dir, tiny_dir):
    """All-position logits of 2^20 positions x 262144 (1.1 TB) and a pattern hook's [1, 4, 2^20, 2^20] scores are
    refused before anything is allocated or computed, naming what would fit; next_token_logits of the same input
    is what generation uses (last position only)."""
    ids = np.zeros((1, 1 << 20), np.int64)
    model = gl.load(big_vocab_dir)
    with pytest.raises(MemoryError, match=r"logits of every position, a float32 \[1, 1048576, 262144\].*next_token_logits"):
        model.forward(ids, allow_longer=True)
    with pytest.raises(MemoryError, match="next_token_logits"):
        model.forward(ids, return_type="loss", allow_longer=True)
    tiny = gl.load(tiny_dir)
    with pytest.raises(MemoryError, match=r"hook_attn_scores / hook_pattern over 1048576 positions.*\[1, 4, 1048576, "
                                          r"1048576\].*KV cache"):
        tiny.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda a, hook: None)], return_type=None,
                            allow_longer=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["tiny", "hd64"])
def test_chunked_prefill_equals_one_pass(hf_models, hd64_dir, which, dtype):
    """A prompt longer than model.prefill_chunk runs as chunks through the KV cache (a temporary one without a cache):
    the last position's logits and the decode steps after it equal one pass's (prefill_chunk = 0), and HF's; left
    padding longer than a chunk, cache_rows, and return_type=None too. Hooks, a cache that already holds positions,
    or per-position outputs keep the one pass (a hook sees the whole input)."""
    from transformers import Gemma3ForCausalLM

    path = hf_models["mqa_scaled_softcap"][1] if which == "tiny" else hd64_dir
    model = gl.load(path, dtype=dtype)
    assert model.prefill_chunk == 2048
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 320, (2, 70))
    mask = np.ones_like(ids)
    mask[1, :23] = 0  # row 1: 23 positions of padding, more than one chunk of 16

    def run(chunk, **kw):
        model.prefill_chunk = chunk
        cache = model.new_cache(batch=2, max_seq_len=80)
        first = model.next_token_logits(ids, cache=cache, attention_mask=mask)
        steps = [first] + [model.next_token_logits(rng_steps[:, t:t + 1], cache=cache) for t in range(4)]
        return np.stack(steps, 1), cache.seq_len, model.next_token_logits(ids[:1])

    rng_steps = rng.integers(0, 320, (2, 4))
    one, n_one, nocache_one = run(0)
    chunked, n_chunked, nocache_chunked = run(16)
    assert n_one == n_chunked == 74
    # bf16: the order of the attention's sums, then bf16 matmul inputs. On AMX (and AMD's AVX512_BF16) the one pass's 70
    # positions take the bf16 attention matmuls (q and the probabilities rounded to bf16 as HF's bf16 run does; README,
    # "CPU classes") and the chunks of 16 the f32 attention kernel: ~1% apart in these random models (a misplaced
    # position is O(1))
    amx_attention = gl.cpu_info()["attention_bf16_prefill"] in ("onednn_amx", "onednn_avx512_bf16")
    tol = 1e-5 if dtype == "float32" else 3e-2 if amx_attention else 2e-3
    assert rel_err(chunked, one) <= tol
    assert rel_err(nocache_chunked, nocache_one) <= tol
    # the independent reference: HF on the same padded batch, last position (f32 only: the bound of test_model_hf)
    if dtype == "float32":
        hf = Gemma3ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        ref = hf_logits(hf, ids, attention_mask=mask)[:, -1]
        assert rel_err(chunked[:, 0], ref) <= 1e-4
    # cache_rows: rows 2 and 0 of a batch-3 cache
    model.prefill_chunk = 16
    big = model.new_cache(batch=3, max_seq_len=80)
    got = model.next_token_logits(ids, cache=big, attention_mask=mask, cache_rows=[2, 0])
    assert rel_err(got, one[:, 0]) <= tol and big.seq_len == 70
    assert model.forward(ids, return_type=None) is None
    # hooks: one pass, the hook sees every position
    seen = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, h: seen.append(a.shape))]):
        model.next_token_logits(ids)
    assert seen == [(2, 70, model.config.hidden_size)]
    # a cache holding positions: the rest of the prompt in one pass (a chunk abandoned part-way could not be undone)
    cache = model.new_cache(batch=2, max_seq_len=80)
    model.next_token_logits(ids[:, :30], cache=cache, attention_mask=mask[:, :30])
    rest = model.next_token_logits(ids[:, 30:], cache=cache, attention_mask=mask)
    assert rel_err(rest, one[:, 0]) <= tol


def test_chunked_prefill_checks_the_whole_input_first(tiny_dir):
    """An input that cannot fit the cache, or holds a bad token id in a later chunk, is refused before the first
    chunk runs: the cache stays empty and usable; prefill_chunk takes non-negative ints only."""
    model = gl.load(tiny_dir)
    model.prefill_chunk = 8
    cache = model.new_cache(batch=1, max_seq_len=30)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.next_token_logits(np.arange(40)[None] % 300, cache=cache)
    bad = np.arange(25)[None] % 300
    bad[0, 20] = 10**6  # in the third chunk
    with pytest.raises(ValueError, match="out of range"):
        model.next_token_logits(bad, cache=cache)
    assert cache.seq_len == 0
    ok = model.next_token_logits(np.arange(25)[None] % 300, cache=cache)
    model.prefill_chunk = 0
    assert rel_err(ok, model.next_token_logits(np.arange(25)[None] % 300)) <= 1e-5
    for bad_value in (-1, 1.5, "8", True):
        with pytest.raises(ValueError, match="prefill_chunk"):
            model.prefill_chunk = bad_value
