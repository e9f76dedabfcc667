"""ActivationCache's residual-stream helpers against TransformerLens's own (a TransformerBridge over the same HF
weights, no weight processing): accumulated_resid, decompose_resid, stack_activation, apply_ln_to_stack.

Tolerance: rel_err <= 1e-5 of the compared tensor's largest value. On gemmalens' own cache the activations themselves
differ from HF's (and so TransformerLens's) by at most ~1e-6 of their scale (test_hooks), and the helpers only stack
them, divide by an RMS and multiply by a norm weight; on TransformerLens's activations the helpers agree to rounding.
"""
import numpy as np
import pytest
import torch

import gemmalens as gl
from conftest import rel_err
from gemmalens.hooks import HookTable

pytest.importorskip("transformer_lens")
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402
from transformers import Gemma3ForCausalLM, PreTrainedTokenizerFast  # noqa: E402

RESID_FAMILIES = ("hook_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


@pytest.fixture(scope="module")
def pair(hf_models, tmp_path_factory):
    """(gemmalens model, its cache, TransformerLens's cache, gemmalens' logits) of the same tokens and weights."""
    from tokenizers import Tokenizer, models

    _, path = hf_models["gqa4_hd24"]  # 8 layers, GQA, head_dim 24
    # A fresh HF model: the bridge wraps the modules it is given (the session's HF models stay untouched).
    hf = Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    # TransformerLens wants a tokenizer object; the random-weight model has none, so give it a stub (as bench/run.py).
    stub = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>", pad_token="<unk>", bos_token="<unk>", eos_token="<unk>")
    stub_dir = str(tmp_path_factory.mktemp("stub-tokenizer"))
    stub.save_pretrained(stub_dir)
    bridge = TransformerBridge.boot_transformers(path, hf_model=hf, tokenizer=PreTrainedTokenizerFast.from_pretrained(stub_dir),
                                                 device="cpu")
    ids = np.random.default_rng(3).integers(0, 320, (2, 11))
    with torch.no_grad():
        _, tl_cache = bridge.run_with_cache(torch.as_tensor(ids))
    model = gl.load(path)
    logits, cache = model.run_with_cache(ids)
    return model, cache, tl_cache, logits


def tl(x):
    if isinstance(x, tuple):
        return x[0].detach().numpy(), x[1]
    return x.detach().numpy()


def same(ours, theirs, tol=1e-5):
    if isinstance(ours, tuple):
        assert ours[1] == theirs[1]
        ours, theirs = ours[0], theirs[0]
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    assert rel_err(ours, theirs) <= tol


CALLS = [
    ("accumulated_resid", dict(return_labels=True)),
    ("accumulated_resid", dict(apply_ln=True, return_labels=True)),  # ln_final on every entry, its weight included
    ("accumulated_resid", dict(incl_mid=True, apply_ln=True, return_labels=True)),
    ("accumulated_resid", dict(layer=3, incl_mid=True, return_labels=True)),
    ("accumulated_resid", dict(layer=3, apply_ln=True, return_labels=True)),
    ("accumulated_resid", dict(layer=5, mlp_input=True, apply_ln=True, pos_slice=-1, return_labels=True)),
    ("accumulated_resid", dict(layer=-1, pos_slice=(2, 9), apply_ln=True)),
    ("accumulated_resid", dict(layer=0, apply_ln=True, pos_slice=[0, 4, 7])),
    ("decompose_resid", dict(return_labels=True)),
    ("decompose_resid", dict(apply_ln=True, return_labels=True)),
    ("decompose_resid", dict(layer=4, mode="attn", return_labels=True)),
    ("decompose_resid", dict(layer=4, mode="mlp", incl_embeds=False, apply_ln=True, return_labels=True)),
    ("decompose_resid", dict(layer=2, mlp_input=True, apply_ln=True, pos_slice=(1, None, 3), return_labels=True)),
    ("decompose_resid", dict(layer=6, mlp_input=True, mode="attn", incl_embeds=False, pos_slice=-2)),
    ("stack_activation", dict(activation_name="pattern")),
    ("stack_activation", dict(activation_name="mlp_out", layer=3)),
    ("stack_activation", dict(activation_name="resid_mid", layer=None)),
    ("stack_activation", dict(activation_name="z", layer=5, sublayer_type="attn")),
]


@pytest.mark.parametrize("method,kw", CALLS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CALLS)])
def test_residual_helpers_match_transformer_lens(pair, method, kw):
    model, cache, tl_cache, _ = pair
    same(getattr(cache, method)(**kw), tl(getattr(tl_cache, method)(**kw)))


@pytest.mark.parametrize("kw", [dict(layer=3), dict(layer=3, mlp_input=True), dict(layer=None), dict(layer=-1, recompute_ln=True),
                                dict(layer=5, pos_slice=(3, 8)), dict(layer=5, batch_slice=1),
                                dict(layer=8, batch_slice=[1, 0], pos_slice=4, recompute_ln=True)])
def test_apply_ln_to_stack_matches_transformer_lens(pair, kw):
    model, cache, tl_cache, _ = pair
    p = kw.get("pos_slice")
    stack = cache.decompose_resid(layer=5, pos_slice=p)
    tl_stack = tl_cache.decompose_resid(layer=5, pos_slice=p)
    same(cache.apply_ln_to_stack(stack, **kw), tl(tl_cache.apply_ln_to_stack(tl_stack, **kw)))


