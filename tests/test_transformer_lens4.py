"""Every hook name gemmalens shares with TransformerLens 4.3 means what it means there, on the same weights: the
activations, the loss's gradients (TransformerLens's ``_grad`` keys), edits at the norm sites, the W_* properties
and the config's field names. TransformerLens's own TransformerBridge (boot_transformers over a local HF checkpoint
this test writes) is the reference. transformer-lens 4.3 and sae-lens cannot share a venv, so it runs in a second
interpreter: GEMMALENS_TL4_PYTHON (.ci/run makes that venv), which dumps its view with tests/tl4_reference.py."""
import json
import os
import subprocess

import numpy as np
import pytest

import gemmalens as gl
from conftest import build_hf

TL4_PYTHON = os.environ.get("GEMMALENS_TL4_PYTHON")
HERE = os.path.dirname(os.path.abspath(__file__))
# GQA (2 query heads per KV head), head_dim * heads != d_model, a global layer (5) among sliding ones with a window
# shorter than the prompt, query_pre_attn_scalar != head_dim, final soft-capping, eps away from the default.
CONFIG = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, sliding_window=4, query_pre_attn_scalar=20, final_logit_softcapping=8.0, rms_norm_eps=1e-5)
B, T = 2, 9


@pytest.fixture(scope="module")
def tl4(tmp_path_factory):
    """(gemmalens model, tokens, TransformerLens 4.3's dump)."""
    if not TL4_PYTHON:
        pytest.skip("GEMMALENS_TL4_PYTHON is not set: point it at a Python with transformer-lens==4.3.0, torch and "
                    "transformers (.ci/run creates one)")
    d = tmp_path_factory.mktemp("tl4")
    model_dir = str(d / "model")
    build_hf(model_dir, seed=4, **CONFIG)
    tokens = np.random.default_rng(4).integers(1, 320, (B, T)).astype(np.int64)
    np.save(d / "tokens.npy", tokens)
    out = d / "tl4.npz"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([TL4_PYTHON, os.path.join(HERE, "tl4_reference.py"), model_dir, str(d / "tokens.npy"), str(out)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, f"TransformerLens 4.3 reference failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    ref = dict(np.load(out))
    return gl.load(model_dir), tokens, ref


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_transformer_lens_4_3_has_every_gemmalens_hook_and_the_same_activations(tl4):
    model, tokens, ref = tl4
    logits, cache = model.run_with_cache(tokens)
    assert rel(logits, ref["logits"]) <= 1e-5
    missing = [n for n in model.hook_names if "act/" + n not in ref]
    assert not missing, f"gemmalens hook names that TransformerLens 4.3 lacks: {missing}"
    worst = {}
    for n in model.hook_names:
        ours, theirs = cache[n], ref["act/" + n]
        assert ours.shape == theirs.shape, (n, ours.shape, theirs.shape)
        if n.endswith("hook_attn_scores"):
            # masked slots: -inf here; TransformerLens 4.3 (without compatibility mode) fills the dtype's minimum
            seen = np.isfinite(ours)
            assert (theirs[~seen] <= -1e30).all() and (theirs[seen] > -1e30).all(), n
            ours, theirs = ours[seen], theirs[seen]
        worst[n] = rel(ours, theirs)
    # f32 on both sides, different summation orders: the worst site measured 2.9e-6 of its max-abs
    bad = {n: e for n, e in worst.items() if e > 1e-5}
    assert not bad, bad
    # the norm sites mean TransformerLens's steps: hook_normalized is before the weight, hook_scale its divisor
    inputs = {"blocks.3.ln1": cache["blocks.3.hook_resid_pre"],
              "blocks.3.attn.q_norm": cache["blocks.3.attn.hook_q"].transpose(0, 2, 1, 3),  # [B, H, T, Hd]
              "ln_final": cache["blocks.6.hook_resid_post"]}
    for n, x in inputs.items():
        np.testing.assert_allclose(cache[n + ".hook_normalized"] * cache[n + ".hook_scale"], x, rtol=1e-4, atol=1e-5)


def test_gradients_at_every_hook_match_transformer_lens_4_3(tl4):
    """TransformerLens's run_with_cache(incl_bwd=True) of the loss: the same ``_grad`` at every shared name (its
    norms then run the hooked python path, so hook_scale / hook_normalized are on the gradient's way)."""
    model, tokens, ref = tl4
    _, cache = model.run_with_cache(tokens, incl_bwd=True, metric="loss")
    assert cache.metric_value == pytest.approx(float(ref["loss"]), rel=1e-5)
    bad = {}
    for n in model.hook_names:
        ours, theirs = cache[n + "_grad"], ref["grad/" + n]
        assert ours.shape == theirs.shape, n
        if n.endswith("hook_resid_mid"):
            # TransformerLens 4.3's hook_resid_mid is an alias of ln2.hook_in, a hook on the MLP branch's input: its
            # gradient is the branch's alone, without the residual connection's (gemmalens's, HookedTransformer's and
            # autograd's on the stream itself: tests/test_grad.py). The two differ by exactly the stream's share.
            ours = ours - cache[n.replace("resid_mid", "resid_post") + "_grad"]
        e = rel(ours, theirs)
        if e > 1e-4:  # gradients pass more f32 steps than activations (measured: at most 6.8e-6 here)
            bad[n] = e
    assert not bad, bad


def test_edits_at_the_norm_sites_act_as_in_transformer_lens_4_3(tl4):
    """The edits tests/tl4_reference.py makes in TransformerLens (its edits()), made here with native interventions
    and numpy hooks: the same logits, and each edit changed them."""
    model, tokens, ref = tl4
    plain = model.forward(tokens)

    def zero_head1(a, hook):  # [batch, head, pos, d_head], TransformerLens's layout
        a[:, 1] = 0

    ours = [
        [("blocks.0.ln2.hook_scale", gl.interventions.scale(2.0))],
        [("blocks.1.attn.q_norm.hook_normalized", zero_head1)],
        [("blocks.1.ln2.hook_normalized", lambda a, hook: a + 0.5), ("ln_final.hook_scale", gl.interventions.scale(0.7))],
        [("blocks.0.attn.k_norm.hook_scale", lambda a, hook: a + 1.0),
         ("blocks.1.ln2_post.hook_normalized", gl.interventions.scale(0.25))],
    ]
    for i, hooks in enumerate(ours):
        got = model.run_with_hooks(tokens, fwd_hooks=hooks)
        assert rel(got, ref[f"patch/{i}"]) <= 1e-5, i
        assert rel(plain, ref[f"patch/{i}"]) > 1e-3, i


def test_weights_and_cfg_match_transformer_lens_4_3(tl4):
    model, _, ref = tl4
    for name in ("W_E", "W_U", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out"):
        ours, theirs = getattr(model, name), ref["weight/" + name]
        assert ours.dtype == np.float32 and ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
    for part, names in (("attn", ("W_Q", "W_K", "W_V", "W_O")), ("mlp", ("W_in", "W_gate", "W_out"))):
        for name in names:
            np.testing.assert_array_equal(getattr(getattr(model.blocks[1], part), name), ref[f"weight/blocks.1.{part}.{name}"])
    tl_cfg = json.loads(str(ref["cfg"]))
    assert {k: getattr(model.cfg, k) for k in tl_cfg} == pytest.approx(tl_cfg)
