"""Writes the fuzzing seed corpus: tiny random-weight Gemma 3 models (hidden 64, 2 layers, vocab 300) and SAEs in
every format gemmalens loads, each written by that format's own writer (the `gguf` package's GGUFWriter, the
`safetensors` package, torch.save, orbax-checkpoint) where one exists.

Run as a script in a separate process (it imports torch and JAX, which the forking fuzzer must not hold):

    python tests/fuzz/seedgen.py OUT_DIR

OUT_DIR/<format>/<seed>/ gets the seed's files and OUT_DIR/manifest.json {seed id: {"claimed_bytes": n}}, where
claimed_bytes is the float32 size of the tensors the seed holds (what a correct load legitimately needs).
Deterministic: same numpy/torch versions, same files (orbax may differ in its own bookkeeping files)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

# tests/ holds the layouts the tests write too (this file runs as a script: tests/fuzz is sys.path[0])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import layouts  # noqa: E402
from gguf_util import gguf_name  # noqa: E402

D, F, L, H, KV, HD, V = 64, 96, 2, 4, 1, 16, 300
SEED_IDS = {
    "gguf": ["gguf/f32", "gguf/q8_0", "gguf/f16"],
    "safetensors": ["safetensors/f32", "safetensors/bf16", "safetensors/f16", "safetensors/sharded",
                    "safetensors/multimodal"],
    "config": ["config/v5", "config/v4", "config/multimodal"],
    "ckpt": ["ckpt/torch", "ckpt/f32", "ckpt/bf16", "ckpt/views"],
    "orbax": ["orbax/real", "orbax/meta"],
    "sae": ["sae/scope", "sae/scope_transcoder", "sae/saelens", "sae/saelens_topk"],
    "tokenizer": ["tokenizer/meta", "tokenizer/gguf"],
}

SHAPES = {"input_layernorm": (D,), "self_attn.q_proj": (H * HD, D), "self_attn.k_proj": (KV * HD, D),
          "self_attn.v_proj": (KV * HD, D), "self_attn.o_proj": (D, H * HD), "self_attn.q_norm": (HD,),
          "self_attn.k_norm": (HD,), "post_attention_layernorm": (D,), "pre_feedforward_layernorm": (D,),
          "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F), "post_feedforward_layernorm": (D,)}


def hf_tensors(seed=1234):
    """HF-named float32 weights of the tiny model (norm weights random too, so 1 + w matters)."""
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": (rng.standard_normal((V, D)) * 0.5).astype(np.float32)}
    for i in range(L):
        for n, s in SHAPES.items():
            t[f"model.layers.{i}.{n}.weight"] = (rng.standard_normal(s) * (0.3 if "norm" in n else 0.12)).astype(np.float32)
    t["model.norm.weight"] = (rng.standard_normal(D) * 0.3).astype(np.float32)
    return t


def claimed(tensors):
    return int(sum(np.asarray(a).size * 4 for a in tensors.values()))


def config_v5():
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": D, "intermediate_size": F,
            "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": HD, "vocab_size": V,
            "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            "query_pre_attn_scalar": HD, "rms_norm_eps": 1e-6, "final_logit_softcapping": None,
            "attn_logit_softcapping": None, "max_position_embeddings": 128, "bos_token_id": 2, "eos_token_id": [1, 106],
            "pad_token_id": 0, "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
            "tie_word_embeddings": True, "torch_dtype": "float32"}


def config_v4():
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": D, "intermediate_size": F,
            "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": HD, "vocab_size": V,
            "sliding_window": 3, "sliding_window_pattern": 2, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "query_pre_attn_scalar": 20,
            "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
            "max_position_embeddings": 64, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}


def config_multimodal():
    text = config_v5()
    text.pop("architectures")
    return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text,
            "vision_config": {"hidden_size": 16, "model_type": "siglip_vision_model"}, "eos_token_id": [1, 106],
            "mm_tokens_per_image": 256}


def repack(path):
    """Rewrite a torch.save zip with stored entries, fixed timestamps and data.pkl last: still a torch zip
    checkpoint, laid out the way the fuzzer's mutators write zips (ckptio.write_zip), so a mutated pickle changes
    only the end of the file."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    entries = [e for e in entries if not e[0].endswith("data.pkl")] + [e for e in entries if e[0].endswith("data.pkl")]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries:
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_STORED
            z.writestr(zi, data)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def st_save(path, tensors, dtype="float32"):
    """safetensors files: F32/F16 by the safetensors package, BF16 by gemmalens' writer (numpy has no bf16)."""
    if dtype == "bfloat16":
        from gemmalens.formats import write_safetensors

        write_safetensors(path, tensors, "bfloat16")
        return
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float16 if dtype == "float16" else np.float32)
               for k, v in tensors.items()}, path, metadata={"format": "pt"})