def test_helpers_on_transformer_lens_activations(pair):
    """The same helpers fed TransformerLens's own residual activations: the formulas agree to rounding."""
    model, _, tl_cache, _ = pair
    table = HookTable(model.config.num_hidden_layers)
    arrays = {n: tl_cache[n].numpy() for n in table.names if n.endswith(RESID_FAMILIES)}
    cache = gl.ActivationCache(arrays, table, model=model)
    for method, kw in CALLS:
        if method != "stack_activation" or kw["activation_name"] in ("mlp_out", "resid_mid"):
            same(getattr(cache, method)(**kw), tl(getattr(tl_cache, method)(**kw)), tol=1e-6)


def test_identities_and_errors(pair):
    model, cache, _, logits = pair
    L = model.config.num_hidden_layers
    # the pieces add up to the stream; ln_final on the last entry is the model's own ln_final output
    np.testing.assert_allclose(cache.decompose_resid().sum(0), cache["resid_post", -1], rtol=0, atol=1e-4)
    assert rel_err(cache.accumulated_resid(apply_ln=True)[-1], cache["ln_final.hook_out"]) <= 1e-6
    # the logit lens through model.unembed (which applies ln_final itself) ends at the model's logits
    lens = model.unembed(cache.accumulated_resid()[:, 0, -1])
    assert lens.shape == (L + 1, model.config.vocab_size) and rel_err(lens[-1], logits[0, -1]) <= 1e-6
    # TransformerLens's keys (utils.get_act_name) for the norm sites
    np.testing.assert_array_equal(cache["normalized", 3, "ln2"], cache["blocks.3.ln2.hook_normalized"])
    np.testing.assert_array_equal(cache["scale", -1, "ln1"], cache[f"blocks.{L - 1}.ln1.hook_scale"])
    np.testing.assert_array_equal(cache["normalized"], cache["ln_final.hook_normalized"])
    np.testing.assert_array_equal(cache["scale"], cache["ln_final.hook_scale"])
    np.testing.assert_array_equal(cache["q_normed", 2], cache["blocks.2.attn.hook_q_normed"])
    np.testing.assert_array_equal(cache["scale", 2, "attn.k_norm"], cache["blocks.2.attn.k_norm.hook_scale"])
    np.testing.assert_array_equal(cache["ln1", 3], cache["blocks.3.ln1.hook_normalized"])  # gemmalens's short form
    assert cache.stack_activation("scale", sublayer_type="ln2").shape == (L,) + cache["blocks.0.ln2.hook_scale"].shape
    # apply_ln_to_stack divides by the norm's cached hook_scale (TransformerLens's source), else by the same scale
    # computed from the norm's cached input: the two agree
    stack = cache.decompose_resid(layer=3, mlp_input=True)
    only_resid = gl.ActivationCache({k: v for k, v in cache.items() if "hook_scale" not in k}, cache._table, model=model)
    np.testing.assert_allclose(cache.apply_ln_to_stack(stack, 3, mlp_input=True),
                               only_resid.apply_ln_to_stack(stack, 3, mlp_input=True), rtol=1e-5, atol=1e-6)
    edited = gl.ActivationCache({**dict(cache.items()), "blocks.3.ln2.hook_scale": 2 * cache["blocks.3.ln2.hook_scale"]},
                             cache._table, model=model)
    np.testing.assert_allclose(edited.apply_ln_to_stack(stack, 3, mlp_input=True),
                               cache.apply_ln_to_stack(stack, 3, mlp_input=True) / 2, rtol=1e-6)
    with pytest.raises(KeyError, match="sublayer 'mlp'"):
        cache["z", 3, "mlp"]
    with pytest.raises(ValueError, match="mode"):
        cache.decompose_resid(mode="heads")
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 8\]"):
        cache.accumulated_resid(layer=9)
    with pytest.raises(ValueError, match="d_model=64"):
        cache.apply_ln_to_stack(np.zeros((2, 2, 11, 5)))
    # the scale is computed from the norm's input: a cache without it names the hook to capture
    ids = np.arange(1, 8)
    _, part = model.run_with_cache(ids, names_filter=lambda n: n.endswith(("hook_embed", "attn_out", "mlp_out")))
    stack = part.decompose_resid(layer=3)
    with pytest.raises(KeyError, match=r"blocks\.3\.ln1.*'blocks\.3\.hook_resid_pre'"):
        part.apply_ln_to_stack(stack, 3)
    with pytest.raises(KeyError, match=r"blocks\.3\.ln2.*'blocks\.3\.hook_resid_mid'"):
        part.decompose_resid(layer=3, mlp_input=True, apply_ln=True)
    with pytest.raises(KeyError, match=rf"ln_final.*'blocks\.{L - 1}\.hook_resid_post'"):
        part.decompose_resid(apply_ln=True)
    bare = gl.ActivationCache(dict(part), HookTable(L))
    with pytest.raises(ValueError, match="without its model"):
        bare.decompose_resid(layer=3, apply_ln=True)
