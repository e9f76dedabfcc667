"""Gradient runs through Python forward hooks and spliced SAEs: the reverse pass differentiates the function the
forward actually computed. The reference makes the same edits with torch hooks on HF's eager Gemma3ForCausalLM and
takes torch autograd's gradients at every site (tests/hf_hooks.py)."""
import numpy as np
import pytest
import torch

import gemmalens as gl
from hf_hooks import hf_activations
from test_grad import compare, loss_10

V = 320


def _swap_input(fn):
    """A torch forward pre-hook replacing a module's first input by fn(input)."""
    def pre(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        y = fn(x)
        return ((y,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})
    return pre


def _swap_output(fn):
    def post(mod, args, out):
        return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)
    return post


@pytest.fixture(params=["kept", "recomputed"])
def tape_mode(request, monkeypatch):
    """Both ways the reverse pass gets a block's intermediates: kept by the forward, or the block run again (the
    forward's Python hooks then replay their recorded outputs)."""
    if request.param == "recomputed":
        monkeypatch.setattr(gl.grad, "keep_bytes", 0)
    return request.param


def test_python_forward_hooks_take_part_in_the_reverse_pass(hf_models, tape_mode):
    """numpy hooks written as usual (in-place edits, returned arrays, numpy constants, a nonlinear one, a patch from
    a stored activation) and one with its own gradient (gl.hooks.with_vjp): the gradients at every site equal
    autograd's with the same edits made by torch hooks."""
    hf, d = hf_models["gqa4_hd24"]
    model = gl.load(d)
    cfg = model.config
    H, Hd, D = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    rng = np.random.default_rng(11)
    B, T = 2, 10
    toks = rng.integers(1, V, size=(B, T)).astype(np.int32)
    steer = rng.standard_normal(D).astype(np.float32)
    u = rng.standard_normal(cfg.intermediate_size).astype(np.float32)
    patch = rng.standard_normal((B, T, D)).astype(np.float32)

    def zero_head1(z, hook):
        z[:, :, 1] = 0

    def mean_heads(z, hook):
        z[:, :, [0, 3]] = z[:, :, [0, 3]].mean(axis=(0, 1), keepdims=True)

    def square_ish(a, hook):
        return a * abs(a)

    def patch_pos4(a, hook):
        a[:, 4] = patch[:, 4]

    calls = []
    halve_plus_one = gl.hooks.with_vjp(lambda a, hook: a * 0.5 + 1.0,
                                       lambda g, a, hook: calls.append(hook.name) or g * 0.5)
    hooks = [("blocks.2.attn.hook_z", zero_head1),
             ("blocks.4.attn.hook_z", mean_heads),
             ("blocks.3.hook_resid_post", lambda a, hook: a + 2.0 * steer),
             ("blocks.1.mlp.hook_post", lambda a, hook: a - (a @ u)[..., None] * u / (u @ u)),
             ("blocks.5.ln1.hook_out", lambda a, hook: a.__setitem__((slice(None), slice(2, 4)), a[:, 2:4] * 0.5)),
             ("blocks.0.ln2_post.hook_out", square_ish),
             ("blocks.6.ln1_post.hook_out", halve_plus_one),
             ("blocks.7.hook_resid_pre", patch_pos4)]

    def t_heads(fn):
        return lambda x: fn(x.reshape(*x.shape[:2], H, Hd)).reshape(x.shape)

    def t_zero1(z):
        keep = torch.ones(H, 1)
        keep[1] = 0
        return z * keep

    def t_mean(z):
        sel = torch.zeros(H, 1, dtype=torch.bool)
        sel[[0, 3]] = True
        return torch.where(sel, z.mean(dim=(0, 1), keepdim=True), z)

    ut, pt = torch.as_tensor(u), torch.as_tensor(patch)

    def t_halve(x):
        w = torch.ones(x.shape[1], 1)
        w[2:4] = 0.5
        return x * w

    def t_patch(x):
        keep = torch.ones(1, T, 1)
        keep[0, 4] = 0
        return x * keep + pt * (1 - keep)

    L = hf.model.layers
    handles = [L[2].self_attn.o_proj.register_forward_pre_hook(_swap_input(t_heads(t_zero1)), with_kwargs=True),
               L[4].self_attn.o_proj.register_forward_pre_hook(_swap_input(t_heads(t_mean)), with_kwargs=True),
               L[3].register_forward_hook(_swap_output(lambda x: x + 2.0 * torch.as_tensor(steer))),
               L[1].mlp.down_proj.register_forward_pre_hook(
                   _swap_input(lambda x: x - (x @ ut)[..., None] * ut / (ut @ ut)), with_kwargs=True),
               L[5].input_layernorm.register_forward_hook(_swap_output(t_halve)),
               L[0].post_feedforward_layernorm.register_forward_hook(_swap_output(lambda x: x * x.abs())),
               L[6].post_attention_layernorm.register_forward_hook(_swap_output(lambda x: x * 0.5 + 1.0)),
               L[7].register_forward_pre_hook(_swap_input(t_patch), with_kwargs=True)]
    try:
        _, logits_ref, grads = hf_activations(hf, toks, metric=lambda lg: loss_10(lg, toks))
    finally:
        for h in handles:
            h.remove()
    # (HF's post-norm output is both ln*_post.hook_out and hook_*_out: the edits sit on the first, so that both names
    # mean the edited tensor here too.)
    logits, cache = model.run_with_cache(toks, fwd_hooks=hooks, incl_bwd=True, metric="loss")
    assert np.abs(logits - logits_ref).max() / np.abs(logits_ref).max() < 1e-4  # the same edited function
    worst, checked = compare(cache, grads, [0, 0], tol=2e-4)
    assert checked == len(model.hook_names)
    assert calls == ["blocks.6.ln1_post.hook_out"]  # with_vjp's gradient was the one used
    # The patched position's gradient stops at the patch: nothing reaches block 6's output there from it.
    assert np.abs(cache["blocks.7.hook_resid_pre_grad"][:, 4]).max() > 0
    assert np.abs(cache["blocks.6.hook_resid_post_grad"][:, 4]).max() == 0
    # The model is unchanged afterwards.
    np.testing.assert_array_equal(model.forward(toks), gl.load(d).forward(toks))


