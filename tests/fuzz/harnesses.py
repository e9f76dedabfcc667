"""One harness per file format: how its cases are mutated and how a case is loaded the way users load it.

A case is {relative file name: bytes}, materialised into a directory before its target runs. Targets import
gemmalens lazily (the fuzzer's parent imports it once before forking)."""
import json
import os
import zlib

from . import ckptio, ggufio, mutators

TOKENS = [[1, 2, 3]]


class Skip(Exception):
    """The harness itself cannot form an input from these bytes (e.g. meta.json is not JSON): not a finding."""


def _opts(data):
    """Load options chosen by the case's own bytes (deterministic, so a saved case replays identically)."""
    h = zlib.crc32(data)
    return {"dtype": ("float32", "float32", "bfloat16")[h % 3], "weights": ("native", "native", "auto", "int8", "int4")[(h >> 4) % 5]}


def _use_model(model):
    """What a user does right after loading: one short forward (and the tokenizer, when the file brought one)."""
    logits = model.forward(TOKENS)
    assert logits.shape[:2] == (1, 3)
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        ids = tok.encode("hello world <start_of_turn>user\n12x")
        tok.decode(ids)
        tok.decode(ids, skip_special_tokens=True)


def _load_model(path, data=b""):
    """Load + use; returns a short summary of what loaded (new summaries make new corpus entries)."""
    import gemmalens as gl

    o = _opts(data)
    m = gl.load(path, threads=1, dtype=o["dtype"], weights=o["weights"])
    _use_model(m)
    return _summary(m.config) + (" tok" if getattr(m, "tokenizer", None) is not None else "")


def _summary(c):
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "sliding_window", "max_position_embeddings", "query_pre_attn_scalar",
              "rope_scaling", "final_logit_softcapping", "attn_logit_softcapping")
    return ",".join(str(getattr(c, f, "")) for f in fields) + "|" + ",".join(t[0] for t in getattr(c, "layer_types", []))[:40]


class Harness:
    name = ""
    seed_prefix = ""
    focus = ()            # files the mutators work on (others stay as in the base seed, mostly)
    raw_ext = {}          # saved-crasher extension -> (base seed, file name) for single-file cases
    json_keys = ()
    json_values = {}

    def mutate(self, files, rng, other):
        """files: a copy of a corpus entry's files (mutated in place). other(): another corpus entry, for splicing."""
        names = [n for n in self.focus if n in files] or list(files)
        name = rng.choice(names)
        data = files[name]
        r = rng.random()
        if r < 0.04:
            o = other()
            if name in o:
                files[name] = mutators.splice(data, o[name], rng)
                return
        files[name] = self.mutate_file(name, data, rng)

    def mutate_file(self, name, data, rng):
        if name.endswith(".json") or name in ("_METADATA",):
            if rng.random() < 0.8:
                return mutators.mutate_json_bytes(data, rng, self.json_keys, self.json_values)
            return mutators.mutate_bytes(data, rng)
        if name.endswith(".safetensors"):
            return mutate_safetensors(data, rng)
        if name.endswith(".gguf"):
            return ggufio.mutate_gguf(data, rng)
        return mutators.mutate_bytes(data, rng)

    def run(self, d, files):
        raise NotImplementedError

    def prepare(self):
        """Run once in the parent before any fork: caches every child would otherwise rebuild."""

    def warm(self):
        """Imports done in each child before its first case (so they do not count as that case's memory)."""
        import gemmalens  # noqa: F401
        from gemmalens import formats, sae, tokenizer  # noqa: F401
        try:
            import sentencepiece  # noqa: F401
            from sentencepiece import sentencepiece_model_pb2  # noqa: F401
        except ImportError:
            pass


# ---------------------------------------------------------------- safetensors

ST_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U64", "Q4_0",
             "f32", "", "F32 "]


def _overflow_shape(numel, itemsize):
    """A shape whose element count differs from numel but whose byte size wraps (mod 2^64) to numel * itemsize."""
    wrap = (1 << 64) // itemsize
    target = numel + wrap
    if target < 1 << 63:
        return [target]
    for p in range(1, 40):
        if target % (1 << p) == 0 and target >> p < 1 << 63:
            return [1 << p, target >> p]
    return [numel, 1 << 62]


