"""Helpers that write GGUF files with the `gguf` package itself (the format's own writer)."""
import numpy as np

HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm",
}


def gguf_name(hf_name):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, n, rest = hf_name.split(".", 3)
    return f"blk.{n}.{HF_TO_GGUF[rest[: -len('.weight')]]}.weight"


def write_gemma3_gguf(path, hf_model, quant=None, tokenizer_tokens=None, skip=(), reshape=None, chat_template=None,
                      special_ids=None, add_space_prefix=None):
    """Write an HF Gemma3ForCausalLM as a llama.cpp-style gemma3 GGUF (norms stored as 1 + w).

    quant: a GGMLQuantizationType for the 2-D projection weights (None = F32).
    chat_template: written as tokenizer.chat_template (llama.cpp's converter copies an instruction-tuned model's).
    special_ids: {"bos": id, "eos": id, "unk": id, "pad": id} written as tokenizer.ggml.*_token_id.
    add_space_prefix: tokenizer.ggml.add_space_prefix (Gemma 3's GGUFs write False; llama.cpp's default is True).
    """
    import gguf

    cfg = hf_model.config
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    if tokenizer_tokens is not None:
        tokens, scores, types = tokenizer_tokens
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    for kind, i in (special_ids or {}).items():
        {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id, "pad": w.add_pad_token_id}[kind](i)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" or name in skip:
            continue
        a = t.detach().float().numpy()
        if "norm" in name:
            a = a + 1.0
        if reshape and name in reshape:
            a = np.resize(a, reshape[name])
        gname = gguf_name(name)
        if quant is not None and a.ndim == 2 and a.shape[1] % 32 == 0:
            w.add_tensor(gname, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(gname, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
