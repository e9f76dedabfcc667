"""Generation: greedy equals HF generate token for token (ring buffers wrapped), sampling, parameters."""
import numpy as np
import pytest
import torch

import gemmalens as gl
from gemmalens.sampling import SamplingParams
from sampling_reference import plain_probs


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.as_tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", ["mqa_scaled_softcap", "gqa4_hd24"])
def test_greedy_equals_hf_with_ring_wrap(hf_models, name):
    hf, path = hf_models[name]
    model = gl.load(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 320, 9).tolist()
    n = 24  # 9 + 24 positions: far past the sliding windows (5..7), the rings wrap several times
    ours = model.generate(ids, max_new_tokens=n, ignore_eos=True)
    assert isinstance(ours, np.ndarray) and len(ours) == n
    assert ours.tolist() == hf_greedy(hf, ids, n)


def test_batched_greedy_equals_single_and_hf(hf_models):
    hf, path = hf_models["gqa2"]
    model = gl.load(path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 320, n).tolist() for n in (3, 11, 6)]
    batched = model.generate(prompts, max_new_tokens=15, ignore_eos=True)
    assert len(batched) == 3
    for p, out in zip(prompts, batched):
        assert out.tolist() == model.generate(p, max_new_tokens=15, ignore_eos=True).tolist()
        assert out.tolist() == hf_greedy(hf, p, 15)


def test_stops_on_eos_and_stop_ids(hf_models):
    hf, path = hf_models["gqa2"]
    model = gl.load(path)
    ids = [5, 6, 7, 8]
    free = model.generate(ids, max_new_tokens=12, ignore_eos=True).tolist()
    stop_at = free[4]
    out = model.generate(ids, max_new_tokens=12, stop=[stop_at], ignore_eos=True).tolist()
    assert out == free[: free.index(stop_at) + 1]
    # stop= works beside the model's own eos ids (the model's own are tested in test_stops_on_the_models_own_eos...)
    k = next(i for i, t in enumerate(free) if t not in free[:i] and i > 0)  # the first step with a new token
    assert free[k] not in model.config.eos_token_id
    out2 = model.generate(ids, max_new_tokens=12, stop=free[k]).tolist()
    assert out2 == free[:k + 1]


def test_stream_matches(hf_models):
    _, path = hf_models["gqa2"]
    model = gl.load(path)
    full = model.generate([4, 5, 6], max_new_tokens=10, ignore_eos=True).tolist()
    assert list(model.generate([4, 5, 6], max_new_tokens=10, ignore_eos=True, stream=True)) == full


def test_seed_determinism_and_difference(hf_models):
    _, path = hf_models["gqa2"]
    model = gl.load(path)
    kw = dict(max_new_tokens=20, temperature=1.5, ignore_eos=True)
    a = model.generate([4, 5, 6], seed=7, **kw).tolist()
    assert a == model.generate([4, 5, 6], seed=7, **kw).tolist()
    assert a != model.generate([4, 5, 6], seed=8, **kw).tolist()


def test_filters_never_emit_excluded_tokens():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50) * 3
    order = np.argsort(-logits)
    p_full = np.exp(logits - logits.max())
    p_full /= p_full.sum()
    cases = [
        (dict(top_k=5), set(order[:5].tolist())),
        (dict(top_p=0.5), set(order[: int(np.searchsorted(np.cumsum(p_full[order]), 0.5)) + 1].tolist())),
        (dict(min_p=0.2), set(np.nonzero(p_full >= 0.2 * p_full.max())[0].tolist())),
    ]
    for kw, allowed in cases:
        sp = SamplingParams(temperature=1.0, seed=0, **kw)
        drawn = {sp.sample(logits) for _ in range(2000)}
        assert drawn <= allowed, kw
        assert len(drawn) == len(allowed) or len(allowed) > 10


def _rows():
    rng = np.random.default_rng(3)
    for n in (50, 1000, 262144):
        yield n, "normal", rng.standard_normal(n) * 3
        yield n, "peaked", rng.standard_normal(n) * 12
        yield n, "flat", rng.standard_normal(n) * 0.05
        yield n, "ties", np.round(rng.standard_normal(n) * 2)  # many equal logits, at the top-k / top-p edges too
        masked = rng.standard_normal(n).astype(np.float32) * 4
        masked[rng.random(n) < 0.3] = -np.inf
        yield n, "float32 with -inf", masked