def _jumprelu_sae(cfg, rng, d_sae=40):
    D = cfg.hidden_size
    W_enc = (rng.standard_normal((D, d_sae)) * 0.3).astype(np.float32)
    b_enc = (rng.standard_normal(d_sae) * 0.1).astype(np.float32)
    thr = np.abs(rng.standard_normal(d_sae) * 0.3).astype(np.float32)
    W_dec = (rng.standard_normal((d_sae, D)) * 0.3).astype(np.float32)
    b_dec = (rng.standard_normal(D) * 0.1).astype(np.float32)
    return W_enc, b_enc, thr, W_dec, b_dec


@pytest.mark.parametrize("use_error_term", [False, True], ids=["no_error", "error_term"])
def test_spliced_sae_gradients_match_autograd(hf_models, use_error_term, tape_mode):
    """A JumpReLU SAE spliced at blocks.2.hook_resid_post, with a feature ablated by a hook on its acts: the
    gradient at every site and at hook_sae_acts_post / hook_sae_recon (/ hook_sae_error) equals autograd's on the
    same splice in torch. The error term is a constant of the forward (SAELens's convention)."""
    hf, d = hf_models["gqa2"]
    model = gl.load(d)
    rng = np.random.default_rng(21)
    B, T = 2, 9
    toks = rng.integers(1, V, size=(B, T)).astype(np.int32)
    W_enc, b_enc, thr, W_dec, b_dec = _jumprelu_sae(model.config, rng)
    sae = gl.SAE(W_enc, b_enc, W_dec, b_dec, threshold=thr, architecture="jumprelu", apply_b_dec_to_input=True,
                 hook_name="blocks.2.hook_resid_post")
    site = "blocks.2.hook_resid_post.hook_sae_"
    ablate = 3

    seen = {}

    def t_sae(x):
        pre = (x - torch.as_tensor(b_dec)) @ torch.as_tensor(W_enc) + torch.as_tensor(b_enc)
        acts = pre * (pre > torch.as_tensor(thr))
        edited = acts * torch.as_tensor((np.arange(W_enc.shape[1]) != ablate).astype(np.float32))
        edited.retain_grad()  # TransformerLens's backward hooks see the gradient at a hook's (edited) output
        recon = edited @ torch.as_tensor(W_dec) + torch.as_tensor(b_dec)
        recon.retain_grad()
        seen.update(acts=edited, recon=recon)
        if use_error_term:
            clean = acts @ torch.as_tensor(W_dec) + torch.as_tensor(b_dec)
            err = (x - clean).detach().requires_grad_(True)
            seen["error"] = err
            return recon + err
        return recon

    h = hf.model.layers[2].register_forward_hook(_swap_output(t_sae))
    try:
        _, logits_ref, grads = hf_activations(hf, toks, metric=lambda lg: loss_10(lg, toks))
    finally:
        h.remove()

    def zero_feature(a, hook):
        a[..., ablate] = 0

    with model.saes([sae], use_error_term=use_error_term):
        logits, cache = model.run_with_cache(toks, fwd_hooks=[(site + "acts_post", zero_feature)], incl_bwd=True,
                                             metric="loss")
    assert np.abs(logits - logits_ref).max() / np.abs(logits_ref).max() < 1e-4
    worst, checked = compare(cache, grads, [0, 0], tol=2e-4)
    assert checked == len(model.hook_names)
    want = {"acts_post": seen["acts"].grad, "recon": seen["recon"].grad}
    if use_error_term:
        want["error"] = seen["error"].grad
    for suffix, ref in want.items():
        got, ref = cache[site + suffix + "_grad"], ref.numpy()
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), suffix
    # The ablated feature's gradient at the hook's output is reported; the hook's VJP stops it (checked above at the
    # model's sites).
    assert np.abs(cache[site + "acts_post_grad"][..., ablate]).max() > 0


