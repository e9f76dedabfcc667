"""Hooks: every site against HF (torch hooks on the corresponding modules), patching equivalence, API."""
import numpy as np
import pytest
import torch

import gemmalens as gl
from conftest import hf_logits, rel_err
from hf_hooks import hf_activations

EXPECTED_BLOCK = [
    "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "ln1.hook_out", "attn.hook_q", "attn.hook_k",
    "attn.hook_v", "attn.q_norm.hook_scale", "attn.q_norm.hook_normalized", "attn.q_norm.hook_out",
    "attn.hook_q_normed", "attn.k_norm.hook_scale", "attn.k_norm.hook_normalized", "attn.k_norm.hook_out",
    "attn.hook_k_normed", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern",
    "attn.hook_z", "ln1_post.hook_scale", "ln1_post.hook_normalized", "ln1_post.hook_out", "hook_attn_out",
    "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized", "ln2.hook_out", "mlp.hook_pre", "mlp.hook_pre_linear",
    "mlp.hook_post", "ln2_post.hook_scale", "ln2_post.hook_normalized", "ln2_post.hook_out", "hook_mlp_out",
    "hook_resid_post",
]
FINAL = ["ln_final.hook_scale", "ln_final.hook_normalized", "ln_final.hook_out"]


def test_exact_ordered_hook_names(tiny_dir):
    model = gl.load(tiny_dir)
    L = model.config.num_hidden_layers
    expected = ["hook_embed"] + [f"blocks.{i}.{s}" for i in range(L) for s in EXPECTED_BLOCK] + FINAL
    assert model.hook_names == expected


@pytest.mark.parametrize("name", ["mqa_scaled_softcap", "gqa4_hd24", "attn_softcap"])
def test_capture_every_site_matches_hf(hf_models, name):
    hf, path = hf_models[name]
    model = gl.load(path)
    ids = np.random.default_rng(0).integers(0, 320, (2, 13))
    logits, cache = model.run_with_cache(ids)
    ref, ref_logits = hf_activations(hf, ids)
    assert rel_err(logits, ref_logits) <= 1e-5
    assert list(cache) == model.hook_names
    for n in model.hook_names:
        ours, theirs = cache[n], ref[n]
        assert ours.shape == theirs.shape, n
        assert ours.dtype == np.float32
        if n.endswith("hook_attn_scores"):
            fin = np.isfinite(theirs)
            assert (np.isfinite(ours) == fin).all(), n  # masked: -inf, as in TransformerLens
            assert rel_err(ours[fin], theirs[fin]) <= 1e-5, n
        else:
            assert rel_err(ours, theirs) <= 1e-5, n


def test_cache_api(tiny_dir):
    model = gl.load(tiny_dir)
    ids = np.arange(1, 11)
    logits, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert len(cache) == model.config.num_hidden_layers
    np.testing.assert_array_equal(cache["resid_post", 3], cache["blocks.3.hook_resid_post"])
    assert cache["resid_post", 3].shape == (1, 10, model.config.hidden_size)
    assert cache.nbytes == sum(a.nbytes for a in cache.values())
    # Each captured array has its own storage (not a view of the model's workspace or of another capture): it stays
    # as it was through later forwards, and writing to one leaves the others alone.
    kept = {k: v.copy() for k, v in cache.items()}
    model.forward(np.arange(20, 30))
    model.run_with_cache(np.arange(30, 40), names_filter=lambda n: n.endswith("hook_resid_post"))
    for k in kept:
        np.testing.assert_array_equal(cache[k], kept[k])
    cache["blocks.3.hook_resid_post"][...] = 0
    np.testing.assert_array_equal(cache["blocks.2.hook_resid_post"], kept["blocks.2.hook_resid_post"])
    np.testing.assert_array_equal(cache["blocks.4.hook_resid_post"], kept["blocks.4.hook_resid_post"])
    with pytest.raises(KeyError, match="not captured"):
        cache["blocks.3.attn.hook_z"]
    with pytest.raises(KeyError, match="did you mean"):
        cache["blocks.3.hook_z"]
    assert "blocks.3.hook_resid_post" in cache and ("resid_post", 3) in cache and "blocks.3.attn.hook_z" not in cache
    _, c1 = model.run_with_cache(ids, names_filter="blocks.2.attn.hook_pattern")
    assert list(c1) == ["blocks.2.attn.hook_pattern"] and c1["pattern", 2].shape == (1, 4, 10, 10)
    _, c2 = model.run_with_cache(ids, names_filter=["hook_embed", "ln_final.hook_normalized"])
    assert c2["embed"].shape == (1, 10, 64)
    with pytest.raises(ValueError, match="did you mean"):
        model.run_with_cache(ids, names_filter=["blocks.2.hook_resid_pots"])