def mutate_safetensors(data, rng):
    if len(data) < 8:
        return mutators.mutate_bytes(data, rng)
    hlen = int.from_bytes(data[:8], "little")
    if hlen > len(data) - 8:
        return mutators.mutate_bytes(data, rng, hot=(0, 4096))
    header, body = data[8:8 + hlen], data[8 + hlen:]
    r = rng.random()
    if r < 0.45:
        try:
            h = json.loads(header)
            assert isinstance(h, dict)
        except (ValueError, AssertionError, RecursionError):
            return mutators.mutate_bytes(data, rng, hot=(0, 8 + hlen))
        names = [k for k in h if k != "__metadata__" and isinstance(h[k], dict)]
        jm = mutators.JsonMutation()
        if names:
            n = rng.choice(names)
            e = h[n]
            s = rng.random()
            shape = [x for x in e.get("shape") if isinstance(x, int)] if isinstance(e.get("shape"), list) else []
            numel = 1
            for x in shape:
                numel *= x
            if s < 0.2:
                e["dtype"] = rng.choice(ST_DTYPES)
            elif s < 0.45:
                isz = {"F32": 4, "F16": 2, "BF16": 2}.get(str(e.get("dtype")), 4)
                e["shape"] = rng.choice((_overflow_shape(numel, isz), shape[::-1], shape + [1], shape[:-1], [0] + shape[1:],
                                         [-1] + shape[1:], [2**63 - 1], [2**31, 2**31], [2**32, 2**30] if isz == 4 else [2**32, 2**31],
                                         [x * 2 for x in shape], [], [1.5], ["64"], None, [mutators.interesting_int(rng)] + shape[1:]))
            elif s < 0.7:
                off = e.get("data_offsets") if isinstance(e.get("data_offsets"), list) else [0, 0]
                a, b = (off + [0, 0])[:2]
                a = a if isinstance(a, int) else 0
                b = b if isinstance(b, int) else 0
                e["data_offsets"] = rng.choice(([b, a], [a, b + 1], [a - 1, b - 1], [a, len(body) + 4], [0, b - a],
                                                [a, a], [2**64 - 1, 2**64 - 1], [2**63, 2**63 + b - a], [-4, b],
                                                [a, b, 0], [a], [float(a), float(b)], [str(a), str(b)],
                                                [a + (1 << 64), b + (1 << 64)], [mutators.interesting_int(rng), b]))
            elif s < 0.8:
                del h[n]
            elif s < 0.9:
                h[rng.choice((n + "x", "lm_head.weight", "model.layers.5.input_layernorm.weight", "__metadata__",
                              "model.embed_tokens.weight"))] = dict(e)
            else:
                h["__metadata__"] = rng.choice(({"format": "pt"}, {"format": ["x"]}, [], "x", None, {"a": {"b": 1}}, 7))
        out = jm.dumps(h, rng)
    elif r < 0.65:
        out = mutators.mutate_json_bytes(header, rng, ("dtype", "shape", "data_offsets", "__metadata__"))
    elif r < 0.8:
        # A lie in the 8-byte header length, or padding the header with garbage.
        s = rng.random()
        if s < 0.6:
            v = rng.choice((0, 1, 2, hlen - 1, hlen + 1, hlen + 8, len(data), len(data) - 8, 2**63, 2**64 - 1, 2**32 + hlen,
                            mutators.interesting_int(rng)))
            return mutators.pack_int(v, 8) + data[8:]
        out = header + rng.choice((b" " * 8, b"\0" * 8, b"\xff" * 8, b"\n\t  ", b"}}}}", b"\xc0\x80"))
    else:
        return mutators.mutate_bytes(data, rng, hot=(0, 8 + hlen))
    return len(out).to_bytes(8, "little") + out + body