def test_backward_hook_on_sae_features_controls_what_reaches_the_input(hf_models):
    """With the error term the gradient reaches the SAE's input through its features alone: a backward hook that
    zeroes the features' gradient leaves nothing for earlier sites; one that keeps a single feature gives exactly
    that feature's share (W_enc's column times the gradient at it where the feature is on)."""
    hf, d = hf_models["gqa2"]
    model = gl.load(d)
    rng = np.random.default_rng(5)
    toks = rng.integers(1, V, size=(1, 8)).astype(np.int32)
    W_enc, b_enc, thr, W_dec, b_dec = _jumprelu_sae(model.config, rng)
    sae = gl.SAE(W_enc, b_enc, W_dec, b_dec, threshold=thr, hook_name="blocks.1.hook_resid_post")
    name = "blocks.1.hook_resid_post.hook_sae_acts_post"
    with model.saes([sae], use_error_term=True):
        _, full = model.run_with_cache(toks, incl_bwd=True, metric="loss")
        seen = []
        model.run_with_hooks(toks, bwd_hooks=[(name, lambda g, hook: seen.append(g.copy()))], metric="loss")
        # (the full capture takes the materialised attention path, this run the tiled one: float rounding differs)
        np.testing.assert_allclose(seen[0], full[name + "_grad"], rtol=0, atol=1e-5 * np.abs(seen[0]).max())
        _, zeroed = model.run_with_cache(toks, incl_bwd=True, metric="loss", names_filter=lambda n: "blocks.0" in n or
                                         n == "hook_embed")
    with model.saes([sae], use_error_term=True):
        got = {}

        def capture(g, hook):
            got[hook.name] = g.copy()

        f = int(np.argmax(np.abs(full[name + "_grad"]).sum(axis=(0, 1)) * (full[name] != 0).any(axis=(0, 1))))

        def keep_one(g, hook):
            out = np.zeros_like(g)
            out[..., f] = g[..., f]
            return out

        def zero(g, hook):
            return np.zeros_like(g)

        model.run_with_hooks(toks, bwd_hooks=[(name, zero), ("blocks.0.hook_resid_post", capture)], metric="loss")
        assert np.abs(got["blocks.0.hook_resid_post"]).max() == 0
        # hook_mlp_out's gradient is the one at the residual stream entering the SAE (resid_post = resid_mid + mlp_out)
        model.run_with_hooks(toks, bwd_hooks=[(name, keep_one), ("blocks.1.hook_mlp_out", capture)], metric="loss")
    on = full[name][..., f] != 0
    share = (full[name + "_grad"][..., f] * on)[..., None] * W_enc[:, f]
    np.testing.assert_allclose(got["blocks.1.hook_mlp_out"], share, rtol=1e-4, atol=1e-6 * np.abs(share).max())
    assert "blocks.0.hook_resid_post_grad" in zeroed  # names_filter reaches model sites in a run with SAEs spliced


