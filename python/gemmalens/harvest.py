"""Corpus-scale activation harvesting for SAE / transcoder training.

``gl.harvest(model, source, hooks, out_dir)`` packs a corpus into token rows exactly as SAELens's ``ActivationsStore``
does, runs the model once per batch for every hook asked for (stopping after the deepest hooked block), and writes
the activations in SAELens's cached-activations layout (a ``datasets.save_to_disk`` folder that SAELens trains on with
``use_cached_activations=True, cached_activations_path=out_dir``) or as safetensors shards with a JSON index. Shards are
written under a temporary name and renamed; a manifest records the finished ones, so a harvest killed at any moment
and started again with the same arguments ends with exactly the rows of an uninterrupted run. ``engine="ray"`` spreads
the shards over a Ray Data actor pool (one model per actor), on this machine or a cluster.

Packing follows SAELens (sae_lens/tokenization_and_batching.py ``concat_and_batch_sequences`` with the defaults of
``ActivationsStore``: begin-batch token = BOS when prepend_bos, sequence separator = BOS, no begin-sequence token,
texts tokenized without BOS, an incomplete last row dropped; a pretokenized column is cut to context_size per row).
"""
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
import uuid
import warnings

import numpy as np

from .formats import bf16_bits

FORMATS = ("saelens", "safetensors")
ENGINES = ("local", "ray")
_DTYPES = {"saelens": ("float32", "float16"), "safetensors": ("float32", "float16", "bfloat16")}
MANIFEST = "gemmalens_harvest.json"
_TMP = ".gemmalens_tmp"  # temporary shard names and worker pid files; removed when the harvest completes
_INDEX = "index.json"  # format="safetensors": the JSON index
_VERSION = 1


class HarvestError(ValueError):
    """A harvest cannot start or go on: bad arguments, an out_dir of another harvest, a source that changed."""


def _need(module, extra):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"gl.harvest needs the '{module}' package here: pip install 'gemmalens[{extra}]'") from None


# ---------------------------------------------------------------- the source -> token rows


def _peek(iterable, what):
    it = iter(iterable)
    try:
        first = next(it)
    except StopIteration:
        raise HarvestError(f"the source is empty: {what} gave no item; pass texts, a dataset or token ids") from None
    return first, itertools.chain([first], it)


def _is_token_seq(x):
    if isinstance(x, np.ndarray):
        return x.ndim == 1 and (np.issubdtype(x.dtype, np.integer) or x.size == 0)
    return isinstance(x, (list, tuple)) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in x)


class _Source:
    """The source, classified: kind "texts" (tokenized, then packed), "seqs" (token sequences, packed) or "rows"
    (pretokenized rows, each cut to context_size as SAELens cuts a tokenized column), an iterator over its items,
    and a fingerprint of what it is."""

    def __init__(self, source, column):
        if isinstance(source, (str, bytes, os.PathLike)):
            raise HarvestError("source must be an iterable of texts, a datasets.Dataset / IterableDataset, or token ids; "
                               "got a single string (wrap one text in a list; a file of texts: "
                               "gemmalens harvest --texts FILE)")
        self.fingerprint = {"type": type(source).__name__}
        if isinstance(source, np.ndarray):
            if not np.issubdtype(source.dtype, np.integer) or source.ndim not in (1, 2):
                raise HarvestError(f"an array source must hold integer token ids, 1-D (one stream, packed) or 2-D "
                                   f"(rows); got dtype {source.dtype}, shape {source.shape}")
            if source.size == 0:
                raise HarvestError("the source is empty: the token array has no ids")
            self.kind = "seqs" if source.ndim == 1 else "rows"
            self.items = iter([source] if source.ndim == 1 else source)
            self.fingerprint["shape"] = list(source.shape)
            return
        if hasattr(source, "column_names") and hasattr(source, "features"):  # datasets.Dataset / IterableDataset
            self.fingerprint["dataset"] = getattr(source, "_fingerprint", None)
            first, it = _peek(source, "the dataset")
            keys = list(first.keys()) if isinstance(first, dict) else []
            if column is None:
                # SAELens's ActivationsStore looks for these columns, in this order
                column = next((c for c in ("tokens", "input_ids", "text", "problem") if c in keys), None)
                if column is None:
                    raise HarvestError(f"the dataset has no 'tokens', 'input_ids', 'text' or 'problem' column (it has "
                                       f"{keys}); name the column with column=")
            elif column not in keys:
                raise HarvestError(f"the dataset has no column {column!r}; its columns are {keys}")
            self.fingerprint["column"] = column
            value = first[column]
            if isinstance(value, str):
                self.kind = "texts"
            elif _is_token_seq(value) or hasattr(value, "tolist"):
                self.kind = "rows"
            else:
                raise HarvestError(f"column {column!r} holds {type(value).__name__}; harvest reads text (str) or "
                                   "token ids (a list of ints)")
            self.items = (row[column] for row in it)
            return
        if column is not None:
            raise HarvestError("column= names a column of a datasets.Dataset; this source is a plain iterable")
        if isinstance(source, dict):
            raise HarvestError("source is a dict; pass a datasets.Dataset, a list of texts or token ids")
        first, it = _peek(source, "the iterable")
        if isinstance(first, str):
            self.kind = "texts"
        elif _is_token_seq(first):
            self.kind = "seqs"
        else:
            raise HarvestError(f"source items must be texts (str) or token-id sequences; the first is "
                               f"{type(first).__name__}")
        if hasattr(source, "__len__"):
            self.fingerprint["len"] = len(source)
        self.items = it