# ---------------------------------------------------------------- tokenizer

def tokenizer_vocab():
    """A SentencePiece-style vocabulary of exactly V pieces: specials, <0xNN> byte pieces, a few words."""
    toks = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>"]
    types = [3, 3, 3, 2, 4, 4, 4, 4]
    toks += ["<0x%02X>" % i for i in range(256)]
    types += [6] * 256
    words = ["\u2581", "\u2581the", "\u2581a", "e", "t", "o", "\u2581hello", "\u2581world", "he", "ll", "lo", "wor", "ld",
             "\u2581t", "\u2581w", "\u2581h", "in", "er", "an", "re", "on", "\u2581user", "\u2581model", "us", "mo", "del",
             "\n", "\u2581\u2581", "12", "3", "x", "y", "z", "ab", "\u2581x", "<tab>"]
    for w in words:
        if len(toks) >= V:
            break
        toks.append(w)
        types.append(1 if w != "<tab>" else 4)
    while len(toks) < V:
        toks.append("<unused%d>" % len(toks))
        types.append(5)
    scores = [0.0] * 8 + [0.0] * 256 + [-float(i) for i in range(V - 264)]
    return toks, scores, types


def tokenizer_meta():
    toks, scores, types = tokenizer_vocab()
    # GGUF's converter writes user-defined pieces with " " for "\u2581" and control/user pieces with score -1000.
    toks = [t.replace("\u2581", " ") if ty == 4 else t for t, ty in zip(toks, types)]
    scores = [-1000.0 if ty in (3, 4) else s for s, ty in zip(scores, types)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": toks, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": True}


# ---------------------------------------------------------------- GGUF

