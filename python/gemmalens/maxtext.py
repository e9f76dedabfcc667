"""MaxText Gemma 3 checkpoints (Orbax, read with tensorstore: no JAX) -> arrays under HF names.

Facts read from AI-Hypercomputer/maxtext at commit e591f30cbbf217ed67ef71263ec0538239f9c3b8 (2026-08-22):

Where the weights are (src/maxtext/common/checkpointing.py, create_orbax_checkpoint_manager / save_checkpoint;
src/maxtext/checkpoint_conversion/utils/utils.py, save_weights_to_checkpoint; configs/base.yml):
- An Orbax CheckpointManager with one item, "items": `<checkpoint_dir>/<step>/items/` (checkpoint_dir is
  `<base_output_directory>/<run_name>/checkpoints`), a PyTree whose weights sit under `params/params/` (a Linen
  TrainState: `step`, `params`, `opt_state`; pure-NNX runs save the same Linen layout). Defaults
  `checkpoint_storage_use_ocdbt: true`, `checkpoint_storage_use_zarr3: true`; either may be turned off (one directory
  per array, zarr v2). The NNX decode checkpoint (utils/generate_param_only_checkpoint.py,
  _save_decode_checkpoint_nnx) drops the `params/params` wrapper and wraps every leaf as `{"value": array}`.
- Everything else in the tree (`opt_state` mu/nu, `step`, `nnx_aux`) and the multimodal `vision_encoder` is skipped
  without being read.

Names and shapes (models/gemma3.py Gemma3DecoderLayer; layers/attentions.py; layers/linears.py MlpBlock;
layers/embeddings.py Embed; layers/decoders.py): `token_embedder/embedding` [V, E] (tied: logits_via_embedding),
`decoder/decoder_norm/scale` [E], and per layer
    self_attention/query/kernel [E, H, Hd]    key/kernel, value/kernel [E, KV, Hd]    out/kernel [H, Hd, E]
    self_attention/query_norm/scale, key_norm/scale [Hd]
    mlp/wi_0/kernel (gate), mlp/wi_1/kernel (up) [E, F]  (or mlp/wi/kernel [E, 2, F] with fused_mlp)
    mlp/wo/kernel [F, E]
    pre_self_attention_norm, post_self_attention_norm, pre_ffw_norm, post_ffw_norm /scale [E]
Layer layouts (layers/decoders.py _apply_gemma3_scanned_blocks, scan_decoder_layers; configs/base.yml):
- scanned (scan_layers: true, the default): `decoder/layers/layers_{j}/...` for j = 0..5, the positions of the
  5-local-1-global pattern (models/gemma3.py Gemma3ScannableBlock), each leaf stacked over the N // 6 blocks on axis
  param_scan_axis = 1 (query [E, N//6, H, Hd], a norm [E, N//6]): block b, position j is layer 6 b + j. The N % 6
  leftover layers are `decoder/layers_remainder/layers_{r}/...` (layer 6 (N // 6) + r), not stacked.
- unscanned (scan_layers: false): `decoder/layers_{i}/...`.
- stacked: the older standalone script (checkpoint_conversion/standalone_scripts/convert_gemma3_chkpt.py) stacks all N
  layers of each leaf in `decoder/layers/...` on axis 1 (query [E, N, H, Hd], out [H, N, Hd, E], a norm [E, N]).
Values (checkpoint_conversion/utils/param_mapping.py GEMMA3_MAXTEXT_TO_HF_PARAM_HOOK_FN, the same in
convert_gemma3_chkpt.py):
- kernels are HF's weights transposed and reshaped (reshape_kernel: MaxText = W.T.reshape(shape)); no permutation
  (MaxText's RoPE pairs (j, j + Hd/2) like HF's), and no query pre-scaling (the scale is applied in the forward pass:
  models/gemma3.py get_query_pre_attn_scalar, head_dim**-0.5 for 4b/12b, (emb_dim // heads)**-0.5 for 27b).
- every RMSNorm scale is stored as 1 + w (scale_rmsnorm; MaxText's RMSNorm multiplies by the scale itself).
- the embedding is stored as HF's times sqrt(E) rounded to bfloat16 (pad_and_scale_embedding's normalizer
  `np.dtype("bfloat16").type(hidden_size ** 0.5)`; convert_gemma3_chkpt.py multiplies bf16 weights by jnp.sqrt(E), which
  JAX also rounds to bf16), its rows padded with zeros or truncated to MaxText's vocab_size (262144 in
  configs/models/gemma3-*.yml; HF's 4b/12b/27b have 262208). MaxText's forward does not scale the embedding and divides
  the tied logits by sqrt(E) exactly (decoders.py, normalize_embedding_logits). gemmalens inverts the conversion (as
  MaxText's own MaxText -> HF conversion does): embedding = stored / bf16(sqrt(E)), which gives back the HF weights a
  checkpoint was converted from; MaxText's own forward on that checkpoint differs from it by the factor
  bf16(sqrt(E)) / sqrt(E) (<= 0.25% for the published sizes) on the embedding and the logits.
"""
import os
import re
import warnings

