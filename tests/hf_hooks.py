"""Reference activations from HF transformers (fp32, eager) with torch forward hooks, in TransformerLens names."""
import numpy as np
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gemma3 import modeling_gemma3

_RECORD = {}


def _recording_eager(module, q, k, v, mask, **kw):
    """HF's eager attention (modeling_gemma3.eager_attention_forward's steps, softcap honoured), computed here so that
    the post-RoPE q/k, the masked scores and the pattern it records are the tensors on the path to the output (their
    gradients are the gradients at those sites)."""
    softcap = module.attn_logit_softcapping
    key = modeling_gemma3.repeat_kv(k, module.num_key_value_groups)
    value = modeling_gemma3.repeat_kv(v, module.num_key_value_groups)
    s = torch.matmul(q, key.transpose(2, 3)) * module.scaling
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s + mask[:, :, :, : key.shape[-2]]
    w = torch.nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(w, value).transpose(1, 2).contiguous()
    rec = _RECORD.get("sink")
    if rec is not None:
        for x in (q, k, s, w):
            if x.requires_grad:
                x.retain_grad()
        rec[module.layer_idx] = {"rot_q": q, "rot_k": k, "scores": s, "pattern": w, "mask": None if mask is None else mask.detach()}
    return out, w


ALL_ATTENTION_FUNCTIONS.register("eager_record", _recording_eager)
ALL_MASK_ATTENTION_FUNCTIONS.register("eager_record", eager_mask)


def _split_norm(mod, scale_name, normalized_name, keep, edits):
    """A forward for one of HF's Gemma3RMSNorm modules in TransformerLens's steps, so that its hook_scale and
    hook_normalized are tensors on the path to the output (autograd gives their gradients): s = sqrt(mean(x^2) +
    eps), n = x / s, out = n * (1 + w) -- HF's x * rsqrt(mean(x^2) + eps) * (1 + w) up to f32 rounding. edits:
    {name: torch fn} applied at those two sites, as a TransformerLens forward hook would."""
    def forward(x):
        xf = x.float()
        s = (xf.pow(2).mean(-1, keepdim=True) + mod.eps).sqrt()
        if scale_name in edits:
            s = edits[scale_name](s)
        keep(scale_name, s, lambda t: t)
        n = xf / s
        if normalized_name in edits:
            n = edits[normalized_name](n)
        keep(normalized_name, n, lambda t: t)
        return (n * (1.0 + mod.weight.float())).type_as(x)
    return forward


