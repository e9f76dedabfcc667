"""Text generation over the native forward pass and KV cache (batched, streaming)."""
import numpy as np

from .sampling import SamplingParams


class _Request:
    """Normalised generate() input: a batch of id lists, and whether the caller gave text."""

    def __init__(self, model, prompt):
        self.text = False
        self.batched = False
        if isinstance(prompt, str):
            self.text, rows = True, [prompt]
        elif isinstance(prompt, np.ndarray):
            if prompt.ndim == 1:
                rows = [prompt]
            elif prompt.ndim == 2:
                rows, self.batched = list(prompt), True
            else:
                raise ValueError(f"prompt array must be 1-D or 2-D, got shape {prompt.shape}")
        elif isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("empty prompt")
            if all(isinstance(p, str) for p in prompt):
                self.text, self.batched, rows = True, True, list(prompt)
            elif all(isinstance(p, (int, np.integer)) for p in prompt):
                rows = [list(prompt)]
            elif all(isinstance(p, (list, tuple, np.ndarray)) for p in prompt):
                rows, self.batched = list(prompt), True
            else:
                raise TypeError("prompt must be a str, a list of str, a list of token ids or a list of id lists")
        else:
            raise TypeError(f"prompt must be text or token ids, got {type(prompt).__name__}")
        if self.text:
            if model.tokenizer is None:
                raise ValueError("this model has no tokenizer (no tokenizer.model beside the weights); pass token ids "
                                 "or set model.tokenizer = gl.Tokenizer(path)")
            for r in rows:
                if r == "":
                    raise ValueError("empty prompt")
            self.ids = [model.tokenizer.encode(r) for r in rows]
        else:
            self.ids = []
            for r in rows:
                a = model.to_tokens(r)
                if a.shape[0] != 1:
                    raise ValueError("each prompt must be a 1-D list of token ids")
                self.ids.append([int(t) for t in a[0]])
        for r in self.ids:
            if not r:
                raise ValueError("empty prompt")


def _stop_lists(model, stop, ignore_eos):
    stop_ids, stop_strs = set(), []
    if not ignore_eos:
        stop_ids.update(int(e) for e in getattr(model, "generation_eos", None) or model.config.eos_token_id)
    if stop is None:
        return stop_ids, stop_strs
    items = [stop] if isinstance(stop, (str, int, np.integer)) else list(stop)
    for s in items:
        if isinstance(s, str):
            if not s:
                raise ValueError("stop strings must be non-empty")
            if model.tokenizer is None:
                raise ValueError("stop strings need a tokenizer; pass stop token ids instead")
            stop_strs.append(s)
        elif isinstance(s, (int, np.integer)):
            if not 0 <= int(s) < model.config.vocab_size:
                raise ValueError(f"stop token id {s} is out of range [0, {model.config.vocab_size})")
            stop_ids.add(int(s))
        else:
            raise TypeError(f"stop must hold strings or token ids, got {type(s).__name__}")
    return stop_ids, stop_strs


def generate(model, prompt, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, min_p=None,
             repetition_penalty=None, seed=None, stop=None, ignore_eos=False, stream=False, kv_dtype=None):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    req = _Request(model, prompt)
    stop_ids, stop_strs = _stop_lists(model, stop, ignore_eos)
    longest = max(len(r) for r in req.ids)
    if longest + max_new_tokens > model.max_seq_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len = "
                         f"{model.max_seq_len}; shorten the prompt, lower max_new_tokens or load with a larger max_seq_len")
    if stream and req.batched:
        raise ValueError("stream=True takes a single prompt")
    if kv_dtype is not None and kv_dtype not in ("int8", model.dtype):
        raise ValueError(f"kv_dtype must be None (the model's dtype, {model.dtype}) or 'int8', got {kv_dtype!r}")
    gen = _run(model, req, max_new_tokens, params, stop_ids, stop_strs, kv_dtype)
    if stream:
        return _stream(model, req, gen, stop_strs)
    outs = None
    for outs in gen:
        pass
    results = [_finish(model, req, o) for o in outs]
    return results if req.batched else results[0]


def _finish(model, req, out):
    ids, text = out
    if req.text:
        return text
    return np.asarray(ids, dtype=np.int64)


