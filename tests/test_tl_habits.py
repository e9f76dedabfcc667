"""TransformerLens habits: to_tokens / to_str_tokens / to_string / to_single_token, model.cfg with TransformerLens's
field names, and the W_* weights in TransformerLens's shapes, checked against HF's weights (and what the model
computes with them). TransformerLens 4.3's own properties and config on the same weights: test_transformer_lens4.py."""
import numpy as np
import pytest
import torch

import gemmalens as gl


@pytest.fixture(scope="module")
def gqa(hf_models):
    hf, d = hf_models["gqa4_hd24"]
    return hf, d, gl.load(d)


def hf_weight(hf, l, name):
    return dict(hf.model.layers[l].named_parameters())[name].detach().float().numpy()


def test_weights_in_transformer_lens_shapes_are_the_hf_weights(gqa):
    hf, _, model = gqa
    c = model.cfg
    L, H, KV, Hd, D, F = c.n_layers, c.n_heads, c.n_key_value_heads, c.d_head, c.d_model, c.d_mlp
    shapes = {"W_Q": (L, H, D, Hd), "W_K": (L, KV, D, Hd), "W_V": (L, KV, D, Hd), "W_O": (L, H, Hd, D),
              "W_in": (L, D, F), "W_gate": (L, D, F), "W_out": (L, F, D), "W_E": (c.d_vocab, D), "W_U": (D, c.d_vocab)}
    W = {k: getattr(model, k) for k in shapes}
    for k, shape in shapes.items():
        assert W[k].shape == shape and W[k].dtype == np.float32, k
    np.testing.assert_array_equal(W["W_E"], hf.model.embed_tokens.weight.detach().numpy())
    np.testing.assert_array_equal(W["W_U"], W["W_E"].T)
    for l in (0, 3, L - 1):
        q, k, v, o = (hf_weight(hf, l, f"self_attn.{n}_proj.weight") for n in "qkvo")
        for h in range(H):
            np.testing.assert_array_equal(W["W_Q"][l, h], q[h * Hd:(h + 1) * Hd].T)
            np.testing.assert_array_equal(W["W_O"][l, h], o[:, h * Hd:(h + 1) * Hd].T)
        for g in range(KV):
            np.testing.assert_array_equal(W["W_K"][l, g], k[g * Hd:(g + 1) * Hd].T)
            np.testing.assert_array_equal(W["W_V"][l, g], v[g * Hd:(g + 1) * Hd].T)
        np.testing.assert_array_equal(W["W_in"][l], hf_weight(hf, l, "mlp.up_proj.weight").T)
        np.testing.assert_array_equal(W["W_gate"][l], hf_weight(hf, l, "mlp.gate_proj.weight").T)
        np.testing.assert_array_equal(W["W_out"][l], hf_weight(hf, l, "mlp.down_proj.weight").T)
        blk = model.blocks[l]
        for k in ("W_Q", "W_K", "W_V", "W_O"):
            np.testing.assert_array_equal(getattr(blk.attn, k), W[k][l])
        for k in ("W_in", "W_gate", "W_out"):
            np.testing.assert_array_equal(getattr(blk.mlp, k), W[k][l])
    np.testing.assert_array_equal(model.blocks[-1].attn.W_O, W["W_O"][L - 1])
    assert len(model.blocks) == L and [b.layer for b in model.blocks][-1] == L - 1


def test_weights_compute_what_the_model_computes(gqa):
    """TransformerLens's idioms on the cache: ln1.hook_out @ W_Q[l, h] is hook_q's head h; the heads' z @ W_O summed
    is o_proj's output (ln1_post's input: hook_normalized * hook_scale); ln2.hook_out @ W_gate is mlp.hook_pre."""
    _, _, model = gqa
    ids = np.random.default_rng(0).integers(0, 320, (2, 7))
    _, cache = model.run_with_cache(ids)
    l = 2
    W_Q, W_O, W_gate = model.W_Q[l], model.W_O[l], model.W_gate[l]
    x = cache["blocks.2.ln1.hook_out"]
    np.testing.assert_allclose(np.einsum("btd,hde->bthe", x, W_Q), cache["blocks.2.attn.hook_q"], rtol=1e-4, atol=1e-5)
    attn = np.einsum("bthe,hed->btd", cache["blocks.2.attn.hook_z"], W_O)
    np.testing.assert_allclose(attn, cache["blocks.2.ln1_post.hook_normalized"] * cache["blocks.2.ln1_post.hook_scale"],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cache["blocks.2.ln2.hook_out"] @ W_gate, cache["blocks.2.mlp.hook_pre"], rtol=1e-4,
                               atol=1e-5)