def _as_ids(x, vocab_size, where):
    a = np.asarray(x)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise HarvestError(f"{where}: expected a 1-D sequence of integer token ids, got dtype {a.dtype}, shape {a.shape}")
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= vocab_size:
        raise HarvestError(f"{where}: token id {lo if lo < 0 else hi} is out of range [0, vocab_size={vocab_size})")
    return a.astype(np.int64, copy=False)


def _sequences(src, model):
    """The source's token sequences (1-D int64 arrays, without BOS: SAELens tokenizes with prepend_bos=False)."""
    V = model.config.vocab_size
    if src.kind == "texts":
        tok = model.tokenizer
        if tok is None:
            raise HarvestError("the model has no tokenizer (tokenizer.model beside the weights); pass token ids instead "
                               "of texts")
        for i, text in enumerate(src.items):
            if not isinstance(text, str):
                raise HarvestError(f"source item {i} is {type(text).__name__}, not text (the first item was text)")
            yield np.asarray(tok.encode(text, add_bos=False), np.int64)
    else:
        for i, seq in enumerate(src.items):
            yield _as_ids(seq, V, f"source item {i}")


def pack_rows(sequences, context_size, bos_id, prepend_bos=True, separator_id="bos"):
    """Token sequences -> rows of exactly context_size tokens, as SAELens's ``concat_and_batch_sequences`` packs them
    (sae_lens/tokenization_and_batching.py, with ActivationsStore's defaults): each row starts with BOS when
    prepend_bos (unless its first token already is BOS); a sequence continuing a partly filled row is preceded by
    the separator (BOS by default) unless it starts with it; a sequence longer than what is left spills into the next
    rows; the incomplete last row is dropped."""
    T = int(context_size)
    begin = bos_id if prepend_bos else None
    sep = bos_id if separator_id == "bos" else separator_id
    if begin is not None and T < 2:
        raise HarvestError("context_size must be at least 2 with prepend_bos=True (a row of BOS alone never ends)")
    row, n = [], 0  # pieces of the row being filled, and its length; row None <=> n == 0
    for toks in sequences:
        off, total = 0, len(toks)
        while off < total:
            first = int(toks[off])
            if n == 0:
                prefix = [begin] if begin is not None and first != begin else []
                need = max(T - len(prefix), 0)
                row = [np.asarray(prefix[:T], np.int64), toks[off:off + need]]
            else:
                prefix = [sep] if sep is not None and first != sep else []
                need = max(T - n - len(prefix), 0)
                row += [np.asarray(prefix[:max(T - n, 0)], np.int64), toks[off:off + need]]
            off += need
            n = sum(len(p) for p in row)
            if n == T:
                yield np.concatenate(row).astype(np.int32)
                row, n = [], 0


