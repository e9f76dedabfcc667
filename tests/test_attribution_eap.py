"""Edge attribution patching against its definition, computed independently: each edge's score is the derivative
of the metric when only the downstream component's own input moves along the upstream component's change. The
reference makes that move with forward hooks (the input rebuilt in numpy from the residual stream with the norm's
forward formula) and takes a central finite difference; a head's change is measured on the model itself (the
attention output with that head's z nudged). No gradient code is involved."""
import numpy as np
import pytest

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
                     ("ln_final.hook_normalized",
                      lambda a, hook, s=s: _rmsnorm(store["x"] + s * eps_fd * delta, W["model.norm.weight"], e).astype(np.float32))]
        elif down.startswith("m"):
            l = int(down[1:])
            w = W[f"model.layers.{l}.pre_feedforward_layernorm.weight"]
            hooks = [(f"blocks.{l}.hook_resid_mid", keep),
                     (f"blocks.{l}.ln2.hook_normalized",
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
    up, down = es.upstream.index("a3.h0"), es.downstream.index("a3.h1<q>")
    assert not es.valid[up, down] and es.scores[up, down] == 0  # same layer: no edge
    assert es.valid[up, es.downstream.index("m3")] and es.valid[es.upstream.index("m3"), es.downstream.index("a4.h0<q>")]
    assert not es.valid[es.upstream.index("m3"), es.downstream.index("m3")]
    assert es.metric_value == pytest.approx(metric(model.forward(clean)), rel=1e-5)
    top = gl.attribution.top_edges(es, 5)
    assert len(top) == 5 and [abs(t[2]) for t in top] == sorted((abs(t[2]) for t in top), reverse=True)
    assert abs(top[0][2]) == pytest.approx(np.abs(es.scores[es.valid]).max())
    assert es.top(5) == top and len(es.top(10**6)) == int(es.valid.sum())
    with pytest.raises(ValueError, match="positive int"):
        gl.attribution.top_edges(es, 0)
    with pytest.raises(TypeError, match="EdgeScores"):
        gl.attribution.top_edges({}, 3)
    with pytest.raises(ValueError, match="same shape"):
        gl.attribution.edge_attribution_patching(model, clean, corrupted[:, :5], metric)


def test_scores_of_an_identical_run_are_zero(setup):
    model, clean, _, metric, _ = setup
    es = gl.attribution.edge_attribution_patching(model, clean, clean, metric)
    assert not es.scores.any()
