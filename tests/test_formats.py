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


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("src"))
    hf = build_hf(d, seed=21, num_key_value_heads=2, head_dim=32, sliding_window=5)
    return hf, d


def to_gemma_pytorch(hf):
    sd = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name == "model.embed_tokens.weight":
            sd["embedder.weight"] = t.clone()
        elif name.endswith("self_attn.q_proj.weight"):
            p = name[: -len("q_proj.weight")]
            sd[p + "qkv_proj.weight"] = torch.cat([t, hf.state_dict()[p + "k_proj.weight"], hf.state_dict()[p + "v_proj.weight"]])
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            continue
        elif name.endswith("q_norm.weight"):
            sd[name.replace("q_norm", "query_norm")] = t.clone()
        elif name.endswith("k_norm.weight"):
            sd[name.replace("k_norm", "key_norm")] = t.clone()
        else:
            sd[name] = t.clone()
    return sd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_pytorch_ckpt(src, tmp_path, dtype):
    hf, d = src
    sd = {k: v.to(dtype) for k, v in to_gemma_pytorch(hf).items()}
    torch.save({"model_state_dict": sd}, str(tmp_path / "model.ckpt"))
    shutil.copy(os.path.join(d, "config.json"), tmp_path / "config.json")  # tiny shapes: no published size to infer
    model = gl.load(str(tmp_path / "model.ckpt"))
    ref = hf_logits(hf if dtype == torch.float32 else build_hf(str(tmp_path / "r"), seed=21, torch_dtype=torch.bfloat16,
                                                              num_key_value_heads=2, head_dim=32, sliding_window=5).float(), IDS)
    assert rel_err(model.forward(IDS), ref) <= (1e-4 if dtype == torch.float32 else 1e-3)


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


def test_orbax_kaggle_checkpoint(src, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    hf, d = src
    path = str(tmp_path / "ckpt")
    ocp.PyTreeCheckpointer().save(path, kaggle_params(hf))
    assert {"_METADATA", "manifest.ocdbt", "d"} <= set(os.listdir(path))
    shutil.copy(os.path.join(d, "config.json"), os.path.join(path, "config.json"))
    model = gl.load(path)
    assert rel_err(model.forward(IDS), hf_logits(hf, IDS)) <= 1e-4
    np.testing.assert_allclose(model.forward(IDS), gl.load(d).forward(IDS), rtol=0, atol=1e-5)


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