import numpy as np

from . import _core
from ._core import CheckpointError, Gemma3Config
from .formats import config_for, open_orbax, orbax_tree, read_orbax_array

# MaxText's Gemma 3 model configs (src/maxtext/configs/models/gemma3-{4b,12b,27b}.yml at the commit above; MaxText ships
# no 270m or 1b): base_num_decoder_layers, base_emb_dim, base_num_query_heads, base_num_kv_heads, head_dim, base_mlp_dim,
# vocab_size, sliding_window_size, local_rope_max_timescale, rope_max_timescale, rope_linear_scaling_factor,
# normalization_layer_epsilon, and the query scale of models/gemma3.py get_query_pre_attn_scalar. MaxText has no
# max_position_embeddings (max_target_length is a run setting): HF's 131072.
MODEL_CONFIGS = {
    "gemma3-4b": dict(num_hidden_layers=34, hidden_size=2560, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                      intermediate_size=10240, query_pre_attn_scalar=256),
    "gemma3-12b": dict(num_hidden_layers=48, hidden_size=3840, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       intermediate_size=15360, query_pre_attn_scalar=256),
    "gemma3-27b": dict(num_hidden_layers=62, hidden_size=5376, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                       intermediate_size=21504, query_pre_attn_scalar=5376 // 32),
}
_COMMON = dict(vocab_size=262144, sliding_window=1024, rope_local_base_freq=10000.0, rope_theta=1000000.0,
               rope_scaling={"rope_type": "linear", "factor": 8.0}, rms_norm_eps=1e-6, max_position_embeddings=131072,
               final_logit_softcapping=None, attn_logit_softcapping=None)


def model_config(name):
    """The Gemma3Config of a MaxText model name ('gemma3-4b', 'gemma3-12b', 'gemma3-27b')."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown MaxText Gemma 3 model '{name}'; MaxText ships {', '.join(MODEL_CONFIGS)}")
    return Gemma3Config.from_dict(dict(_COMMON, **MODEL_CONFIGS[name]))


def embedding_normalizer(hidden_size):
    """sqrt(hidden_size) rounded to bfloat16 (round to nearest even), as MaxText's Gemma 3 conversion scales the
    embedding (see the module docstring)."""
    u = int(np.array(np.sqrt(np.float64(hidden_size)), dtype=np.float32).view(np.uint32))
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return float(np.array(u, dtype=np.uint32).view(np.float32))


# ---------------------------------------------------------------- finding the checkpoint

def _step_dirs(base):
    """`base`'s numbered step directories holding items/_METADATA, newest (largest step) first."""
    try:
        names = os.listdir(base)
    except OSError:
        return []
    steps = [int(n) for n in names if n.isdigit() and os.path.isfile(os.path.join(base, n, "items", "_METADATA"))]
    return [os.path.join(base, str(s), "items") for s in sorted(steps, reverse=True)]


def find_items(path):
    """The Orbax directory of the MaxText checkpoint at `path`, or None when `path` is not one: `path` itself (an
    `items` directory whose tree has MaxText's weights), `path/items` (a step directory), `path/<latest step>/items` (a
    checkpoint directory) or `path/checkpoints/<latest step>/items` (a run directory)."""
    if os.path.isfile(os.path.join(path, "_METADATA")):
        try:
            return path if _model_entries(orbax_tree(path)[0]) else None
        except CheckpointError:  # unreadable metadata: the Kaggle Orbax loader reports it
            return None
    if os.path.isfile(os.path.join(path, "items", "_METADATA")):
        return os.path.join(path, "items")
    for base in (path, os.path.join(path, "checkpoints")):
        steps = _step_dirs(base)
        if steps:
            return steps[0]
    return None


def _model_entries(entries):
    """{model-relative key tuple: stored key tuple} of a MaxText tree's weights: those under params/params (a Linen
    TrainState's; its optimizer state and step are left out), else the leaves wrapped as {'value': x} (the NNX decode
    checkpoint). Empty unless the weights include MaxText's decoder or token_embedder."""
    out = {keys[2:]: keys for keys in entries if keys[:2] == ("params", "params") and len(keys) > 2}
    if not out:
        out = {keys[:-1]: keys for keys in entries if len(keys) > 1 and keys[-1] == "value"}
    return out if any(rel[0] in ("decoder", "token_embedder") for rel in out) else {}


# ---------------------------------------------------------------- the layout -> HF names

_LAYER_PARAMS = (
    "self_attention/query/kernel", "self_attention/key/kernel", "self_attention/value/kernel", "self_attention/out/kernel",
    "self_attention/query_norm/scale", "self_attention/key_norm/scale", "mlp/wi_0/kernel", "mlp/wi_1/kernel",
    "mlp/wo/kernel", "pre_self_attention_norm/scale", "post_self_attention_norm/scale", "pre_ffw_norm/scale",
    "post_ffw_norm/scale",
)
_FUSED_MLP = ("mlp/wi/kernel",)  # fused_mlp: [E, 2, F] in place of wi_0 / wi_1
_NORMS = (("pre_self_attention_norm", "input_layernorm"), ("post_self_attention_norm", "post_attention_layernorm"),
          ("pre_ffw_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"))
_PATTERN = 6  # models/gemma3.py GEMMA3_ATTENTION_PATTERN: 5 local + 1 global
_LAYER_KEY = re.compile(r"layers_(0|[1-9][0-9]{0,5})")


def _classify(rel):
    """A decoder entry -> (group, index, param): group 'scanned' (index = position j), 'remainder' (index = r),
    'unscanned' (index = layer), 'stacked' (index None); None for entries that are not per-layer."""
    if rel[:2] == ("decoder", "layers") and len(rel) > 3 and _LAYER_KEY.fullmatch(rel[2]):
        return "scanned", int(_LAYER_KEY.fullmatch(rel[2]).group(1)), "/".join(rel[3:])
    if rel[:2] == ("decoder", "layers_remainder") and len(rel) > 3 and _LAYER_KEY.fullmatch(rel[2]):
        return "remainder", int(_LAYER_KEY.fullmatch(rel[2]).group(1)), "/".join(rel[3:])
    if rel[:2] == ("decoder", "layers") and len(rel) > 2:
        return "stacked", None, "/".join(rel[2:])
    if len(rel) > 2 and rel[0] == "decoder" and _LAYER_KEY.fullmatch(rel[1]):
        return "unscanned", int(_LAYER_KEY.fullmatch(rel[1]).group(1)), "/".join(rel[2:])
    return None


class _Stored:
    """One array of the checkpoint: open (its shape known), read in its stored dtype when a weight first needs it, and
    dropped after its last use, so that the arrays read but not yet handed to the model stay few (an unscanned
    checkpoint's one at a time; a scanned one's stacked arrays until their last block)."""

    def __init__(self, name, store, where):
        self.name, self.store, self.where = name, store, where
        self.shape, self.ndim = tuple(store.shape), len(store.shape)
        self.uses, self._data = 0, None

    def get(self):
        if self._data is None:
            self._data = read_orbax_array(self.store, self.name, self.where, dtype=None)
        return self._data

    def release(self):
        self.uses -= 1
        if self.uses <= 0:
            self._data = None


class _Weight:
    """An HF-named weight for _core.load_arrays: its `shape` now, its float32 values when the model takes it (numpy's
    __array__): `make` applied to the source array (or to its slice `index` along param_scan_axis)."""

    def __init__(self, shape, src, make, index=None, failures=None):
        self.shape, self.src, self.make, self.index, self.failures = tuple(shape), src, make, index, failures
        src.uses += 1

    def values(self):
        try:
            a = self.src.get()
            if self.index is not None:
                a = a[:, self.index]
            return np.ascontiguousarray(self.make(a), dtype=np.float32)
        finally:
            self.src.release()

    def __array__(self, dtype=None, copy=None):
        try:
            a = self.values()
        except Exception as e:  # numpy's conversion hides the error: keep it for load_maxtext to raise
            if self.failures is not None:
                self.failures.append(e)
            raise
        return a if dtype is None else a.astype(dtype, copy=False)


def _layers(srcs, groups, where):
    """{layer index: {param: (source, index along axis 1 or None)}} from the classified arrays of one layout."""
    layers = {}

    def put(i, param, src, index=None):
        layers.setdefault(i, {})[param] = (src, index)

    def stack_len(items, what):
        ns = {srcs[n].shape[1] if srcs[n].ndim >= 2 else None for _, _, n in items}
        if len(ns) != 1 or None in ns:
            shapes = sorted({srcs[n].shape for _, _, n in items})[:4]
            raise CheckpointError(f"{where}: the {what} arrays are not stacked on axis 1 (param_scan_axis) to one "
                                  f"length: shapes {shapes}")
        return ns.pop()

    if "stacked" in groups:
        items = groups["stacked"]
        n = stack_len(items, "stacked decoder/layers")
        for _, param, name in items:
            for i in range(n):
                put(i, param, srcs[name], i)
        return layers, n, "stacked"
    layout = "unscanned"
    n_blocks = 0
    if "scanned" in groups:
        layout = "scanned"
        items = groups["scanned"]
        n_blocks = stack_len(items, "scanned decoder/layers/layers_{j}")
        positions = sorted({j for j, _, _ in items})
        if positions != list(range(_PATTERN)):
            raise CheckpointError(f"{where}: scanned layers hold positions {positions} of the {_PATTERN}-layer Gemma 3 "
                                  f"pattern (decoder/layers/layers_0 .. layers_{_PATTERN - 1} expected)")
        for j, param, name in items:
            for b in range(n_blocks):
                put(_PATTERN * b + j, param, srcs[name], b)
    if "remainder" in groups:
        layout = "scanned"
        for r, param, name in groups["remainder"]:
            if r >= _PATTERN - 1:
                raise CheckpointError(f"{where}: decoder/layers_remainder/layers_{r}: at most {_PATTERN - 1} leftover layers")
            put(_PATTERN * n_blocks + r, param, srcs[name])
    if "unscanned" in groups:
        if layout == "scanned":
            raise CheckpointError(f"{where}: mixes scanned (decoder/layers) and unscanned (decoder/layers_{{i}}) layers")
        for i, param, name in groups["unscanned"]:
            put(i, param, srcs[name])
    n = 1 + max(layers) if layers else 0
    return layers, n, layout


def _check_arch(params_seen, extra_top, where):
    """A tree of another MaxText architecture (llama2, gemma2, ...) is refused with what gives it away."""
    known = set(_LAYER_PARAMS) | set(_FUSED_MLP)
    extra = sorted(params_seen - known)
    required = set(_LAYER_PARAMS) - ({"mlp/wi_0/kernel", "mlp/wi_1/kernel"} if "mlp/wi/kernel" in params_seen else set())
    missing = sorted(required - params_seen)
    if extra or missing or extra_top:
        said = []
        if extra or extra_top:
            said.append("it has " + ", ".join(f"'{p}'" for p in (extra_top + extra)[:6]))
        if missing:
            said.append("it lacks " + ", ".join(f"'{p}'" for p in missing[:6]))
        raise CheckpointError(f"{where} is not a MaxText Gemma 3 text model (decoder_block 'gemma3'): {'; '.join(said)}. "
                              "gemmalens reads Gemma 3 only")


def _minus_one(a):
    return a.astype(np.float32) - 1.0  # RMSNorm scales are stored as 1 + w


def maxtext_arrays(path, where=None, failures=None):
    """A MaxText Gemma 3 checkpoint's `items` directory -> ({HF name: weight}, layout name). The weights have the HF
    shape and give their float32 values when converted with numpy (np.asarray), reading the checkpoint as they go;
    a read that fails is appended to `failures` as well as raised."""
    where = where or f"MaxText checkpoint '{path}'"
    entries, flags = orbax_tree(path)
    model = _model_entries(entries)
    if not model:
        raise CheckpointError(f"{where} has no MaxText weights (no params/params/decoder or token_embedder arrays in its "
                              "tree)")
    stored = {rel: ".".join(keys) for rel, keys in model.items()}
    groups, top, extra_top = {}, {}, []
    for rel, name in list(stored.items()):
        c = _classify(rel) if rel[0] == "decoder" else None
        if c is not None:
            groups.setdefault(c[0], []).append((c[1], c[2], name))
        elif rel in (("token_embedder", "embedding"), ("decoder", "decoder_norm", "scale")):
            top[rel] = name
        elif rel[0] == "vision_encoder":  # a multimodal checkpoint: the text model is read, the vision tower not
            del stored[rel]
        else:
            extra_top.append("/".join(rel))
    params_seen = {p for items in groups.values() for _, p, _ in items}
    _check_arch(params_seen, sorted(extra_top), where)
    if "stacked" in groups and len(groups) > 1:
        raise CheckpointError(f"{where}: mixes the stacked decoder/layers/<param> layout with layers_* arrays")
    for rel, what in ((("token_embedder", "embedding"), "token_embedder/embedding"),
                      (("decoder", "decoder_norm", "scale"), "decoder/decoder_norm/scale")):
        if rel not in top:
            raise CheckpointError(f"{where} is missing array '{what}'")
    # Only the model's arrays are opened: a training checkpoint's optimizer state (2x the weights) stays on disk.
    srcs = {n: _Stored(n, st, where) for n, st in open_orbax(path, sorted(stored.values()), flags, where).items()}
    layers, n, layout = _layers(srcs, groups, where)

    def shape_of(src, index, ndim, what, name):
        shape = src.shape if index is None else src.shape[:1] + src.shape[2:]
        if len(shape) != ndim:
            raise CheckpointError(f"{where}: array '{name}' has shape {shape}, expected {what}")
        return shape

    out = {}
    emb = srcs[top[("token_embedder", "embedding")]]
    V, E = shape_of(emb, None, 2, "[vocab, emb_dim]", "token_embedder/embedding")
    normalizer = np.float32(embedding_normalizer(E))
    out["model.embed_tokens.weight"] = _Weight((V, E), emb, lambda a: a.astype(np.float32) / normalizer, None, failures)
    norm = srcs[top[("decoder", "decoder_norm", "scale")]]
    out["model.norm.weight"] = _Weight(shape_of(norm, None, 1, "[emb_dim]", "decoder/decoder_norm/scale"), norm,
                                       _minus_one, None, failures)
    for i in range(n):
        got = layers.get(i, {})
        fused = "mlp/wi/kernel" in got
        need = [p for p in _LAYER_PARAMS if not (fused and p in ("mlp/wi_0/kernel", "mlp/wi_1/kernel"))]
        lacking = [p for p in need if p not in got]
        if lacking:
            raise CheckpointError(f"{where} ({layout} layers): layer {i} is missing array '{lacking[0]}'")
        hp = f"model.layers.{i}."

        def weight(hf, p, ndim, what, hf_shape, make):
            src, index = got[p]
            shape = shape_of(src, index, ndim, what, f"{p} (layer {i})")
            out[hp + hf] = _Weight(hf_shape(shape), src, make, index, failures)

        # kernels: HF's weights transposed (and heads split): [E, H, Hd] -> [H*Hd, E], [H, Hd, E] -> [E, H*Hd]
        for mx, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            weight(f"self_attn.{hf}.weight", f"self_attention/{mx}/kernel", 3, "[emb_dim, heads, head_dim]",
                   lambda s: (s[1] * s[2], s[0]), lambda a: a.reshape(a.shape[0], -1).T)
        weight("self_attn.o_proj.weight", "self_attention/out/kernel", 3, "[heads, head_dim, emb_dim]",
               lambda s: (s[2], s[0] * s[1]), lambda a: a.reshape(-1, a.shape[2]).T)
        for mx, hf in (("query_norm", "q_norm"), ("key_norm", "k_norm")):
            weight(f"self_attn.{hf}.weight", f"self_attention/{mx}/scale", 1, "[head_dim]", lambda s: s, _minus_one)
        if fused:  # [E, 2, F]: gate, up
            src, index = got["mlp/wi/kernel"]
            shape = shape_of(src, index, 3, "[emb_dim, 2, mlp_dim]", f"mlp/wi/kernel (layer {i})")
            if shape[1] != 2:
                raise CheckpointError(f"{where}: array 'mlp/wi/kernel' (layer {i}) has shape {shape}, expected "
                                      "[emb_dim, 2, mlp_dim] (gate, up)")
            for k, hf in enumerate(("gate_proj", "up_proj")):
                weight(f"mlp.{hf}.weight", "mlp/wi/kernel", 3, "[emb_dim, 2, mlp_dim]", lambda s: (s[2], s[0]),
                       lambda a, k=k: a[:, k].T)
        else:
            for mx, hf in (("wi_0", "gate_proj"), ("wi_1", "up_proj")):
                weight(f"mlp.{hf}.weight", f"mlp/{mx}/kernel", 2, "[emb_dim, mlp_dim]", lambda s: (s[1], s[0]),
                       lambda a: a.T)
        weight("mlp.down_proj.weight", "mlp/wo/kernel", 2, "[mlp_dim, emb_dim]", lambda s: (s[1], s[0]), lambda a: a.T)
        for mx, hf in _NORMS:
            weight(hf + ".weight", f"{mx}/scale", 1, "[emb_dim]", lambda s: s, _minus_one)
    return out, layout


def _search_dirs(given, items):
    """Where a config.json / tokenizer.model beside a MaxText checkpoint may be: the directory given, the items
    directory, its step directory and the checkpoint directory above."""
    dirs = []
    for d in (given, items, os.path.dirname(items), os.path.dirname(os.path.dirname(items))):
        d = os.path.abspath(d)
        if d not in dirs:
            dirs.append(d)
    return dirs


def _resize_vocab(a, rows):
    """The embedding's rows made `rows`: zeros added (as MaxText's MaxText -> HF conversion pads them) or dropped."""
    if a.shape[0] >= rows:
        return a[:rows]
    return np.concatenate([a, np.zeros((rows - a.shape[0], a.shape[1]), a.dtype)])


def load_maxtext(given, items, dtype, weights="native", progress=None, config=None):
    """The native model from the MaxText checkpoint directory `items` (found from `given` by find_items), and the
    directories searched for its config.json (and a tokenizer.model)."""
    where = f"MaxText checkpoint '{items}'"
    failures = []
    arrays, layout = maxtext_arrays(items, where, failures)
    shapes = {k: v.shape for k, v in arrays.items()}
    dirs = _search_dirs(given, items)
    named = config is None and not any(os.path.isfile(os.path.join(d, "config.json")) for d in dirs)
    named = named or (isinstance(config, str) and config in MODEL_CONFIGS and not os.path.exists(config))
    cfg = config_for(config, dirs, shapes, where)
    emb = arrays["model.embed_tokens.weight"]
    V = emb.shape[0]
    if named:  # inferred or a MaxText model name: the vocabulary is the embedding's rows
        cfg.vocab_size = V
    elif cfg.vocab_size != V:
        # MaxText's vocab_size may differ from HF's (262144 vs 262208): MaxText's MaxText -> HF conversion
        # (pad_and_scale_embedding) pads the rows with zeros or truncates them to the HF config's
        if cfg.vocab_size < V:
            warnings.warn(f"gemmalens.load: {where} has {V} embedding rows, its config {cfg.vocab_size}: the rows beyond "
                          "are dropped (as MaxText's conversion truncates them)")
        rows, make = cfg.vocab_size, emb.make
        emb.src.uses -= 1  # replaced by:
        arrays["model.embed_tokens.weight"] = _Weight((rows, emb.shape[1]), emb.src,
                                                      lambda a: _resize_vocab(make(a), rows), None, failures)
    cfg.validate()
    try:
        return _core.load_arrays(arrays, cfg, dtype, weights, progress), dirs
    except CheckpointError:
        if failures:  # numpy's conversion inside the loader replaced a read error with a generic one
            raise failures[0] from None
        raise