@pytest.mark.parametrize("kw", [
    dict(), dict(top_k=40), dict(top_p=0.5), dict(top_p=0.9), dict(top_p=0.999), dict(top_k=64, top_p=0.95),
    dict(min_p=0.05), dict(top_p=0.9, min_p=0.1), dict(top_k=300, top_p=0.99, min_p=0.01),
    dict(temperature=0.7, repetition_penalty=1.3), dict(temperature=0.0, repetition_penalty=1.3),
])
def test_sampler_equals_plain_numpy_bit_for_bit(kw):
    # The same distribution to the bit, and the same ids as numpy's Generator.choice(n, p=p) draws from the plain
    # distribution with the same seed: a seed gives the same text as with the direct version.
    kw = dict(dict(temperature=1.0), **kw)
    seen = [1, 5, 7, 40, 5]
    for n, name, logits in _rows():
        sp = SamplingParams(seed=11, **kw)
        ref = (np.eye(1, n, int(np.argmax(plain_probs(1.0, None, None, None, kw.get("repetition_penalty"), logits, seen))))[0]
               if kw["temperature"] == 0 else
               plain_probs(kw["temperature"], kw.get("top_k"), kw.get("top_p"), kw.get("min_p"),
                           kw.get("repetition_penalty"), logits, seen))
        got = sp.probs(logits, seen=seen)
        assert np.array_equal(got, ref), (n, name, kw)
        rng = np.random.default_rng(11)
        for _ in range(5):
            want = int(np.argmax(ref)) if kw["temperature"] == 0 else int(rng.choice(n, p=ref))
            assert sp.sample(logits, seen=seen) == want, (n, name, kw)


def test_sampler_filters_match_hf_logits_warpers():
    # The independent reference: transformers' own processors in generate's order (repetition penalty, then
    # temperature, top-k, top-p, min-p), softmax of what they leave.
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    rng = np.random.default_rng(5)
    seen = [3, 9, 27]
    for n, scale in ((1000, 3.0), (262144, 3.0), (262144, 0.3)):
        logits = rng.standard_normal(n) * scale
        for kw in (dict(top_k=50), dict(top_p=0.9), dict(top_k=100, top_p=0.8, min_p=0.05), dict(min_p=0.1),
                   dict(top_p=0.95, repetition_penalty=1.5)):
            procs = []
            if kw.get("repetition_penalty"):
                procs.append(RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
            procs.append(TemperatureLogitsWarper(0.8))
            if kw.get("top_k"):
                procs.append(TopKLogitsWarper(kw["top_k"]))
            if kw.get("top_p"):
                procs.append(TopPLogitsWarper(kw["top_p"]))
            if kw.get("min_p"):
                procs.append(MinPLogitsWarper(kw["min_p"]))
            ids = torch.as_tensor([seen])
            s = torch.as_tensor(logits[None], dtype=torch.float64)
            for proc in procs:
                s = proc(ids, s)
            want = torch.softmax(s, dim=-1)[0].numpy()
            got = SamplingParams(temperature=0.8, seed=0, **kw).probs(logits, seen=seen)
            assert np.array_equal(got > 0, want > 0), (n, scale, kw)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_sampler_rejects_non_finite_logits():
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=0)
    for bad in (np.array([0.0, np.nan, 1.0]), np.array([0.0, np.inf, 1.0])):
        with pytest.raises(ValueError, match="NaN or infinity"):
            sp.sample(bad)
    assert sp.sample(np.array([0.0, 50.0, 1.0])) == 1  # usable afterwards
    with pytest.raises(ValueError, match="one non-empty row"):
        sp.sample(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="one non-empty row"):  # the greedy shortcut checks it too
        SamplingParams(temperature=0.0).sample(np.zeros((2, 3)))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_refuses_seen_ids_outside_the_row(temperature):
    # A negative id would otherwise penalise a token counted from the end, a too-large one raise an IndexError.
    sp = SamplingParams(temperature=temperature, repetition_penalty=1.5, seed=0)
    for seen in ([1, -1], [1, 4]):
        with pytest.raises(ValueError, match="outside the row's"):
            sp.sample(np.array([0.0, 1.0, 2.0, 3.0]), seen=seen)
    assert sp.sample(np.array([0.0, 1.0, 9.0, 3.0]), seen=[0, 3]) in range(4)  # usable afterwards


def test_temperature_shapes_distribution():
    logits = np.array([2.0, 1.0, 0.0, -1.0])
    for T in (0.5, 1.0, 2.0):
        sp = SamplingParams(temperature=T, seed=1)
        draws = np.array([sp.sample(logits) for _ in range(20000)])
        freq = np.bincount(draws, minlength=4) / len(draws)
        expected = np.exp(logits / T) / np.exp(logits / T).sum()
        # multinomial standard error at n=20000 is <= 0.0036: 5 sigma
        assert np.abs(freq - expected).max() < 0.018, (T, freq, expected)