class SafetensorsHarness(Harness):
    name = "safetensors"
    seed_prefix = "safetensors/"
    json_keys = ("weight_map", "metadata", "total_size")
    json_values = {}

    def mutate(self, files, rng, other):
        names = list(files)
        weights = [(n, 1 if n == "config.json" else (3 if n.endswith(".json") else 10)) for n in names]
        name = mutators.weighted(rng, weights)
        data = files[name]
        if name.endswith("index.json") and rng.random() < 0.5:
            files[name] = mutate_index(data, rng, [n for n in names if n.endswith(".safetensors")])
        elif name == "config.json":
            files[name] = mutators.mutate_json_bytes(data, rng, CONFIG_KEYS, CONFIG_VALUES)
        elif rng.random() < 0.04:
            files[name] = mutators.splice(data, other().get(name, data), rng)
        else:
            files[name] = self.mutate_file(name, data, rng)

    def run(self, d, files):
        from gemmalens import _core

        main = os.path.join(d, "model.safetensors")
        info = _load_model(d, files.get("model.safetensors") or files.get("model.safetensors.index.json", b""))
        if os.path.exists(main):
            _core.read_safetensors(main)
        return info


def mutate_index(data, rng, shards):
    """model.safetensors.index.json: weight_map entries pointing at other shards, this file, paths, nothing."""
    try:
        idx = json.loads(data)
        wm = idx["weight_map"]
        assert isinstance(wm, dict) and wm
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
        return mutators.mutate_json_bytes(data, rng, ("weight_map", "metadata"))
    k = rng.choice(list(wm))
    s = rng.random()
    if s < 0.6:
        wm[k] = rng.choice(shards + ["../config.json", "model.safetensors.index.json", "config.json", "missing.safetensors",
                                     "", ".", "sub/x.safetensors", "/dev/zero", "\u00e9.safetensors", 7, None, ["a"]])
    elif s < 0.8:
        wm[rng.choice(("lm_head.weight", "model.layers.9.input_layernorm.weight", k + "x", ""))] = wm[k]
    else:
        del wm[k]
    return json.dumps(idx).encode()


# ---------------------------------------------------------------- config.json

CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "sliding_window", "layer_types", "rope_theta", "rope_local_base_freq",
               "rope_scaling", "rope_parameters", "query_pre_attn_scalar", "rms_norm_eps", "final_logit_softcapping",
               "attn_logit_softcapping", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
               "model_type", "text_config", "sliding_window_pattern", "_sliding_window_pattern", "hidden_activation",
               "attention_bias", "use_bidirectional_attention", "rope_type", "factor", "full_attention",
               "sliding_attention", "torch_dtype", "tie_word_embeddings")
CONFIG_VALUES = {
    "model_type": ["gemma3", "gemma3_text", "gemma2", "", "llama"],
    "rope_type": ["linear", "default", "yarn", "dynamic", "llama3"],
    "hidden_activation": ["gelu_pytorch_tanh", "gelu", "silu"],
    "layer_types": [["sliding_attention", "full_attention"], ["full_attention"] * 3, [], ["x", 1], "sliding_attention"],
    "hidden_size": [-2**31, -1, 0, 2**31 - 1, 1, 63, 65],
    "num_attention_heads": [-1, 0, 2**31 - 1, -2**31],
    "num_key_value_heads": [-1, 0, 3, 2**31 - 1, -2**31],
    "head_dim": [-2, 0, 1, 15, 2**30, -2**31],
    "num_hidden_layers": [2**31 - 1, 10**6, 10**9, -1, 0, 100000],
    "sliding_window": [0, -1, 2**31 - 1],
    "max_position_embeddings": [0, 1, 2, 2**31 - 1, -1],
    "vocab_size": [0, 1, 2**31 - 1, 299, 301],
    "factor": [0.0, -1.0, 1e308, 0.5],
    "rope_theta": [0.0, -1.0, 1e308, 1e-308],
    "sliding_window_pattern": [0, -1, 1, 2**31 - 1, -2**31],
    "eos_token_id": [[], [-1], [2**31], 300, [1, 106, 299]],
}


class ConfigHarness(Harness):
    name = "config"
    seed_prefix = "config/"
    focus = ("config.json",)
    raw_ext = {".json": ("config/v5", "config.json")}
    json_keys = CONFIG_KEYS
    json_values = CONFIG_VALUES

    def mutate_file(self, name, data, rng):
        if rng.random() < 0.85:
            return mutators.mutate_json_bytes(data, rng, self.json_keys, self.json_values)
        return mutators.mutate_bytes(data, rng)

    def run(self, d, files):
        import gemmalens as gl

        cfg = gl.Gemma3Config.from_pretrained(d)
        repr(cfg)
        text = cfg.to_json()
        gl.Gemma3Config.from_json(text)
        return _load_model(d, files.get("config.json", b""))