def hf_activations(hf, ids, attention_mask=None, metric=None, norm_edits=None):
    """Run HF on ids [B, T]; return ({TL hook name: np.ndarray} for every site and layer, logits). With metric (a
    function of the logits tensor returning a scalar), also {name: gradient of the metric at that site} after
    torch autograd's backward, third. norm_edits: {hook_scale / hook_normalized name: torch fn} edits made inside
    the norms (other sites are edited with torch hooks on HF's modules, registered before this call).

    Each RMSNorm runs as TransformerLens's steps (_split_norm): its hook_scale [..., 1] and hook_normalized (before
    the weight) are recorded inside it, its hook_out (after the weight) is the module's output. q_norm / k_norm act
    on HF's [B, heads, T, Hd] tensors, TransformerLens's layout for them."""
    cfg = hf.config
    H, KV, Hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    live, handles = {}, []  # name -> (tensor, layout function)
    t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    B, T = t.shape

    def keep(name, x, fn):
        if metric is not None and x.requires_grad:
            x.retain_grad()
        live[name] = (x, fn)

    def out_hook(name, fn=lambda x: x):
        def h(mod, args, out):
            keep(name, out if isinstance(out, torch.Tensor) else out[0], fn)
        return h

    def in_hook(name, fn=lambda x: x):
        def h(mod, args, kwargs):
            keep(name, args[0] if args else kwargs["hidden_states"], fn)
        return h

    heads = lambda n: (lambda x: x.reshape(B, T, n, Hd))  # noqa: E731
    bhtd = lambda x: x.transpose(1, 2)  # noqa: E731  [B, h, T, Hd] -> [B, T, h, Hd]
    m = hf.model
    norm_edits = dict(norm_edits or {})
    split = []  # (module) whose forward is replaced for this call

    def norm_sites(mod, prefix, extra=()):
        """TransformerLens's three sites of a norm: scale and normalized inside it, hook_out (and aliases such as
        hook_attn_out) its module output, after any torch hook registered before this call."""
        mod.forward = _split_norm(mod, prefix + "hook_scale", prefix + "hook_normalized", keep, norm_edits)
        split.append(mod)
        return [mod.register_forward_hook(out_hook(n)) for n in (prefix + "hook_out",) + tuple(extra)]

    handles.append(m.embed_tokens.register_forward_hook(out_hook("hook_embed")))
    handles += norm_sites(m.norm, "ln_final.")
    for i, layer in enumerate(m.layers):
        p = f"blocks.{i}."
        a = layer.self_attn
        handles += [
            layer.register_forward_pre_hook(in_hook(p + "hook_resid_pre"), with_kwargs=True),
            a.q_proj.register_forward_hook(out_hook(p + "attn.hook_q", heads(H))),
            a.k_proj.register_forward_hook(out_hook(p + "attn.hook_k", heads(KV))),
            a.v_proj.register_forward_hook(out_hook(p + "attn.hook_v", heads(KV))),
            a.o_proj.register_forward_pre_hook(in_hook(p + "attn.hook_z", heads(H)), with_kwargs=True),
            layer.pre_feedforward_layernorm.register_forward_pre_hook(in_hook(p + "hook_resid_mid"), with_kwargs=True),
            layer.mlp.gate_proj.register_forward_hook(out_hook(p + "mlp.hook_pre")),
            layer.mlp.up_proj.register_forward_hook(out_hook(p + "mlp.hook_pre_linear")),
            layer.mlp.down_proj.register_forward_pre_hook(in_hook(p + "mlp.hook_post"), with_kwargs=True),
            layer.register_forward_hook(out_hook(p + "hook_resid_post")),
        ]
        handles += norm_sites(layer.input_layernorm, p + "ln1.")
        handles += norm_sites(a.q_norm, p + "attn.q_norm.", [p + "attn.hook_q_normed"])
        handles += norm_sites(a.k_norm, p + "attn.k_norm.", [p + "attn.hook_k_normed"])
        handles += norm_sites(layer.post_attention_layernorm, p + "ln1_post.", [p + "hook_attn_out"])
        handles += norm_sites(layer.pre_feedforward_layernorm, p + "ln2.")
        handles += norm_sites(layer.post_feedforward_layernorm, p + "ln2_post.", [p + "hook_mlp_out"])
    prev = hf.config._attn_implementation
    hf.set_attn_implementation("eager_record")
    _RECORD["sink"] = rec = {}
    kw = {}
    if attention_mask is not None:  # positions count from each row's first real token, as gemmalens's do
        am = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        kw = {"attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp(min=0)}
    try:
        with torch.set_grad_enabled(metric is not None):
            out = hf(t, **kw).logits
            if metric is not None:
                metric(out).backward()
    finally:
        _RECORD["sink"] = None
        hf.set_attn_implementation(prev)
        for h in handles:
            h.remove()
        for mod in split:
            del mod.forward  # the class's forward again
    for i, r in rec.items():
        p = f"blocks.{i}.attn."
        visible = r["mask"] == 0 if r["mask"] is not None else torch.ones_like(r["scores"], dtype=torch.bool)
        live[p + "hook_rot_q"] = (r["rot_q"], bhtd)
        live[p + "hook_rot_k"] = (r["rot_k"], bhtd)
        live[p + "hook_attn_scores"] = (r["scores"], lambda x, vis=visible: torch.where(vis, x, -torch.inf))
        live[p + "hook_pattern"] = (r["pattern"], lambda x: x)
    acts = {n: fn(x).detach().float().numpy().copy() for n, (x, fn) in live.items()}
    logits = out.detach().float().numpy()
    if metric is None:
        return acts, logits
    grads = {}
    for n, (x, fn) in live.items():
        g = torch.zeros_like(x) if x.grad is None else x.grad
        if n.endswith("hook_attn_scores"):  # the gradient at masked scores is 0 (their pattern entries are)
            g = torch.where(visible_of(rec, n), g, 0.0)
        else:
            g = fn(g)
        grads[n] = g.detach().float().numpy().copy()
    return acts, logits, grads


def visible_of(rec, name):
    r = rec[int(name.split(".")[1])]
    return r["mask"] == 0 if r["mask"] is not None else torch.ones_like(r["scores"], dtype=torch.bool)
