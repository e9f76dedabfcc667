"""Checkpoint layouts the tests and the fuzzer's seeds write: HF-named numpy weights -> the Kaggle Flax FLAT layout and
MaxText's Gemma 3 layouts."""
import os

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


# ---------------------------------------------------------------- MaxText (AI-Hypercomputer/maxtext, commit e591f30c)

# HF -> MaxText per layer, after checkpoint_conversion/utils/param_mapping.py GEMMA3_MAXTEXT_TO_HF_PARAM_MAPPING
# (the pairs) and GEMMA3_MAXTEXT_TO_HF_PARAM_HOOK_FN (reshape_kernel: W.T.reshape(MaxText shape); scale_rmsnorm: w + 1).
MAXTEXT_LAYER = (
    ("pre_self_attention_norm/scale", "input_layernorm.weight"),
    ("post_self_attention_norm/scale", "post_attention_layernorm.weight"),
    ("self_attention/query_norm/scale", "self_attn.q_norm.weight"),
    ("self_attention/key_norm/scale", "self_attn.k_norm.weight"),
    ("pre_ffw_norm/scale", "pre_feedforward_layernorm.weight"),
    ("post_ffw_norm/scale", "post_feedforward_layernorm.weight"),
    ("self_attention/query/kernel", "self_attn.q_proj.weight"),
    ("self_attention/key/kernel", "self_attn.k_proj.weight"),
    ("self_attention/value/kernel", "self_attn.v_proj.weight"),
    ("self_attention/out/kernel", "self_attn.o_proj.weight"),
    ("mlp/wi_0/kernel", "mlp.gate_proj.weight"),
    ("mlp/wi_1/kernel", "mlp.up_proj.weight"),
    ("mlp/wo/kernel", "mlp.down_proj.weight"),
)


def _nest(flat):
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    out = {}
    for path, v in flat.items():
        *keys, leaf = path.split("/")
        d = out
        for k in keys:
            d = d.setdefault(k, {})
        d[leaf] = v
    return out


def maxtext_layer(sd, i, fused_mlp=False):
    """Layer i of HF weights -> {MaxText param path: array}, with MaxText's hook functions."""
    Hd = sd["model.layers.0.self_attn.q_norm.weight"].shape[0]
    D = sd["model.embed_tokens.weight"].shape[1]
    H = sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // Hd
    KV = sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // Hd
    F = sd["model.layers.0.mlp.gate_proj.weight"].shape[0]
    shapes = {"self_attention/query/kernel": (D, H, Hd), "self_attention/key/kernel": (D, KV, Hd),
              "self_attention/value/kernel": (D, KV, Hd), "self_attention/out/kernel": (H, Hd, D),
              "mlp/wi_0/kernel": (D, F), "mlp/wi_1/kernel": (D, F), "mlp/wo/kernel": (F, D)}
    out = {}
    for mx, hf in MAXTEXT_LAYER:
        w = sd[f"model.layers.{i}.{hf}"]
        out[mx] = w + 1.0 if mx.endswith("/scale") else w.T.reshape(shapes[mx]).copy()
    if fused_mlp:  # layers/linears.py MlpBlock with fused_mlp: one wi kernel [E, num_activations, F]
        out["mlp/wi/kernel"] = np.stack([out.pop("mlp/wi_0/kernel"), out.pop("mlp/wi_1/kernel")], axis=1)
    return out


def maxtext_params(sd, layout="scanned", vocab_size=None, fused_mlp=False):
    """{HF name: np.ndarray} -> MaxText's Gemma 3 params tree (what goes under params/params), in one of its layouts:
    'scanned' (decoder/layers/layers_{j} stacked on axis 1 over the N // 6 blocks, + decoder/layers_remainder),
    'unscanned' (decoder/layers_{i}) or 'stacked' (the older convert_gemma3_chkpt.py: decoder/layers/<param> stacked
    over all N layers on axis 1). The embedding is scaled by sqrt(E) rounded to bfloat16 and padded / truncated to
    `vocab_size` rows (pad_and_scale_embedding)."""
    import ml_dtypes

    emb = sd["model.embed_tokens.weight"]
    V, D = emb.shape
    normalizer = np.float32(ml_dtypes.bfloat16(D ** 0.5))
    emb = (emb * normalizer).astype(np.float32)
    vocab_size = vocab_size or V
    emb = emb[:vocab_size] if vocab_size <= V else np.concatenate([emb, np.zeros((vocab_size - V, D), np.float32)])
    L = 1 + max(int(n.split(".")[2]) for n in sd if n.startswith("model.layers."))
    layers = [maxtext_layer(sd, i, fused_mlp) for i in range(L)]
    flat = {"token_embedder/embedding": emb, "decoder/decoder_norm/scale": sd["model.norm.weight"] + 1.0}
    if layout == "unscanned":
        for i, layer in enumerate(layers):
            flat.update({f"decoder/layers_{i}/{k}": v for k, v in layer.items()})
    elif layout == "stacked":
        flat.update({f"decoder/layers/{k}": np.stack([layer[k] for layer in layers], axis=1) for k in layers[0]})
    elif layout == "scanned":
        n_blocks, rem = divmod(L, 6)
        if n_blocks:
            for j in range(6):
                flat.update({f"decoder/layers/layers_{j}/{k}": np.stack([layers[6 * b + j][k] for b in range(n_blocks)], axis=1)
                             for k in layers[0]})
        for r in range(rem):
            flat.update({f"decoder/layers_remainder/layers_{r}/{k}": v for k, v in layers[6 * n_blocks + r].items()})
    else:
        raise ValueError(layout)
    return _nest(flat)


def save_maxtext(directory, params, step=0, ocdbt=True, zarr3=True, opt_state=True, nnx_decode=False):
    """Write `params` as MaxText does (common/checkpointing.py create_orbax_checkpoint_manager + save_checkpoint): an
    Orbax CheckpointManager with the one item 'items', <directory>/<step>/items. The tree is a TrainState's (step,
    params/params, opt_state with an Adam-like mu of the same tree), or with nnx_decode the NNX decode checkpoint's
    (no params/params wrapper, each leaf {'value': array}). Returns the items directory."""
    import orbax.checkpoint as ocp

    if nnx_decode:
        def wrap(t):
            return {k: wrap(v) for k, v in t.items()} if isinstance(t, dict) else {"value": t}
        state = wrap(params)
    else:
        state = {"step": np.asarray(step, np.int32), "params": {"params": params}}
        if opt_state:
            state["opt_state"] = {"mu": {"params": params}}
    mgr = ocp.CheckpointManager(
        os.path.abspath(directory), item_names=("items",),
        item_handlers={"items": ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, use_zarr3=zarr3)},
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    mgr.save(step, args=ocp.args.Composite(items=ocp.args.PyTreeSave(item=state)))
    mgr.wait_until_finished()
    mgr.close()
    return os.path.join(os.path.abspath(directory), str(step), "items")
