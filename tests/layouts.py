"""Checkpoint layouts the tests and the fuzzer's seeds write: HF-named numpy weights -> the Kaggle Flax FLAT layout."""
import numpy as np


def kaggle_params(sd):
    """{HF name: np.ndarray} -> the Kaggle Flax FLAT layout (seed 000 / the reference table), for orbax-checkpoint."""
    Hd = sd["model.layers.0.self_attn.q_norm.weight"].shape[0]
    D = sd["model.embed_tokens.weight"].shape[1]
    H = sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // Hd
    KV = sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // Hd
    n_layers = 1 + max(int(n.split(".")[2]) for n in sd if n.startswith("model.layers."))
    p = {"transformer/embedder": {"input_embedding": sd["model.embed_tokens.weight"]},
         "transformer/final_norm": {"scale": sd["model.norm.weight"]}}
    for i in range(n_layers):
        h, k = f"model.layers.{i}.", f"transformer/layer_{i}/"
        p[k + "attn/q_einsum"] = {"w": sd[h + "self_attn.q_proj.weight"].reshape(H, Hd, D).transpose(0, 2, 1)}
        kk = sd[h + "self_attn.k_proj.weight"].reshape(KV, Hd, D).transpose(0, 2, 1)
        vv = sd[h + "self_attn.v_proj.weight"].reshape(KV, Hd, D).transpose(0, 2, 1)
        p[k + "attn/kv_einsum"] = {"w": np.stack([kk, vv])}
        p[k + "attn/attn_vec_einsum"] = {"w": sd[h + "self_attn.o_proj.weight"].reshape(D, H, Hd).transpose(1, 2, 0)}
        p[k + "attn/_query_norm"] = {"scale": sd[h + "self_attn.q_norm.weight"]}
        p[k + "attn/_key_norm"] = {"scale": sd[h + "self_attn.k_norm.weight"]}
        p[k + "mlp/gating_einsum"] = {"w": np.stack([sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]])}
        p[k + "mlp/linear"] = {"w": sd[h + "mlp.down_proj.weight"].T.copy()}
        for hn, kn in (("input_layernorm", "pre_attention_norm"), ("post_attention_layernorm", "post_attention_norm"),
                       ("pre_feedforward_layernorm", "pre_ffw_norm"), ("post_feedforward_layernorm", "post_ffw_norm")):
            p[k + kn] = {"scale": sd[h + hn + ".weight"]}
    return p
