"""KV cache: chunked forward equals one forward (also after the sliding-window rings wrap)."""
import numpy as np
import pytest

import gemmalens as gl
from conftest import rel_err


@pytest.mark.parametrize("name", ["mqa_scaled_softcap", "gqa4_hd24"])
@pytest.mark.parametrize("chunks", [[1] * 20, [7, 1, 1, 11], [3, 17], [20]])
def test_chunked_equals_full(hf_models, name, chunks):
    _, path = hf_models[name]
    model = gl.load(path)
    ids = np.random.default_rng(0).integers(0, 320, (2, sum(chunks)))
    full = model.forward(ids)
    cache = model.new_cache(batch=2, max_seq_len=64)
    outs, p = [], 0
    for c in chunks:
        outs.append(model.forward(ids[:, p:p + c], cache=cache))
        p += c
    assert cache.seq_len == p
    assert rel_err(np.concatenate(outs, 1), full) <= 1e-5


@pytest.mark.parametrize("weights", ["native", "int8", "int4"])
def test_bf16_chunked_equals_full(tiny_dir, weights):
    model = gl.load(tiny_dir, dtype="bfloat16", weights=weights)
    ids = np.arange(40, 70)
    full = model.forward(ids)
    cache = model.new_cache(max_seq_len=64)
    parts = [model.forward(ids[:9], cache=cache)] + [model.forward(ids[i:i + 1], cache=cache) for i in range(9, 30)]
    assert cache.dtype == "bfloat16"
    got = np.concatenate(parts, 1)
    # bf16 single-token steps take the decode kernels (ops/gemv_bf16.cpp, f32 attention over the bf16 cache), a long
    # pass oneDNN's matmuls (and, from 64 positions on an AMX machine, bf16 attention with bf16 probabilities); int8 /
    # int4 modes keep bf16 for the layers whose K is not a multiple of 64, as in this tiny model. The sums run in
    # another order, so an activation now and then rounds to the neighbouring bf16 value. Bound that by what bf16
    # itself costs against the f32 model (a cache bug costs O(1)), and ask for the same greedy tokens wherever the
    # choice is not a tie within that noise: with int8 / int4 activations a last-bit difference in the attention's
    # sums (decode steps run the split-K decode kernel, the long pass the tiled one) can move an activation to the
    # neighbouring quantisation step, and on this random tiny model two logits are sometimes closer than that.
    ref32 = gl.load(tiny_dir).forward(ids)
    assert rel_err(got, full) <= rel_err(full, ref32)
    top2 = np.sort(full, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2 * np.abs(got - full).max()
    assert clear.mean() >= 0.25  # a good share of clear choices: the check below is not vacuous
    assert (got.argmax(-1) == full.argmax(-1))[clear].all()


def test_padded_batch_with_cache(hf_models):
    _, path = hf_models["gqa2"]
    model = gl.load(path)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 320, 9), rng.integers(0, 320, 4)
    toks = np.stack([a, np.concatenate([np.zeros(5, int), b])])
    mask = np.stack([np.ones(9, int), np.r_[np.zeros(5, int), np.ones(4, int)]])
    cache = model.new_cache(batch=2, max_seq_len=32)
    model.forward(toks, attention_mask=mask, cache=cache)
    nxt = rng.integers(0, 320, (2, 6))
    step = np.concatenate([model.forward(nxt[:, i:i + 1], cache=cache) for i in range(6)], 1)
    for row, prefix in enumerate([a, b]):
        alone = model.forward(np.concatenate([prefix, nxt[row]]))[0, -6:]
        assert rel_err(step[row], alone) <= 1e-5


def test_copy_and_truncate(tiny_dir):
    model = gl.load(tiny_dir)  # sliding_window = 6
    ids = np.arange(1, 15)
    cache = model.new_cache(max_seq_len=32)
    model.forward(ids[:4], cache=cache)
    fork = cache.copy()
    out_a = model.forward(ids[4:6], cache=cache)
    out_b = model.forward(ids[4:6], cache=fork)
    np.testing.assert_array_equal(out_a, out_b)
    cache.truncate(4)  # the rings (6 slots) still hold positions 0..5
    assert cache.seq_len == 4
    np.testing.assert_array_equal(model.forward(ids[4:6], cache=cache), out_a)
    # once the rings have wrapped, going back past them is refused with a clear message
    model.forward(ids[6:14], cache=cache)
    with pytest.raises(ValueError, match="ring"):
        cache.truncate(3)
    assert cache.seq_len == 14
    cache.truncate(14)
    cache.truncate(0)
    np.testing.assert_array_equal(model.forward(ids[:4], cache=cache), model.forward(ids[:4]))