def test_weights_are_float32_whatever_the_storage(hf_models):
    """bfloat16 weights come back as their bf16 values widened; int8 ones dequantised, each within half a step of its
    block's scale (blocks of 32 along the input, scale max|w| / 127) of the original float32 weight."""
    hf, d = hf_models["gqa4_hd24"]
    f32 = gl.load(d).W_Q
    bf = gl.load(d, dtype="bfloat16").W_Q
    assert bf.dtype == np.float32
    np.testing.assert_array_equal(bf, torch.as_tensor(f32).bfloat16().float().numpy())
    q8 = gl.load(d, weights="int8")
    w8 = q8.W_Q
    assert w8.dtype == np.float32
    # per HF row (out feature), blocks of 32 input features: here W_Q[l, h] is [d_model (input), d_head]
    blocks = f32.reshape(*f32.shape[:2], -1, 32, f32.shape[-1])  # [L, H, D / 32, 32, Hd]
    step = np.abs(blocks).max(axis=3, keepdims=True) / 127
    err = np.abs(w8 - f32).reshape(blocks.shape)
    assert (err <= step / 2 * (1 + 1e-3) + 1e-7).all()
    if q8.weights == "int8":  # the CPU took int8 (AVX-512 VNNI): the values are the dequantised ones
        assert err.max() > 0


def test_cfg_has_transformer_lens_field_names(gqa):
    _, _, model = gqa
    c, hf_cfg = model.cfg, model.config
    assert (c.d_model, c.n_layers, c.n_heads, c.d_head, c.d_mlp, c.d_vocab, c.n_ctx, c.n_key_value_heads) == (
        hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.num_attention_heads, hf_cfg.head_dim,
        hf_cfg.intermediate_size, hf_cfg.vocab_size, hf_cfg.max_position_embeddings, hf_cfg.num_key_value_heads)
    assert c.attn_types[5] == "global" and c.attn_types[0] == "local" and c.window_size == hf_cfg.sliding_window
    assert c.attn_scale == pytest.approx(30 ** 0.5) and c.act_fn == "gelu_pytorch_tanh" and c.dtype == "float32"
    assert c.to_dict()["d_model"] == 64 and "d_head=24" in repr(c)


def test_absent_weights_and_bad_block_indices_are_clear_errors(gqa):
    _, _, model = gqa
    for name in ("b_Q", "b_in", "W_pos"):
        with pytest.raises(AttributeError, match="Gemma 3 has no"):
            getattr(model, name)
    with pytest.raises(AttributeError, match="Gemma 3 has no"):
        model.blocks[0].attn.b_O
    with pytest.raises(AttributeError, match="no attribute 'W_nonsense'"):
        model.W_nonsense
    with pytest.raises(IndexError, match="8 layers"):
        model.blocks[8]
    with pytest.raises(TypeError):
        model.blocks["0"]


@pytest.fixture(scope="module")
def real(real_gguf_path):
    return gl.load(real_gguf_path)


def test_text_to_tokens_and_back(real):
    model = real
    s = "The capital of France is"
    np.testing.assert_array_equal(model.to_tokens(s), [[2, 818, 5279, 529, 7001, 563]])  # the README's ids
    np.testing.assert_array_equal(model.to_tokens(s, prepend_bos=False), [[818, 5279, 529, 7001, 563]])
    assert model.to_tokens(s).dtype == np.int32
    assert model.to_str_tokens(s) == ["<bos>", "The", " capital", " of", " France", " is"]
    assert model.to_str_tokens(s, prepend_bos=False)[0] == "The"
    assert model.to_str_tokens([818, 5279]) == ["The", " capital"]
    assert model.to_str_tokens(np.array([[818, 5279], [529, 7001]])) == [["The", " capital"], [" of", " France"]]
    assert model.to_str_tokens(["Hi", s])[1] == model.to_str_tokens(s)
    assert model.to_string(model.to_tokens(s)[0]) == "<bos>" + s
    assert model.to_string(model.to_tokens(s)) == ["<bos>" + s]
    assert model.to_single_token(" Paris") == model.tokenizer.encode(" Paris", add_bos=False)[0]
    with pytest.raises(ValueError, match=r"is 2 tokens \[' capital', ' of'\]"):
        model.to_single_token(" capital of")
    # a batch of texts: left-padded with the pad id; forward on the texts makes the attention mask itself
    batch = ["Hello", s]
    toks = model.to_tokens(batch)
    assert toks.shape == (2, 6) and (toks[0, :4] == model.tokenizer.pad_id).all() and toks[0, 4] == 2
    logits = model.forward(batch)
    for b, text in enumerate(batch):
        alone = model.forward(text)
        np.testing.assert_allclose(logits[b, -1], alone[0, -1], rtol=1e-4, atol=1e-4 * np.abs(alone).max())
    with pytest.raises(ValueError, match="left-padded"):
        model.to_tokens(batch, padding_side="right")
    with pytest.raises(ValueError, match="out of range"):
        model.to_string([10**7])


def test_text_needs_a_tokenizer(gqa):
    _, _, model = gqa
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        model.to_tokens("text")
    with pytest.raises(ValueError, match="no tokenizer"):
        model.forward("text")
    np.testing.assert_array_equal(model.to_tokens([3, 4]), [[3, 4]])  # ids need none