def _rows(src, model, context_size, prepend_bos):
    if src.kind == "rows":
        V = model.config.vocab_size
        for i, r in enumerate(src.items):
            ids = _as_ids(r, V, f"source row {i}")
            if len(ids) < context_size:
                raise HarvestError(f"pretokenized row {i} has {len(ids)} tokens, fewer than context_size={context_size} "
                                   "(SAELens cuts tokenized rows to context_size and needs them at least that long)")
            yield ids[:context_size].astype(np.int32)
    else:
        bos = model.tokenizer.bos_id if model.tokenizer is not None else model.config.bos_token_id
        yield from pack_rows(_sequences(src, model), context_size, bos, prepend_bos)


# ---------------------------------------------------------------- the model side


def _layer_of(name):
    parts = name.split(".")
    if parts[0] == "blocks":
        return int(parts[1])
    return -1 if name == "hook_embed" else None  # None: after the blocks (ln_final ...)


class _Plan:
    """What one harvest computes: hook names (validated on a probe forward), their per-token width, where the
    forward may stop, and the SAEs spliced in (with their error term: the model's own activations are unchanged)."""

    def __init__(self, model, hooks, saes):
        if isinstance(hooks, str):
            hooks = [h.strip() for h in hooks.split(",") if h.strip()]
        hooks = list(hooks or [])
        if not hooks:
            raise HarvestError("hooks is empty: name at least one hook (e.g. 'blocks.6.hook_resid_post'; see "
                               "model.hook_names)")
        if len(set(hooks)) != len(hooks):
            raise HarvestError(f"hooks lists a name twice: {hooks}")
        for h in hooks:
            if not isinstance(h, str):
                raise HarvestError(f"hook names must be strings, got {h!r}")
        self.hooks = hooks
        from .transcoders import TranscoderSet

        saes = list(saes) if isinstance(saes, (list, tuple)) else ([] if saes is None else [saes])
        self.saes = [t for s in saes for t in (s.transcoders if isinstance(s, TranscoderSet) else [s])]
        L = model.config.num_hidden_layers
        layers = [_layer_of(h) for h in hooks]
        self.stop_at_layer = None if any(x is None for x in layers) or max(layers) + 1 >= L else max(layers) + 1
        # Two tiny probes name unknown hooks (the model's own error) and tell token-major activations [B, T, ...]
        # from the others ([B, H, T, T] patterns ...), which SAELens's [context, d_in] rows cannot hold.
        shapes = [self._probe(model, t) for t in (2, 3)]
        self.dims = {}
        for h in hooks:
            a, b = shapes[0][h], shapes[1][h]
            if not (a[:2] == (1, 2) and b[:2] == (1, 3) and a[2:] == b[2:]):
                raise HarvestError(f"{h} is not a per-token activation (shape {b} for one row of 3 tokens); harvest "
                                   "stores [T, d] rows as SAELens does: pick a per-token hook (resid, mlp_out, attn "
                                   "z / q / k / v ...)")
            self.dims[h] = int(np.prod(a[2:], dtype=np.int64))

    def _ctx(self, model):
        import contextlib

        return model.saes(self.saes, use_error_term=True) if self.saes else contextlib.nullcontext()

    def _probe(self, model, T):
        try:
            with self._ctx(model):
                _, cache = model.run_with_cache(np.zeros((1, T), np.int32), names_filter=self.hooks,
                                                stop_at_layer=self.stop_at_layer, return_type=None)
        except (ValueError, TypeError) as e:  # an unknown hook name (with close matches), an SAE that does not fit
            raise HarvestError(str(e)) from None
        return {h: tuple(cache[h].shape) for h in self.hooks}

    def compute(self, model, tokens, batch_size):
        """tokens [n, T] int32 -> {hook: float32 [n, T, d]}."""
        n, T = tokens.shape
        out = {h: np.empty((n, T, d), np.float32) for h, d in self.dims.items()}
        with self._ctx(model):
            for s in range(0, n, batch_size):
                _, cache = model.run_with_cache(tokens[s:s + batch_size], names_filter=self.hooks,
                                                stop_at_layer=self.stop_at_layer, return_type=None)
                for h in self.hooks:
                    a = cache[h]
                    out[h][s:s + a.shape[0]] = a.reshape(a.shape[0], T, -1)
        return out


