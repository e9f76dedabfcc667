"""Gradient-based attribution on the native reverse pass.

``attribution_patching`` is the first-order (linear) estimate of activation patching (Nanda, "Attribution
Patching", 2023; Syed et al., 2023): patching site A from a corrupted run into the clean run changes the metric by
about (A_corrupted - A_clean) . dMetric/dA_clean, computed for every site, position and head from one clean
forward + reverse pass and one corrupted forward.

``integrated_gradients`` (Sundararajan et al., 2017) integrates the gradient at one hook site along the straight
path from a baseline activation to the real one; its attributions sum to metric(real) - metric(baseline).
"""
import numpy as np

from . import interventions

__all__ = ["attribution_patching", "integrated_gradients"]

# Sites whose activations are [batch, pos, head, d_head]: their scores keep the head axis.
_PER_HEAD = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_rot_q", "attn.hook_rot_k",
             "attn.q_norm.hook_normalized", "attn.k_norm.hook_normalized")


def attribution_patching(model, clean, corrupted, metric, names=None, attention_mask=None):
    """{hook name: estimated change of ``metric`` when that activation is patched from ``corrupted`` into ``clean``}.

    clean, corrupted: token ids of the same shape [batch, pos] (1-D: batch 1). metric: what
    ``run_with_cache(incl_bwd=True)`` takes ("loss", a ``gl.metrics`` object, a dMetric/dLogits array), evaluated
    on the clean run. names: a hook name, a list, or a filter (None: every ``hook_resid_pre``, ``hook_attn_out``
    and ``hook_mlp_out``, plus ``attn.hook_z``).

    Each score sums (corrupted - clean) * gradient over the activation's last axis: [batch, pos] for the residual
    stream and other [batch, pos, d] sites, [batch, pos, head] for per-head sites (``attn.hook_z`` ...);
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
