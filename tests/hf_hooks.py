"""Reference activations from HF transformers (fp32, eager) with torch forward hooks, in TransformerLens names."""
import numpy as np
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gemma3 import modeling_gemma3

_RECORD = {}


def _recording_eager(module, q, k, v, mask, **kw):
    """HF's eager attention, recording post-RoPE q/k, the masked scores and the pattern for module.layer_idx."""
    kw.pop("softcap", None)
    softcap = module.attn_logit_softcapping
    rec = _RECORD.get("sink")
    if rec is not None:
        key = modeling_gemma3.repeat_kv(k, module.num_key_value_groups)
        s = torch.matmul(q, key.transpose(2, 3)) * module.scaling
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if mask is not None:
            s = s + mask
        rec[module.layer_idx] = {"rot_q": q.detach().clone(), "rot_k": k.detach().clone(), "scores": s.detach().clone(),
                                 "mask": None if mask is None else mask.detach().clone()}
    out, w = modeling_gemma3.eager_attention_forward(module, q, k, v, mask, softcap=softcap, **kw)
    if rec is not None:
        rec[module.layer_idx]["pattern"] = w.detach().clone()
    return out, w


ALL_ATTENTION_FUNCTIONS.register("eager_record", _recording_eager)
ALL_MASK_ATTENTION_FUNCTIONS.register("eager_record", eager_mask)


def hf_activations(hf, ids):
    """Run HF on ids [B, T]; return {TL hook name: np.ndarray} for every site and layer, and the logits."""
    cfg = hf.config
    H, KV, Hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    acts, handles = {}, []
    t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    B, T = t.shape

    def out_hook(name, fn=lambda x: x):
        def h(mod, args, out):
            acts[name] = fn(out if isinstance(out, torch.Tensor) else out[0]).detach().float().numpy().copy()
        return h

    def in_hook(name, fn=lambda x: x):
        def h(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            acts[name] = fn(x).detach().float().numpy().copy()
        return h

    heads = lambda n: (lambda x: x.reshape(B, T, n, Hd))  # noqa: E731
    bhtd = lambda x: x.transpose(1, 2)  # noqa: E731  [B, h, T, Hd] -> [B, T, h, Hd]
    m = hf.model
    handles.append(m.embed_tokens.register_forward_hook(out_hook("hook_embed")))
    handles.append(m.norm.register_forward_hook(out_hook("ln_final.hook_normalized")))
    for i, layer in enumerate(m.layers):
        p = f"blocks.{i}."
        a = layer.self_attn
        handles += [
            layer.register_forward_pre_hook(in_hook(p + "hook_resid_pre"), with_kwargs=True),
            layer.input_layernorm.register_forward_hook(out_hook(p + "ln1.hook_normalized")),
            a.q_proj.register_forward_hook(out_hook(p + "attn.hook_q", heads(H))),
            a.k_proj.register_forward_hook(out_hook(p + "attn.hook_k", heads(KV))),
            a.v_proj.register_forward_hook(out_hook(p + "attn.hook_v", heads(KV))),
            a.q_norm.register_forward_hook(out_hook(p + "attn.q_norm.hook_normalized", bhtd)),
            a.k_norm.register_forward_hook(out_hook(p + "attn.k_norm.hook_normalized", bhtd)),
            a.o_proj.register_forward_pre_hook(in_hook(p + "attn.hook_z", heads(H)), with_kwargs=True),
            layer.post_attention_layernorm.register_forward_hook(out_hook(p + "ln1_post.hook_normalized")),
            layer.post_attention_layernorm.register_forward_hook(out_hook(p + "hook_attn_out")),
            layer.pre_feedforward_layernorm.register_forward_pre_hook(in_hook(p + "hook_resid_mid"), with_kwargs=True),
            layer.pre_feedforward_layernorm.register_forward_hook(out_hook(p + "ln2.hook_normalized")),
            layer.mlp.gate_proj.register_forward_hook(out_hook(p + "mlp.hook_pre")),
            layer.mlp.up_proj.register_forward_hook(out_hook(p + "mlp.hook_pre_linear")),
            layer.mlp.down_proj.register_forward_pre_hook(in_hook(p + "mlp.hook_post"), with_kwargs=True),
            layer.post_feedforward_layernorm.register_forward_hook(out_hook(p + "ln2_post.hook_normalized")),
            layer.post_feedforward_layernorm.register_forward_hook(out_hook(p + "hook_mlp_out")),
            layer.register_forward_hook(out_hook(p + "hook_resid_post")),
        ]
    prev = hf.config._attn_implementation
    hf.set_attn_implementation("eager_record")
    _RECORD["sink"] = rec = {}
    try:
        with torch.no_grad():
            logits = hf(t).logits.float().numpy()
    finally:
        _RECORD["sink"] = None
        hf.set_attn_implementation(prev)
        for h in handles:
            h.remove()
    for i, r in rec.items():
        p = f"blocks.{i}.attn."
        acts[p + "hook_rot_q"] = bhtd(r["rot_q"]).numpy()
        acts[p + "hook_rot_k"] = bhtd(r["rot_k"]).numpy()
        s = r["scores"].numpy()
        visible = r["mask"].numpy() == 0 if r["mask"] is not None else np.ones_like(s, bool)
        acts[p + "hook_attn_scores"] = np.where(np.broadcast_to(visible, s.shape), s, -np.inf)
        acts[p + "hook_pattern"] = r["pattern"].numpy()
    return acts, logits
