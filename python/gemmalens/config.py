"""Python conveniences on the native Gemma3Config (the C++ struct is the single source of truth)."""
import json
import os

from ._core import CheckpointError, Gemma3Config

_FIELDS = [
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "sliding_window", "layer_types", "rope_theta", "rope_local_base_freq",
    "rope_scaling", "query_pre_attn_scalar", "rms_norm_eps", "final_logit_softcapping",
    "attn_logit_softcapping", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
]


def _from_pretrained(path):
    """Read an HF ``config.json`` (a file, or a directory holding one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json at '{path}'")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start}); is it really a config.json?") from None

    return Gemma3Config.from_json(text)


def _to_dict(self):
    return {k: getattr(self, k) for k in _FIELDS}


def _repr(self):
    d = _to_dict(self)
    lt = d.pop("layer_types")
    n_full = sum(t == "full_attention" for t in lt)
    inner = ", ".join(f"{k}={v!r}" for k, v in d.items())
    return f"Gemma3Config({inner}, layer_types=[{len(lt) - n_full} sliding, {n_full} full])"


def _eq(self, other):
    return type(self) is type(other) and _to_dict(self) == _to_dict(other)


def _save(self, directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        f.write(self.to_json())


def _install_config_helpers(cls):
    cls.from_pretrained = staticmethod(_from_pretrained)
    cls.to_dict = _to_dict
    cls.__repr__ = _repr
    cls.__eq__ = _eq
    cls.__hash__ = None
    cls.save_pretrained = _save
    cls.from_dict = staticmethod(lambda d: cls.from_json(json.dumps(d)))
