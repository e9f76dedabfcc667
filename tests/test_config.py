"""Gemma3Config: parsing (transformers v4 and v5 forms, multimodal text_config), presets, validation."""
import json

import pytest

import gemmalens as gl

V4 = {  # the real Gemma 3 1B config.json (shared/seeds/000)
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "transformers_version": "4.52.4", "use_cache": True, "vocab_size": 262144,
}


def test_v4_config_equals_preset():
    cfg = gl.Gemma3Config.from_json(json.dumps(V4))
    assert cfg == gl.Gemma3Config.preset("1b")
    assert cfg.layer_types[5] == "full_attention" and cfg.layer_types[4] == "sliding_attention"
    assert cfg.eos_token_id == [1, 106] and cfg.rope_scaling is None and cfg.final_logit_softcapping is None


def test_v5_rope_parameters_and_text_config():
    from transformers import Gemma3TextConfig

    hf = Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, vocab_size=300, sliding_window=8,
                          rope_scaling={"rope_type": "linear", "factor": 8.0})
    d = json.loads(hf.to_json_string())
    cfg = gl.Gemma3Config.from_json(json.dumps({"model_type": "gemma3", "text_config": d}))
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert cfg.rope_theta == 1e6 and cfg.rope_local_base_freq == 1e4
    assert cfg.layer_types == hf.layer_types


@pytest.mark.parametrize("size,L,D,H,KV,Hd,F,W,scale,qpas,V", [
    ("270m", 18, 640, 4, 1, 256, 2048, 512, None, 256, 262144),
    ("1b", 26, 1152, 4, 1, 256, 6912, 512, None, 256, 262144),
    ("4b", 34, 2560, 8, 4, 256, 10240, 1024, 8.0, 256, 262208),
    ("12b", 48, 3840, 16, 8, 256, 15360, 1024, 8.0, 256, 262208),
    ("27b", 62, 5376, 32, 16, 128, 21504, 1024, 8.0, 168, 262208),
])
def test_presets(size, L, D, H, KV, Hd, F, W, scale, qpas, V):
    c = gl.Gemma3Config.preset(size)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.sliding_window, c.query_pre_attn_scalar, c.vocab_size) == (L, D, H, KV, Hd, F, W, qpas, V)
    assert (c.rope_scaling or {}).get("factor") == scale
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == list(range(5, L, 6))


def test_roundtrip_to_json():
    c = gl.Gemma3Config.preset("4b")
    assert gl.Gemma3Config.from_json(c.to_json()) == c


@pytest.mark.parametrize("field,value,needle", [
    ("num_key_value_heads", 3, "num_key_value_heads = 3"),
    ("head_dim", 7, "head_dim = 7"),
    ("hidden_size", 0, "hidden_size = 0"),
    ("rms_norm_eps", -1, "rms_norm_eps"),
    ("bos_token_id", 999999, "bos_token_id = 999999"),
    ("layer_types", ["sliding_attention"] * 3, "layer_types"),
    ("layer_types", ["sliding_attention"] * 25 + ["global"], "'global'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "yarn"),
    ("hidden_activation", "relu", "relu"),
    ("model_type", "llama", "llama"),
])
def test_validation_names_field_and_value(field, value, needle):
    d = dict(V4)
    d[field] = value
    with pytest.raises(ValueError, match=needle):
        gl.Gemma3Config.from_json(json.dumps(d))


def test_bad_json_and_wrong_types():
    with pytest.raises(gl.CheckpointError, match="not valid JSON"):
        gl.Gemma3Config.from_json("{not json")
    d = dict(V4, hidden_size="big")
    with pytest.raises(ValueError, match="hidden_size"):
        gl.Gemma3Config.from_json(json.dumps(d))
    with pytest.raises(ValueError, match="unknown size"):
        gl.Gemma3Config.preset("3b")
