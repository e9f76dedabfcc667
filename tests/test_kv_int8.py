"""An int8 KV cache (model.new_cache(kv_dtype="int8"), generate(kv_dtype="int8"), the CLI's --kv-dtype int8): keys
and values held as int8 blocks of 32 with an f32 scale each (csrc/ops/attention.h). The kernels against numpy on
the dequantised past are in tests/test_ops.py (every decode path, the prefill paths, per forced CPU class through
tests/test_isa.py); here the model: its size, its logits against the exact cache's, and the cache's operations
(copy, truncate, batching with left padding, place_row / shift) on quantised rows."""
import numpy as np
import pytest

import gemmalens as gl


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, tiny_dir):
    return gl.load(tiny_dir, dtype=request.param)


def _ids(n, seed=0):
    return np.random.default_rng(seed).integers(3, 300, n).tolist()


def test_int8_cache_is_smaller_and_says_so(model):
    exact = model.new_cache(batch=2, max_seq_len=64)
    q8 = model.new_cache(batch=2, max_seq_len=64, kv_dtype="int8")
    assert (exact.kv_dtype, q8.kv_dtype) == (model.dtype, "int8")
    assert q8.dtype == model.dtype  # passes over it compute in the model's dtype
    hd = model.config.head_dim
    per_value = (hd + hd // 32 * 4) / hd  # int8 values and an f32 scale per 32
    assert q8.nbytes / exact.nbytes == pytest.approx(per_value / (4 if model.dtype == "float32" else 2))
    assert model.new_cache(batch=1, max_seq_len=8, kv_dtype=model.dtype).kv_dtype == model.dtype


def test_int8_cache_decodes_close_to_the_exact_cache(model):
    """A prefill then 12 decode steps (past the sliding window of 6, so the rings wrap): logits within the
    quantisation's error of the exact cache's, and not equal to them (the int8 path ran)."""
    ids = _ids(40)
    caches = {kv: model.new_cache(batch=1, max_seq_len=64, kv_dtype=kv) for kv in (None, "int8")}
    out = {kv: [model.next_token_logits([ids[:28]], cache=c)] for kv, c in caches.items()}
    for t in ids[28:]:
        for kv, c in caches.items():
            out[kv].append(model.next_token_logits([[t]], cache=c))
    exact, q8 = np.stack(out[None]), np.stack(out["int8"])
    scale = np.abs(exact).max()
    err = np.abs(q8 - exact).max() / scale
    assert 1e-5 < err < 3e-2, err
    # and the same order of logits where it matters: the top token of most steps
    agree = np.mean(exact.argmax(-1) == q8.argmax(-1))
    assert agree >= 0.75, agree


def test_int8_cache_copy_and_truncate_replay_exactly(model):
    """copy() and truncate() keep the quantised rows: decoding on from a copy, or again after a truncate, gives the
    same logits bit for bit."""
    ids = _ids(30, seed=1)
    c = model.new_cache(batch=1, max_seq_len=64, kv_dtype="int8")
    model.next_token_logits([ids[:12]], cache=c)
    branch = c.copy()
    assert branch.kv_dtype == "int8"
    first = [model.next_token_logits([[t]], cache=c) for t in ids[12:16]]
    again = [model.next_token_logits([[t]], cache=branch) for t in ids[12:16]]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    c.truncate(15)  # one step back (the sliding rings of 6 slots still hold the window before it)
    np.testing.assert_array_equal(model.next_token_logits([[ids[15]]], cache=c), first[3])


def test_int8_cache_generate_batched_rows_equal_their_own_runs(model):
    """generate(kv_dtype="int8") of prompts of different lengths (left padding) in one batch: each row's ids equal
    its prompt run alone with an int8 cache (rows are quantised row by row)."""
    prompts = [_ids(9, seed=2), _ids(17, seed=3)]
    batched = model.generate(prompts, max_new_tokens=10, kv_dtype="int8", ignore_eos=True)
    for p, got in zip(prompts, batched):
        np.testing.assert_array_equal(got, model.generate(p, max_new_tokens=10, kv_dtype="int8", ignore_eos=True))


def test_int8_cache_place_row_and_shift(model):
    """The serving engine's moves on an int8 cache: a prompt's own cache placed into a row of a batch cache (after
    shift() makes room) decodes as the prompt's cache itself."""
    a, b = _ids(10, seed=4), _ids(16, seed=5)
    big = model.new_cache(batch=2, max_seq_len=64, kv_dtype="int8")
    own_a = model.new_cache(batch=1, max_seq_len=64, kv_dtype="int8")
    la = model.next_token_logits([a], cache=own_a)
    own_b = model.new_cache(batch=1, max_seq_len=64, kv_dtype="int8")
    lb = model.next_token_logits([b], cache=own_b)
    assert la.shape == lb.shape
    big.shift(len(a))
    big.place_row(0, own_a)
    big.shift(len(b) - len(a))
    big.place_row(1, own_b)
    got = model.next_token_logits([[7], [11]], cache=big)
    want = np.concatenate([model.next_token_logits([[7]], cache=own_a), model.next_token_logits([[11]], cache=own_b)])
    # the same quantised rows; a batch of 2 only sums in another order
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.abs(got - want).max() < 1e-3 * np.abs(got - la).max()  # far closer than to the step before


def test_kv_dtype_refusals(model):
    other = "bfloat16" if model.dtype == "float32" else "float32"
    for bad in ("int4", "q8_0", other):
        with pytest.raises(ValueError, match="kv_dtype must be None .* or 'int8'"):
            model.new_cache(batch=1, max_seq_len=8, kv_dtype=bad)
        with pytest.raises(ValueError, match="kv_dtype must be None .* or 'int8'"):
            model.generate([5, 6], max_new_tokens=1, kv_dtype=bad)
    with pytest.raises(ValueError, match="kv_dtype must be None .* or 'int8', got a int"):
        model.new_cache(batch=1, max_seq_len=8, kv_dtype=8)
    # a cache of another kv_dtype is not placed into this one
    exact = model.new_cache(batch=1, max_seq_len=16)
    model.next_token_logits([[5, 6, 7]], cache=exact)
    q8 = model.new_cache(batch=1, max_seq_len=16, kv_dtype="int8")
    q8.shift(3)
    with pytest.raises(ValueError, match="another model, dtype or kv_dtype"):
        q8.place_row(0, exact)
    # the standalone cache (for sizing) takes and refuses the same
    sized = gl.KVCache(model.config, 1, 8, model.dtype, kv_dtype="int8")
    assert sized.kv_dtype == "int8" and sized.nbytes == model.new_cache(batch=1, max_seq_len=8, kv_dtype="int8").nbytes
    with pytest.raises(ValueError, match="kv_dtype must be None .* or 'int8', got 'fp8'"):
        gl.KVCache(model.config, 1, 8, model.dtype, kv_dtype="fp8")
    # the model stays usable
    assert model.new_cache(batch=1, max_seq_len=8, kv_dtype="int8").kv_dtype == "int8"


def test_kv_int8_refuses_a_head_dim_off_its_blocks(hf_models):
    m = gl.load(hf_models["gqa4_hd24"][1])  # head_dim 24
    with pytest.raises(ValueError, match="kv_dtype 'int8' needs head_dim to be a multiple of 32 .*24"):
        m.new_cache(batch=1, max_seq_len=8, kv_dtype="int8")


def test_int8_cache_under_the_pattern_hooks(model):
    """A hook on hook_attn_scores / hook_pattern makes a layer materialise its scores and pattern (the hooks' path,
    csrc/ops/attention.cpp) instead of the fused kernels: over an int8 cache both read the same dequantised keys and
    values, so a decode step with do-nothing hooks on every layer gives the fused step's logits."""
    ids = _ids(20, seed=6)
    L = model.config.num_hidden_layers
    seen = []

    def keep(a, hook):
        seen.append(a.shape)
        return a

    plain = model.new_cache(batch=1, max_seq_len=32, kv_dtype="int8")
    model.next_token_logits([ids[:19]], cache=plain)
    hooked = plain.copy()
    want = model.next_token_logits([[ids[19]]], cache=plain)
    names = [f"blocks.{i}.attn.hook_{s}" for i in range(L) for s in ("attn_scores", "pattern")]
    with model.hooks(fwd_hooks=[(n, keep) for n in names]):
        got = model.next_token_logits([[ids[19]]], cache=hooked)
    assert len(seen) == 2 * L and seen[-1][-1] == 20  # one query over all 20 positions
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_int8_cache_keeps_a_nan_visible(model):
    """A key an intervention made NaN reads back as NaN from an int8 cache (its block's scale is NaN), as it does
    from the exact cache: the next step's logits are NaN with either, not a silently finite answer."""
    ids = _ids(8, seed=7)

    def poison(a, hook):
        a = a.copy()
        a[:, 3] = np.nan
        return a

    for kv in (None, "int8"):
        c = model.new_cache(batch=1, max_seq_len=16, kv_dtype=kv)
        with model.hooks(fwd_hooks=[("blocks.5.attn.hook_k", poison)]):  # layer 5: global, sees position 3
            model.next_token_logits([ids[:6]], cache=c)
        assert np.isnan(model.next_token_logits([[ids[6]]], cache=c)).all(), kv
