"""Wrong input to the Python API surfaces (SAEs, interventions, caches, tokenizer, load options) raises a clear
exception naming the problem, and the model keeps working."""
import os
import subprocess
import sys

import numpy as np
import pytest

import gemmalens as gl
from test_sae import random_sae, save_gemma_scope


@pytest.fixture(scope="module")
def model(tiny_dir):
    return gl.load(tiny_dir)


@pytest.fixture(scope="module")
def sae(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("sae") / "s")
    return gl.SAE.load(save_gemma_scope(d, random_sae(np.random.default_rng(0), 64, 40), "model.layers.1.output"))


def test_load_options(tiny_dir):
    with pytest.raises(ValueError, match="max_seq_len"):
        gl.load(tiny_dir, max_seq_len=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        gl.load(tiny_dir, max_seq_len=10**7)
    with pytest.raises(ValueError, match="weights"):
        gl.load(tiny_dir, weights="fp8")
    # the message lists every mode, the new ones included
    with pytest.raises(ValueError, match="'native', 'auto', 'int8' or 'int4', got 'int3'"):
        gl.load(tiny_dir, weights="int3")
    # the native loaders take no "auto" (gl.load resolves it first) and say which modes they take
    cfg = gl._core.Gemma3Config.from_pretrained(os.path.join(tiny_dir, "config.json"))
    with pytest.raises(ValueError, match="'native' .*'int8' or 'int4', got 'auto'"):
        gl._core.load_hf(os.path.join(tiny_dir, "model.safetensors"), cfg, "float32", "auto")
    bad = subprocess.run([sys.executable, "-m", "gemmalens", "generate", "--weights", "int3", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'int3'" in bad.stderr


def test_cache_and_unembed_arguments(model):
    with pytest.raises(ValueError, match="batch"):
        model.new_cache(batch=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.new_cache(max_seq_len=-3)
    with pytest.raises(ValueError, match="d_model = 64"):
        model.unembed(np.zeros((2, 63), np.float32))
    with pytest.raises(ValueError, match="stop_at_layer"):
        model.run_with_cache([1, 2], stop_at_layer=99)
    with pytest.raises(ValueError, match="KV cache"):
        model._core.forward(model.to_tokens([1, 2]), None, model.new_cache(), "all", None, 2)


def test_sae_inputs(sae, tmp_path):
    with pytest.raises(ValueError, match="last axis must be 64"):
        sae.encode(np.zeros((3, 65), np.float32))
    with pytest.raises(ValueError, match="last axis must be 40"):
        sae.decode(np.zeros((3, 41), np.float32))
    with pytest.raises(ValueError, match="k must be in"):
        sae.encode_topk(np.zeros((2, 64), np.float32), 0)
    with pytest.raises(FileNotFoundError):
        gl.SAE.load(str(tmp_path / "missing"))
    from safetensors.numpy import save_file

    d = tmp_path / "broken"
    d.mkdir()
    save_file({"w_enc": np.zeros((4, 4), np.float32)}, str(d / "params.safetensors"))
    (d / "config.json").write_text('{"architecture": "jump_relu", "hf_hook_point_in": "model.layers.0.output"}')
    with pytest.raises(ValueError, match="lacks tensor 'b_enc'"):
        gl.SAE.load(str(d))
    (d / "config.json").write_text('{"architecture": "gated", "hf_hook_point_in": "model.layers.0.output"}')
    save_file({"w_enc": np.zeros((4, 4), np.float32), "b_enc": np.zeros(4, np.float32),
               "w_dec": np.zeros((4, 4), np.float32), "b_dec": np.zeros(4, np.float32)}, str(d / "params.safetensors"))
    with pytest.raises(ValueError, match="gated"):
        gl.SAE.load(str(d))
    (d / "config.json").write_text('{"architecture": "jump_relu", "hf_hook_point_in": "model.layers.0.vision.output"}')
    with pytest.raises(ValueError, match="no gemmalens hook"):
        gl.SAE.load(str(d))


def test_intervention_inputs(model, sae):
    ids = [1, 2, 3, 4]
    clean = model.forward(ids)
    with pytest.raises(ValueError, match="non-finite"):
        gl.interventions.add(np.array([np.nan] * 64))
    with pytest.raises(ValueError, match="zero"):
        gl.interventions.project_out(np.zeros(64))
    with pytest.raises(ValueError, match="mode"):
        gl.interventions.ablate_heads([0], mode="random")
    with pytest.raises(ValueError, match="at least one head"):
        gl.interventions.ablate_heads([])
    with pytest.raises(ValueError, match="out of range"):
        gl.interventions.steer(sae, 40)
    with pytest.raises(ValueError, match="features must be in"):
        gl.interventions.ablate_features(sae, [40])
    with pytest.raises(ValueError, match="head 7 out of range"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", gl.interventions.ablate_heads([7]))])
    with pytest.raises(ValueError, match="per-head activations"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", gl.interventions.ablate_heads([0]))])
    with pytest.raises(ValueError, match="do not fit the activation"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", gl.interventions.replace(np.zeros((2, 3))))])
    # (a position of hook_pattern [batch, head, query, key] holds its keys: project_out takes a [key] direction)
    with pytest.raises(ValueError, match="holds 4 per position"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern", gl.interventions.project_out(np.ones(5)))])
    with pytest.raises(TypeError, match="no site of its own"):
        model.run_with_hooks(ids, fwd_hooks=[gl.interventions.zero()])
    with pytest.raises(TypeError, match="pairs"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post",)])
    np.testing.assert_array_equal(model.forward(ids), clean)


def test_steering_and_tokenizer_inputs(model, spm_path):
    with pytest.raises(ValueError, match="lists of prompts"):
        gl.steering.mean_difference(model, "one prompt", ["b"], "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="unknown hook name"):
        gl.steering.mean_difference(model, [[1, 2]], [[3, 4]], "blocks.0.hook_resid")
    tok = gl.Tokenizer(spm_path)
    with pytest.raises(ValueError, match="non-empty list"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "hi"}])
    with pytest.raises(ValueError, match="unknown role"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(TypeError, match="stop must hold"):
        model.generate([1, 2], max_new_tokens=2, stop=[1.5])


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm_api")
    (d / "c.txt").write_text("hello world, the cat sat on the mat.\n" * 50)
    spm.SentencePieceTrainer.train(input=str(d / "c.txt"), model_prefix=str(d / "t"), vocab_size=300, model_type="bpe",
                                   byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2,
                                   user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    return str(d / "t.model")