def test_stop_at_layer(tiny_dir):
    model = gl.load(tiny_dir)
    ids = np.arange(1, 11)
    _, full = model.run_with_cache(ids)
    resid, cache = model.run_with_cache(ids, stop_at_layer=3)
    assert rel_err(resid, full["blocks.3.hook_resid_pre"]) <= 1e-5
    assert all(not n.startswith(("blocks.3.", "blocks.4.", "ln_final")) for n in cache)
    assert "blocks.2.hook_resid_post" in cache
    last, _ = model.run_with_cache(ids, stop_at_layer=-1, names_filter=[])
    L = model.config.num_hidden_layers
    # the full run materialised every attention pattern (another summation order): f32 noise only
    assert rel_err(last, full[f"blocks.{L - 1}.hook_resid_pre"]) <= 1e-5


def test_patching_zero_mlp_out_matches_hf(hf_models):
    hf, path = hf_models["gqa2"]
    model = gl.load(path)
    ids = np.random.default_rng(1).integers(0, 320, (1, 12))
    ours = model.run_with_hooks(ids, fwd_hooks=[("blocks.3.hook_mlp_out", gl.interventions.zero())])
    py = model.run_with_hooks(ids, fwd_hooks=[("blocks.3.hook_mlp_out", lambda a, hook: np.zeros_like(a))])
    h = hf.model.layers[3].post_feedforward_layernorm.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        ref = hf_logits(hf, ids)
    finally:
        h.remove()
    assert rel_err(ours, ref) <= 1e-5 and rel_err(py, ref) <= 1e-5
    assert rel_err(model.forward(ids), ref) > 1e-3  # the ablation mattered, and no hook was left behind


