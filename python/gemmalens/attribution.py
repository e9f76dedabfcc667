"""Gradient-based attribution on the native reverse pass.

``attribution_patching`` is the first-order (linear) estimate of activation patching (Nanda, "Attribution
Patching", 2023; Syed et al., 2023): patching site A from a corrupted run into the clean run changes the metric by
about (A_corrupted - A_clean) . dMetric/dA_clean, computed for every site, position and head from one clean
forward + reverse pass and one corrupted forward.

``integrated_gradients`` (Sundararajan et al., 2017) integrates the gradient at one hook site along the straight
path from a baseline activation to the real one; its attributions sum to metric(real) - metric(baseline).

``edge_attribution_patching`` (EAP; Syed, Rager and Conmy, "Attribution Patching Outperforms Automated Circuit
Discovery", 2023) scores every edge between components: the change of an upstream component's output times the
gradient at a downstream component's own input, from the same two runs.
"""
import numpy as np

from . import interventions

__all__ = ["attribution_patching", "integrated_gradients", "edge_attribution_patching", "top_edges", "EdgeScores"]

def attribution_patching(model, clean, corrupted, metric, names=None, attention_mask=None):
    """{hook name: estimated change of ``metric`` when that activation is patched from ``corrupted`` into ``clean``}.

    clean, corrupted: token ids of the same shape [batch, pos] (1-D: batch 1). metric: what
    ``run_with_cache(incl_bwd=True)`` takes ("loss", a ``gl.metrics`` object, a dMetric/dLogits array), evaluated
    on the clean run. names: a hook name, a list, or a filter (None: every ``hook_resid_pre``, ``hook_attn_out``
    and ``hook_mlp_out``, plus ``attn.hook_z``).

    Each score sums (corrupted - clean) * gradient over the activation's last axis: [batch, pos] for the residual
    stream and other [batch, pos, d] sites (a norm's ``hook_scale`` too), [batch, pos, head] for per-head sites
    (``attn.hook_z`` ...), [batch, head, pos] for those in TransformerLens's [batch, head, pos, d_head] layout
    (``attn.q_norm.*``, ``attn.k_norm.*``, ``attn.hook_q_normed`` / ``hook_k_normed``);
    ``attn.hook_attn_scores`` / ``hook_pattern`` keep every entry ([batch, head, query, key]).
    """
    if names is None:
        names = lambda n: n.endswith(("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "attn.hook_z"))  # noqa: E731
    clean_t = model.to_tokens(clean)
    corrupt_t = model.to_tokens(corrupted)
    if clean_t.shape != corrupt_t.shape:
        raise ValueError(f"clean {clean_t.shape} and corrupted {corrupt_t.shape} tokens must have the same shape "
                         "(pad them to one length and pass attention_mask)")
    _, clean_cache = model.run_with_cache(clean_t, names_filter=names, attention_mask=attention_mask, incl_bwd=True,
                                          metric=metric)
    _, corrupt_cache = model.run_with_cache(corrupt_t, names_filter=names, attention_mask=attention_mask,
                                            return_type=None)
    out = {}
    for name in corrupt_cache:
        with np.errstate(invalid="ignore"):  # -inf - -inf at masked attention scores
            delta = corrupt_cache[name].astype(np.float64) - clean_cache[name]
            prod = delta * clean_cache[name + "_grad"]
        if name.endswith(("hook_attn_scores", "hook_pattern")):
            # -inf scores at masked slots: their gradient is 0 and so is their share
            out[name] = np.where(np.isfinite(delta), prod, 0.0)
        else:
            out[name] = prod.sum(axis=-1)
    return out


def integrated_gradients(model, tokens, metric, name, baseline=None, steps=16, attention_mask=None):
    """Integrated gradients of ``metric`` at hook site ``name``: (x - baseline) * the mean of the metric's gradient
    at baseline + a (x - baseline) over the midpoints a = (k + 1/2) / steps. Returns an array of the activation's
    shape (sum over its last axis for a per-position / per-head saliency); summed over everything it approximates
    metric(x) - metric(baseline) (the completeness property), closer with more steps.

    baseline: an array of the activation's shape (or without the batch axis), or None for zeros. For residual-stream
    sites prefer the activation of a reference input: Gemma's RMSNorms are scale-invariant away from 0 and change
    abruptly near it, so a zero baseline puts most of the change where no step samples. Each step is one
    gradient run with the site replaced (``gl.interventions.replace``), so the gradient is that of the model with
    the interpolated activation, as in the method's definition.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"integrated_gradients: steps must be an int >= 1, got {steps!r}")
    model._hook_table.resolve(name)
    _, cache = model.run_with_cache(tokens, names_filter=[name], attention_mask=attention_mask, return_type=None)
    x = cache[name].astype(np.float64)
    if baseline is None:
        base = np.zeros_like(x)
    else:
        base = np.asarray(baseline, dtype=np.float64)
        if base.shape not in (x.shape, x.shape[1:]):
            raise ValueError(f"integrated_gradients: baseline has shape {base.shape}; {name} is {x.shape} (or pass "
                             f"{x.shape[1:]} for every row)")
        base = np.broadcast_to(base, x.shape)
    total = np.zeros_like(x)
    for k in range(steps):
        a = (k + 0.5) / steps
        point = (base + a * (x - base)).astype(np.float32)
        _, c = model.run_with_cache(tokens, names_filter=[name], attention_mask=attention_mask,
                                    fwd_hooks=[(name, interventions.replace(point))], incl_bwd=True, metric=metric,
                                    return_type=None)
        total += c[name + "_grad"]
    return (x - base) * (total / steps)


def _rms(x, eps):
    return np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def _rmsnorm_vjp(x, w, eps, gy):
    """Gemma's RMSNorm y = x / rms(x) * (1 + w): the gradient at x for gy at y (linear in gy; float64)."""
    r = _rms(x, eps)
    gw = gy * (1.0 + w)
    return gw / r - x * (gw * x).mean(-1, keepdims=True) / r ** 3


def _rmsnorm_jvp(x, w, eps, dx):
    """The same norm's change at y for a change dx at x (first order, at x)."""
    r = _rms(x, eps)
    return (1.0 + w) * (dx / r - x * (x * dx).mean(-1, keepdims=True) / r ** 3)


class EdgeScores:
    """Edge attribution patching scores (``edge_attribution_patching``'s result).

    ``upstream`` / ``downstream``: the node names (lists); ``scores``: float64 [len(upstream), len(downstream)],
    ``scores[i, j]`` the first-order change of the metric when the edge ``upstream[i] -> downstream[j]`` carries the
    corrupted run's value and every other edge the clean one. ``valid[i, j]`` is False where no edge exists (the
    upstream component writes after the downstream one has read the residual stream); those scores are 0.
    ``per_position``: [len(upstream), len(downstream), batch, pos] when asked for (``scores`` is its sum over the last
    two axes), else None. ``metric_value``: the metric on the clean run.

    ``es[up, down]`` (or ``es.score(up, down)``) is one edge's score; ``edges()`` -> {(up, down): score} over the
    valid edges; ``top(k)`` = ``top_edges(es, k)``."""

    def __init__(self, upstream, downstream, scores, valid, metric_value, per_position=None):
        self.upstream, self.downstream = list(upstream), list(downstream)
        self.scores, self.valid = scores, valid
        self.per_position = per_position
        self.metric_value = metric_value  # the metric on the clean run
        self._up_index = {n: i for i, n in enumerate(self.upstream)}
        self._down_index = {n: j for j, n in enumerate(self.downstream)}

    def index(self, upstream, downstream):
        """(row, column) of edge upstream -> downstream in ``scores``; KeyError for an unknown node or a pair that is
        not an edge."""
        i, j = self._up_index.get(upstream), self._down_index.get(downstream)
        if i is None:
            raise KeyError(f"no upstream node {upstream!r} (upstream nodes: 'embed', 'a{{layer}}.h{{head}}', "
                           "'m{layer}')")
        if j is None:
            raise KeyError(f"no downstream node {downstream!r} (downstream nodes: 'a{{layer}}.h{{head}}<q>', "
                           "'a{layer}.kv{kv_head}<k>' / '<v>', 'm{layer}', 'logits')")
        if not self.valid[i, j]:
            raise KeyError(f"{upstream} -> {downstream} is not an edge: {upstream} writes to the residual stream after "
                           f"{downstream} reads it")
        return i, j

    def score(self, upstream, downstream):
        """The score of edge upstream -> downstream (a float)."""
        return float(self.scores[self.index(upstream, downstream)])

    def __getitem__(self, edge):
        if not (isinstance(edge, tuple) and len(edge) == 2):
            raise TypeError(f"EdgeScores[...] takes (upstream, downstream), got {edge!r}")
        return self.score(*edge)

    def __len__(self):
        return int(self.valid.sum())

    def edges(self):
        return {(self.upstream[i], self.downstream[j]): float(self.scores[i, j]) for i, j in zip(*np.nonzero(self.valid))}

    def top(self, k=20):
        return top_edges(self, k)

    def __repr__(self):
        return (f"EdgeScores({len(self.upstream)} upstream x {len(self.downstream)} downstream, "
                f"{int(self.valid.sum())} edges)")


def top_edges(scores, k=20):
    """The k edges with the largest |score|: [(upstream, downstream, score)], largest first. scores: EdgeScores."""
    if not isinstance(scores, EdgeScores):
        raise TypeError(f"top_edges takes the EdgeScores of edge_attribution_patching, got {type(scores).__name__}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"top_edges: k must be a positive int, got {k!r}")
    flat = np.where(scores.valid, np.abs(scores.scores), -1.0).ravel()
    n = min(int(k), int(scores.valid.sum()))
    order = np.argsort(-flat, kind="stable")[:n]
    nd = len(scores.downstream)
    return [(scores.upstream[i // nd], scores.downstream[i % nd], float(scores.scores.flat[i])) for i in order]


def edge_attribution_patching(model, clean, corrupted, metric, attention_mask=None, per_position=False):
    """Edge attribution patching over the components of Gemma 3 -> EdgeScores.

    clean, corrupted: token ids of one shape [batch, pos] (1-D: batch 1); pad rows to one length on the left and
    pass attention_mask (padding positions count for nothing). metric: what ``run_with_cache(incl_bwd=True)`` takes
    ("loss", a ``gl.metrics`` object, a dMetric/dLogits array), evaluated on the clean run. per_position: also keep
    each edge's score per batch row and position (``EdgeScores.per_position``).

    Nodes. Upstream components write to the residual stream: ``embed`` (hook_embed, the stream before block 0), each
    attention head ``a{l}.h{h}`` and each MLP ``m{l}`` (hook_mlp_out). Gemma normalises each block's output before
    adding it (post-attention and post-feedforward RMSNorms), so one head's share of the attention output is defined
    through that norm linearised at the clean run: J_norm(clean o_proj output) (delta z_h W_O[:, h]^T), delta z_h its
    attn.hook_z change -- the heads' shares add up to the first-order change of hook_attn_out.
    Downstream components read it: each query head's input ``a{l}.h{h}<q>``, each key / value head's
    ``a{l}.kv{g}<k>`` / ``a{l}.kv{g}<v>`` (with grouped-query attention a key/value head is shared by the
    num_attention_heads / num_key_value_heads query heads of its group, so it is one node), each MLP's input
    ``m{l}`` and the unembedding ``logits`` (the final norm's input). The gradient at a component's own input is the
    metric's gradient flowing into that component only, through its input norm: e.g. for query head h,
    RMSNorm-VJP(resid_pre, ln1, dq_h W_Q[h]) with dq_h the gradient at attn.hook_q (before q_norm).

    Edges: every upstream node to every downstream node that reads the residual stream after it was written: embed
    to everything, a layer's heads to its MLP and to every later layer, a layer's MLP to every later layer.

    score(u -> v) = sum over batch rows and positions of (u's output on corrupted - on clean) . (gradient at v's
    input on the clean run) (Syed, Rager and Conmy 2023): the first-order estimate of
    metric(only that edge patched) - metric(clean). Summing over the batch matches the metric's own convention:
    ``gl.metrics`` average over rows, so their gradients already carry the 1/batch. Cost: one clean gradient run and
    one corrupted forward; weights are widened to float32 one layer at a time.
    """
    if not isinstance(per_position, (bool, np.bool_)):
        raise TypeError(f"edge_attribution_patching: per_position must be True or False, got {per_position!r}")
    clean_t, corrupt_t = model.to_tokens(clean), model.to_tokens(corrupted)
    if clean_t.shape != corrupt_t.shape:
        raise ValueError(f"clean {clean_t.shape} and corrupted {corrupt_t.shape} tokens must have the same shape "
                         "(pad them to one length and pass attention_mask)")
    cfg = model.config
    L, H, KV, Hd, D = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                       cfg.hidden_size)
    eps = float(cfg.rms_norm_eps)
    per_layer = ("hook_resid_pre", "hook_resid_mid", "attn.hook_z", "hook_mlp_out", "attn.hook_q", "attn.hook_k",
                 "attn.hook_v", "ln2.hook_out")
    names = ["hook_embed", f"blocks.{L - 1}.hook_resid_post", "ln_final.hook_out"] + [
        f"blocks.{l}.{n}" for l in range(L) for n in per_layer]
    _, cc = model.run_with_cache(clean_t, names_filter=names, attention_mask=attention_mask, incl_bwd=True,
                                 metric=metric, return_type=None)
    up_names = ["hook_embed"] + [f"blocks.{l}.{n}" for l in range(L) for n in ("attn.hook_z", "hook_mlp_out")]
    _, kc = model.run_with_cache(corrupt_t, names_filter=up_names, attention_mask=attention_mask, return_type=None)
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    B, T = clean_t.shape
    if attention_mask is not None:  # padding slots: neither their changes nor their gradients count
        live = (np.asarray(attention_mask).reshape(B, T) != 0)[..., None]
    else:
        live = np.ones((B, T, 1), bool)

    up, up_vec, up_layer = ["embed"], [f64(kc["hook_embed"]) - f64(cc["hook_embed"])], [-1.0]
    down, down_vec, down_layer = [], [], []
    for l in range(L):
        p = f"model.layers.{l}."
        W = model._core.export_tensors([p + n for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                       "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                                       "input_layernorm.weight", "post_attention_layernorm.weight",
                                                       "pre_feedforward_layernorm.weight")])
        wq, wk, wv, wo = (f64(W[p + f"self_attn.{n}_proj.weight"]) for n in ("q", "k", "v", "o"))
        ln1, post, ln2 = (f64(W[p + n]) for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                                   "pre_feedforward_layernorm.weight"))
        b = f"blocks.{l}."
        # downstream: the attention heads' inputs (they read resid_pre through ln1)
        x = f64(cc[b + "hook_resid_pre"])
        for kind, site, n, w in (("q", "attn.hook_q", H, wq), ("k", "attn.hook_k", KV, wk), ("v", "attn.hook_v", KV, wv)):
            g = f64(cc[b + site + "_grad"])  # [B, T, n, Hd]
            for h in range(n):
                gy = g[:, :, h] @ w[h * Hd:(h + 1) * Hd]
                down.append(f"a{l}.h{h}<q>" if kind == "q" else f"a{l}.kv{h}<{kind}>")
                down_vec.append(_rmsnorm_vjp(x, ln1, eps, gy))
                down_layer.append(l)
        # upstream: each head's share of the attention output, through post_attention_layernorm linearised
        z, dz = f64(cc[b + "attn.hook_z"]), f64(kc[b + "attn.hook_z"]) - f64(cc[b + "attn.hook_z"])
        a = z.reshape(B, T, H * Hd) @ wo.T  # o_proj's output on the clean run
        for h in range(H):
            up.append(f"a{l}.h{h}")
            up_vec.append(_rmsnorm_jvp(a, post, eps, dz[:, :, h] @ wo[:, h * Hd:(h + 1) * Hd].T))
            up_layer.append(l + 0.0)
        # the MLP: reads resid_mid through ln2, writes hook_mlp_out
        down.append(f"m{l}")
        down_vec.append(_rmsnorm_vjp(f64(cc[b + "hook_resid_mid"]), ln2, eps, f64(cc[b + "ln2.hook_out_grad"])))
        down_layer.append(l + 0.5)
        up.append(f"m{l}")
        up_vec.append(f64(kc[b + "hook_mlp_out"]) - f64(cc[b + "hook_mlp_out"]))
        up_layer.append(l + 0.5)
    fin = f64(model._core.export_tensors(["model.norm.weight"])["model.norm.weight"])
    down.append("logits")
    down_vec.append(_rmsnorm_vjp(f64(cc[f"blocks.{L - 1}.hook_resid_post"]), fin, eps,
                                 f64(cc["ln_final.hook_out_grad"])))
    down_layer.append(float(L))
    # An attention head of layer l writes after layer l's heads read (so only to later layers and its own MLP); an
    # MLP of layer l writes after everything in layer l has read.
    valid = np.asarray(up_layer)[:, None] < np.asarray(down_layer)[None, :]
    U = np.stack([u * live for u in up_vec])  # [n_up, B, T, D]
    V = np.stack([v * live for v in down_vec])  # [n_down, B, T, D]
    by_pos = None
    if per_position:  # [B*T, n_up, D] @ [B*T, D, n_down] -> [n_up, n_down, B, T]
        nu, nd = len(up), len(down)
        by_pos = np.matmul(U.reshape(nu, B * T, D).transpose(1, 0, 2), V.reshape(nd, B * T, D).transpose(1, 2, 0))
        by_pos = np.where(valid[..., None, None], by_pos.transpose(1, 2, 0).reshape(nu, nd, B, T), 0.0)
        scores = by_pos.sum(axis=(2, 3))
    else:
        scores = np.where(valid, U.reshape(len(up), -1) @ V.reshape(len(down), -1).T, 0.0)
    return EdgeScores(up, down, scores, valid, cc.metric_value, by_pos)
