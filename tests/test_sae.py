"""SAEs and transcoders: Gemma Scope 2 and SAELens folders, native math against numpy (and SAELens itself),
splicing against numpy-on-captured-activations, feature hooks, steering and ablation."""
import json
import os

import numpy as np
import pytest

import gemmalens as gl
from conftest import rel_err


def np_encode(x, W_enc, b_enc, threshold=None, b_dec=None, arch="jumprelu", k=0):
    xin = x - b_dec if b_dec is not None else x
    pre = xin.astype(np.float64) @ W_enc + b_enc
    if arch == "jumprelu":
        return np.where((pre > threshold) & (pre > 0), pre, 0.0)
    if arch == "relu":
        return np.maximum(pre, 0)
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=-1)[..., :k]
    np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
    return out


def random_sae(rng, d_in, d_sae, d_out=None, skip=False):
    d_out = d_out or d_in
    return dict(W_enc=(rng.standard_normal((d_in, d_sae)) * 0.2).astype(np.float32),
                b_enc=(rng.standard_normal(d_sae) * 0.1).astype(np.float32),
                threshold=np.abs(rng.standard_normal(d_sae) * 0.2).astype(np.float32),
                W_dec=(rng.standard_normal((d_sae, d_out)) * 0.2).astype(np.float32),
                b_dec=(rng.standard_normal(d_out) * 0.1).astype(np.float32),
                W_skip=(rng.standard_normal((d_in, d_out)) * 0.1).astype(np.float32) if skip else None)


def save_gemma_scope(d, p, hook_in, hook_out=None, model_name="gemma-v3-270m-pt", arch="jump_relu"):
    from safetensors.numpy import save_file

    os.makedirs(d, exist_ok=True)
    t = {"w_enc": p["W_enc"], "b_enc": p["b_enc"], "threshold": p["threshold"], "w_dec": p["W_dec"], "b_dec": p["b_dec"]}
    if p.get("W_skip") is not None:
        t["affine_skip_connection"] = p["W_skip"]
    save_file(t, os.path.join(d, "params.safetensors"))
    json.dump({"architecture": arch, "hf_hook_point_in": hook_in, "hf_hook_point_out": hook_out or hook_in,
               "width": p["W_enc"].shape[1], "l0": 10, "model_name": model_name}, open(os.path.join(d, "config.json"), "w"))
    return d