def safe_end(text, sent, stop_strs):
    """How much of a running sequence's text can be handed out (generate's stream, gemmalens serve): not a piece
    ending inside a multi-byte character (byte-fallback tokens decode to U+FFFD until the character is complete), nor a
    tail that may begin a stop string."""
    end = len(text)
    while end > sent and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stop_strs:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:k], 0, end):
                end -= k
                break
    return max(end, sent)


def push_text(decoder, t, stop_strs):
    """Id t pushed to a sequence's Tokenizer.decoder: (its text, cut before the first stop string, and whether one
    was met). The part of the text that earlier pushes settled was searched then, so each stop string is looked for
    from where it could still begin (generate and gemmalens serve)."""
    settled = decoder.settled
    text = decoder.push(t)
    stopped = False
    for s in stop_strs:
        k = text.find(s, max(0, settled - len(s) + 1))
        if k >= 0:
            text, stopped = text[:k], True
    return text, stopped


def _stream(model, req, gen, stop_strs):
    sent = 0
    emitted_ids = 0
    text = None
    for outs in gen:
        ids, text = outs[0]
        if req.text:
            # hold back a piece that ends inside a multi-byte character (byte-fallback tokens) or may begin a stop
            # string (the next token may complete it, and the text is then cut before it)
            end = safe_end(text, sent, stop_strs)
            if end > sent:
                yield text[sent:end]
                sent = end
        else:
            for t in ids[emitted_ids:]:
                yield t
            emitted_ids = len(ids)
    if req.text and text is not None and len(text) > sent:
        yield text[sent:]


def _run(model, req, max_new_tokens, params, stop_ids, stop_strs, kv_dtype=None):
    """Yields, after every step, [(new_ids, text_or_None)] per row."""
    B = len(req.ids)
    T = max(len(r) for r in req.ids)
    toks = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.int32)
    for b, r in enumerate(req.ids):
        toks[b, T - len(r):] = r
        mask[b, T - len(r):] = 1
    new = [[] for _ in range(B)]
    texts = ["" if req.text or stop_strs else None for _ in range(B)]  # "": a row whose first id is a stop id
    done = [False] * B
    tok = model.tokenizer
    # Text out needs ids the tokenizer can decode: a model may have more embedding rows than tokenizer pieces (HF's
    # 4b/12b/27b: 262208 rows, 262144 pieces); those rows are never sampled then. Ids out keep every row, as HF.
    n_text = len(tok) if tok is not None and (req.text or stop_strs) else None

    # each row's text kept up to date id by id (decoding the whole row per step cost O(n) a step)
    decoders = [tok.decoder(skip_special_tokens=True) if req.text or stop_strs else None for _ in range(B)]

    def update_text(b, t):
        if decoders[b] is not None:
            texts[b], stopped = push_text(decoders[b], t, stop_strs)
            done[b] = done[b] or stopped

    if max_new_tokens == 0:
        yield [(new[b], "" if req.text else None) for b in range(B)]
        return
    cache = model.new_cache(batch=B, max_seq_len=T + max_new_tokens, kv_dtype=kv_dtype)
    # hooks from `with model.hooks(...)` and SAEs from `with model.saes(...)` fire on the prompt and on every step
    logits = model.next_token_logits(toks, cache=cache, attention_mask=None if mask.all() else mask)
    for step in range(max_new_tokens):
        nxt = np.zeros((B, 1), np.int32)
        for b in range(B):
            if done[b]:
                nxt[b, 0] = new[b][-1] if new[b] else req.ids[b][-1]
                continue
            row = logits[b]
            if n_text is not None and n_text < row.shape[-1]:
                row = row.copy()
                row[n_text:] = -np.inf
            t = params.sample(row, seen=req.ids[b] + new[b])
            nxt[b, 0] = t
            if t in stop_ids:
                done[b] = True
                if not req.text:
                    new[b].append(t)  # ids out: the stop token is returned, as HF does
                continue
            new[b].append(t)
            update_text(b, t)
        yield [(new[b], texts[b]) for b in range(B)]
        if all(done) or step == max_new_tokens - 1:
            return
        logits = model.next_token_logits(nxt, cache=cache)
