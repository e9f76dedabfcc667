"""TransformerLens's habits on a gemmalens Model: ``model.cfg`` with TransformerLens's field names and the weights as
TransformerLens's HookedTransformer / TransformerBridge properties give them (``W_Q`` [n_layers, n_heads, d_model,
d_head] ...), as float32 numpy arrays whatever the storage (bf16, int8 and int4 weights are widened on access)."""
import math

import numpy as np

# Gemma 3 has no biases and no learned position embedding: TransformerLens's names for them, and why they are absent.
_ABSENT = {"b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "b_gate", "b_U", "W_pos"}


def absent(name):
    if name in _ABSENT:
        what = "a learned position embedding (it uses RoPE)" if name == "W_pos" else f"biases ({name})"
        return AttributeError(f"Gemma 3 has no {what}; TransformerLens raises here too")
    return None


class TLConfig:
    """TransformerLens's config fields for a Gemma 3 model (``model.cfg``), read from the native Gemma3Config
    (``model.config``, HF's names, stays the source of truth): d_model, n_layers, n_heads, d_head, d_mlp, d_vocab,
    d_vocab_out, n_ctx, n_key_value_heads, eps, act_fn, normalization_type, positional_embedding_type, rotary_base,
    rotary_base_local, rotary_dim, window_size, attn_types, use_attn_scale / attn_scale, attn_scores_soft_cap,
    output_logits_soft_cap, gated_mlp, final_rms, use_qk_norm, use_normalization_before_and_after,
    original_architecture, dtype, device, default_prepend_bos, tokenizer_prepends_bos."""

    def __init__(self, config, dtype, model_name=None):
        c = config
        self.d_model = c.hidden_size
        self.n_layers = c.num_hidden_layers
        self.n_heads = c.num_attention_heads
        self.d_head = c.head_dim
        self.d_mlp = c.intermediate_size
        self.d_vocab = c.vocab_size
        self.d_vocab_out = c.vocab_size  # tied unembedding
        self.n_ctx = c.max_position_embeddings
        self.n_key_value_heads = c.num_key_value_heads
        self.eps = c.rms_norm_eps
        self.act_fn = "gelu_pytorch_tanh"
        self.normalization_type = "RMS"
        self.positional_embedding_type = "rotary"
        self.rotary_base = c.rope_theta
        self.rotary_base_local = c.rope_local_base_freq
        self.rotary_dim = c.head_dim
        self.window_size = c.sliding_window
        self.use_local_attn = True
        self.attn_types = ["local" if t == "sliding_attention" else "global" for t in c.layer_types]
        self.use_attn_scale = True
        self.attn_scale = math.sqrt(c.query_pre_attn_scalar)  # scores are divided by it
        # TransformerLens's -1.0 means "no soft cap"
        self.attn_scores_soft_cap = c.attn_logit_softcapping if c.attn_logit_softcapping else -1.0
        self.output_logits_soft_cap = c.final_logit_softcapping if c.final_logit_softcapping else -1.0
        self.gated_mlp = True
        self.final_rms = True
        self.use_qk_norm = True
        self.use_normalization_before_and_after = True
        self.original_architecture = "Gemma3ForCausalLM"
        self.model_name = model_name
        self.dtype = dtype
        self.device = "cpu"
        self.default_prepend_bos = True
        self.tokenizer_prepends_bos = True

    def to_dict(self):
        return dict(vars(self))

    def __repr__(self):
        inner = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "attn_types")
        return f"TLConfig({inner})"


def _layer_names(l):
    p = f"model.layers.{l}."
    return {"W_Q": p + "self_attn.q_proj.weight", "W_K": p + "self_attn.k_proj.weight",
            "W_V": p + "self_attn.v_proj.weight", "W_O": p + "self_attn.o_proj.weight",
            "W_in": p + "mlp.up_proj.weight", "W_gate": p + "mlp.gate_proj.weight", "W_out": p + "mlp.down_proj.weight"}


def _to_tl(kind, w, config):
    """One layer's HF weight [out, in] -> TransformerLens's layout for `kind`."""
    Hd = config.head_dim
    if kind in ("W_Q", "W_K", "W_V"):  # [n Hd, D] -> [n, D, Hd]
        return np.ascontiguousarray(w.reshape(-1, Hd, w.shape[1]).transpose(0, 2, 1))
    if kind == "W_O":  # [D, H Hd] -> [H, Hd, D]
        return np.ascontiguousarray(w.reshape(w.shape[0], -1, Hd).transpose(1, 2, 0))
    return np.ascontiguousarray(w.T)  # W_in / W_gate [F, D] -> [D, F]; W_out [D, F] -> [F, D]


def layer_weights(model, kinds, layers):
    """{kind: [len(layers), ...] float32} for kinds among W_Q, W_K, W_V, W_O, W_in, W_gate, W_out."""
    names = [_layer_names(l)[k] for l in layers for k in kinds]
    raw = model._core.export_tensors(names)  # only these are widened to f32
    out = {}
    for k in kinds:
        out[k] = np.stack([_to_tl(k, raw[_layer_names(l)[k]], model.config) for l in layers])
    return out


class AttnWeights:
    """``model.blocks[l].attn``: W_Q [n_heads, d_model, d_head], W_K / W_V [n_key_value_heads, d_model, d_head],
    W_O [n_heads, d_head, d_model] (TransformerLens's per-layer shapes; float32 copies)."""

    def __init__(self, model, layer):
        self._model, self._layer = model, layer

    def _get(self, kind):
        return layer_weights(self._model, [kind], [self._layer])[kind][0]

    W_Q = property(lambda self: self._get("W_Q"))
    W_K = property(lambda self: self._get("W_K"))
    W_V = property(lambda self: self._get("W_V"))
    W_O = property(lambda self: self._get("W_O"))

    def __getattr__(self, name):
        raise absent(name) or AttributeError(name)


class MlpWeights:
    """``model.blocks[l].mlp``: W_in (up) / W_gate [d_model, d_mlp], W_out [d_mlp, d_model]."""

    def __init__(self, model, layer):
        self._model, self._layer = model, layer

    def _get(self, kind):
        return layer_weights(self._model, [kind], [self._layer])[kind][0]

    W_in = property(lambda self: self._get("W_in"))
    W_gate = property(lambda self: self._get("W_gate"))
    W_out = property(lambda self: self._get("W_out"))

    def __getattr__(self, name):
        raise absent(name) or AttributeError(name)


class Block:
    """``model.blocks[l]``: its ``attn`` and ``mlp`` weights."""

    def __init__(self, model, layer):
        self.layer = layer
        self.attn = AttnWeights(model, layer)
        self.mlp = MlpWeights(model, layer)

    def __repr__(self):
        return f"Block({self.layer})"


class Blocks:
    """``model.blocks``: a sequence of Block, one per layer (negative indices count from the end)."""

    def __init__(self, model):
        self._model = model
        self._n = model.config.num_hidden_layers

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"blocks indices are ints or slices, got {type(i).__name__}")
        if not -self._n <= i < self._n:
            raise IndexError(f"block {i} out of range: the model has {self._n} layers")
        return Block(self._model, int(i) % self._n)

    def __iter__(self):
        return (self[i] for i in range(self._n))