def test_spliced_transcoder_gradients_match_autograd(hf_models, tape_mode):
    """A skip transcoder (ln2.hook_out -> hook_mlp_out, error term on): the MLP's own output is replaced, so
    no gradient reaches the MLP; the transcoder's gradient joins the one at its input. Equal to autograd's on the same
    splice in torch."""
    hf, d = hf_models["gqa2"]
    model = gl.load(d)
    rng = np.random.default_rng(8)
    B, T = 2, 7
    toks = rng.integers(1, V, size=(B, T)).astype(np.int32)
    W_enc, b_enc, thr, W_dec, b_dec = _jumprelu_sae(model.config, rng)
    D = model.config.hidden_size
    W_skip = (rng.standard_normal((D, D)) * 0.05).astype(np.float32)
    tc = gl.SAE(W_enc, b_enc, W_dec, b_dec, threshold=thr, W_skip=W_skip, hook_name="blocks.1.ln2.hook_out",
                hook_name_out="blocks.1.hook_mlp_out")
    stash = {}

    def t_out(y):
        x = stash.pop("x")
        pre = x @ torch.as_tensor(W_enc) + torch.as_tensor(b_enc)
        acts = pre * (pre > torch.as_tensor(thr))
        tr = lambda a: a @ torch.as_tensor(W_dec) + torch.as_tensor(b_dec) + x @ torch.as_tensor(W_skip)  # noqa: E731
        return tr(acts) + (y - tr(acts)).detach()

    L = hf.model.layers[1]
    handles = [L.pre_feedforward_layernorm.register_forward_hook(lambda m, a, out: stash.update(x=out)),
               L.post_feedforward_layernorm.register_forward_hook(_swap_output(t_out))]
    try:
        _, logits_ref, grads = hf_activations(hf, toks, metric=lambda lg: loss_10(lg, toks))
    finally:
        for h in handles:
            h.remove()
    with model.saes([tc], use_error_term=True):
        logits, cache = model.run_with_cache(toks, incl_bwd=True, metric="loss")
    assert np.abs(logits - logits_ref).max() / np.abs(logits_ref).max() < 1e-4
    # HF's post-norm output carries both names; here the transcoder writes hook_mlp_out, after ln2_post: the MLP's
    # own output (ln2_post, all three of its sites) gets no gradient.
    for site in ("hook_out", "hook_normalized", "hook_scale"):
        assert np.abs(cache[f"blocks.1.ln2_post.{site}_grad"]).max() == 0
    assert np.abs(cache["blocks.1.mlp.hook_post_grad"]).max() == 0
    del grads["blocks.1.ln2_post.hook_out"]
    worst, checked = compare(cache, grads, [0, 0], tol=2e-4)
    assert checked == len(model.hook_names) - 1
    assert np.abs(cache["blocks.1.ln2.hook_out_grad"]).max() > 0


def test_bad_gradient_hook_setup_is_a_clear_error(hf_models, monkeypatch):
    """with_vjp needs two callables; a negative keep_bytes is refused before any run; the model works after."""
    model = gl.load(hf_models["gqa2"][1])
    toks = np.arange(1, 7, dtype=np.int32)[None]
    with pytest.raises(TypeError, match="both must be callables"):
        gl.hooks.with_vjp(lambda a, hook: a, None)
    monkeypatch.setattr(gl.grad, "keep_bytes", -1)
    with pytest.raises(ValueError, match="keep_bytes must be >= 0"):
        model.run_with_cache(toks, incl_bwd=True, metric="loss")
    monkeypatch.setattr(gl.grad, "keep_bytes", 2 << 30)
    _, cache = model.run_with_cache(toks, names_filter="hook_embed", incl_bwd=True, metric="loss")
    assert np.isfinite(cache["hook_embed_grad"]).all() and np.abs(cache["hook_embed_grad"]).max() > 0


