"""The user-facing Model: input validation and conveniences over the native core. Loading is formats.load."""
import contextlib
import os

import numpy as np

from . import _core, grad, interventions, metrics
from .activation_cache import ActivationCache
from .generation import generate
from .hooks import HookTable, check_hooks, plan_hookset
from .sae import SAE, Splice
from .tl import Blocks, TLConfig, absent, layer_weights
from .transcoders import CLT, TranscoderSet


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


def _is_text(x):
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, str) for t in x))


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
        self._ln_final_gain_value = None  # (1 + w) of the final norm, read on first use (_ln_final_gain)
        self._tl_cfg = None  # model.cfg (TransformerLens's field names), made on first use
        # The ids generate() stops on (unless ignore_eos): an HF folder's generation_config.json when it lists them
        # (as HF's generate does), else config.eos_token_id.
        self.generation_eos = None

    # ---- hooks (TransformerLens idioms) ----

    def save_pretrained(self, directory, dtype=None):
        """Write HF safetensors + config.json (+ tokenizer.model) in the HF layout, whatever format this model
        was loaded from (GGUF weights are written dequantised). dtype: "float32" or "bfloat16" (default: the
        model's)."""
        from .formats import save_pretrained  # formats imports this module (load() makes a Model)

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
        error term, ``.hook_sae_error``), visible to run_with_cache and run_with_hooks. A ``gl.TranscoderSet`` splices
        each of its transcoders; a ``gl.CLT`` replaces every layer's MLP output, with the feature hooks
        ``blocks.L.hook_clt_acts_post`` (``_recon``, ``_error``)."""
        saes = list(saes) if isinstance(saes, (list, tuple)) else [saes]
        saes = [t for s in saes for t in (s.transcoders if isinstance(s, TranscoderSet) else [s])]
        for s in saes:
            if not isinstance(s, (SAE, CLT)):
                raise TypeError(f"saes: expected gl.SAE, gl.TranscoderSet or gl.CLT objects, got {type(s).__name__}")
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

    def run_with_saes(self, tokens, saes, use_error_term=False, fwd_hooks=(), attention_mask=None, return_type="logits",
                      bwd_hooks=(), metric=None):
        """Forward with SAEs spliced at their sites (transcoders replace the MLP output from its input). With
        use_error_term=True the output equals the plain model's, while features stay observable and editable.
        bwd_hooks and metric as in run_with_hooks (backward hooks may name the SAEs' tensors, e.g.
        ``{hook_name}.hook_sae_acts_post``)."""
        with self.saes(saes, use_error_term=use_error_term):
            return self.run_with_hooks(tokens, fwd_hooks=fwd_hooks, attention_mask=attention_mask,
                                       return_type=return_type, reset_hooks_end=False, bwd_hooks=bwd_hooks,
                                       metric=metric)

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
                       allow_longer=False, bwd_hooks=(), metric=None):
        """Forward with hooks: fn(activation, hook) -> None | np.ndarray (a returned array replaces the
        activation; in-place edits work too), or a gl.interventions object (applied natively).

        bwd_hooks (with metric=, as in run_with_cache(incl_bwd=True)): TransformerLens's backward hooks, fn(grad, hook),
        run by the native reverse pass as the metric's gradient reaches each site; editing or returning the gradient
        changes what flows on to earlier sites."""
        if bwd_hooks:
            try:
                return grad.run_with_hooks(self, tokens, fwd_hooks, bwd_hooks, metric, attention_mask, return_type,
                                           allow_longer)
            finally:
                if reset_hooks_end:
                    self.reset_hooks()
        if metric is not None:
            raise ValueError("metric= is for gradient runs: pass bwd_hooks as well (or use run_with_cache(incl_bwd=True))")
        hs, _ = self._plan(fwd_hooks)
        try:
            return self._forward(tokens, attention_mask, return_type, None, allow_longer, hs)
        finally:
            if reset_hooks_end:
                self.reset_hooks()

    def run_with_cache(self, tokens, names_filter=None, stop_at_layer=None, attention_mask=None, return_type="logits",
                       fwd_hooks=(), allow_longer=False, incl_bwd=False, metric=None):
        """Forward and capture activations: returns (logits, ActivationCache).

        names_filter: a hook name, a list of them, or a predicate (None = all). Only those are materialised.
        stop_at_layer: stop before block k (TransformerLens semantics): returns the residual stream there
        ([batch, pos, d_model]) instead of logits, and skips the rest of the model.
        allow_longer: run sequences longer than max_position_embeddings (refused by default).
        incl_bwd: also run the native reverse pass from ``metric`` ("loss", a ``gl.metrics`` object, or an array
        dMetric/dLogits of the logits' shape): the cache then holds ``name + "_grad"`` (the gradient of the metric at
        that site) beside each ``name``, and ``cache.metric_value``.
        """
        _check_allow_longer(allow_longer)
        if incl_bwd:
            return grad.run_with_cache(self, tokens, names_filter, attention_mask, metric, return_type, fwd_hooks,
                                       stop_at_layer, allow_longer)
        if metric is not None:
            raise ValueError("metric= is for gradient runs: pass incl_bwd=True as well")
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
        return out, ActivationCache(splice.ordered(arrays), self._hook_table, model=self)

    def _ln_final_gain(self):
        """The final norm's (1 + w) [d_model] as float64, for ActivationCache.apply_ln_to_stack(recompute_ln=True).
        The core hands out weights only all together (export_tensors), so it is read off the norm itself: a
        one-token forward whose last residual is replaced by ones (RMS sqrt(1 + eps)), capturing
        ln_final.hook_out (after the weight). No registered hook or SAE takes part. Read once per model."""
        if self._ln_final_gain_value is None:
            cfg = self.config
            L, D = cfg.num_hidden_layers, cfg.hidden_size
            ones = interventions.replace(np.ones((1, 1, D), np.float32))
            hs = plan_hookset(self._hook_table, [(f"blocks.{L - 1}.hook_resid_post", ones)],
                              captures=["ln_final.hook_out"])
            self._core.forward(np.zeros((1, 1), np.int32), None, None, "none", hs)
            (_, _, normed), = hs.take_captures()
            self._ln_final_gain_value = normed.reshape(D).astype(np.float64) * np.sqrt(1.0 + cfg.rms_norm_eps)
        return self._ln_final_gain_value

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
    def prefill_chunk(self):
        """Inputs longer than this many positions whose per-position values nobody asked for (next_token_logits,
        return_type=None; no hooks, SAEs or gradients; an empty cache or none) run as consecutive passes of at most
        this many positions through the KV cache (a temporary one without a cache), as a decoding loop would feed them:
        the same logits, with one chunk's activations in memory instead of the whole input's. Default 2048; 0 turns
        it off."""
        return self._core.prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, n):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"prefill_chunk must be a non-negative int (0: off), got {n!r}")
        self._core.prefill_chunk = int(n)

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

    # ---- TransformerLens habits: tokens and strings, cfg, weights ----

    def to_tokens(self, input, prepend_bos=True, padding_side="left"):
        """Text or token ids -> int32 token ids [batch, pos] (TransformerLens's ``to_tokens``, numpy instead of torch).

        input: a str (-> [1, pos]), a list of str (-> [batch, pos], shorter rows padded on the left with the pad id:
        gemmalens runs left padding; forward / run_with_cache given the same list make the attention mask
        themselves), or token ids (list, 1-D or 2-D array: validated and returned as [batch, pos]).
        prepend_bos: prepend ``<bos>`` to text (once; TransformerLens's default for Gemma too)."""
        if _is_text(input):
            return self._encode_texts(input, prepend_bos, padding_side)[0]
        return _as_tokens(input, self.config.vocab_size)

    def _need_tokenizer(self, what):
        if self.tokenizer is None:
            raise ValueError(f"{what}: this model has no tokenizer (no tokenizer.model beside the weights); pass token "
                             "ids, or set model.tokenizer = gl.Tokenizer(path)")
        return self.tokenizer

    def _encode_texts(self, texts, prepend_bos=True, padding_side="left"):
        """str | list of str -> (int32 tokens [batch, pos] left-padded, attention_mask or None when no row is
        padded)."""
        if padding_side != "left":
            raise ValueError(f"padding_side={padding_side!r}: gemmalens runs left-padded batches only (each row's "
                             "tokens at the end, an attention_mask marking the padding); use padding_side='left'")
        if not isinstance(prepend_bos, (bool, np.bool_)):
            raise TypeError(f"prepend_bos must be True or False, got {prepend_bos!r}")
        tok = self._need_tokenizer("to_tokens")
        rows = [texts] if isinstance(texts, str) else list(texts)
        ids = [tok.encode(t, add_bos=bool(prepend_bos)) for t in rows]
        if any(len(r) == 0 for r in ids):
            raise ValueError("to_tokens: an empty text with prepend_bos=False has no tokens")
        T = max(len(r) for r in ids)
        pad = tok.pad_id if tok.pad_id >= 0 else 0
        out = np.full((len(ids), T), pad, np.int32)
        mask = np.zeros((len(ids), T), np.int32)
        for b, r in enumerate(ids):
            out[b, T - len(r):] = r
            mask[b, T - len(r):] = 1
        return _as_tokens(out, self.config.vocab_size), (None if mask.all() else mask)

    def to_str_tokens(self, input, prepend_bos=True):
        """Each token as its text (TransformerLens's ``to_str_tokens``): a str -> list of str (``['<bos>', 'The',
        ' capital', ...]``); token ids 1-D, or 2-D with one row -> list of str; a list of str, or ids with several
        rows -> a list of such lists."""
        tok = self._need_tokenizer("to_str_tokens")
        if isinstance(input, str):
            return [tok.decode([i]) for i in self.to_tokens(input, prepend_bos)[0]]
        if _is_text(input):
            return [self.to_str_tokens(t, prepend_bos) for t in input]
        if isinstance(input, (int, np.integer)) and not isinstance(input, bool):
            input = [input]
        toks = _as_tokens(input, self.config.vocab_size)
        rows = [[tok.decode([i]) for i in row] for row in toks]
        return rows[0] if np.ndim(input) == 1 or len(rows) == 1 else rows

    def to_string(self, tokens):
        """Token ids -> text, special tokens written out (TransformerLens's ``to_string``): 1-D ids -> str, 2-D ->
        list of str."""
        tok = self._need_tokenizer("to_string")
        if isinstance(tokens, (int, np.integer)) and not isinstance(tokens, bool):
            tokens = [tokens]
        toks = _as_tokens(tokens, self.config.vocab_size)
        texts = [tok.decode(row) for row in toks]
        return texts[0] if np.ndim(tokens) == 1 else texts

    def to_single_token(self, string):
        """The id of a string that is one token (without BOS), as TransformerLens's ``to_single_token``; a string of
        several tokens is a ValueError naming them."""
        ids = self._need_tokenizer("to_single_token").encode(string, add_bos=False)
        if len(ids) != 1:
            raise ValueError(f"to_single_token: {string!r} is {len(ids)} tokens "
                             f"{[self.tokenizer.decode([i]) for i in ids]}, not one")
        return int(ids[0])

    @property
    def cfg(self):
        """TransformerLens's config field names (d_model, n_layers, n_heads, d_head, d_mlp, d_vocab, n_ctx,
        n_key_value_heads, ...): a gemmalens.tl.TLConfig read from ``model.config`` (HF's names)."""
        if self._tl_cfg is None:
            self._tl_cfg = TLConfig(self.config, self.dtype, os.path.basename(str(self.path)) if self.path else None)
        return self._tl_cfg

    @property
    def blocks(self):
        """Per-layer weights as TransformerLens names them: ``model.blocks[l].attn.W_Q`` [n_heads, d_model, d_head],
        ``.attn.W_K`` / ``W_V`` [n_key_value_heads, d_model, d_head], ``.attn.W_O`` [n_heads, d_head, d_model],
        ``.mlp.W_in`` / ``W_gate`` [d_model, d_mlp], ``.mlp.W_out`` [d_mlp, d_model] (float32 copies)."""
        return Blocks(self)

    def _stacked(self, kind):
        return layer_weights(self, [kind], range(self.config.num_hidden_layers))[kind]

    @property
    def W_E(self):
        """The embedding [d_vocab, d_model], float32 (without Gemma's sqrt(d_model) scale, which hook_embed
        includes), as TransformerLens's W_E."""
        return self._core.export_tensors(["model.embed_tokens.weight"])["model.embed_tokens.weight"]

    @property
    def W_U(self):
        """The unembedding [d_model, d_vocab]: W_E transposed (Gemma 3 ties them)."""
        return self.W_E.T

    W_Q = property(lambda self: self._stacked("W_Q"), doc="[n_layers, n_heads, d_model, d_head] float32")
    W_K = property(lambda self: self._stacked("W_K"), doc="[n_layers, n_key_value_heads, d_model, d_head] float32")
    W_V = property(lambda self: self._stacked("W_V"), doc="[n_layers, n_key_value_heads, d_model, d_head] float32")
    W_O = property(lambda self: self._stacked("W_O"), doc="[n_layers, n_heads, d_head, d_model] float32")
    W_in = property(lambda self: self._stacked("W_in"), doc="[n_layers, d_model, d_mlp] float32 (up_proj)")
    W_gate = property(lambda self: self._stacked("W_gate"), doc="[n_layers, d_model, d_mlp] float32 (gate_proj)")
    W_out = property(lambda self: self._stacked("W_out"), doc="[n_layers, d_mlp, d_model] float32 (down_proj)")

    def __getattr__(self, name):
        err = absent(name)
        if err is not None:
            raise err
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def new_cache(self, batch=1, max_seq_len=None, kv_dtype=None):
        """A preallocated KV cache. Sliding-window layers keep only `sliding_window` positions in a ring buffer;
        full-attention layers keep `max_seq_len` (default: the model's max_seq_len, min(max_position_embeddings,
        8192) unless given to gl.load).

        kv_dtype: None (the model's dtype) or "int8": keys and values in int8 blocks of 32 with an f32 scale each
        (llama.cpp's q8_0 cache type): 0.56x a bf16 cache's memory (0.28x float32's) for long contexts and large
        batches, decoding at about the bf16 cache's speed. Lossy: attention reads the quantised past (each step's
        own key and value exactly), so logits move by about the quantisation's error (README, "Long context")."""
        if max_seq_len is None:
            max_seq_len = self.max_seq_len
        if not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if not isinstance(max_seq_len, (int, np.integer)) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        return self._core.new_cache(int(batch), int(max_seq_len), kv_dtype)

    def _inputs(self, tokens, attention_mask, cache):
        """tokens, attention_mask and cache as forward() takes them -> (int32 tokens [batch, pos], row_start). Text
        (a str or a list of str) is tokenized with BOS, as TransformerLens's forward does; a list of texts of
        different lengths is left-padded and gets its attention mask here unless one is given."""
        if _is_text(tokens):
            toks, mask = self._encode_texts(tokens)
            if attention_mask is None:
                attention_mask = mask
        else:
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

    def next_token_logits(self, tokens, cache=None, attention_mask=None, allow_longer=False, cache_rows=None):
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

        cache_rows: the cache row of each row of tokens (some of a larger cache's rows, in any order): continuous
        batching, where sequences join and leave a batch between steps (``cache.place_row`` puts a sequence prefilled
        in its own cache into a row, ``cache.shift`` moves every row's slots; gemmalens serve runs on these). The rows
        left out miss these positions (``cache.row_valid(r)`` turns False) until a place_row fills them again.
        """
        _check_allow_longer(allow_longer)
        toks, row_start = self._inputs(tokens, attention_mask, cache)
        rows = _cache_rows(cache_rows, cache, toks.shape[0])
        hs, _ = self._plan()
        return self._core.forward(toks, row_start, cache, "last", hs, allow_longer=allow_longer, cache_rows=rows)

    def generate(self, prompt, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, min_p=None,
                 repetition_penalty=None, seed=None, stop=None, ignore_eos=False, stream=False, kv_dtype=None):
        """Generate a continuation.

        prompt: str -> str; list[int] / 1-D array -> np.ndarray of new ids (the stop token included);
        list of those -> list (one batched run, left-padded; each row equals its prompt run alone).
        temperature 0 (default) is greedy; top_k, top_p, min_p, repetition_penalty as in HF; seed makes
        sampling repeatable. Stops on the config's eos ids (Gemma 3: 1 and 106) unless ignore_eos, and on
        `stop` (strings or token ids). stream=True returns an iterator of text pieces (or ids). kv_dtype: the
        KV cache's, as new_cache takes it (None: the model's dtype; "int8").
        """
        return generate(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                        ignore_eos=ignore_eos, stream=stream, kv_dtype=kv_dtype)


def _cache_rows(rows, cache, batch):
    """next_token_logits(cache_rows=...) -> int32 [batch] (None stays None); the native forward checks the values."""
    if rows is None:
        return None
    if cache is None:
        raise ValueError("cache_rows needs a cache")
    arr = np.asarray(rows)
    if arr.ndim != 1 or arr.shape[0] != batch or not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
        raise ValueError(f"cache_rows must be {batch} integer row indices (one per row of tokens), got {rows!r}")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _next_token_loss(logits, toks, row_start):
    """forward(return_type="loss"): the value of the one next-token loss (gemmalens.metrics.next_token_loss)."""
    return metrics.next_token_loss(logits, toks, row_start, with_grad=False, what="return_type='loss'")[0]


def __getattr__(name):
    # load() and format detection moved to formats.py (which imports this module); the old names still resolve here.
    if name in ("load", "DEMO_MODELS", "_resolve_demo", "zipfile_with_pickle", "CheckpointError"):
        from . import formats

        return getattr(formats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
