"""gemma_pytorch (torch zip, read without torch), Kaggle Flax/Orbax (written by orbax-checkpoint itself), and
export back to HF safetensors that HF transformers loads."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import gemmalens as gl
import layouts  # noqa: E402
from conftest import build_hf, hf_logits, rel_err

IDS = np.arange(4, 30)


SRC = dict(seed=21, num_key_value_heads=2, head_dim=32, sliding_window=5)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("src"))
    hf = build_hf(d, **SRC)
    return hf, d


@pytest.fixture(scope="module")
def src_bf16(tmp_path_factory):
    """The same model stored in bfloat16 (as Kaggle and gemma_pytorch publish), and its reference: HF reading the
    bf16 file into float32 with from_pretrained (casting the bf16 model with .float() would also round its RoPE
    buffers; tests/test_model_hf.py)."""
    from transformers import Gemma3ForCausalLM

    d = str(tmp_path_factory.mktemp("src_bf16"))
    hf16 = build_hf(d, torch_dtype=torch.bfloat16, **SRC)
    ref = Gemma3ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    assert all(t.dtype == torch.float32 for t in ref.state_dict().values())
    return hf16, ref, d


def to_gemma_pytorch(hf, multimodal=False, rope_buffers=True):
    """HF weights -> the state dict a gemma_pytorch model saves (google/gemma_pytorch gemma/model.py, gemma3_model.py):
    fused qkv_proj, query_norm / key_norm, the embedding as embedder (GemmaForCausalLM) or text_token_embedder
    (Gemma3ForMultimodalLM, which also holds the SigLIP tower and its projection), and the persistent RoPE buffers."""
    sd = {}
    state = hf.state_dict()
    for name, t in state.items():
        if name == "lm_head.weight":
            continue
        if name == "model.embed_tokens.weight":
            sd["text_token_embedder.weight" if multimodal else "embedder.weight"] = t.clone()
        elif name.endswith("self_attn.q_proj.weight"):
            p = name[: -len("q_proj.weight")]
            sd[p + "qkv_proj.weight"] = torch.cat([t, state[p + "k_proj.weight"], state[p + "v_proj.weight"]])
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            continue
        elif name.endswith("q_norm.weight"):
            sd[name.replace("q_norm", "query_norm")] = t.clone()
        elif name.endswith("k_norm.weight"):
            sd[name.replace("k_norm", "key_norm")] = t.clone()
        else:
            sd[name] = t.clone()
    if rope_buffers:
        sd.update(gemma_pytorch_rope_buffers(hf.config))
    if multimodal:  # a few tensors under the vision tower's names (their shapes do not matter to the text model)
        g = torch.Generator().manual_seed(0)
        D, E = hf.config.hidden_size, 24
        sd["siglip_vision_model.patch_embedding.weight"] = torch.randn(E, 3, 2, 2, generator=g)
        sd["siglip_vision_model.encoder_blocks.0.self_attn.q_proj.weight"] = torch.randn(E, E, generator=g)
        sd["siglip_vision_model.encoder_blocks.0.self_attn.q_proj.bias"] = torch.randn(E, generator=g)
        sd["siglip_vision_model.final_norm.weight"] = torch.randn(E, generator=g)
        sd["mm_soft_embedding_norm.weight"] = torch.randn(E, generator=g)
        sd["mm_input_projection.weight"] = torch.randn(D, E, generator=g)
        dt = state["model.norm.weight"].dtype
        sd = {k: v.to(dt) if k.startswith(("siglip", "mm_")) else v for k, v in sd.items()}
    return sd


def gemma_pytorch_rope_buffers(cfg):
    """gemma_pytorch's Gemma 3 RoPE tables, registered with register_buffer (persistent, so in every saved state dict):
    cos + i sin of position * inv_freq, complex64 [2 * max_position_embeddings, head_dim / 2] (its
    precompute_freqs_cis; the global table divides inv_freq by the RoPE scaling factor)."""
    Hd, T = cfg.head_dim, 2 * cfg.max_position_embeddings

    def table(theta, factor=1.0):
        inv = 1.0 / theta ** (torch.arange(0, Hd, 2)[: Hd // 2].float() / Hd) / factor
        angles = torch.outer(torch.arange(T).float(), inv)
        return torch.polar(torch.ones_like(angles), angles)

    rp = cfg.rope_parameters
    full = rp["full_attention"]
    return {"local_freqs_cis": table(rp["sliding_attention"]["rope_theta"]),
            "global_freqs_cis": table(full["rope_theta"], full.get("factor", 1.0) if full.get("rope_type") == "linear" else 1.0)}


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_pytorch_ckpt(src, src_bf16, tmp_path, dtype, multimodal):
    """A checkpoint as gemma_pytorch publishes them: complex64 RoPE buffers, text_token_embedder and the vision tower
    in the multimodal models, bf16 or f32 weights; against HF fp32 on the same weights."""
    hf, d = src
    if dtype == torch.bfloat16:
        hf, ref, d = src_bf16
    else:
        ref = hf
    sd = to_gemma_pytorch(hf, multimodal=multimodal)
    assert sd["local_freqs_cis"].dtype == torch.complex64 and sd["global_freqs_cis"].shape == (1024, 16)
    assert {v.dtype for k, v in sd.items() if "freqs_cis" not in k} == {dtype}
    torch.save({"model_state_dict": sd}, str(tmp_path / "model.ckpt"))
    shutil.copy(os.path.join(d, "config.json"), tmp_path / "config.json")  # tiny shapes: no published size to infer
    model = gl.load(str(tmp_path / "model.ckpt"))
    # fp32 compute on the same (bf16-valued) weights as the reference: the f32 bound holds for both
    assert rel_err(model.forward(IDS), hf_logits(ref, IDS)) <= 1e-4


def test_gemma_pytorch_complex_tensor_where_a_weight_belongs(src, tmp_path):
    hf, d = src
    sd = to_gemma_pytorch(hf)
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.complex64)
    torch.save({"model_state_dict": sd}, str(tmp_path / "model.ckpt"))
    shutil.copy(os.path.join(d, "config.json"), tmp_path / "config.json")
    with pytest.raises(gl.CheckpointError, match="'model.norm.weight' is a complex tensor"):
        gl.load(str(tmp_path / "model.ckpt"))


def test_gemma_pytorch_without_config_names_the_fix(src, tmp_path):
    hf, _ = src
    torch.save({"model_state_dict": to_gemma_pytorch(hf)}, str(tmp_path / "model.ckpt"))
    with pytest.raises(gl.CheckpointError, match="config.json"):
        gl.load(str(tmp_path / "model.ckpt"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + _Evil.marker,))


def test_pickle_calling_anything_else_is_refused(tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    torch.save({"model_state_dict": {"embedder.weight": torch.zeros(2, 2)}, "x": _Evil()}, str(tmp_path / "evil.ckpt"))
    with pytest.raises(pickle.UnpicklingError, match="refused to load 'posix.system'|refused to load 'os.system'"):
        gl.load(str(tmp_path / "evil.ckpt"))
    assert not os.path.exists(_Evil.marker)
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
    with pytest.raises(gl.CheckpointError, match="not a torch zip"):
        gl.load(str(tmp_path / "junk.ckpt"))


def kaggle_params(hf):
    """The HF weights in the Kaggle Flax FLAT layout, as numpy."""
    return layouts.kaggle_params({k: v.detach().float().numpy() for k, v in hf.state_dict().items()})


def _bf16(tree):
    import ml_dtypes

    return {k: {n: a.astype(ml_dtypes.bfloat16) for n, a in v.items()} for k, v in tree.items()}


def _orbax_dtypes(path):
    """The stored dtype of every array of an Orbax checkpoint, read with tensorstore."""
    import tensorstore as ts
    from gemmalens.formats import _orbax_names

    names, zarr3 = _orbax_names(path)
    base = "file://" + os.path.abspath(path) + "/"
    return {ts.open({"driver": "zarr3" if zarr3 else "zarr", "kvstore": {"driver": "ocdbt", "base": base, "path": n}},
                    open=True).result().dtype.name for n in names}


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_orbax_kaggle_checkpoint(src, src_bf16, tmp_path, stored):
    """Kaggle's Flax checkpoints are bfloat16: such a fixture, written by orbax-checkpoint, against HF fp32 reading
    the same bf16 weights."""
    ocp = pytest.importorskip("orbax.checkpoint")
    if stored == "bfloat16":
        hf16, ref, d = src_bf16
        params = _bf16(kaggle_params(hf16))
    else:
        ref, d = src
        params = kaggle_params(ref)
    path = str(tmp_path / "ckpt")
    ocp.PyTreeCheckpointer().save(path, params)
    assert {"_METADATA", "manifest.ocdbt", "d"} <= set(os.listdir(path))
    assert _orbax_dtypes(path) == {stored}
    shutil.copy(os.path.join(d, "config.json"), os.path.join(path, "config.json"))
    model = gl.load(path)
    assert rel_err(model.forward(IDS), hf_logits(ref, IDS)) <= 1e-4
    np.testing.assert_allclose(model.forward(IDS), gl.load(d).forward(IDS), rtol=0, atol=1e-5)


def test_orbax_without_config_infers_the_published_270m(tmp_path):
    """A Kaggle-layout bf16 checkpoint with no config.json: the config comes from the shapes (the 270m's layers,
    widths and heads; a small vocabulary keeps the fixture small), with the published 270m's window, RoPE bases and
    query scale. Reference: HF with google/gemma-3-270m's config values (transformers' convert_gemma3_weights.py,
    gemma3_270m) on the same bf16-valued weights."""
    ocp = pytest.importorskip("orbax.checkpoint")
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=320, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
                           query_pre_attn_scalar=256, sliding_window=512, rope_theta=1e6, rope_local_base_freq=1e4,
                           attn_implementation="eager")
    torch.manual_seed(7)
    hf = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            # bf16-valued weights in an fp32 model (RoPE buffers untouched, computed in fp32)
            p.copy_(p.normal_(0.0, 0.4 if "norm" in name else 0.05).bfloat16().float())
    path = str(tmp_path / "ckpt")
    ocp.PyTreeCheckpointer().save(path, _bf16(kaggle_params(hf)))
    assert not os.path.exists(os.path.join(path, "config.json")) and _orbax_dtypes(path) == {"bfloat16"}
    model = gl.load(path)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size, c.sliding_window, c.query_pre_attn_scalar, c.rope_theta,
            c.rope_local_base_freq, list(c.layer_types)) == (18, 640, 320, 512, 256, 1e6, 1e4, list(cfg.layer_types))
    ids = np.arange(3, 40)
    assert rel_err(model.forward(ids), hf_logits(hf, ids)) <= 1e-4


def test_orbax_missing_array(src, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    hf, d = src
    p = kaggle_params(hf)
    del p["transformer/layer_2/mlp/linear"]
    path = str(tmp_path / "ckpt")
    ocp.PyTreeCheckpointer().save(path, p)
    shutil.copy(os.path.join(d, "config.json"), os.path.join(path, "config.json"))
    with pytest.raises(gl.CheckpointError, match="missing array 'transformer/layer_2/mlp/linear.w'"):
        gl.load(path)


def test_infer_config_from_published_shapes():
    from gemmalens.formats import infer_config

    for size in ("270m", "1b", "4b", "27b"):
        c = gl.Gemma3Config.preset(size)
        D, F, H, KV, Hd, V = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                              c.head_dim, c.vocab_size)
        shapes = {"model.embed_tokens.weight": (V, D), "model.layers.0.self_attn.q_norm.weight": (Hd,),
                  "model.layers.0.self_attn.q_proj.weight": (H * Hd, D), "model.layers.0.self_attn.k_proj.weight": (KV * Hd, D),
                  "model.layers.0.mlp.gate_proj.weight": (F, D)}
        shapes.update({f"model.layers.{i}.input_layernorm.weight": (D,) for i in range(c.num_hidden_layers)})
        assert infer_config(shapes) == c


@pytest.mark.parametrize("fmt", ["hf", "gguf", "gemma_pytorch"])
def test_save_pretrained_roundtrip_through_hf(src, tmp_path, fmt):
    from transformers import Gemma3ForCausalLM

    hf, d = src
    if fmt == "hf":
        path = d
    elif fmt == "gguf":
        from gguf_util import write_gemma3_gguf

        path = write_gemma3_gguf(str(tmp_path / "m.gguf"), hf)
    else:
        torch.save({"model_state_dict": to_gemma_pytorch(hf)}, str(tmp_path / "model.ckpt"))
        shutil.copy(os.path.join(d, "config.json"), tmp_path / "config.json")
        path = str(tmp_path / "model.ckpt")
    model = gl.load(path)
    out = str(tmp_path / "exported")
    model.save_pretrained(out)
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "gemma3_text"
    back = Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ours = model.forward(IDS)
    assert rel_err(hf_logits(back, IDS), ours) <= 1e-4
    assert rel_err(gl.load(out).forward(IDS), ours) <= 1e-6


def test_save_pretrained_real_model_with_tokenizer(tmp_path, real_gguf_path):
    model = gl.load(real_gguf_path)
    out = str(tmp_path / "hf270m")
    model.save_pretrained(out, dtype="bfloat16")
    again = gl.load(out)
    assert again.tokenizer.encode("Hello world") == model.tokenizer.encode("Hello world")
    text = "The capital of France is"
    assert again.generate(text, max_new_tokens=8) == gl.load(out, dtype="bfloat16").generate(text, max_new_tokens=8)