# ---------------------------------------------------------------- GGUF

class GGUFHarness(Harness):
    name = "gguf"
    seed_prefix = "gguf/"
    focus = ("model.gguf",)
    raw_ext = {".gguf": ("gguf/f32", "model.gguf")}

    def mutate_file(self, name, data, rng):
        return ggufio.mutate_gguf(data, rng, key_focus=b"gemma3." if rng.random() < 0.3 else None)

    def run(self, d, files):
        return run_gguf(os.path.join(d, "model.gguf"), files.get("model.gguf", b""))


def _utf8(name):
    """Names that are not UTF-8 come back with surrogate escapes, which cannot be passed back in (a known quirk of
    the private reader API, not a finding)."""
    try:
        name.encode("utf-8")
        return True
    except (UnicodeError, AttributeError):
        return False


def run_gguf(path, data):
    from gemmalens import _core

    f = _core.GGUFFile(path)
    # The reader's own surface (what tools built on it read), when this build has it.
    if hasattr(type(f), "metadata"):
        f.metadata
    if hasattr(type(f), "tensors"):
        for name, shape, _type in f.tensors:
            n = 1
            for x in shape:
                n *= int(x)
            if n <= 1 << 22 and hasattr(f, "dequantize") and _utf8(name):
                f.dequantize(name)
    del f
    return _load_model(path, data)


# ---------------------------------------------------------------- tokenizer metadata

class TokenizerHarness(Harness):
    name = "tokenizer"
    seed_prefix = "tokenizer/"
    focus = ("meta.json", "tok.gguf")
    raw_ext = {".json": ("tokenizer/meta", "meta.json"), ".gguf": ("tokenizer/gguf", "tok.gguf")}
    json_keys = tuple(ggufio.TOKENIZER_KEYS)
    json_values = {"tokenizer.ggml.model": ["llama", "gpt2", "bert", "", "LLAMA"]}

    def mutate_file(self, name, data, rng):
        if name.endswith(".gguf"):
            return ggufio.mutate_gguf(data, rng, key_focus=b"tokenizer." if rng.random() < 0.85 else None)
        if rng.random() < 0.3:
            return mutate_token_meta(data, rng)
        return mutators.mutate_json_bytes(data, rng, self.json_keys, self.json_values)

    def run(self, d, files):
        if "meta.json" in files:
            try:
                meta = json.loads(files["meta.json"].decode("utf-8", "surrogateescape"))
            except (ValueError, RecursionError):
                raise Skip("meta.json is not JSON") from None
            if not isinstance(meta, dict) or not _gguf_representable(meta):
                raise Skip("meta.json holds values a GGUF cannot (null, objects)")
            from gemmalens.tokenizer import Tokenizer

            tok = Tokenizer.from_gguf_metadata(meta)
            ids = tok.encode("hello world <start_of_turn>user\n12x <bos>")
            tok.decode(ids)
            tok.decode(ids, skip_special_tokens=True)
            tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
            if "tok.gguf" not in files:
                return "tok %d %s %s %s %s" % (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id)
        if "tok.gguf" in files:
            return run_gguf(os.path.join(d, "tok.gguf"), files["tok.gguf"])


def _gguf_representable(v, depth=0):
    if depth > 6:
        return False
    if v is None:
        return False
    if isinstance(v, dict):
        return depth == 0 and all(isinstance(k, str) and _gguf_representable(x, 1) for k, x in v.items())
    if isinstance(v, list):
        return all(_gguf_representable(x, depth + 1) for x in v)
    return True