def test_edits_inside_the_norms_and_at_projections_match_autograd(hf_models, tape_mode):
    """TransformerLens's norm sites are live: an edit at hook_scale feeds hook_normalized = x / scale, one at
    hook_normalized feeds the weighted output, for the residual norms, q_norm / k_norm ([B, heads, T, Hd]) and
    ln_final; edits at hook_q and mlp.hook_pre feed the steps after them. Logits and the gradient at every site equal
    autograd's on HF with the same edits (made inside its norms by tests/hf_hooks.py's split norm)."""
    hf, d = hf_models["gqa4_hd24"]
    model = gl.load(d)
    cfg = model.config
    H, Hd, D = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    rng = np.random.default_rng(12)
    B, T = 2, 9
    toks = rng.integers(1, V, size=(B, T)).astype(np.int32)
    v = rng.standard_normal(D).astype(np.float32)
    hooks = [("blocks.1.ln1.hook_scale", gl.interventions.scale(2.0, positions=[3])),
             ("blocks.2.ln2.hook_normalized", lambda a, hook: a * abs(a)),
             ("blocks.3.attn.q_norm.hook_normalized", gl.interventions.ablate_heads([1])),
             ("blocks.4.attn.k_norm.hook_scale", lambda a, hook: a + 0.5),
             ("blocks.5.ln1_post.hook_normalized", gl.interventions.project_out(v)),
             ("ln_final.hook_normalized", gl.interventions.add(v, scale=0.3)),
             ("blocks.2.attn.hook_q", lambda a, hook: a.__setitem__((slice(None), slice(None), 0), a[:, :, 0] * 1.5)),
             ("blocks.3.mlp.hook_pre", gl.interventions.scale(0.5))]
    vt = torch.as_tensor(v)

    def t_scale_pos3(s):
        w = torch.ones(1, T, 1)
        w[0, 3] = 2.0
        return s * w

    def t_zero_head1(n):  # [B, H, T, Hd]
        keep = torch.ones(1, H, 1, 1)
        keep[0, 1] = 0
        return n * keep

    def t_q_head0(mod, args, out):
        w = torch.ones(H, 1)
        w[0] = 1.5
        return (out.reshape(*out.shape[:2], H, Hd) * w).reshape(out.shape)

    norm_edits = {"blocks.1.ln1.hook_scale": t_scale_pos3,
                  "blocks.2.ln2.hook_normalized": lambda n: n * n.abs(),
                  "blocks.3.attn.q_norm.hook_normalized": t_zero_head1,
                  "blocks.4.attn.k_norm.hook_scale": lambda s: s + 0.5,
                  "blocks.5.ln1_post.hook_normalized": lambda n: n - (n @ vt)[..., None] * vt / (vt @ vt),
                  "ln_final.hook_normalized": lambda n: n + 0.3 * vt}
    L = hf.model.layers
    handles = [L[2].self_attn.q_proj.register_forward_hook(t_q_head0),
               L[3].mlp.gate_proj.register_forward_hook(lambda m, a, out: out * 0.5)]
    try:
        _, logits_ref, grads = hf_activations(hf, toks, metric=lambda lg: loss_10(lg, toks), norm_edits=norm_edits)
    finally:
        for h in handles:
            h.remove()
    logits, cache = model.run_with_cache(toks, fwd_hooks=hooks, incl_bwd=True, metric="loss")
    plain = model.forward(toks)
    assert np.abs(logits - logits_ref).max() / np.abs(logits_ref).max() < 1e-4  # the same edited function
    assert np.abs(plain - logits_ref).max() / np.abs(logits_ref).max() > 1e-2   # and the edits mattered
    worst, checked = compare(cache, grads, [0, 0], tol=2e-4)
    assert checked == len(model.hook_names)
    # what the sites hold: hook_normalized is x / scale after the edit at hook_scale, hook_out its weighted value
    s, n = (cache[f"blocks.1.ln1.hook_{k}"] for k in ("scale", "normalized"))
    pre = cache["blocks.1.hook_resid_pre"]
    np.testing.assert_allclose(s[:, [0, 1, 2, 4]], np.sqrt((pre[:, [0, 1, 2, 4]] ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps),
                               rtol=1e-5)
    np.testing.assert_allclose(s[:, 3], 2 * np.sqrt((pre[:, 3] ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps), rtol=1e-5)
    np.testing.assert_allclose(n, pre / s, rtol=1e-5, atol=1e-6)
    assert not cache["blocks.3.attn.q_norm.hook_normalized"][:, 1].any()
    assert cache["blocks.3.attn.q_norm.hook_normalized"].shape == (B, H, T, Hd)