def write_gguf(path, tensors, kind="f32", tokenizer=None, rope_linear=False):
    import gguf

    w = gguf.GGUFWriter(path, "gemma3")
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(4)
    w.add_rope_freq_base(1000000.0)
    if rope_linear:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(8.0)
    if tokenizer:
        w.add_tokenizer_model(tokenizer["tokenizer.ggml.model"])
        w.add_token_list(tokenizer["tokenizer.ggml.tokens"])
        w.add_token_scores(tokenizer["tokenizer.ggml.scores"])
        w.add_token_types(tokenizer["tokenizer.ggml.token_type"])
        w.add_unk_token_id(3)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_pad_token_id(0)
        w.add_add_space_prefix(False)
        w.add_add_bos_token(True)
    for name, a in tensors.items():
        g = gguf_name(name)
        if "norm" in name:
            a = a + 1.0  # llama.cpp's converter stores Gemma norms as 1 + w
        if kind == "q8_0" and a.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif kind == "f16" and a.ndim == 2:
            w.add_tensor(g, a.astype(np.float16))
        else:
            w.add_tensor(g, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------- gemma_pytorch

def gemma_pytorch_state(tensors, dtype, views=False):
    import torch

    sd = {}
    for name, a in tensors.items():
        t = torch.from_numpy(np.array(a)).to(dtype)
        if name == "model.embed_tokens.weight":
            sd["embedder.weight"] = t
        elif name.endswith("self_attn.q_proj.weight"):
            p = name[: -len("q_proj.weight")]
            k = torch.from_numpy(tensors[p + "k_proj.weight"]).to(dtype)
            v = torch.from_numpy(tensors[p + "v_proj.weight"]).to(dtype)
            sd[p + "qkv_proj.weight"] = torch.cat([t, k, v])
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            continue
        elif name.endswith("q_norm.weight"):
            sd[name.replace("q_norm", "query_norm")] = t
        elif name.endswith("k_norm.weight"):
            sd[name.replace("k_norm", "key_norm")] = t
        else:
            sd[name] = t
    if views:
        # Non-contiguous tensors (column-major storage) and views into one shared storage at offsets: the
        # pickle then carries non-trivial strides and storage offsets.
        for n in list(sd):
            if sd[n].ndim == 2 and "mlp" in n:
                sd[n] = sd[n].t().contiguous().t()
        norms = [n for n in sd if sd[n].ndim == 1]
        base = torch.cat([sd[n] for n in norms])
        off = 0
        for n in norms:
            k = sd[n].numel()
            sd[n] = base[off:off + k]
            off += k
    return sd


# ---------------------------------------------------------------- Orbax

ORBAX_SCRIPT = r'''
import json, sys, numpy as np
import orbax.checkpoint as ocp
params = {k: {kk: np.load(sys.argv[2] + "/" + vv) for kk, vv in v.items()} for k, v in json.load(open(sys.argv[2] + "/index.json")).items()}
ocp.PyTreeCheckpointer().save(sys.argv[1], params)
'''


def kaggle_params(t):
    return layouts.kaggle_params(t)


def orbax_metadata(params):
    """A _METADATA like orbax-checkpoint's (PyTreeCheckpointer, OCDBT) for these arrays."""
    tree = {}
    for k, v in params.items():
        for kk in v:
            tree[f"('{k}', '{kk}')"] = {"key_metadata": [{"key": k, "key_type": 2}, {"key": kk, "key_type": 2}],
                                        "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
    return {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False, "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None}


# ---------------------------------------------------------------- SAEs

def sae_params(seed, d_in=D, d_sae=128, d_out=D, skip=False):
    rng = np.random.default_rng(seed)
    p = {"W_enc": (rng.standard_normal((d_in, d_sae)) * 0.2).astype(np.float32),
         "b_enc": (rng.standard_normal(d_sae) * 0.1).astype(np.float32),
         "threshold": np.abs(rng.standard_normal(d_sae) * 0.2).astype(np.float32),
         "W_dec": (rng.standard_normal((d_sae, d_out)) * 0.2).astype(np.float32),
         "b_dec": (rng.standard_normal(d_out) * 0.1).astype(np.float32)}
    if skip:
        p["W_skip"] = (rng.standard_normal((d_in, d_out)) * 0.1).astype(np.float32)
    return p


def main(out):
    tmp = out + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    manifest = {}
    t = hf_tensors()
    model_bytes = claimed(t)

    def d(seed_id):
        p = os.path.join(tmp, seed_id)
        os.makedirs(p, exist_ok=True)
        manifest[seed_id] = {"claimed_bytes": model_bytes}
        return p

    # safetensors (HF directories)
    for kind in ("f32", "bf16", "f16"):
        p = d("safetensors/" + kind)
        st_save(os.path.join(p, "model.safetensors"), t, {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[kind])
        write_json(os.path.join(p, "config.json"), config_v5())
    p = d("safetensors/sharded")
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fn, ns in shards.items():
        st_save(os.path.join(p, fn), {n: t[n] for n in ns})
    write_json(os.path.join(p, "model.safetensors.index.json"),
               {"metadata": {"total_size": model_bytes}, "weight_map": {n: fn for fn, ns in shards.items() for n in ns}})
    write_json(os.path.join(p, "config.json"), config_v5())
    p = d("safetensors/multimodal")
    mm = {"model.language_model." + k[len("model."):]: v for k, v in t.items()}
    mm["lm_head.weight"] = t["model.embed_tokens.weight"]
    mm["model.vision_tower.patch_embedding.weight"] = np.ones((4, 4), np.float32)
    st_save(os.path.join(p, "model.safetensors"), mm)
    write_json(os.path.join(p, "config.json"), config_multimodal())

    # config.json (beside the f32 weights)
    for name, cfg in (("v5", config_v5()), ("v4", config_v4()), ("multimodal", config_multimodal())):
        p = d("config/" + name)
        write_json(os.path.join(p, "config.json"), cfg)
        st_save(os.path.join(p, "model.safetensors"), t)

    # GGUF
    for kind in ("f32", "q8_0", "f16"):
        p = d("gguf/" + kind)
        write_gguf(os.path.join(p, "model.gguf"), t, kind, rope_linear=(kind == "f16"))

    # tokenizer metadata: the dict, and a GGUF carrying it
    p = d("tokenizer/meta")
    write_json(os.path.join(p, "meta.json"), tokenizer_meta())
    manifest["tokenizer/meta"]["claimed_bytes"] = 0
    p = d("tokenizer/gguf")
    write_gguf(os.path.join(p, "tok.gguf"), t, "f32", tokenizer=tokenizer_meta())

    # gemma_pytorch model.ckpt + config.json
    import torch

    for kind, dtype, views in (("torch", torch.float32, False), ("f32", torch.float32, False),
                               ("bf16", torch.bfloat16, False), ("views", torch.float32, True)):
        p = d("ckpt/" + kind)
        torch.save({"model_state_dict": gemma_pytorch_state(t, dtype, views)}, os.path.join(p, "model.ckpt"))
        if kind != "torch":  # ckpt/torch stays byte for byte what torch.save wrote
            repack(os.path.join(p, "model.ckpt"))
        write_json(os.path.join(p, "config.json"), config_v5())

    # Orbax: the real thing (orbax-checkpoint in a child process: JAX stays out of this one), and metadata only.
    params = kaggle_params(t)
    p = d("orbax/meta")
    write_json(os.path.join(p, "_METADATA"), orbax_metadata(params))
    write_json(os.path.join(p, "config.json"), config_v5())
    arr_dir = os.path.join(tmp, "_arrays")
    os.makedirs(arr_dir)
    index = {}
    for k, v in params.items():
        index[k] = {}
        for kk, a in v.items():
            fn = "%d.npy" % sum(len(x) for x in index.values())
            np.save(os.path.join(arr_dir, fn), a)
            index[k][kk] = fn
    write_json(os.path.join(arr_dir, "index.json"), index)
    real = os.path.join(tmp, "orbax", "real")
    r = subprocess.run([sys.executable, "-c", ORBAX_SCRIPT, real, arr_dir], capture_output=True, text=True)
    if r.returncode == 0:
        manifest["orbax/real"] = {"claimed_bytes": model_bytes}
        write_json(os.path.join(real, "config.json"), config_v5())
    else:  # orbax-checkpoint not installed: the metadata-only seed still exercises the parser
        sys.stderr.write("seedgen: orbax-checkpoint could not write the real Orbax seed; skipped\n" + r.stderr[-2000:])
        shutil.rmtree(real, ignore_errors=True)
    shutil.rmtree(arr_dir)

    # SAE folders
    hook_resid = "model.layers.1.output"
    for name, skip in (("scope", False), ("scope_transcoder", True)):
        p = d("sae/" + name)
        sp = sae_params(7 if not skip else 8, skip=skip)
        tens = {"w_enc": sp["W_enc"], "b_enc": sp["b_enc"], "threshold": sp["threshold"], "w_dec": sp["W_dec"],
                "b_dec": sp["b_dec"]}
        if skip:
            tens["affine_skip_connection"] = sp["W_skip"]
        st_save(os.path.join(p, "params.safetensors"), tens)
        hin = "model.layers.0.pre_feedforward_layernorm.output" if skip else hook_resid
        hout = "model.layers.0.post_feedforward_layernorm.output" if skip else hook_resid
        write_json(os.path.join(p, "config.json"), {"architecture": "jump_relu", "hf_hook_point_in": hin, "hf_hook_point_out": hout,
                                                    "width": 128, "l0": 10, "model_name": "gemma-v3-270m-pt",
                                                    "affine_connection": skip, "type": "transcoder" if skip else "sae"})
        manifest["sae/" + name]["claimed_bytes"] = claimed(tens)
    for name, arch, hook, k in (("saelens", "jumprelu", "blocks.1.hook_resid_post", None),
                                ("saelens_topk", "topk", "blocks.0.attn.hook_z", 8)):
        p = d("sae/" + name)
        sp = sae_params(9 if k is None else 10)
        tens = {"W_enc": sp["W_enc"], "b_enc": sp["b_enc"], "W_dec": sp["W_dec"], "b_dec": sp["b_dec"]}
        if arch == "jumprelu":
            tens["threshold"] = sp["threshold"]
        st_save(os.path.join(p, "sae_weights.safetensors"), tens)
        cfg = {"architecture": arch, "d_in": D, "d_sae": 128, "hook_name": hook, "hook_layer": int(hook.split(".")[1]),
               "apply_b_dec_to_input": k is not None, "normalize_activations": "none", "dtype": "float32", "device": "cpu",
               "model_name": "gemma-3-270m", "metadata": {"hook_name": hook, "model_name": "gemma-3-270m"}}
        if k:
            cfg["activation_fn_kwargs"] = {"k": k}
        write_json(os.path.join(p, "cfg.json"), cfg)
        manifest["sae/" + name]["claimed_bytes"] = claimed(tens)

    write_json(os.path.join(tmp, "manifest.json"), manifest)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))