def test_steering_during_generation_matches_hf(hf_models):
    hf, path = hf_models["mqa_scaled_softcap"]
    model = gl.load(path)
    vec = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    ids = [5, 17, 33, 2]
    with model.hooks(fwd_hooks=[("blocks.4.hook_resid_post", gl.interventions.add(vec, scale=3.0))]):
        ours = model.generate(ids, max_new_tokens=16, ignore_eos=True).tolist()
    plain = model.generate(ids, max_new_tokens=16, ignore_eos=True).tolist()
    h = hf.model.layers[4].register_forward_hook(lambda m, i, o: o + 3.0 * torch.as_tensor(vec))
    try:
        with torch.no_grad():
            ref = hf.generate(torch.as_tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
    finally:
        h.remove()
    assert ours == ref
    assert ours != plain


def test_replace_one_head_of_z_matches_hf(hf_models):
    hf, path = hf_models["gqa4_hd24"]
    model = gl.load(path)
    rng = np.random.default_rng(3)
    clean, corrupt = rng.integers(0, 320, (1, 10)), rng.integers(0, 320, (1, 10))
    _, cache = model.run_with_cache(clean, names_filter="blocks.2.attn.hook_z")
    zc = cache["z", 2]
    head = 5

    def patch(a, hook):
        a[:, :, head] = zc[:, :, head]

    ours = model.run_with_hooks(corrupt, fwd_hooks=[("blocks.2.attn.hook_z", patch)])
    H, Hd = 8, 24

    def hf_patch(mod, args):
        x = args[0].clone().reshape(1, 10, H, Hd)
        x[:, :, head] = torch.as_tensor(zc[:, :, head])
        return (x.reshape(1, 10, H * Hd),)

    h = hf.model.layers[2].self_attn.o_proj.register_forward_pre_hook(hf_patch)
    try:
        ref = hf_logits(hf, corrupt)
    finally:
        h.remove()
    assert rel_err(ours, ref) <= 1e-5
    # native replace of the whole z equals running the clean z through the rest of the model
    full = model.run_with_hooks(corrupt, fwd_hooks=[("blocks.2.attn.hook_z", gl.interventions.replace(zc))])
    h = hf.model.layers[2].self_attn.o_proj.register_forward_pre_hook(lambda m, a: (torch.as_tensor(zc.reshape(1, 10, -1)),))
    try:
        ref_full = hf_logits(hf, corrupt)
    finally:
        h.remove()
    assert rel_err(full, ref_full) <= 1e-5


def test_native_interventions_against_numpy(tiny_dir):
    model = gl.load(tiny_dir)
    ids = np.arange(3, 15)
    name = "blocks.2.hook_resid_mid"
    _, c = model.run_with_cache(ids, names_filter=name)
    x = c[name]
    rng = np.random.default_rng(4)
    v = rng.standard_normal(64).astype(np.float32)
    d = rng.standard_normal(64).astype(np.float32)

    def via_python(f):
        return model.run_with_hooks(ids, fwd_hooks=[(name, lambda a, hook: f(a.copy()).astype(np.float32))])

    def proj(a):
        return a - (a @ d)[..., None] * d / (d @ d)

    def add_pos(a):
        a[:, [1, -1]] += 2.0 * v
        return a

    cases = [
        (gl.interventions.add(v, scale=2.0, positions=[1, -1]), add_pos),
        (gl.interventions.scale(0.5), lambda a: a * 0.5),
        (gl.interventions.zero(positions=3), lambda a: np.where(np.arange(12)[None, :, None] == 3, 0, a)),
        (gl.interventions.project_out(d), proj),
        (gl.interventions.replace(x * 2), lambda a: x * 2),
    ]
    for native, ref in cases:
        np.testing.assert_allclose(model.run_with_hooks(ids, fwd_hooks=[(name, native)]), via_python(ref), rtol=0,
                                   atol=1e-4, equal_nan=False, err_msg=repr(native))
    # composition: two at one site apply in order
    both = model.run_with_hooks(ids, fwd_hooks=[(name, [gl.interventions.scale(0.5), gl.interventions.add(v)])])
    np.testing.assert_allclose(both, via_python(lambda a: a * 0.5 + v), rtol=0, atol=1e-4, equal_nan=False)
    # head ablation on hook_z, zero and mean
    zname = "blocks.1.attn.hook_z"
    for mode in ("zero", "mean"):
        def ref_ab(a, mode=mode):
            a[:, :, [0, 2]] = 0 if mode == "zero" else a[:, :, [0, 2]].mean(axis=(0, 1), keepdims=True)
            return a
        np.testing.assert_allclose(
            model.run_with_hooks(ids, fwd_hooks=[(zname, gl.interventions.ablate_heads([0, 2], mode=mode))]),
            model.run_with_hooks(ids, fwd_hooks=[(zname, lambda a, hook, f=ref_ab: f(a.copy()))]), rtol=0, atol=1e-4, equal_nan=False)


def test_hook_errors_leave_model_usable(tiny_dir):
    model = gl.load(tiny_dir)
    ids = np.arange(1, 8)
    clean = model.forward(ids)

    def boom(a, hook):
        raise RuntimeError("boom at " + hook.name)

    with pytest.raises(RuntimeError, match="boom at blocks.2.hook_resid_post"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.2.hook_resid_post", boom)])
    with pytest.raises(ValueError, match=r"returned shape \(1, 7\).*\(1, 7, 64\)"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.2.hook_resid_post", lambda a, h: a[..., 0])])
    with pytest.raises(TypeError, match="dtype"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.2.hook_resid_post", lambda a, h: a.astype(np.int32))])
    with pytest.raises(ValueError, match="did you mean"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.2.hook_resid_post_", lambda a, h: None)])
    with pytest.raises(ValueError, match="holds 64 per position"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.2.hook_resid_post", gl.interventions.add(np.ones(5)))])
    with pytest.raises(RuntimeError):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", boom)]):
            model.forward(ids)
    np.testing.assert_array_equal(model.forward(ids), clean)
    # a generate that fails in a hook leaves the model usable too
    with pytest.raises(RuntimeError):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", boom)]):
            model.generate([1, 2, 3], max_new_tokens=3)
    np.testing.assert_array_equal(model.forward(ids), clean)


def test_hooks_during_generation_see_new_positions(tiny_dir):
    model = gl.load(tiny_dir)
    shapes = []
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda a, h: shapes.append(a.shape)),
                                ("blocks.1.hook_resid_post", lambda a, h: shapes.append(a.shape))]):
        model.generate([1, 2, 3, 4], max_new_tokens=3, ignore_eos=True)
    assert shapes[:2] == [(1, 4, 4, 4), (1, 4, 64)]          # the prompt
    assert shapes[2:4] == [(1, 4, 1, 5), (1, 1, 64)]         # step 1: one new position, keys seen so far
    assert shapes[4:6] == [(1, 4, 1, 6), (1, 1, 64)]
    assert model._persistent_hooks == []


def test_filter_hooks_and_kept_arrays(tiny_dir):
    model = gl.load(tiny_dir)
    seen = []
    model.run_with_hooks(np.arange(1, 6), fwd_hooks=[(lambda n: n.endswith("hook_z"), lambda a, h: seen.append((h.name, h.layer, a)))])
    assert [s[0] for s in seen] == [f"blocks.{i}.attn.hook_z" for i in range(model.config.num_hidden_layers)]
    assert seen[3][1] == 3
    # arrays handed to hooks are the hook's to keep: later layers do not overwrite them
    assert not np.array_equal(seen[0][2], seen[1][2])


def test_transformer_lens_idioms_layer_method_and_negative_layers(tiny_dir):
    """TransformerLens: hook.layer() is a method; cache["resid_post", -1] is the last block's."""
    model = gl.load(tiny_dir)
    L = model.config.num_hidden_layers
    layers = []
    model.run_with_hooks(np.arange(1, 6), fwd_hooks=[
        (lambda n: n.endswith("hook_resid_post"), lambda a, h: layers.append((h.layer(), h.layer))),
        ("hook_embed", lambda a, h: layers.append(h.layer)),
    ])
    assert layers[0] is None and [x[0] for x in layers[1:]] == list(range(L))
    assert all(type(m) is int and m == a for m, a in layers[1:])
    _, cache = model.run_with_cache(np.arange(1, 6), names_filter=lambda n: "resid_post" in n or "pattern" in n)
    np.testing.assert_array_equal(cache["resid_post", -1], cache[f"blocks.{L - 1}.hook_resid_post"])
    np.testing.assert_array_equal(cache["pattern", -L], cache["blocks.0.attn.hook_pattern"])
    assert ("resid_post", -1) in cache
    with pytest.raises(KeyError):
        cache["resid_post", -L - 1]
    with pytest.raises(KeyError):
        cache["resid_post", L]


def test_the_cache_holds_the_edited_activation_as_transformer_lens_does(tiny_dir):
    """A site's cache entry is what the model went on with, after every edit at that site (TransformerLens's caching
    hooks run after the hooks in force): a zeroed site reads zero, and one block's resid_post equals the next
    block's resid_pre whatever edits are made -- for native interventions, Python hooks and model.hooks(...)."""
    model = gl.load(tiny_dir)
    toks = np.arange(1, 8, dtype=np.int32)[None]
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"]
    v = np.random.default_rng(0).standard_normal(model.config.hidden_size).astype(np.float32)
    for edits in ([("blocks.0.hook_resid_post", gl.interventions.zero())],
                  [("blocks.0.hook_resid_post", lambda a, hook: a * 0)],
                  [("blocks.0.hook_resid_post", gl.interventions.add(v, scale=3.0)),
                   ("blocks.1.attn.hook_z", gl.interventions.ablate_heads([0]))]):
        for ctx in (False, True):
            if ctx:
                with model.hooks(edits):
                    _, cache = model.run_with_cache(toks, names_filter=names)
            else:
                _, cache = model.run_with_cache(toks, names_filter=names, fwd_hooks=edits)
            np.testing.assert_array_equal(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
            if len(edits) == 1:
                assert not cache["blocks.0.hook_resid_post"].any()
            else:
                assert not cache["blocks.1.attn.hook_z"][:, :, 0].any() and cache["blocks.1.attn.hook_z"].any()


FAST_MODE_SITES = ["hook_embed"] + [f"blocks.{i}.{s}" for i in (0, 3, 6) for s in (
    "attn.hook_rot_q", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "mlp.hook_post", "hook_mlp_out",
    "hook_resid_post")] + ["ln_final.hook_out"]


@pytest.fixture(scope="module")
def hf16_reference(hf_models, tmp_path_factory):
    """HF's own bf16 run of the mqa_scaled_softcap model (the same seed, saved in bf16): its error against fp32 is
    the yardstick for gemmalens's bf16 mode."""
    from conftest import CONFIGS, build_hf

    name = "mqa_scaled_softcap"
    hf16 = build_hf(str(tmp_path_factory.mktemp("hf16")), seed=list(CONFIGS).index(name), torch_dtype=torch.bfloat16,
                    **CONFIGS[name])
    ids = np.random.default_rng(0).integers(0, 320, (2, 13))
    return ids, hf_activations(hf16, ids)[0]


@pytest.mark.parametrize("mode", ["bfloat16", "int8", "int8+bfloat16"])
def test_captures_in_fast_modes_against_hf_fp32(hf_models, hf16_reference, mode):
    """Hooks capture the right tensors in the bf16 and int8 weight modes: every site below (embedding; layers 0, 3
    and 6: rotated queries, pattern, z, attention out, MLP post-activation and out, residual; final norm) against HF
    fp32 eager, per site.

    Tolerances (rel_err: max abs error / max abs reference), measured on this model: bf16 (bf16 weights and matmul
    inputs, f32 activations) at most 0.022 per site and at most 1.41x HF bf16's own error at the same site (which also
    rounds every activation): bound 2x HF bf16's error and 0.05. int8 (int8 weight blocks and int8 activations at the
    matmuls; with or without bf16): at most 0.037 in layer 0 and 0.135 later (errors compound over the layers of
    random width-64 weights, test_model_hf.test_quantized_weights_against_hf): bounds 0.06 and 0.25. A capture of
    the wrong tensor or layer, or a garbled one, is off by ~1."""
    hf, path = hf_models["mqa_scaled_softcap"]
    ids, ref16 = hf16_reference
    kw = {"bfloat16": dict(dtype="bfloat16"), "int8": dict(weights="int8"),
          "int8+bfloat16": dict(weights="int8", dtype="bfloat16")}[mode]
    model = gl.load(path, **kw)
    assert (model.dtype, model.weights) == (kw.get("dtype", "float32"), kw.get("weights", "native"))
    ref, _ = hf_activations(hf, ids)
    _, cache = model.run_with_cache(ids, names_filter=FAST_MODE_SITES)
    assert list(cache) == FAST_MODE_SITES
    for n in FAST_MODE_SITES:
        ours = cache[n]
        assert ours.shape == ref[n].shape and ours.dtype == np.float32, n
        err = rel_err(ours, ref[n])
        if mode == "bfloat16":
            assert err <= min(2 * rel_err(ref16[n], ref[n]), 0.05), (n, err, rel_err(ref16[n], ref[n]))
        else:
            assert err <= (0.06 if n == "hook_embed" or n.startswith("blocks.0.") else 0.25), (n, err)
    for i in (0, 3, 6):  # attention patterns stay distributions
        np.testing.assert_allclose(cache[f"blocks.{i}.attn.hook_pattern"].sum(-1), 1.0, rtol=0, atol=1e-5)


def test_native_interventions_on_head_major_sites_against_numpy(tiny_dir):
    """Sites laid out [batch, head, pos, .] (hook_pattern, the q_norm / k_norm sites, hook_q_normed): positions
    select axis 2, ablate_heads axis 1 (zero and mean over batch and the selected positions), add / project_out act
    on a position's last axis -- each equal to the same edit written in numpy."""
    model = gl.load(tiny_dir)
    ids = np.random.default_rng(5).integers(0, 320, (2, 9))
    Hd = model.config.head_dim
    rng = np.random.default_rng(6)
    v, d = rng.standard_normal(Hd).astype(np.float32), rng.standard_normal(Hd).astype(np.float32)

    def mean_heads(a, heads, pos):
        m = a[:, heads][:, :, pos].mean(axis=(0, 2), keepdims=True)
        a[:, heads, pos[0]:pos[-1] + 1] = m
        return a

    cases = [
        ("blocks.2.attn.hook_pattern", gl.interventions.ablate_heads([1, 3]),
         lambda a: a * (np.arange(a.shape[1]) % 2 == 0)[None, :, None, None]),
        ("blocks.2.attn.hook_q_normed", gl.interventions.ablate_heads([0, 2], mode="mean", positions=[3, 4, 5]),
         lambda a: mean_heads(a, [0, 2], [3, 4, 5])),
        ("blocks.1.attn.q_norm.hook_normalized", gl.interventions.add(v, scale=0.5, positions=[-1]),
         lambda a: a + 0.5 * v * (np.arange(a.shape[2]) == a.shape[2] - 1)[None, None, :, None]),
        ("blocks.3.attn.k_norm.hook_out", gl.interventions.project_out(d),
         lambda a: a - (a @ d)[..., None] * d / (d @ d)),
        ("blocks.4.attn.q_norm.hook_scale", gl.interventions.scale(3.0, positions=[0, 2]),
         lambda a: a * np.where(np.isin(np.arange(a.shape[2]), [0, 2]), 3.0, 1.0)[None, None, :, None]),
    ]
    for name, native, ref in cases:
        py = model.run_with_hooks(ids, fwd_hooks=[(name, lambda a, hook, f=ref: f(a.copy()).astype(np.float32))])
        ours = model.run_with_hooks(ids, fwd_hooks=[(name, native)])
        np.testing.assert_allclose(ours, py, rtol=0, atol=1e-4, err_msg=name)
        assert np.abs(ours - model.forward(ids)).max() > 1e-3, name  # the edit mattered
