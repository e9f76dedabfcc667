"""Write random-weight Gemma 3 checkpoints of real shapes (270m, 1b) as HF safetensors directories.

Weights are N(0, 0.02) (norms N(0, 0.1)) stored in bf16, so every engine reads the same values.
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


def write_safetensors(path, tensors):
    """tensors: name -> (np.uint16 bf16 bits | np.float32 array, shape)."""
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        dt = "BF16" if arr.dtype == np.uint16 else "F32"
        b = arr.tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def make(size, out_dir, seed=0):
    import gemmalens as gl

    cfg = gl.Gemma3Config.preset(size)
    cfg.max_position_embeddings = 8192
    rng = np.random.default_rng(seed)
    D, F, H, KV, Hd, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                          cfg.head_dim, cfg.vocab_size)

    def w(*shape, std=0.02):
        return _bf16_bytes(rng.standard_normal(shape, dtype=np.float32) * std)

    t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": w(D, std=0.1)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(H * Hd, D)
        t[p + "self_attn.k_proj.weight"] = w(KV * Hd, D)
        t[p + "self_attn.v_proj.weight"] = w(KV * Hd, D)
        t[p + "self_attn.o_proj.weight"] = w(D, H * Hd)
        t[p + "self_attn.q_norm.weight"] = w(Hd, std=0.1)
        t[p + "self_attn.k_norm.weight"] = w(Hd, std=0.1)
        t[p + "mlp.gate_proj.weight"] = w(F, D)
        t[p + "mlp.up_proj.weight"] = w(F, D)
        t[p + "mlp.down_proj.weight"] = w(D, F)
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            t[p + n + ".weight"] = w(D, std=0.1)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), t)
    cfg.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    out = sys.argv[1]
    for s in sys.argv[2:] or ["270m", "1b"]:
        make(s, os.path.join(out, f"random-{s}"))
        print("wrote", os.path.join(out, f"random-{s}"))