# ---------------------------------------------------------------- writers


class _SaelensWriter:
    """One Arrow file per shard, as ``datasets.save_to_disk`` writes them; state.json / dataset_info.json at the end
    (as SAELens's CacheActivationsRunner consolidates its shards)."""

    def __init__(self, dims, T, dtype):
        datasets = _need("datasets", "harvest")
        feats = {h: datasets.Array2D(shape=(T, d), dtype=dtype) for h, d in dims.items()}
        feats["token_ids"] = datasets.Sequence(datasets.Value("int32"), length=T)
        self.features = datasets.Features(feats)
        self.dtype = dtype

    @staticmethod
    def shard_file(i):
        return f"data-{i:05d}.arrow"

    def write(self, path, acts, tokens):
        import datasets
        from datasets.arrow_writer import ArrowWriter

        cols = {h: a.astype(self.dtype, copy=False) for h, a in acts.items()}
        cols["token_ids"] = tokens.astype(np.int32, copy=False)
        table = datasets.Dataset.from_dict(cols, features=self.features).data.table
        w = ArrowWriter(features=self.features, path=path)
        try:
            w.write_table(table)
            w.finalize()
        finally:
            w.close()

    def finalize(self, out_dir, files, fingerprint, meta):
        from dataclasses import asdict

        import datasets

        state = {"_data_files": [{"filename": f} for f in files], "_fingerprint": fingerprint,
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                 "_split": None}
        info = asdict(datasets.DatasetInfo(features=self.features, description=meta))
        _write_json(os.path.join(out_dir, "state.json"), state, sort_keys=True)
        _write_json(os.path.join(out_dir, "dataset_info.json"), {k: info[k] for k in sorted(info)})


class _SafetensorsWriter:
    """Numbered safetensors shards (one tensor per hook [rows, T, d] and token_ids [rows, T] int32) and index.json."""

    _CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

    def __init__(self, dims, T, dtype):
        self.dims, self.T, self.dtype = dims, T, dtype

    @staticmethod
    def shard_file(i):
        return f"shard-{i:05d}.safetensors"

    def write(self, path, acts, tokens):
        tensors = []
        for h, a in acts.items():
            if self.dtype == "bfloat16":
                tensors.append((h, "BF16", a.shape, bf16_bits(a)))
            else:
                tensors.append((h, self._CODES[self.dtype], a.shape, np.ascontiguousarray(a, self.dtype)))
        tensors.append(("token_ids", "I32", tokens.shape, np.ascontiguousarray(tokens, np.int32)))
        header, off = {"__metadata__": {"format": "gemmalens-harvest"}}, 0
        for name, code, shape, arr in tensors:
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + arr.nbytes]}
            off += arr.nbytes
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        with open(path, "wb") as f:
            f.write(len(hb).to_bytes(8, "little"))
            f.write(hb)
            for *_, arr in tensors:
                f.write(memoryview(arr).cast("B"))

    def finalize(self, out_dir, files, fingerprint, meta):
        pass  # the index is written by the harvest (it knows the rows of each shard)


def _write_json(path, obj, **kw):
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, **kw)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the harvest


class HarvestResult:
    """What ``gl.harvest`` returns: where the output is and what it holds."""

    def __init__(self, out_dir, format, hooks, dims, context_size, rows, shards, seconds, computed_rows):
        self.out_dir, self.format, self.hooks, self.dims = out_dir, format, list(hooks), dict(dims)
        self.context_size, self.rows, self.shards = context_size, rows, shards
        self.tokens = rows * context_size
        self.seconds = seconds  # this call's wall time
        self.computed_rows = computed_rows  # rows this call computed (fewer than rows when it resumed)

    @property
    def tokens_per_second(self):
        return self.computed_rows * self.context_size / self.seconds if self.seconds > 0 else float("nan")

    def load(self):
        """The output as a ``datasets.Dataset`` (format="saelens"), else {name: array} over all shards."""
        if self.format == "saelens":
            datasets = _need("datasets", "harvest")
            return datasets.load_from_disk(self.out_dir)
        return load_safetensors_harvest(self.out_dir)

    def __repr__(self):
        return (f"HarvestResult({self.out_dir!r}, format={self.format!r}, rows={self.rows}, tokens={self.tokens}, "
                f"shards={self.shards}, hooks={self.hooks})")


