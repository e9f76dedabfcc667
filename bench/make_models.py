"""Write random-weight Gemma 3 checkpoints of real shapes (270m, 1b) as HF safetensors directories.

Weights are N(0, 0.02) (norms N(0, 0.1)) stored in bf16, so every engine reads the same values (as a BF16 GGUF too).
Usage: python bench/make_models.py OUT_DIR [270m 1b]
"""
import json
import os
import sys

import numpy as np


def _bf16_bytes(a):
    # f32 -> bf16 with round-to-nearest-even, as raw uint16.
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype(np.uint16)


def _weight_specs(cfg):
    """(HF name, shape, std) of every weight, in the order make() draws them: the order fixes the values for a seed."""
    D, F, H, KV, Hd, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                          cfg.head_dim, cfg.vocab_size)
    yield "model.embed_tokens.weight", (V, D), 0.02
    yield "model.norm.weight", (D,), 0.1
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (H * Hd, D), 0.02
        yield p + "self_attn.k_proj.weight", (KV * Hd, D), 0.02
        yield p + "self_attn.v_proj.weight", (KV * Hd, D), 0.02
        yield p + "self_attn.o_proj.weight", (D, H * Hd), 0.02
        yield p + "self_attn.q_norm.weight", (Hd,), 0.1
        yield p + "self_attn.k_norm.weight", (Hd,), 0.1
        yield p + "mlp.gate_proj.weight", (F, D), 0.02
        yield p + "mlp.up_proj.weight", (F, D), 0.02
        yield p + "mlp.down_proj.weight", (D, F), 0.02
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            yield p + n + ".weight", (D,), 0.1


_CHUNK = 1 << 29  # elements: tensors above this (2 GB in f32) are drawn in blocks of rows


def make(size, out_dir, seed=0):
    """Write out_dir/model.safetensors (BF16) and config.json for a preset size ("270m", "1b", ...).

    Each tensor is drawn, rounded to bf16 and written before the next is drawn, so the peak memory is the largest
    tensor (the 262144-row embedding: 1.2 GB in f32 for 1b), not the whole model in f32."""
    import gemmalens as gl

    cfg = gl.Gemma3Config.preset(size)
    cfg.max_position_embeddings = 8192
    specs = list(_weight_specs(cfg))
    header, off = {}, 0
    for name, shape, _ in specs:
        n = 2 * int(np.prod(shape))  # bytes in bf16
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)  # the data section starts 8-byte aligned
    rng = np.random.default_rng(seed)
    total = sum(int(np.prod(shape)) for _, shape, _ in specs)
    # Past 15B parameters (27b), drawing every value takes about an hour on 2 cores: each tensor is instead a run of
    # consecutive values from a pool of 2^28 bf16 draws per std, starting at a random offset (wrapping). The values
    # repeat with that period, which a load, its memory or its speed cannot tell from fresh draws.
    pools = {}
    if total > 15e9:
        for std in sorted({std for _, _, std in specs}):
            pools[std] = np.concatenate([_bf16_bytes(rng.standard_normal(1 << 26, dtype=np.float32) * std)
                                         for _ in range(4)])
    os.makedirs(out_dir, exist_ok=True)
    # Written under another name and renamed when complete: a killed run leaves no model.safetensors that run.py
    # would take for a finished checkpoint.
    tmp = os.path.join(out_dir, "model.safetensors.partial")
    with open(tmp, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for name, shape, std in specs:
            if pools:
                pool, n = pools[std], int(np.prod(shape))
                at = int(rng.integers(len(pool)))
                while n > 0:
                    k = min(n, len(pool) - at)
                    f.write(pool[at:at + k].tobytes())
                    n, at = n - k, 0
                continue
            if int(np.prod(shape)) <= _CHUNK:
                f.write(_bf16_bytes(rng.standard_normal(shape, dtype=np.float32) * std).tobytes())
                continue
            # 4b and up: the embedding (and 27b's matmuls) drawn a block of rows at a time, so that a 54 GB
            # checkpoint is written in a few GB of memory
            rows = max(1, _CHUNK // int(np.prod(shape[1:])))
            for r0 in range(0, shape[0], rows):
                n = min(rows, shape[0] - r0)
                f.write(_bf16_bytes(rng.standard_normal((n,) + tuple(shape[1:]), dtype=np.float32) * std).tobytes())
    cfg.save_pretrained(out_dir)
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    return out_dir


def write_bf16_gguf(hf_dir, out_path):
    """The same random weights as a llama.cpp gemma3 GGUF (BF16 projections; norms F32 stored as 1 + w), written
    with the `gguf` package, so llama.cpp runs exactly the weights gemmalens and HF run."""
    import gguf

    import gemmalens as gl
    from gemmalens import _core

    cfg = gl.Gemma3Config.from_pretrained(hf_dir)
    t = _core.read_safetensors(os.path.join(hf_dir, "model.safetensors"))
    w = gguf.GGUFWriter(out_path, "gemma3")
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
    w.add_rope_freq_base(cfg.rope_theta)
    # a minimal SentencePiece vocabulary so llama.cpp accepts the file (ids only are used in the benchmark)
    n = cfg.vocab_size
    w.add_tokenizer_model("llama")
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>"] + byte_pieces + [f"t{i}" for i in range(260, n)])
    w.add_token_scores([0.0] * n)
    w.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * (n - 260))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm"}
    for name, a in t.items():
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            g = f"blk.{i}.{names[rest[:-len('.weight')]]}.weight"
        if a.ndim == 1:
            w.add_tensor(g, (a + 1.0).astype(np.float32))
        else:
            w.add_tensor(g, _bf16_bytes(a).view(np.uint8).reshape(a.shape[0], -1), raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


if __name__ == "__main__":
    out = sys.argv[1]
    for s in sys.argv[2:] or ["270m", "1b"]:
        make(s, os.path.join(out, f"random-{s}"))
        print("wrote", os.path.join(out, f"random-{s}"))