def save_saelens(d, p, hook_name, arch="jumprelu", apply_b_dec=False, k=None, model_name="gemma-3-270m"):
    from safetensors.numpy import save_file

    os.makedirs(d, exist_ok=True)
    t = {"W_enc": p["W_enc"], "b_enc": p["b_enc"], "W_dec": p["W_dec"], "b_dec": p["b_dec"]}
    if arch == "jumprelu":
        t["threshold"] = p["threshold"]
    save_file(t, os.path.join(d, "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": p["W_enc"].shape[0], "d_sae": p["W_enc"].shape[1], "hook_name": hook_name,
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none", "dtype": "float32", "device": "cpu",
           "model_name": model_name, "metadata": {"hook_name": hook_name, "model_name": model_name}}
    if k:
        cfg["k"] = k
    json.dump(cfg, open(os.path.join(d, "cfg.json"), "w"))
    return d


@pytest.mark.parametrize("fmt,arch", [("scope", "jumprelu"), ("saelens", "jumprelu"), ("saelens", "standard"),
                                      ("saelens", "topk")])
def test_encode_decode_topk_against_numpy(tmp_path, fmt, arch):
    rng = np.random.default_rng(0)
    p = random_sae(rng, 64, 300)
    if fmt == "scope":
        sae = gl.SAE.load(save_gemma_scope(str(tmp_path / "s"), p, "model.layers.3.output"))
        assert sae.hook_name == "blocks.3.hook_resid_post"
        b_dec_in = None
    else:
        sae = gl.SAE.load(save_saelens(str(tmp_path / "s"), p, "blocks.3.hook_resid_post", arch=arch,
                                       apply_b_dec=True, k=7 if arch == "topk" else None))
        b_dec_in = p["b_dec"]
    x = rng.standard_normal((2, 9, 64)).astype(np.float32)
    ref_arch = {"jumprelu": "jumprelu", "standard": "relu", "topk": "topk"}[arch]
    ref = np_encode(x, p["W_enc"], p["b_enc"], p["threshold"], b_dec_in, ref_arch, 7)
    acts = sae.encode(x)
    assert acts.shape == (2, 9, 300)
    np.testing.assert_allclose(acts, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sae.decode(acts), acts @ p["W_dec"] + p["b_dec"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sae(x), ref @ p["W_dec"] + p["b_dec"], rtol=1e-4, atol=1e-3)
    idx, val = sae.encode_topk(x, 5)
    assert idx.shape == (2, 9, 5) and idx.dtype == np.int32
    np.testing.assert_allclose(val, -np.sort(-ref, -1)[..., :5], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(ref, idx.astype(np.int64), -1), val, rtol=1e-4, atol=1e-4)
    # bf16 weights: values to bf16 precision (TopK excluded: a near-tie may pick another feature)
    if arch != "topk":
        a16 = gl.SAE.load(str(tmp_path / "s"), dtype="bfloat16").encode(x)
        assert rel_err(a16, ref) < 0.05


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_empty_batch_gives_empty_outputs(dtype):
    """An SAE fed no activations (a [0, d_in] or [2, 0, d_in] batch: an empty harvest shard, a filter that kept
    nothing) returns empty outputs of the right shapes, as numpy's matmul does; it used to raise gemmalens's internal
    error from the matmul kernels (bf16 on every class, f32 on the AVX2 classes)."""
    rng = np.random.default_rng(5)
    p = random_sae(rng, 64, 128, skip=True)
    sae = gl.SAE(**p, architecture="jumprelu", dtype=dtype)
    for lead in ((0,), (2, 0)):
        x = np.zeros(lead + (64,), np.float32)
        assert sae.encode(x).shape == lead + (128,)
        assert sae(x).shape == lead + (64,)
        assert sae.decode(np.zeros(lead + (128,), np.float32), x).shape == lead + (64,)
        idx, val = sae.encode_topk(x, 3)
        assert idx.shape == val.shape == lead + (3,)
    x = (rng.standard_normal((4, 64)) * 3).astype(np.float32)  # and the SAE still computes afterwards
    ref = np_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    np.testing.assert_allclose(sae.encode(x), ref, atol=0.03 * np.abs(ref).max())


def test_against_saelens_itself(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    import torch

    rng = np.random.default_rng(1)
    p = random_sae(rng, 64, 128)
    d = save_saelens(str(tmp_path / "sl"), p, "blocks.2.hook_resid_post", arch="jumprelu", apply_b_dec=True)
    theirs = sae_lens.SAE.load_from_disk(d, device="cpu")
    ours = gl.SAE.load(d)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    with torch.no_grad():
        ta = theirs.encode(torch.as_tensor(x)).numpy()
        tr = theirs.decode(torch.as_tensor(ta)).numpy()
    np.testing.assert_allclose(ours.encode(x), ta, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.decode(ta), tr, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def small(hf_models):
    return gl.load(hf_models["mqa_scaled_softcap"][1])


def test_splice_with_and_without_error_term(small, tmp_path):
    model = small
    rng = np.random.default_rng(2)
    p = random_sae(rng, 64, 200)
    sae = gl.SAE.load(save_gemma_scope(str(tmp_path / "s"), p, "model.layers.4.output"))
    ids = rng.integers(0, 320, (2, 11))
    plain, cache = model.run_with_cache(ids, names_filter="blocks.4.hook_resid_post")
    x = cache["blocks.4.hook_resid_post"]
    recon = (np_encode(x, p["W_enc"], p["b_enc"], p["threshold"]) @ p["W_dec"] + p["b_dec"]).astype(np.float32)
    ref = model.run_with_hooks(ids, fwd_hooks=[("blocks.4.hook_resid_post", lambda a, h: recon)])
    spliced = model.run_with_saes(ids, saes=[sae])
    assert rel_err(spliced, ref) <= 1e-4
    with_err = model.run_with_saes(ids, saes=[sae], use_error_term=True)
    assert rel_err(with_err, plain) <= 1e-5
    # feature activations are hooks of the SAE, capturable
    with model.saes([sae], use_error_term=True):
        logits, c2 = model.run_with_cache(ids, names_filter=["blocks.4.hook_resid_post.hook_sae_acts_post",
                                                              "blocks.4.hook_resid_post"])
    acts = c2["blocks.4.hook_resid_post.hook_sae_acts_post"]
    np.testing.assert_allclose(acts, np_encode(x, p["W_enc"], p["b_enc"], p["threshold"]), rtol=1e-4, atol=1e-4)
    assert rel_err(logits, plain) <= 1e-5
    assert model._saes == []


def test_feature_edit_ablate_and_steer(small, tmp_path):
    model = small
    rng = np.random.default_rng(3)
    p = random_sae(rng, 64, 200)
    sae = gl.SAE.load(save_gemma_scope(str(tmp_path / "s"), p, "model.layers.2.output"))
    ids = rng.integers(0, 320, (1, 12))
    _, cache = model.run_with_cache(ids, names_filter="blocks.2.hook_resid_post")
    x = cache["blocks.2.hook_resid_post"]
    acts = np_encode(x, p["W_enc"], p["b_enc"], p["threshold"])
    feats = [int(f) for f in np.argsort(-(acts > 0).sum((0, 1)))[:3]]
    assert (acts[..., feats] > 0).any()
    expected_x = (x - acts[..., feats] @ p["W_dec"][feats]).astype(np.float32)
    ref = model.run_with_hooks(ids, fwd_hooks=[("blocks.2.hook_resid_post", lambda a, h: expected_x)])

    def zero_feats(a, hook):
        a[..., feats] = 0

    edited = model.run_with_saes(ids, saes=[sae], use_error_term=True,
                                 fwd_hooks=[("blocks.2.hook_resid_post.hook_sae_acts_post", zero_feats)])
    assert rel_err(edited, ref) <= 1e-4
    native = model.run_with_hooks(ids, fwd_hooks=[gl.interventions.ablate_features(sae, feats)])
    assert rel_err(native, ref) <= 1e-4
    # steering: + scale * W_dec[f] at the site; the next-token distribution moves exactly as computed
    f, s = feats[0], 6.0
    steered = model.run_with_hooks(ids, fwd_hooks=[gl.interventions.steer(sae, f, s)])
    ref_s = model.run_with_hooks(ids, fwd_hooks=[("blocks.2.hook_resid_post", lambda a, h: a + s * p["W_dec"][f])])
    assert rel_err(steered, ref_s) <= 1e-5
    with model.hooks(fwd_hooks=[gl.interventions.steer(sae, f, s)]):
        gen = model.generate(list(ids[0]), max_new_tokens=6, ignore_eos=True)
    assert gen[0] == int(ref_s[0, -1].argmax())


def test_transcoder_and_attention_sae(small, tmp_path):
    model = small
    cfg = model.config
    rng = np.random.default_rng(4)
    p = random_sae(rng, 64, 150, skip=True)
    tc = gl.SAE.load(save_gemma_scope(str(tmp_path / "tc"), p, "model.layers.3.pre_feedforward_layernorm.output",
                                      "model.layers.3.post_feedforward_layernorm.output"))
    # Gemma Scope 2 transcoders read pre_feedforward_layernorm's output: ln2's weighted output, TransformerLens's
    # ln2.hook_out (its ln2.hook_normalized is before the weight)
    assert (tc.hook_name, tc.hook_name_out) == ("blocks.3.ln2.hook_out", "blocks.3.hook_mlp_out")
    ids = rng.integers(0, 320, (1, 10))
    _, cache = model.run_with_cache(ids, names_filter="blocks.3.ln2.hook_out")
    x = cache["blocks.3.ln2.hook_out"]
    out = (np_encode(x, p["W_enc"], p["b_enc"], p["threshold"]) @ p["W_dec"] + p["b_dec"] + x @ p["W_skip"]).astype(np.float32)
    ref = model.run_with_hooks(ids, fwd_hooks=[("blocks.3.hook_mlp_out", lambda a, h: out)])
    assert rel_err(model.run_with_saes(ids, saes=[tc]), ref) <= 1e-4
    assert rel_err(model.run_with_saes(ids, saes=[tc], use_error_term=True), model.forward(ids)) <= 1e-5
    # attention-output SAE (Gemma Scope 2 attn_out): reads o_proj's input = hook_z flattened
    width = cfg.num_attention_heads * cfg.head_dim
    pa = random_sae(rng, width, 100)
    asae = gl.SAE.load(save_gemma_scope(str(tmp_path / "att"), pa, "model.layers.1.self_attn.o_proj.input"))
    assert asae.hook_name == "blocks.1.attn.hook_z"
    _, cz = model.run_with_cache(ids, names_filter="blocks.1.attn.hook_z")
    z = cz["blocks.1.attn.hook_z"]
    zf = z.reshape(1, 10, width)
    rz = (np_encode(zf, pa["W_enc"], pa["b_enc"], pa["threshold"]) @ pa["W_dec"] + pa["b_dec"]).astype(np.float32)
    ref_z = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", lambda a, h: rz.reshape(z.shape))])
    assert rel_err(model.run_with_saes(ids, saes=[asae]), ref_z) <= 1e-4


def test_mismatches_raise(small, tmp_path):
    rng = np.random.default_rng(5)
    bad = gl.SAE.load(save_gemma_scope(str(tmp_path / "b"), random_sae(rng, 32, 40), "model.layers.1.output"))
    with pytest.raises(ValueError, match="d_in = 32"):
        small.run_with_saes([1, 2, 3], saes=[bad])
    with pytest.raises(ValueError, match="blocks.99"):
        small.run_with_saes([1, 2], saes=[gl.SAE.load(save_gemma_scope(str(tmp_path / "x"), random_sae(rng, 64, 8),
                                                                       "model.layers.99.output"))])
    with pytest.raises(ValueError, match="neither"):
        gl.SAE.load(str(tmp_path))
    assert small.forward([1, 2, 3]).shape == (1, 3, 320)


def _saelens_sae(arch, d_in, d_sae, seed, **cfg):
    """A sae_lens SAE object with random parameters (thresholds around the pre-activations' scale)."""
    import sae_lens
    import torch
    from sae_lens.saes.sae import SAEMetadata

    classes = {"jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
               "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig)}
    sae_cls, cfg_cls = classes[arch]
    meta = SAEMetadata(hook_name=cfg.pop("hook_name"), model_name="gemma-3-270m")
    sae = sae_cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=meta, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if name != "threshold" else 0.3))
            if name == "threshold":
                p.abs_()
    return sae


@pytest.mark.parametrize("arch,cfg", [
    ("jumprelu", dict(apply_b_dec_to_input=False)),
    ("jumprelu", dict(apply_b_dec_to_input=True)),
    ("standard", dict(apply_b_dec_to_input=True)),
    ("topk", dict(k=9)),
    ("topk", dict(k=9, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=True)),
    ("standard", dict(reshape_activations="hook_z", hook_name="blocks.1.attn.hook_z")),
], ids=["jumprelu", "jumprelu_b_dec_in", "standard", "topk", "topk_rescaled", "hook_z"])
def test_folder_written_by_sae_lens(tmp_path, arch, cfg):
    """A folder written by sae_lens itself (SAE.save_model: its cfg.json, with the hook in its metadata, and
    sae_weights.safetensors) loads, and encodes / decodes as sae_lens does."""
    import torch

    cfg = dict(cfg)
    cfg.setdefault("hook_name", "blocks.2.hook_resid_post")
    hook = cfg["hook_name"]
    theirs = _saelens_sae(arch, 64, 200, seed=len(tmp_path.name), **cfg).eval()
    d = str(tmp_path / "saved")
    theirs.save_model(d)
    saved = json.load(open(os.path.join(d, "cfg.json")))
    assert saved["architecture"] == arch and saved["metadata"]["hook_name"] == hook and "hook_name" not in saved
    ours = gl.SAE.load(d)
    assert ours.hook_name == hook and ours.architecture == {"standard": "relu"}.get(arch, arch)
    x = np.random.default_rng(6).standard_normal((3, 7, 64)).astype(np.float32)
    with torch.no_grad():
        xt = torch.as_tensor(x)
        if hook.endswith("hook_z"):  # sae_lens reads hook_z as [..., heads, d_head] and flattens it
            xt = xt.reshape(3, 7, 4, 16)
        ta = theirs.encode(xt).numpy()
        tr = theirs.decode(torch.as_tensor(ta)).reshape(3, 7, 64).numpy()
    acts = ours.encode(x)
    assert (acts > 0).sum() >= 30 and (acts == 0).sum() >= 30  # a live, sparse code
    np.testing.assert_array_equal(acts > 0, ta > 0)
    np.testing.assert_allclose(acts, ta, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.decode(ta), tr, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours(x), tr, rtol=1e-4, atol=1e-4)


def test_saelens_head_sae_refused(tmp_path):
    p = random_sae(np.random.default_rng(7), 64, 40)
    d = save_saelens(str(tmp_path / "h"), p, "blocks.1.attn.hook_z")
    cfg = json.load(open(os.path.join(d, "cfg.json")))
    cfg["metadata"]["hook_head_index"] = 2
    json.dump(cfg, open(os.path.join(d, "cfg.json"), "w"))
    with pytest.raises(ValueError, match="hook_head_index=2"):
        gl.SAE.load(d)


def test_gemma_scope_2_affine_transcoder_orientation_against_saelens(tmp_path, monkeypatch):
    """A Gemma Scope 2 affine ("skip") transcoder folder (square: d_in = d_out, so a transposed affine_skip_connection
    would still fit), loaded by SAELens's own Gemma Scope 2 loader (SAE.from_pretrained of the
    gemma-scope-2-270m-pt-transcoders release, conversion_func gemma_3, which stores W_skip = affine_skip_connection.T
    and computes x @ W_skip.T), served from this folder instead of the hub. gemmalens's transcoder gives SAELens's
    output; with the skip matrix transposed it would not."""
    import sae_lens
    import torch
    from safetensors import safe_open
    from sae_lens.loading import pretrained_sae_loaders as loaders

    release, sae_id = "gemma-scope-2-270m-pt-transcoders", "transcoder/layer_9_width_16k_l0_small_affine"
    rng = np.random.default_rng(8)
    p = random_sae(rng, 64, 150, skip=True)
    p["W_skip"] = (rng.standard_normal((64, 64)) * 0.3).astype(np.float32)  # far from symmetric
    repo = tmp_path / "repo"
    folder = save_gemma_scope(str(repo / sae_id), p, "model.layers.9.pre_feedforward_layernorm.output",
                              "model.layers.9.post_feedforward_layernorm.output")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["affine_connection"] = True  # as the released affine transcoders' config.json says
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))

    def local_download(repo_id, filename, subfolder=None, **kw):
        return str(repo / (subfolder or "") / filename)

    def local_shapes(repo_id, filename):
        with safe_open(str(repo / filename), "np") as f:
            return {n: list(f.get_slice(n).get_shape()) for n in f.keys()}

    monkeypatch.setattr(loaders, "hf_hub_download", local_download)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", local_shapes)
    theirs = sae_lens.SAE.from_pretrained(release, sae_id, device="cpu")
    assert type(theirs).__name__ == "JumpReLUSkipTranscoder"
    np.testing.assert_array_equal(theirs.W_skip.detach().numpy(), p["W_skip"].T)
    ours = gl.SAE.load(folder)
    assert ours.is_transcoder and ours.W_skip is not None
    x = rng.standard_normal((5, 64)).astype(np.float32)
    with torch.no_grad():
        ref = theirs(torch.as_tensor(x)).numpy()
        ta = theirs.encode(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(ours.encode(x), ta, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours(x), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.decode(ta, x), ref, rtol=1e-4, atol=1e-4)
    flipped = ref - x @ p["W_skip"] + x @ p["W_skip"].T  # what a transposed skip matrix would give
    assert np.abs(flipped - ref).max() > 100 * np.abs(ours(x) - ref).max()
    # SAELens names this transcoder's input hook_mlp_in (TransformerLens: the MLP branch's input before ln2); its data
    # is pre_feedforward_layernorm's output, ln2.hook_out, which the hf_hook_name SAELens keeps says and gemmalens reads,
    # from the Gemma Scope 2 folder and from the SAELens folder SAELens writes of it
    assert theirs.cfg.metadata.hook_name == "blocks.9.hook_mlp_in" and ours.hook_name == "blocks.9.ln2.hook_out"
    theirs.save_model(str(tmp_path / "saelens"))
    again = gl.SAE.load(str(tmp_path / "saelens"))
    assert (again.hook_name, again.hook_name_out) == ("blocks.9.ln2.hook_out", "blocks.9.hook_mlp_out")
    np.testing.assert_allclose(again(x), ref, rtol=1e-4, atol=1e-4)


def test_saelens_transcoders_read_the_site_their_cfg_names(small, tmp_path):
    """A SAELens skip transcoder (written by sae_lens itself) whose hook_name is blocks.1.ln2.hook_normalized reads
    TransformerLens's ln2.hook_normalized (before ln2's weight) and replaces hook_mlp_out as sae_lens computes it.
    Given hf_hook_name (what SAELens writes for Gemma Scope 2: the HF module the data was recorded at), that site is
    read instead: SAELens names Gemma Scope 2 transcoders' input hook_mlp_in, but they read
    pre_feedforward_layernorm's output, TransformerLens's ln2.hook_out."""
    sae_lens = pytest.importorskip("sae_lens")
    import torch
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig

    model = small
    D = model.config.hidden_size
    rng = np.random.default_rng(9)
    p = random_sae(rng, D, 48, skip=True)
    ids = rng.integers(0, 320, (1, 9))

    def write(name, **meta):
        cfg = JumpReLUSkipTranscoderConfig(d_in=D, d_sae=48, d_out=D, apply_b_dec_to_input=False,
                                           metadata=SAEMetadata(model_name="gemma-3-270m", **meta))
        tc = JumpReLUSkipTranscoder(cfg)
        with torch.no_grad():
            for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
                getattr(tc, n).copy_(torch.as_tensor(p[n]))
            tc.W_skip.copy_(torch.as_tensor(p["W_skip"].T))  # SAELens: x @ W_skip.T
        tc.save_model(str(tmp_path / name))
        return sae_lens.SAE.load_from_disk(str(tmp_path / name), device="cpu"), gl.SAE.load(str(tmp_path / name))

    for meta, site in ((dict(hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out"),
                        "blocks.1.ln2.hook_normalized"),
                       (dict(hook_name="blocks.1.hook_mlp_in", hook_name_out="blocks.1.hook_mlp_out",
                             hf_hook_name="model.layers.1.pre_feedforward_layernorm.output",
                             hf_hook_name_out="model.layers.1.post_feedforward_layernorm.output"), "blocks.1.ln2.hook_out")):
        theirs, ours = write(site, **meta)
        assert (ours.hook_name, ours.hook_name_out) == (site, "blocks.1.hook_mlp_out") and ours.is_transcoder
        _, cache = model.run_with_cache(ids, names_filter=site)
        with torch.no_grad():
            out = theirs(torch.as_tensor(cache[site])).numpy()
        ref = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_mlp_out", lambda a, h: out)])
        assert rel_err(model.run_with_saes(ids, saes=[ours]), ref) <= 1e-4
    _, both = model.run_with_cache(ids, names_filter=["blocks.1.ln2.hook_normalized", "blocks.1.ln2.hook_out"])
    assert rel_err(both["blocks.1.ln2.hook_normalized"], both["blocks.1.ln2.hook_out"]) > 0.1  # the choice matters
    with pytest.raises(ValueError, match="hook_mlp_in"):
        write("bare", hook_name="blocks.1.hook_mlp_in", hook_name_out="blocks.1.hook_mlp_out")


_SAE_HUB_CHILD = """
import json, sys
import gemmalens as gl
out = {}
a = gl.SAE.load("gemmalens-test/tiny-scope", "resid_post/layer_3")
b = gl.SAE.load("gemmalens-test/tiny-scope/resid_post/layer_3")
out["hook"], out["same"] = a.hook_name, bool((a.W_enc == b.W_enc).all())
for bad in [("gemmalens-test/tiny-scope", "resid_post/layer_9"), ("gemmalens-test/not-cached", "x")]:
    try:
        gl.SAE.load(*bad)
    except FileNotFoundError as e:
        out.setdefault("errors", []).append(str(e))
print(json.dumps(out))
"""


def test_sae_from_a_hub_repository_offline(tmp_path):
    """gl.SAE.load("owner/repo", "sub/folder"): only that folder, through huggingface_hub, from an HF cache in HF's
    layout built by the test (HF_HUB_OFFLINE=1, no network)."""
    import json
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--gemmalens-test--tiny-scope"
    snap = repo / "snapshots" / commit
    save_gemma_scope(str(snap / "resid_post" / "layer_3"), random_sae(rng, 64, 48), "model.layers.3.output")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf_home"))
    r = subprocess.run([sys.executable, "-c", _SAE_HUB_CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["hook"] == "blocks.3.hook_resid_post" and out["same"]
    assert "no folder 'resid_post/layer_9'" in out["errors"][0]
    assert "could not be fetched" in out["errors"][1] and "HF_HUB_OFFLINE=1" in out["errors"][1]
    with pytest.raises(TypeError, match="dtype is a keyword"):
        gl.SAE.load(str(snap / "resid_post" / "layer_3"), 16)


def test_two_saes_in_one_splice(small, tmp_path):
    """Several SAEs spliced in one call each run with their own hooks (a splice's callbacks once all took the last
    SAE's hook table: a KeyError, or the wrong SAE's edits)."""
    rng = np.random.default_rng(10)
    p1, p2 = random_sae(rng, 64, 80), random_sae(rng, 64, 90)
    s1 = gl.SAE.load(save_gemma_scope(str(tmp_path / "a"), p1, "model.layers.1.output"))
    s2 = gl.SAE.load(save_gemma_scope(str(tmp_path / "b"), p2, "model.layers.4.output"))
    ids = rng.integers(0, 320, (1, 8))

    def zero3(a, hook):
        a[..., :3] = 0

    got = small.run_with_saes(ids, saes=[s1, s2], fwd_hooks=[("blocks.1.hook_resid_post.hook_sae_acts_post", zero3)])

    def sae1(a, hook):
        acts = np_encode(a, p1["W_enc"], p1["b_enc"], p1["threshold"])
        acts[..., :3] = 0
        return (acts @ p1["W_dec"] + p1["b_dec"]).astype(np.float32)

    def sae2(a, hook):
        return (np_encode(a, p2["W_enc"], p2["b_enc"], p2["threshold"]) @ p2["W_dec"] + p2["b_dec"]).astype(np.float32)

    ref = small.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post", sae1), ("blocks.4.hook_resid_post", sae2)])
    assert rel_err(got, ref) <= 1e-4