def load_safetensors_harvest(out_dir):
    """Read a format="safetensors" harvest back: {hook or 'token_ids': array [rows, T, (d)]} (bfloat16 widened)."""
    with open(os.path.join(out_dir, _INDEX), encoding="utf-8") as f:
        index = json.load(f)
    parts = {}
    for shard in index["shards"]:
        with open(os.path.join(out_dir, shard["file"]), "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            data = f.read()
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            raw = np.frombuffer(data[b:e], {"F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                                            "I32": np.int32}[info["dtype"]])
            if info["dtype"] == "BF16":
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            parts.setdefault(name, []).append(raw.reshape(info["shape"]))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _model_identity(model):
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    return {"path": None if model.path is None else os.path.abspath(str(model.path)), "dtype": str(model.dtype),
            "weights": str(model.weights), "config": json.loads(json.dumps(cfg, default=str))}


def _sae_identity(sae):
    if hasattr(sae, "_identity"):  # a cross-layer transcoder (its weights live natively)
        return sae._identity()
    h = hashlib.sha256()
    for a in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
        h.update(np.ascontiguousarray(a).tobytes())
    return {"hook_name": sae.hook_name, "hook_name_out": sae.hook_name_out, "d_sae": int(sae.d_sae),
            "architecture": sae.architecture, "sha256": h.hexdigest()}


def _check_out_dir(out_dir):
    """-> (created dirs to remove on an early failure). Refuses a file, an unwritable place, a foreign folder."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise HarvestError(f"out_dir '{out_dir}' is a file; pass a directory (new or empty, or an unfinished harvest "
                           "to resume)")
    if os.path.isdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        other = [p for p in os.listdir(out_dir)]
        if other:
            raise HarvestError(f"out_dir '{out_dir}' is not empty and holds no gemmalens harvest ({MANIFEST}): "
                               f"found {sorted(other)[:5]}; pass a new or empty directory")
    created, p = [], out_dir
    while not os.path.exists(p):
        created.append(p)
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise HarvestError(f"out_dir '{out_dir}': '{p}' is a file, not a directory")
    try:
        os.makedirs(os.path.join(out_dir, _TMP), exist_ok=True)
        probe = os.path.join(out_dir, _TMP, f"probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.remove(probe)
    except OSError as e:
        _remove_created(created, out_dir)
        raise HarvestError(f"out_dir '{out_dir}' is not writable ({e.strerror or e}); pass a directory you can write "
                           "to") from None
    return created


def _remove_created(created, out_dir):
    shutil.rmtree(os.path.join(out_dir, _TMP), ignore_errors=True)
    for p in created:  # innermost first
        try:
            if os.path.isdir(p) and not os.listdir(p):
                os.rmdir(p)
        except OSError:
            pass


def _diff(a, b, prefix=""):
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} there, {y!r} now")
    return out


class _Manifest:
    def __init__(self, out_dir, identity):
        self.path = os.path.join(out_dir, MANIFEST)
        self.identity = identity
        if os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError) as e:
                raise HarvestError(f"'{self.path}' is unreadable ({e}); delete the folder to harvest afresh") from None
            if old.get("identity") != identity:
                diffs = _diff(old.get("identity") or {}, identity)
                raise HarvestError(f"out_dir '{out_dir}' holds a different harvest ({'; '.join(diffs[:6])}); pass a new "
                                   "out_dir, or the same arguments to resume that one")
            self.shards = {int(k): v for k, v in old.get("shards", {}).items()}
            self.complete = bool(old.get("complete"))
        else:
            self.shards, self.complete = {}, False
            self.save()

    def save(self):
        rows = sum(s["rows"] for s in self.shards.values())
        _write_json(self.path, {"gemmalens_harvest": _VERSION, "identity": self.identity, "complete": self.complete,
                                "rows": rows, "tokens": rows * self.identity["context_size"],
                                "shards": {str(k): self.shards[k] for k in sorted(self.shards)}})


def _token_hash(tokens):
    return hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).hexdigest()


def _shards(rows, rows_per_shard):
    """rows -> (index, int32 [n, T]) in order; the last may be short."""
    for i in itertools.count():
        chunk = list(itertools.islice(rows, rows_per_shard))
        if not chunk:
            return
        yield i, np.stack(chunk)


class _Job:
    """Computes and writes shards: shared by the local engine and the Ray actors."""

    def __init__(self, model, plan, out_dir, fmt, dtype, T, batch_size):
        self.model, self.plan, self.out_dir, self.batch_size = model, plan, out_dir, batch_size
        self.writer = (_SaelensWriter if fmt == "saelens" else _SafetensorsWriter)(plan.dims, T, dtype)
        self.dtype = dtype
        self._warned_inf = False

    def run(self, i, tokens):
        acts = self.plan.compute(self.model, tokens, self.batch_size)
        if self.dtype != "float32" and not self._warned_inf:
            big = max(float(np.abs(a).max()) for a in acts.values())
            if self.dtype == "float16" and big > 65504:
                warnings.warn(f"activations up to {big:.3g} overflow float16 (max 65504): they are stored as inf; "
                              "harvest with dtype='float32' (or 'bfloat16' in format='safetensors')", stacklevel=3)
                self._warned_inf = True
        name = self.writer.shard_file(i)
        tmp = os.path.join(self.out_dir, _TMP, f"{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.writer.write(tmp, acts, tokens)
        os.replace(tmp, os.path.join(self.out_dir, name))  # a finished shard appears whole, or not at all
        return {"file": name, "rows": int(tokens.shape[0]), "tokens_sha256": _token_hash(tokens)}


def harvest(model, source, hooks, out_dir, context_size=128, batch_size=None, prepend_bos=True, dtype="float32",
            max_tokens=None, shard_bytes=256 << 20, progress=True, format="saelens", column=None, saes=None,
            engine="local", num_workers=2, threads_per_worker=1, ray_address=None):
    """Harvest activations of ``hooks`` over a corpus into ``out_dir``.

    source: an iterable of texts; a ``datasets`` Dataset / IterableDataset (column: "tokens", "input_ids", "text" or
      "problem", found in that order as SAELens does, or named with ``column=``; a token column is taken as pretokenized
      rows); a 2-D integer array (pretokenized rows); a 1-D integer array or an iterable of 1-D id sequences (packed).
      Texts and sequences are packed into rows of ``context_size`` tokens exactly as SAELens's ActivationsStore packs
      them (see ``pack_rows``), with BOS first in each row when ``prepend_bos``.
    hooks: TransformerLens hook names (any number; one pass computes them all and stops after the deepest hooked
      block), including the feature hooks of ``saes`` (spliced with their error term, so every other activation is
      the model's own), e.g. "blocks.6.hook_resid_post.hook_sae_acts_post" (saes: gl.SAE, gl.TranscoderSet or gl.CLT,
      whose features are "blocks.L.hook_clt_acts_post"). Per-token activations [T, ...] are
      stored flattened to [T, d] (as SAELens stores hook_z).
    format: "saelens" (a datasets.save_to_disk folder: a column per hook, named exactly the hook, Array2D(context_size,
      d) of ``dtype``, and token_ids; SAELens trains on it with use_cached_activations=True,
      cached_activations_path=out_dir; needs gemmalens[harvest]) or "safetensors" (shard-NNNNN.safetensors + index.json).
    dtype: stored dtype: "float32" or "float16" (also "bfloat16" with format="safetensors").
    max_tokens: stop after max_tokens // context_size rows (default: the whole source).
    shard_bytes: the size of one shard (rows are never split); the unit of resumption and of Ray work.
    Resumable: killed at any point and called again with the same arguments, it skips the finished shards (their
    token rows are checked against the source) and ends with exactly an uninterrupted run's rows. An out_dir of a
    different harvest is refused.
    engine: "local", or "ray" (gemmalens[ray]): ``num_workers`` actors with ``threads_per_worker`` threads each load
      the model from ``model.path`` (a path every node can read) and write shards into out_dir (on storage every
      node can write); ``ray_address="auto"`` attaches to
      a running cluster, None starts a local one. An actor that dies is restarted and its shard redone.
    Returns a HarvestResult (out_dir, rows, tokens, shards, tokens_per_second, load()).
    """
    t_start = time.perf_counter()
    # ---- arguments (all checked before any work or any file)
    if format not in FORMATS:
        raise HarvestError(f"format must be one of {FORMATS}, got {format!r}")
    if dtype not in _DTYPES[format]:
        raise HarvestError(f"dtype must be one of {_DTYPES[format]} for format={format!r}, got {dtype!r}")
    if engine not in ENGINES:
        raise HarvestError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not isinstance(context_size, (int, np.integer)) or isinstance(context_size, bool) or context_size < 1:
        raise HarvestError(f"context_size must be a positive int, got {context_size!r}")
    T = int(context_size)
    if T > model.max_seq_len:
        raise HarvestError(f"context_size={T} is above the model's max_seq_len={model.max_seq_len} (set at "
                           f"gl.load(..., max_seq_len=N), at most max_position_embeddings="
                           f"{model.config.max_position_embeddings})")
    if batch_size is None:
        batch_size = max(1, 2048 // T)
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise HarvestError(f"batch_size must be a positive int (rows per forward), got {batch_size!r}")
    if max_tokens is not None:
        if not isinstance(max_tokens, (int, np.integer)) or isinstance(max_tokens, bool) or max_tokens < T:
            raise HarvestError(f"max_tokens must be an int of at least context_size={T} (one row), got {max_tokens!r}")
    if not isinstance(shard_bytes, (int, np.integer)) or shard_bytes < 1:
        raise HarvestError(f"shard_bytes must be a positive int, got {shard_bytes!r}")
    if not isinstance(prepend_bos, bool):
        raise HarvestError(f"prepend_bos must be True or False, got {prepend_bos!r}")
    if engine == "ray":
        for nm, v in (("num_workers", num_workers), ("threads_per_worker", threads_per_worker)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise HarvestError(f"{nm} must be a positive int, got {v!r}")
        if model.path is None or not os.path.exists(str(model.path)):
            raise HarvestError("engine='ray' loads the model in every actor from model.path; this model has no path on "
                               "disk (load it with gl.load(path))")
        _need("ray", "ray")
    if format == "saelens":
        _need("datasets", "harvest")
    from .formats import _progress_on

    show = _progress_on(progress)
    plan = _Plan(model, hooks, saes)
    src = _Source(source, column)
    if src.kind == "texts" and model.tokenizer is None:
        raise HarvestError("the source is text but the model has no tokenizer (tokenizer.model beside the weights); "
                           "pass token ids instead")
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    row_bytes = T * (sum(plan.dims.values()) * itemsize + 4)
    rows_per_shard = max(1, int(shard_bytes) // row_bytes)
    max_rows = None if max_tokens is None else int(max_tokens) // T
    identity = {"model": _model_identity(model), "hooks": plan.hooks, "saes": [_sae_identity(s) for s in plan.saes],
                "context_size": T, "prepend_bos": prepend_bos, "dtype": dtype, "format": format,
                "source": src.fingerprint, "max_tokens": max_tokens, "rows_per_shard": rows_per_shard,
                "dims": plan.dims}
    out_dir = os.path.abspath(os.fspath(out_dir))
    created = _check_out_dir(out_dir)
    try:
        manifest = _Manifest(out_dir, identity)
    except BaseException:
        _remove_created(created, out_dir)
        raise
    Writer = _SaelensWriter if format == "saelens" else _SafetensorsWriter
    if manifest.complete:
        rows = sum(s["rows"] for s in manifest.shards.values())
        return HarvestResult(out_dir, format, plan.hooks, plan.dims, T, rows, len(manifest.shards),
                             time.perf_counter() - t_start, 0)

    rows_it = _rows(src, model, T, prepend_bos)
    if max_rows is not None:
        rows_it = itertools.islice(rows_it, max_rows)
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=None if max_rows is None else max_rows * T, unit="tok", unit_scale=True, file=sys.stderr,
                   desc=f"harvest {len(plan.hooks)} hook{'s' if len(plan.hooks) > 1 else ''}", smoothing=0.1)
    computed = 0
    try:
        todo = _verified_todo(_shards(rows_it, rows_per_shard), manifest, bar, T)
        if engine == "local":
            job = _Job(model, plan, out_dir, format, dtype, T, int(batch_size))
            for i, tokens in todo:
                manifest.shards[i] = job.run(i, tokens)
                manifest.save()
                computed += tokens.shape[0]
                if bar is not None:
                    bar.update(tokens.shape[0] * T)
        else:
            from . import _harvest_ray

            def done(i, info):
                nonlocal computed
                manifest.shards[i] = info
                manifest.save()
                computed += info["rows"]
                if bar is not None:
                    bar.update(info["rows"] * T)

            _harvest_ray.run(model, plan, out_dir, format, dtype, T, int(batch_size), todo, done, int(num_workers),
                             int(threads_per_worker), ray_address)
    except BaseException:
        if not manifest.shards:
            os.remove(manifest.path)
            _remove_created(created, out_dir)
        raise
    finally:
        if bar is not None:
            bar.close()
    if not manifest.shards:
        os.remove(manifest.path)
        _remove_created(created, out_dir)
        raise HarvestError(f"the source gave no full row of context_size={T} tokens; pass more text or a smaller "
                           "context_size")
    # ---- finish: the folder's index files, then the manifest says complete
    order = sorted(manifest.shards)
    if order != list(range(len(order))):
        raise HarvestError(f"internal: shards {order} are not contiguous; run the harvest again to redo them")
    files = [manifest.shards[i]["file"] for i in order]
    rows = sum(manifest.shards[i]["rows"] for i in order)
    fp = hashlib.sha256(json.dumps([identity, [manifest.shards[i] for i in order]], sort_keys=True,
                                   default=str).encode()).hexdigest()[:16]
    meta = json.dumps({"gemmalens_harvest": identity}, default=str)
    if format == "saelens":
        Writer(plan.dims, T, dtype).finalize(out_dir, files, fp, meta)
    else:
        first, shards = 0, []
        for i in order:
            shards.append({"file": manifest.shards[i]["file"], "rows": manifest.shards[i]["rows"], "first_row": first})
            first += manifest.shards[i]["rows"]
        _write_json(os.path.join(out_dir, _INDEX), {
            "format": "gemmalens-harvest-safetensors", "version": _VERSION, "rows": rows, "tokens": rows * T,
            "context_size": T, "dtype": dtype, "hooks": {h: [T, d] for h, d in plan.dims.items()},
            "token_ids": [T], "model": identity["model"], "prepend_bos": prepend_bos, "shards": shards})
    manifest.complete = True
    manifest.save()
    shutil.rmtree(os.path.join(out_dir, _TMP), ignore_errors=True)
    return HarvestResult(out_dir, format, plan.hooks, plan.dims, T, rows, len(order), time.perf_counter() - t_start,
                         computed)


def _verified_todo(shards, manifest, bar, T):
    """Skip the shards a previous run finished, after checking that the source still gives the same token rows."""
    for i, tokens in shards:
        info = manifest.shards.get(i)
        if info is not None and not os.path.isfile(os.path.join(os.path.dirname(manifest.path), info["file"])):
            del manifest.shards[i]  # listed but gone (deleted by hand): computed again
            info = None
        if info is not None:
            if info["rows"] != tokens.shape[0] or info["tokens_sha256"] != _token_hash(tokens):
                raise HarvestError(f"the source differs from the harvest being resumed: shard {i}'s token rows are not "
                                   "the ones written before; pass the same source, or a new out_dir")
            if bar is not None:
                bar.update(tokens.shape[0] * T)
            continue
        yield i, tokens