def mutate_token_meta(data, rng):
    """Targeted edits of the tokenizer dict: ids out of range, pieces and types of the wrong kind, lengths."""
    try:
        meta = json.loads(data)
        assert isinstance(meta, dict)
    except (ValueError, AssertionError, RecursionError):
        return mutators.mutate_bytes(data, rng)
    jm = mutators.JsonMutation()
    toks = meta.get("tokenizer.ggml.tokens")
    n = len(toks) if isinstance(toks, list) else 300
    s = rng.random()
    if s < 0.35:
        k = rng.choice(("tokenizer.ggml.unknown_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                        "tokenizer.ggml.padding_token_id"))
        meta[k] = rng.choice((n, n + 1, -1, -n - 1, 2**31, 2**63, 1.5, "2", True, [2]))
    elif s < 0.7 and isinstance(toks, list) and toks:
        key = rng.choice(("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"))
        arr = meta.get(key)
        if isinstance(arr, list) and arr:
            i = rng.randrange(len(arr))
            arr[i] = rng.choice(("", "\udcff", "<0x100>", "<0xZZ>", "\u2581" * 300, 7, 1e308, float("nan"), -1000.0, 0, 6,
                                 100, -1, 2**40, [1], True, "<bos>", arr[(i + 1) % len(arr)]))
    elif s < 0.85:
        key = rng.choice(("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"))
        arr = meta.get(key)
        if isinstance(arr, list):
            meta[key] = rng.choice((arr[:-1], arr[:4], arr + arr[-1:], [], arr[:3] * 2))
    else:
        meta["tokenizer.ggml.add_space_prefix"] = rng.choice((True, 1, "yes", [True], 2.0))
    return jm.dumps(meta, rng)


# ---------------------------------------------------------------- gemma_pytorch model.ckpt

class CkptHarness(Harness):
    name = "ckpt"
    seed_prefix = "ckpt/"
    focus = ("model.ckpt",)
    json_keys = CONFIG_KEYS
    json_values = CONFIG_VALUES

    def prepare(self):
        ckptio.bomb()

    def mutate(self, files, rng, other):
        if rng.random() < 0.05:
            files["config.json"] = mutators.mutate_json_bytes(files["config.json"], rng, CONFIG_KEYS, CONFIG_VALUES)
            return
        files["model.ckpt"] = ckptio.mutate_ckpt(files["model.ckpt"], rng)

    def run(self, d, files):
        return _load_model(os.path.join(d, "model.ckpt"), files.get("model.ckpt", b""))


# ---------------------------------------------------------------- Orbax

ORBAX_KEYS = ("tree_metadata", "key_metadata", "key", "key_type", "value_metadata", "value_type", "use_zarr3", "use_ocdbt",
              "skip_deserialize", "custom_metadata")


class OrbaxHarness(Harness):
    name = "orbax"
    seed_prefix = "orbax/"
    focus = ("_METADATA",)
    json_keys = ORBAX_KEYS
    json_values = {"key": ["transformer/layer_0/attn/q_einsum", "w", "scale", "transformer/layer_5/mlp/linear", "", "..",
                           "/etc", "transformer/embedder"], "value_type": ["np.ndarray", "jax.Array", "scalar", ""]}

    def mutate(self, files, rng, other):
        if rng.random() < 0.05 and "config.json" in files:
            files["config.json"] = mutators.mutate_json_bytes(files["config.json"], rng, CONFIG_KEYS, CONFIG_VALUES)
            return
        data = files.get("_METADATA", b"{}")
        r = rng.random()
        if r < 0.25:
            files["_METADATA"] = mutate_orbax_tree(data, rng)
        elif r < 0.9:
            files["_METADATA"] = mutators.mutate_json_bytes(data, rng, self.json_keys, self.json_values)
        else:
            files["_METADATA"] = mutators.mutate_bytes(data, rng)

    def warm(self):
        super().warm()
        try:
            import tensorstore  # noqa: F401  (starts threads: imported in the children only, never before a fork)
        except ImportError:
            pass

    def run(self, d, files):
        from gemmalens import formats

        if hasattr(formats, "_orbax_names"):
            formats._orbax_names(d)
        return _load_model(d, files.get("_METADATA", b""))


def mutate_orbax_tree(data, rng):
    """Edits of tree_metadata entries: tuple-string keys, key_metadata parts, duplicated and renamed arrays."""
    try:
        meta = json.loads(data)
        tree = meta["tree_metadata"]
        assert isinstance(tree, dict) and tree
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
        return mutators.mutate_json_bytes(data, rng, ORBAX_KEYS)
    jm = mutators.JsonMutation()
    k = rng.choice(list(tree))
    v = tree[k]
    s = rng.random()
    if s < 0.25:
        tree[rng.choice(("()", "(,)", "('a',)", "(" + "'x', " * 500 + ")", k.replace("'", ""), k + k, "", "('',)",
                         "('transformer/layer_0/attn/q_einsum', 'w', 'extra')"))] = v
        del tree[k]
    elif s < 0.5 and isinstance(v, dict):
        v["key_metadata"] = rng.choice(([], [{}], [{"key": None}], [{"key": ["a"]}], "abc", [1, 2], {"key": "w"},
                                        [{"key": "transformer/layer_0/attn/q_einsum"}, {"key": "w"}] * 3,
                                        [{"key": "x" * 10000}], [{"key": jm.bad_string(rng)}]))
    elif s < 0.7:
        tree[k + "_copy"] = v
    elif s < 0.85:
        meta["use_zarr3"] = rng.choice((True, "yes", 1, None, [], {}))
    else:
        meta["tree_metadata"] = rng.choice(([], "x", None, 5, {k: v for k, v in list(tree.items())[: len(tree) // 2]}))
    return jm.dumps(meta, rng)


# ---------------------------------------------------------------- SAE folders

SAE_KEYS = ("architecture", "hf_hook_point_in", "hf_hook_point_out", "width", "l0", "model_name", "k", "d_in", "d_sae",
            "hook_name", "hook_layer", "apply_b_dec_to_input", "normalize_activations", "metadata", "activation_fn_kwargs",
            "affine_connection", "dtype")
SAE_VALUES = {
    "architecture": ["jumprelu", "jump_relu", "relu", "standard", "topk", "gated", "", "JUMP_RELU"],
    "hf_hook_point_in": ["model.layers.0.output", "layers.99999999999999999999.output", "model.layers.-1.output",
                         "model.layers.0.mlp.down_proj.input", "model.layers.0.self_attn.o_proj.input", "x", ""],
    "hook_name": ["blocks.0.hook_resid_post", "blocks.99.hook_resid_post", "blocks.x.hook_z", "blocks.0.attn.hook_z",
                  "hook_embed", "", "blocks.-1.hook_resid_pre"],
    "normalize_activations": ["none", "expected_average_only_in", "constant_norm_rescale", None, ""],
    "k": [0, -1, 1, 128, 129, 2**31, 2**63, 1.5, "8"],
    "d_in": [64, 63, 0, -1, 2**63], "d_sae": [128, 127, 0, -1, 2**31],
}


class SAEHarness(Harness):
    name = "sae"
    seed_prefix = "sae/"
    json_keys = SAE_KEYS
    json_values = SAE_VALUES

    def mutate(self, files, rng, other):
        names = list(files)
        name = rng.choice(names)
        if name.endswith(".json"):
            files[name] = mutators.mutate_json_bytes(files[name], rng, SAE_KEYS, SAE_VALUES) if rng.random() < 0.9 \
                else mutators.mutate_bytes(files[name], rng)
        else:
            files[name] = mutate_safetensors(files[name], rng)

    def run(self, d, files):
        import numpy as np

        import gemmalens as gl

        sae = gl.SAE.load(d)
        repr(sae)
        if 0 < sae.d_in <= 1 << 16:
            x = np.linspace(-1.0, 1.0, 2 * sae.d_in, dtype=np.float32).reshape(2, sae.d_in)
            acts = sae.encode(x)
            sae.decode(acts, x if sae.W_skip is not None else None)
            sae(x)
            sae.encode_topk(x, max(1, min(4, sae.d_sae)))
        return "%s %s %d %d %d %s" % (sae.architecture, sae.hook_name, sae.d_in, sae.d_sae, sae.d_out, sae.hook_name_out)


HARNESSES = {h.name: h for h in (GGUFHarness(), SafetensorsHarness(), ConfigHarness(), CkptHarness(), OrbaxHarness(),
                                 SAEHarness(), TokenizerHarness())}
FORMATS = ["gguf", "safetensors", "config", "ckpt", "orbax", "sae", "tokenizer"]