def test_repetition_penalty_hf_semantics():
    sp = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    logits = np.array([3.0, 2.9, -1.0, 0.5])
    assert sp.sample(logits) == 0
    assert sp.sample(logits, seen=[0]) == 1  # 3.0 / 2 = 1.5 < 2.9
    p = SamplingParams(temperature=1.0, repetition_penalty=2.0).probs(logits, seen=[2])
    ref = np.array([3.0, 2.9, -2.0, 0.5])
    np.testing.assert_allclose(p, np.exp(ref) / np.exp(ref).sum())


@pytest.mark.parametrize("kw,msg", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(temperature=-1), "temperature"),
    (dict(min_p=2), "min_p"),
    (dict(max_new_tokens=10**6), "max_seq_len"),
    (dict(stop=[10**7]), "stop token id"),
])
def test_invalid_parameters(tiny_dir, kw, msg):
    model = gl.load(tiny_dir)
    with pytest.raises(ValueError, match=msg):
        model.generate([1, 2, 3], **kw)


def test_invalid_prompts(tiny_dir):
    model = gl.load(tiny_dir)
    with pytest.raises(ValueError, match="empty"):
        model.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate("text needs a tokenizer", max_new_tokens=2)
    with pytest.raises(ValueError, match="out of range"):
        model.generate([1, 10**6], max_new_tokens=2)
    assert len(model.generate([1, 2], max_new_tokens=0)) == 0


def test_max_seq_len_from_load(tiny_dir):
    model = gl.load(tiny_dir, max_seq_len=16)
    assert model.max_seq_len == 16 and model.new_cache().max_seq_len == 16
    with pytest.raises(ValueError, match="max_seq_len = 16"):
        model.generate(list(range(1, 10)), max_new_tokens=8)
    assert len(model.generate(list(range(1, 10)), max_new_tokens=7, ignore_eos=True)) == 7


def test_cache_memory_formula_1b_8k_bf16():
    cfg = gl.Gemma3Config.preset("1b")
    cache = gl.KVCache(cfg, 1, 8192, "bfloat16")
    n_full = cfg.layer_types.count("full_attention")
    n_slide = cfg.num_hidden_layers - n_full
    per_pos = 2 * cfg.num_key_value_heads * cfg.head_dim * 2  # k and v, bf16
    expected = per_pos * (n_full * 8192 + n_slide * cfg.sliding_window)
    assert cache.nbytes == expected
    print(f"1b bf16 KV cache at 8192 positions: {cache.nbytes / 2**20:.1f} MiB "
          f"(a cache without rings: {per_pos * 26 * 8192 / 2**20:.1f} MiB)")


def _with_eos(hf, src, dst, config_eos, generation_eos=None):
    """The model at src saved again with other stop ids: config.json's eos_token_id, and a generation_config.json
    (HF's generate reads the latter)."""
    import json
    import os
    import shutil
    shutil.copytree(src, dst)
    with open(f"{dst}/config.json") as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = config_eos
    with open(f"{dst}/config.json", "w") as f:
        json.dump(cfg, f)
    os.remove(f"{dst}/generation_config.json")  # save_pretrained's default (eos 1), which would win
    if generation_eos is not None:
        with open(f"{dst}/generation_config.json", "w") as f:
            json.dump({"eos_token_id": generation_eos, "bos_token_id": 2, "pad_token_id": 0}, f)
    return dst


def test_stops_on_the_models_own_eos_as_hf_generate(hf_models, tmp_path):
    """Without stop= or ignore_eos, generation ends on an id of the model's eos_token_id (Gemma 3: eos 1 and
    <end_of_turn> 106, a list): here ids that greedy decoding reaches a few steps in, in config.json and then in
    generation_config.json; HF's generate with the same stop ids ends at the same token, batched rows each at their
    own."""
    hf, path = hf_models["gqa2"]
    base = gl.load(path)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    free = [base.generate(p, max_new_tokens=12, ignore_eos=True).tolist() for p in prompts]
    first = lambda seq, avoid: next(t for t in seq[1:] if t not in avoid)  # noqa: E731  (greedy repeats itself)
    a = first(free[0], {free[0][0]})
    b = first(free[1], set(free[0][: free[0].index(a) + 1]) | {free[1][0]})
    stops = [a, b]
    want = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.as_tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=stops,
                              pad_token_id=0)
        want.append(out[0, len(p):].tolist())
    assert all(w[-1] in stops and len(w) < 12 for w in want)  # the references do stop early
    for name, cfg_eos, gen_eos in (("config", stops, None), ("generation_config", 1, stops)):
        model = gl.load(_with_eos(hf, path, str(tmp_path / name), cfg_eos, gen_eos))
        for p, w in zip(prompts, want):
            assert model.generate(p, max_new_tokens=12).tolist() == w, name
        batched = model.generate(prompts, max_new_tokens=12)
        assert [o.tolist() for o in batched] == want, name
        assert model.generate(prompts[0], max_new_tokens=12, ignore_eos=True).tolist() == free[0]
