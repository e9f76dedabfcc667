"""Edge attribution patching against two independent references.

1. Torch autograd on HF transformers' eager Gemma3ForCausalLM: each downstream node (query head, key/value head, MLP,
   unembedding) is given its own copy of the residual stream (torch hooks: every head's projection recomputed from its
   own copy through HF's input norm), so autograd gives the gradient at each node's input; the upstream changes come
   from HF's clean and corrupted runs, a head's through HF's post-attention norm linearised by
   torch.autograd.functional.jvp. Every edge's score, on configs with MQA and GQA, for logit_diff and the loss, a
   left-padded batch included.
2. The definition by finite differences through gemmalens's forward hooks (no gradient code): each edge's score is
   the derivative of the metric when only the downstream component's own input moves along the upstream
   component's change (the input rebuilt in numpy from the residual stream with the norm's forward formula); a
   head's change is measured on the model itself (the attention output with that head's z nudged).

Plus the bookkeeping: the edges into a node add up to the first-order change of its whole input, a layer's heads to
the first-order change of hook_attn_out; the layout, top_edges and the errors."""
import numpy as np
import pytest
import torch

import gemmalens as gl

V = 320


def _rmsnorm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1.0 + w)


@pytest.fixture(scope="module")
def setup(hf_models):
    model = gl.load(hf_models["gqa2"][1])  # 4 heads, 2 KV heads, eps 1e-2
    rng = np.random.default_rng(3)
    clean = rng.integers(1, V, size=(2, 8)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[:, 2] = rng.integers(1, V, size=2)
    corrupted[0, 5] = rng.integers(1, V)
    metric = gl.metrics.logit_diff([5, 6], [7, 8])
    return model, clean, corrupted, metric, gl.attribution.edge_attribution_patching(model, clean, corrupted, metric)


def _upstream_delta(model, clean, corrupted, up, eps_fd=1e-2):
    """The change of component `up`'s output on the residual stream, corrupted - clean ([batch, pos, d_model]);
    for a head, the first-order change of hook_attn_out when only that head's z moves, by finite difference."""
    if up == "embed" or up.startswith("m"):
        name = "hook_embed" if up == "embed" else f"blocks.{int(up[1:])}.hook_mlp_out"
        _, c = model.run_with_cache(clean, names_filter=[name])
        _, k = model.run_with_cache(corrupted, names_filter=[name])
        return k[name].astype(np.float64) - c[name]
    layer, head = (int(t) for t in up[1:].split(".h"))
    z = f"blocks.{layer}.attn.hook_z"
    _, c = model.run_with_cache(clean, names_filter=[z])
    _, k = model.run_with_cache(corrupted, names_filter=[z])
    dz = k[z].astype(np.float64) - c[z]
    out = []
    for s in (1, -1):
        def nudge(a, hook, s=s):
            a[:, :, head] += (s * eps_fd * dz[:, :, head]).astype(np.float32)
        _, r = model.run_with_cache(clean, names_filter=[f"blocks.{layer}.hook_attn_out"], fwd_hooks=[(z, nudge)])
        out.append(r[f"blocks.{layer}.hook_attn_out"].astype(np.float64))
    return (out[0] - out[1]) / (2 * eps_fd)


def _edge_by_finite_difference(model, clean, metric, down, delta, eps_fd=1e-2):
    """d metric / d eps with only `down`'s input fed resid + eps * delta."""
    cfg = model.config
    L, Hd, e = cfg.num_hidden_layers, cfg.head_dim, float(cfg.rms_norm_eps)
    W = model._core.export_tensors()
    vals = []
    for s in (1, -1):
        store = {}

        def keep(a, hook):
            store["x"] = a.astype(np.float64).copy()

        if down == "logits":
            hooks = [(f"blocks.{L - 1}.hook_resid_post", keep),
                     ("ln_final.hook_out",
                      lambda a, hook, s=s: _rmsnorm(store["x"] + s * eps_fd * delta, W["model.norm.weight"], e).astype(np.float32))]
        elif down.startswith("m"):
            l = int(down[1:])
            w = W[f"model.layers.{l}.pre_feedforward_layernorm.weight"]
            hooks = [(f"blocks.{l}.hook_resid_mid", keep),
                     (f"blocks.{l}.ln2.hook_out",
                      lambda a, hook, s=s, w=w: _rmsnorm(store["x"] + s * eps_fd * delta, w, e).astype(np.float32))]
        else:
            layer, rest = down[1:].split(".", 1)
            l = int(layer)
            kind = rest[-2]  # q, k or v
            h = int(rest[1:-3]) if rest.startswith("h") else int(rest[2:-3])
            w_in = W[f"model.layers.{l}.input_layernorm.weight"]
            proj = W[f"model.layers.{l}.self_attn.{kind}_proj.weight"][h * Hd:(h + 1) * Hd]

            def feed(a, hook, s=s, w_in=w_in, proj=proj, h=h):
                a[:, :, h] = (_rmsnorm(store["x"] + s * eps_fd * delta, w_in, e) @ proj.T).astype(np.float32)

            hooks = [(f"blocks.{l}.hook_resid_pre", keep), (f"blocks.{l}.attn.hook_{kind}", feed)]
        vals.append(metric(model.run_with_hooks(clean, fwd_hooks=hooks)))
    return (vals[0] - vals[1]) / (2 * eps_fd)


EDGES = [("embed", "m2"), ("embed", "a0.h2<q>"), ("a0.h1", "a3.kv0<k>"), ("m1", "a2.h3<q>"), ("a1.h0", "logits"),
         ("m4", "a5.kv1<v>"), ("a2.h3", "m2"), ("m6", "logits"), ("a4.h1", "a6.kv1<k>")]


def test_edge_scores_equal_their_definition(setup):
    model, clean, corrupted, metric, es = setup
    scale = np.abs(es.scores).max()
    assert scale > 0
    got = es.edges()
    for up, down in EDGES:
        delta = _upstream_delta(model, clean, corrupted, up)
        ref = _edge_by_finite_difference(model, clean, metric, down, delta)
        assert got[(up, down)] == pytest.approx(ref, abs=2e-3 * scale), (up, down)


def test_edge_layout_and_top_edges(setup):
    model, clean, corrupted, metric, es = setup
    cfg = model.config
    L, H, KV = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    assert es.upstream[0] == "embed" and len(es.upstream) == 1 + L * (H + 1)
    assert len(es.downstream) == L * (H + 2 * KV + 1) + 1 and es.downstream[-1] == "logits"
    assert es.downstream[:H + 2 * KV + 1] == ["a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>", "a0.kv0<k>", "a0.kv1<k>",
                                              "a0.kv0<v>", "a0.kv1<v>", "m0"]
    assert es.scores.shape == es.valid.shape == (len(es.upstream), len(es.downstream))
    assert es.scores.dtype == np.float64 and es.per_position is None
    up, down = es.upstream.index("a3.h0"), es.downstream.index("a3.h1<q>")
    assert not es.valid[up, down] and es.scores[up, down] == 0  # same layer: no edge
    assert es.valid[up, es.downstream.index("m3")] and es.valid[es.upstream.index("m3"), es.downstream.index("a4.h0<q>")]
    assert not es.valid[es.upstream.index("m3"), es.downstream.index("m3")]
    assert es.valid[0].all()  # embed feeds everything
    # edges: embed -> all; layer l's H heads -> its MLP and later layers; its MLP -> later layers
    per_layer_down = H + 2 * KV + 1
    n = len(es.downstream) + sum(H * (1 + (L - 1 - l) * per_layer_down + 1) + (L - 1 - l) * per_layer_down + 1
                                 for l in range(L))
    assert len(es) == int(es.valid.sum()) == len(es.edges()) == n
    assert es.metric_value == pytest.approx(metric(model.forward(clean)), rel=1e-5)
    # one edge by name
    i, j = es.index("a1.h2", "a4.kv1<v>")
    edge = ("a1.h2", "a4.kv1<v>")
    assert es[edge] == es.score(*edge) == es.scores[i, j] == es.edges()[edge]
    with pytest.raises(KeyError, match="not an edge"):
        es["a3.h0", "a3.h1<q>"]
    with pytest.raises(KeyError, match="no upstream node 'a3.h9'"):
        es.score("a3.h9", "logits")
    with pytest.raises(KeyError, match="no downstream node 'a3.kv0<q>'"):
        es.score("embed", "a3.kv0<q>")
    with pytest.raises(TypeError, match=r"takes \(upstream, downstream\)"):
        es["embed"]
    # top_edges: the k largest |score| over the valid edges, largest first, as (upstream, downstream, score)
    top = gl.attribution.top_edges(es, 7)
    brute = sorted(es.edges().items(), key=lambda kv: -abs(kv[1]))[:7]
    assert top == [(u, d, s) for (u, d), s in brute]
    assert [abs(t[2]) for t in top] == sorted((abs(t[2]) for t in top), reverse=True)
    assert abs(top[0][2]) == pytest.approx(np.abs(es.scores[es.valid]).max())
    assert es.top(7) == top and gl.attribution.top_edges(es, np.int64(7)) == top
    everything = es.top(10**6)
    assert len(everything) == len(es) and {(u, d) for u, d, _ in everything} == set(es.edges())
    for k in (0, -3):
        with pytest.raises(ValueError, match="positive int"):
            gl.attribution.top_edges(es, k)
    for k in (2.5, True, "3", None):
        with pytest.raises(ValueError, match="positive int"):
            gl.attribution.top_edges(es, k)
    with pytest.raises(TypeError, match="EdgeScores"):
        gl.attribution.top_edges({}, 3)
    with pytest.raises(TypeError, match="EdgeScores"):
        gl.attribution.top_edges(es.scores, 3)
    # bad input to edge_attribution_patching
    with pytest.raises(ValueError, match="same shape"):
        gl.attribution.edge_attribution_patching(model, clean, corrupted[:, :5], metric)
    with pytest.raises(ValueError, match="same shape"):
        gl.attribution.edge_attribution_patching(model, clean, corrupted[:1], metric)
    with pytest.raises(ValueError, match="needs metric="):
        gl.attribution.edge_attribution_patching(model, clean, corrupted, None)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        gl.attribution.edge_attribution_patching(model, clean, corrupted, metric, attention_mask=np.ones((2, 5)))
    with pytest.raises(ValueError, match="out of range"):
        gl.attribution.edge_attribution_patching(model, clean, np.full_like(clean, V), metric)
    with pytest.raises(TypeError, match="per_position must be True or False"):
        gl.attribution.edge_attribution_patching(model, clean, corrupted, metric, per_position="yes")


def test_scores_of_an_identical_run_are_zero(setup):
    model, clean, _, metric, _ = setup
    es = gl.attribution.edge_attribution_patching(model, clean, clean, metric)
    assert not es.scores.any()


# --- 1. against torch autograd on HF's model, every edge -----------------------------------------------------------

def _torch_reference(hf, clean, corrupted, torch_metric, attention_mask=None):
    """({upstream node: its change on the residual stream, corrupted - clean}, {downstream node: dMetric/d(its own
    input) on the clean run}, metric value): float64 [batch, pos, d_model] arrays, from HF's model alone."""
    cfg, m = hf.config, hf.model
    H, KV, Hd, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    B, T = clean.shape
    kw = {}
    if attention_mask is not None:  # positions count from each row's first real token, as gemmalens's do
        am = torch.as_tensor(attention_mask, dtype=torch.long)
        kw = {"attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp(min=0)}

    def writes(ids):
        """What the components write: the scaled embedding, each o_proj's input (z), each post-feedforward norm's
        output."""
        got, handles = {}, [m.embed_tokens.register_forward_hook(lambda mod, a, out: got.__setitem__("embed", out))]
        for l, layer in enumerate(m.layers):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda mod, a, l=l: got.__setitem__(f"z{l}", a[0])))
            handles.append(layer.post_feedforward_layernorm.register_forward_hook(
                lambda mod, a, out, l=l: got.__setitem__(f"m{l}", out)))
        try:
            with torch.no_grad():
                hf(torch.as_tensor(ids, dtype=torch.long), **kw)
        finally:
            for h in handles:
                h.remove()
        return got

    c, k = writes(clean), writes(corrupted)
    up = {"embed": (k["embed"] - c["embed"]).double().numpy()}
    for l, layer in enumerate(m.layers):
        wo = layer.self_attn.o_proj.weight.detach()
        dz = k[f"z{l}"] - c[f"z{l}"]
        a = layer.self_attn.o_proj(c[f"z{l}"]).detach()  # the post-attention norm's input on the clean run
        for h in range(H):
            blk = slice(h * Hd, (h + 1) * Hd)
            _, d = torch.autograd.functional.jvp(layer.post_attention_layernorm, (a,), (dz[..., blk] @ wo[:, blk].T,))
            up[f"a{l}.h{h}"] = d.double().numpy()
        up[f"m{l}"] = (k[f"m{l}"] - c[f"m{l}"]).double().numpy()

    # Each downstream node reads its own copy of the residual stream: x + a zero tensor of its own, whose gradient
    # is the gradient at that node's input.
    leaves, resid, handles = {}, {}, []

    def leaf(name):
        leaves[name] = torch.zeros(B, T, D, requires_grad=True)
        return leaves[name]

    def per_head(proj, ln, l, names):
        copies = [leaf(n) for n in names]

        def hook(mod, args, out):  # the projection's output, head by head from each head's own copy
            return torch.cat([ln(resid[l] + x) @ proj.weight[i * Hd:(i + 1) * Hd].T for i, x in enumerate(copies)], -1)
        return proj.register_forward_hook(hook)

    for l, layer in enumerate(m.layers):
        at, ln1 = layer.self_attn, layer.input_layernorm
        handles += [
            layer.register_forward_pre_hook(
                lambda mod, a, kwa, l=l: resid.__setitem__(l, a[0] if a else kwa["hidden_states"]), with_kwargs=True),
            per_head(at.q_proj, ln1, l, [f"a{l}.h{h}<q>" for h in range(H)]),
            per_head(at.k_proj, ln1, l, [f"a{l}.kv{g}<k>" for g in range(KV)]),
            per_head(at.v_proj, ln1, l, [f"a{l}.kv{g}<v>" for g in range(KV)]),
            # the MLP alone reads through pre_feedforward_layernorm; the residual add takes the stream before it
            layer.pre_feedforward_layernorm.register_forward_pre_hook(lambda mod, a, x=leaf(f"m{l}"): (a[0] + x,)),
        ]
    handles.append(m.norm.register_forward_pre_hook(lambda mod, a, x=leaf("logits"): (a[0] + x,)))
    try:
        value = torch_metric(hf(torch.as_tensor(clean, dtype=torch.long), **kw).logits)
        value.backward()
    finally:
        for h in handles:
            h.remove()
    down = {n: x.grad.double().numpy() for n, x in leaves.items()}
    return up, down, value.item()