def test_cache_errors(tiny_dir):
    model = gl.load(tiny_dir)
    cache = model.new_cache(batch=1, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.forward(np.arange(1, 10), cache=cache)
    assert cache.seq_len == 0
    with pytest.raises(ValueError, match="batch"):
        model.forward(np.ones((2, 3), int), cache=cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.new_cache(max_seq_len=10**6)
    with pytest.raises(TypeError, match="new_cache"):
        model.forward([1, 2], cache=object())
    model.forward([1, 2, 3], cache=cache)
    assert cache.seq_len == 3 and cache.nbytes > 0


@pytest.mark.parametrize("name,dtype", [("mqa_scaled_softcap", "float32"), ("gqa4_hd24", "float32"),
                                        ("attn_softcap", "bfloat16")])
def test_long_context_decode_steps(hf_models, name, dtype):
    """Decode steps after a long prefix take the split-K attention path (keys read straight from the cache)."""
    _, path = hf_models[name]
    model = gl.load(path, dtype=dtype)
    ids = np.random.default_rng(7).integers(0, 320, (2, 306))
    full = model.forward(ids)
    cache = model.new_cache(batch=2, max_seq_len=320)
    model.forward(ids[:, :300], cache=cache)
    steps = np.concatenate([model.forward(ids[:, i:i + 1], cache=cache) for i in range(300, 304)]
                           + [model.forward(ids[:, 304:306], cache=cache)], 1)
    if dtype == "float32":
        assert rel_err(steps, full[:, 300:]) <= 1e-5
    else:  # decode kernel vs oneDNN: see test_bf16_chunked_equals_full
        ref32 = gl.load(path).forward(ids)[:, 300:]
        assert rel_err(steps, full[:, 300:]) <= rel_err(full[:, 300:], ref32)
        assert (steps.argmax(-1) == full[:, 300:].argmax(-1)).all()


def test_next_token_logits_is_the_last_position_of_forward(hf_models):
    """The step API: [batch, vocab] logits of the last position, alone, with a cache (prefill then one token per
    step), with left padding, and with registered hooks. Only the LM head's row count differs from forward(), so
    the logits agree to float32 rounding (1e-5 of their scale, as the chunked-cache tests)."""
    _, path = hf_models["gqa2"]
    model = gl.load(path)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 320, (2, 14))
    full = model.forward(ids)
    assert model.next_token_logits(ids).shape == (2, 320)
    assert rel_err(model.next_token_logits(ids), full[:, -1]) <= 1e-5
    cache = model.new_cache(batch=2, max_seq_len=32)
    steps = [model.next_token_logits(ids[:, :9], cache=cache)]
    steps += [model.next_token_logits(ids[:, i:i + 1], cache=cache) for i in range(9, 14)]
    assert cache.seq_len == 14
    assert rel_err(np.stack(steps, 1), full[:, 8:]) <= 1e-5
    # left padding: each row's last logits equal that row run alone
    a, b = ids[0, :10], ids[1, :6]
    toks = np.stack([a, np.r_[np.zeros(4, int), b]])
    mask = np.stack([np.ones(10, int), np.r_[np.zeros(4, int), np.ones(6, int)]])
    got = model.next_token_logits(toks, attention_mask=mask)
    assert rel_err(got[0], model.forward(a)[0, -1]) <= 1e-5 and rel_err(got[1], model.forward(b)[0, -1]) <= 1e-5
    # hooks registered with model.hooks(...) apply, as in forward
    v = rng.standard_normal(model.config.hidden_size)
    hooked = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post", gl.interventions.add(v))])
    assert rel_err(hooked, full) > 1e-2
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", gl.interventions.add(v))]):
        assert rel_err(model.next_token_logits(ids), hooked[:, -1]) <= 1e-5
    with pytest.raises(TypeError, match="new_cache"):
        model.next_token_logits(ids, cache=object())