def _writes_before_reads(up, down, L):
    """Whether upstream node `up` writes to the residual stream before downstream node `down` reads it (an edge).
    Writes: embed at -1, layer l's heads at 2l, its MLP at 2l + 1; reads: layer l's attention at 2l, its MLP at
    2l + 1, the unembedding at 2L."""
    w = -1 if up == "embed" else 2 * int(up[1:].split(".")[0]) + (1 if up.startswith("m") else 0)
    r = 2 * L if down == "logits" else 2 * int(down[1:].split(".")[0]) + (1 if down.startswith("m") else 0)
    return w < r


def _torch_loss(row_start, toks):
    def f(lg):
        B, T = toks.shape
        terms = [-torch.log_softmax(lg[b, t], -1)[int(toks[b, t + 1])]
                 for b in range(B) for t in range(row_start[b], T - 1)]
        return torch.stack(terms).mean()
    return f


# config, metric, left padding of row 1
CASES = {
    "gqa2-logit_diff": ("gqa2", "logit_diff", 0),            # 4 query heads, 2 key/value heads
    "gqa2-loss-left_padded": ("gqa2", "loss", 3),
    "gqa4_hd24-loss": ("gqa4_hd24", "loss", 0),              # 8 query heads, 2 key/value heads, 8 layers
    "mqa_scaled_softcap-logit_diff": ("mqa_scaled_softcap", "logit_diff", 0),  # 1 key/value head, logit soft-capping
    "attn_softcap-logprob": ("attn_softcap", "logprob", 0),  # attention soft-capping
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, hf_models):
    config, metric_name, pad = CASES[request.param]
    hf, d = hf_models[config]
    model = gl.load(d)
    B, T = 2, 9
    rng = np.random.default_rng(11)
    clean = rng.integers(1, V, size=(B, T)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[:, 4] = rng.integers(1, V, size=B)
    corrupted[1, 6] = rng.integers(1, V)
    row_start = [0, pad]
    mask = None
    if pad:
        mask = np.ones((B, T), np.int64)
        mask[1, :pad] = 0
        clean[1, :pad] = corrupted[1, :pad] = 0
    rows = torch.arange(B)
    good, bad = [5, 17], [9, 30]
    metric, torch_metric = {
        "logit_diff": (gl.metrics.logit_diff(good, bad),
                       lambda lg: (lg[rows, -1, torch.tensor(good)] - lg[rows, -1, torch.tensor(bad)]).mean()),
        "loss": ("loss", _torch_loss(row_start, clean)),
        "logprob": (gl.metrics.logprob(good),
                    lambda lg: torch.log_softmax(lg[:, -1], -1)[rows, torch.tensor(good)].mean()),
    }[metric_name]
    es = gl.attribution.edge_attribution_patching(model, clean, corrupted, metric, attention_mask=mask,
                                                  per_position=True)
    ref = _torch_reference(hf, clean, corrupted, torch_metric, attention_mask=mask)
    return dict(model=model, clean=clean, corrupted=corrupted, mask=mask, metric=metric, es=es, ref=ref)


def test_every_edge_score_equals_the_torch_reference(case):
    model, es, (up, down, value) = case["model"], case["es"], case["ref"]
    cfg = model.config
    L, H, KV = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    assert es.upstream == ["embed"] + [n for l in range(L) for n in [f"a{l}.h{h}" for h in range(H)] + [f"m{l}"]]
    assert sorted(es.downstream) == sorted(down)
    assert es.metric_value == pytest.approx(value, rel=1e-4, abs=1e-6)
    valid = np.array([[_writes_before_reads(u, v, L) for v in es.downstream] for u in es.upstream])
    np.testing.assert_array_equal(es.valid, valid)
    # reference per position: sum over d_model of change . gradient, 0 where no edge
    U = np.stack([up[u] for u in es.upstream])
    Vg = np.stack([down[v] for v in es.downstream])
    ref_pos = np.where(valid[..., None, None], np.einsum("ubtd,vbtd->uvbt", U, Vg), 0.0)
    ref = ref_pos.sum(axis=(2, 3))
    scale = np.abs(ref).max()
    assert scale > 1e-3 and (np.abs(ref) > 1e-2 * scale).sum() > 50  # many edges matter: the check has teeth
    err = np.abs(es.scores - ref).max() / scale
    assert err < 1e-4, err
    assert es.per_position.shape == ref_pos.shape
    assert np.abs(es.per_position - ref_pos).max() / np.abs(ref_pos).max() < 1e-4
    np.testing.assert_allclose(es.per_position.sum(axis=(2, 3)), es.scores, rtol=1e-12, atol=1e-15)
    assert not es.scores[~valid].any()
    if case["mask"] is not None:  # padding positions contribute nothing
        assert not es.per_position[:, :, case["mask"] == 0].any()
    # the default (no per-position array) gives the same scores
    plain = gl.attribution.edge_attribution_patching(model, case["clean"], case["corrupted"], case["metric"],
                                                     attention_mask=case["mask"])
    assert plain.per_position is None
    np.testing.assert_allclose(plain.scores, es.scores, rtol=1e-10, atol=1e-14 * scale)


def _first_order_attn_out(model, clean, corrupted, mask, eps_fd=4e-2):
    """{layer: the first-order change of hook_attn_out when the layer's whole hook_z moves from clean to corrupted},
    by central differences through gemmalens's forward, Richardson-extrapolated (steps eps and eps / 2: the eps^2
    error cancels, and the steps stay large beside float32's rounding). Every layer's z is replaced at once: a
    layer's attention output depends on its own z only."""
    L = model.config.num_hidden_layers
    zs = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    outs = [f"blocks.{l}.hook_attn_out" for l in range(L)]
    _, c = model.run_with_cache(clean, names_filter=zs, attention_mask=mask)
    _, k = model.run_with_cache(corrupted, names_filter=zs, attention_mask=mask)

    def central(e):
        got = []
        for s in (e, -e):
            def put(a, hook, s=s):
                n = hook.name
                a[...] = (c[n].astype(np.float64) + s * (k[n].astype(np.float64) - c[n])).astype(np.float32)

            _, r = model.run_with_cache(clean, names_filter=outs, attention_mask=mask, fwd_hooks=[(z, put) for z in zs])
            got.append(r)
        return [(got[0][o].astype(np.float64) - got[1][o]) / (2 * e) for o in outs]

    wide, narrow = central(eps_fd), central(eps_fd / 2)
    return {l: (4 * narrow[l] - wide[l]) / 3 for l in range(L)}


def test_edges_into_a_node_add_up_to_the_first_order_change_of_its_input(case):
    """Sum over a node's incoming edges = (the change of its whole input, with each attention output's change taken
    to first order) . (its input gradient); the sum over a layer's heads = (first-order change of hook_attn_out) .
    (gradient). Gradients from the torch reference; the changes from gemmalens's own runs."""
    model, es, (_, down, _) = case["model"], case["es"], case["ref"]
    clean, corrupted, mask = case["clean"], case["corrupted"], case["mask"]
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    names = ["hook_embed", f"blocks.{L - 1}.hook_resid_post"] + [
        f"blocks.{l}.{n}" for l in range(L) for n in ("hook_resid_pre", "hook_resid_mid", "hook_attn_out")]
    _, c = model.run_with_cache(clean, names_filter=names, attention_mask=mask)
    _, k = model.run_with_cache(corrupted, names_filter=names, attention_mask=mask)
    delta = {n: k[n].astype(np.float64) - c[n] for n in names}
    first = _first_order_attn_out(model, clean, corrupted, mask)
    live = np.ones(clean.shape + (1,)) if mask is None else mask[..., None].astype(np.float64)
    scale = np.abs(es.scores).max()
    for j, v in enumerate(es.downstream):
        layer = L if v == "logits" else int(v[1:].split(".")[0])
        if v == "logits":
            site, attn_layers = f"blocks.{L - 1}.hook_resid_post", range(L)
        elif v.startswith("m"):
            site, attn_layers = f"blocks.{layer}.hook_resid_mid", range(layer + 1)
        else:
            site, attn_layers = f"blocks.{layer}.hook_resid_pre", range(layer)
        # the input's actual change less each earlier attention output's second-order part
        x = delta[site] - sum((delta[f"blocks.{l}.hook_attn_out"] - first[l] for l in attn_layers), 0.0)
        want = float((x * down[v] * live).sum())
        assert es.scores[:, j].sum() == pytest.approx(want, abs=1e-4 * scale), v
        for l in attn_layers:
            heads = [es.upstream.index(f"a{l}.h{h}") for h in range(H)]
            assert es.scores[heads, j].sum() == pytest.approx(float((first[l] * down[v] * live).sum()),
                                                              abs=1e-4 * scale), (l, v)
