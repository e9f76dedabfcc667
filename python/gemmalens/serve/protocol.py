"""Request bodies of ``gemmalens serve``, checked: OpenAI's completion and chat fields, and the interpretability
extensions (steering, activations, features). Every problem is an ApiError naming the field (HTTP 400)."""
import base64
import binascii
import io
import math

import numpy as np

from .. import interventions
from ..hooks import family

MAX_PROMPTS = 64          # prompts in one completions request
MAX_STOP = 16             # stop strings
MAX_STEERING = 64         # steering entries in one request
MAX_TOP_LOGPROBS = 20
MAX_HOOKS = 512           # hook names in one activations request
MAX_ACTIVATION_FLOATS = 1 << 24  # floats one activations response may carry (64 MB of float32)
MAX_FEATURES_TOP_K = 256


class ApiError(Exception):
    """An HTTP error with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message, param=None, status=400, type="invalid_request_error", code=None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(body, key, default=None, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return None
    if not _is_int(v):
        raise ApiError(f"'{key}' must be an integer, got {v!r}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        want = f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
        raise ApiError(f"'{key}' must be {want}, got {v}", key)
    return int(v)


def _num(body, key, default=None, lo=None, hi=None, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return None
    if not _is_num(v):
        raise ApiError(f"'{key}' must be a finite number, got {v!r}", key)
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        raise ApiError(f"'{key}' must be in {left}{lo}, {hi if hi is not None else 'inf'}], got {v}", key)
    return float(v)


def _bool(body, key, default=False):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(f"'{key}' must be true or false, got {v!r}", key)
    return v


def _token_ids(v, vocab, param):
    if not isinstance(v, list) or not v:
        raise ApiError(f"'{param}' must be a non-empty list of token ids", param)
    for t in v:
        if not _is_int(t):
            raise ApiError(f"'{param}' must hold integer token ids, got {t!r}", param)
        if not 0 <= t < vocab:
            raise ApiError(f"'{param}': token id {t} is out of range [0, {vocab})", param)
    return [int(t) for t in v]


def _text_ids(ctx, text, param, add_bos=True):
    if not text:
        raise ApiError(f"'{param}' is empty", param)
    return ctx.model.tokenizer.encode(text, add_bos=add_bos)


def parse_prompts(ctx, body):
    """completions' prompt: a string, a list of strings, a list of token ids or a list of those -> id lists."""
    p = body.get("prompt")
    vocab = ctx.model.config.vocab_size
    if isinstance(p, str):
        return [_text_ids(ctx, p, "prompt")]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            out = [_text_ids(ctx, x, "prompt") for x in p]
        elif all(_is_int(x) for x in p):
            out = [_token_ids(p, vocab, "prompt")]
        elif all(isinstance(x, list) for x in p):
            out = [_token_ids(x, vocab, "prompt") for x in p]
        else:
            raise ApiError("'prompt' must be a string, a list of strings, a list of token ids or a list of token id "
                           "lists", "prompt")
        if len(out) > MAX_PROMPTS:
            raise ApiError(f"'prompt': at most {MAX_PROMPTS} prompts per request, got {len(out)}", "prompt")
        return out
    if p is None:
        raise ApiError("'prompt' is required", "prompt")
    raise ApiError("'prompt' must be a non-empty string, a list of strings, a list of token ids or a list of token id "
                   "lists", "prompt")


def parse_messages(ctx, body):
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError("each message must be an object with a 'role' and a 'content'", "messages")
        c = m.get("content")
        if not (isinstance(c, str) or (isinstance(c, list) and all(isinstance(i, dict) for i in c))):
            raise ApiError("a message's 'content' must be a string or a list of {\"type\": \"text\", \"text\"} parts",
                           "messages")
        if isinstance(c, list):
            for part in c:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                                   "messages")
    try:
        return ctx.model.tokenizer.apply_chat_template(msgs, tokenize=True)
    except ValueError as e:
        raise ApiError(f"messages: {e}", "messages") from None


# Per-position width of each hook family ([batch, pos, ...] sites): what a steering vector must have.
def site_width(cfg, name):
    fam = family(name)
    D, F, H, KV, Hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    widths = {"q": H * Hd, "q_norm": H * Hd, "rot_q": H * Hd, "z": H * Hd, "k": KV * Hd, "v": KV * Hd, "k_norm": KV * Hd,
              "rot_k": KV * Hd, "pre": F, "pre_linear": F, "post": F}
    if fam in ("attn_scores", "pattern"):
        return None
    return widths.get(fam, D)


def _vector(v, param):
    """A steering vector: a list of numbers, or a base64 string of a .npy file (np.save of a float array)."""
    if isinstance(v, str):
        try:
            raw = base64.b64decode(v, validate=True)
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except (binascii.Error, ValueError, OSError, EOFError) as e:
            raise ApiError(f"'{param}': a string must be base64 of a .npy file (np.save), could not read it: {e}",
                           param) from None
        if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.number) or arr.dtype.kind == "c":
            raise ApiError(f"'{param}': the .npy array must hold real numbers", param)
        arr = arr.astype(np.float32).reshape(-1)
    elif isinstance(v, list) and v:
        if not all(_is_num(x) for x in v):
            raise ApiError(f"'{param}' must be a list of finite numbers (or a base64 .npy string)", param)
        arr = np.asarray(v, dtype=np.float32)
    else:
        raise ApiError(f"'{param}' must be a non-empty list of numbers or a base64 .npy string", param)
    if not np.all(np.isfinite(arr)):
        raise ApiError(f"'{param}' has non-finite values", param)
    return arr


def parse_steering(ctx, value, param="steering"):
    """[{hook, vector, scale?, positions?} | {sae, feature, scale?, positions?}] -> [(hook name, Intervention)]."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(f"'{param}' must be a list of {{hook, vector, scale}} or {{sae, feature, scale}} objects", param)
    if len(value) > MAX_STEERING:
        raise ApiError(f"'{param}': at most {MAX_STEERING} entries, got {len(value)}", param)
    cfg = ctx.model.config
    out = []
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise ApiError(f"'{where}' must be an object", where)
        scale = _num(item, "scale", 1.0) if "scale" in item else 1.0
        positions = item.get("positions")
        if positions is not None:
            if isinstance(positions, bool) or not (_is_int(positions) or (isinstance(positions, list) and positions and
                                                                          all(_is_int(p) for p in positions))):
                raise ApiError(f"'{where}.positions' must be an integer or a non-empty list of integers", where)
        unknown = set(item) - {"hook", "vector", "scale", "positions", "sae", "feature"}
        if unknown:
            raise ApiError(f"'{where}': unknown field(s) {sorted(unknown)}", where)
        if "sae" in item:
            name = item["sae"]
            if not isinstance(name, str) or name not in ctx.saes:
                known = ", ".join(sorted(ctx.saes)) or "none (start the server with --sae DIR)"
                raise ApiError(f"'{where}.sae': unknown SAE {name!r}; loaded: {known}", where)
            sae = ctx.saes[name]
            feat = item.get("feature")
            if not _is_int(feat) or not 0 <= feat < sae.d_sae:
                raise ApiError(f"'{where}.feature' must be an integer in [0, {sae.d_sae}), got {feat!r}", where)
            if "vector" in item or "hook" in item:
                raise ApiError(f"'{where}': give either {{hook, vector}} or {{sae, feature}}, not both", where)
            it = interventions.steer(sae, int(feat), scale=scale, positions=positions)
            out.append((it.site, it))
            continue
        hook = item.get("hook")
        if not isinstance(hook, str):
            raise ApiError(f"'{where}.hook' must be a hook name (e.g. 'blocks.6.hook_resid_post')", where)
        try:
            ctx.model._hook_table.resolve(hook)
        except ValueError as e:
            raise ApiError(f"'{where}.hook': {e}", where) from None
        width = site_width(cfg, hook)
        if width is None:
            raise ApiError(f"'{where}.hook': steering adds a vector at each position of a [batch, pos, ...] site; "
                           f"{hook!r} holds attention scores / patterns", where)
        vec = _vector(item.get("vector"), f"{where}.vector")
        if vec.size != width:
            raise ApiError(f"'{where}.vector' has {vec.size} values but {hook!r} holds {width} per position", where)
        out.append((hook, interventions.add(vec, scale=scale, positions=positions)))
    return out


def parse_generation(ctx, body, chat):
    """A completions / chat completions body -> the GenerationRequest arguments and the response options."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError("'model' must be a string", "model")
    for key in ("tools", "tool_choice", "functions", "function_call"):
        if body.get(key) not in (None, [], "none"):
            raise ApiError(f"'{key}' is not supported by gemmalens serve", key)
    if body.get("response_format") not in (None, {"type": "text"}):
        raise ApiError("'response_format': only {\"type\": \"text\"} is supported", "response_format")
    for key in ("presence_penalty", "frequency_penalty"):
        if _num(body, key, 0.0) not in (0.0, None):
            raise ApiError(f"'{key}' is not supported; use the extension 'repetition_penalty' (HF semantics)", key)
    if body.get("logit_bias") not in (None, {}):
        raise ApiError("'logit_bias' is not supported", "logit_bias")
    if not chat:
        if _bool(body, "echo"):
            raise ApiError("'echo' is not supported", "echo")
        if body.get("suffix") not in (None, ""):
            raise ApiError("'suffix' is not supported", "suffix")
    prompts = parse_messages(ctx, body) if chat else None
    prompts = [prompts] if chat else parse_prompts(ctx, body)
    n = _int(body, "n", 1, 1, ctx.engine.max_batch)
    best_of = _int(body, "best_of", None, 1)
    if best_of is not None and best_of != n:
        raise ApiError("'best_of' is not supported (other than equal to n)", "best_of")
    if len(prompts) * n > ctx.engine.max_batch:
        raise ApiError(f"{len(prompts)} prompt(s) x n = {n} sequences exceed the server's --max-batch "
                       f"{ctx.engine.max_batch}", "n")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, None)
    longest = max(len(p) for p in prompts)
    room = ctx.engine.max_seq_len - longest
    if room < 1:
        raise ApiError(f"the prompt has {longest} tokens; this server's max_seq_len is {ctx.engine.max_seq_len} "
                       "(with room for at least one new token): shorten the prompt", "prompt" if not chat else "messages",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)  # OpenAI: completions default to 16, chat to the context's rest
    elif max_tokens < 1:
        raise ApiError(f"'{key}' must be >= 1, got {max_tokens}", key)
    elif longest + max_tokens > ctx.engine.max_seq_len:
        raise ApiError(f"the prompt has {longest} tokens and '{key}' asks for {max_tokens} more: {longest + max_tokens} "
                       f"exceed this server's max_seq_len {ctx.engine.max_seq_len}", key, code="context_length_exceeded")
    temperature = _num(body, "temperature", 1.0, 0.0)
    top_p = _num(body, "top_p", None, 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", None)
    if top_k is not None and top_k <= 0:
        top_k = None  # -1 / 0: no top-k filter (vLLM's convention)
    sampling = dict(temperature=temperature if temperature is not None else 1.0, top_k=top_k, top_p=top_p,
                    min_p=_num(body, "min_p", None, 0.0, 1.0),
                    repetition_penalty=_num(body, "repetition_penalty", None, 0.0, lo_open=True))
    seed = _int(body, "seed", None)
    stop = body.get("stop")
    if stop is None:
        stop_strs = []
    elif isinstance(stop, str):
        stop_strs = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop_strs = list(stop)
    else:
        raise ApiError("'stop' must be a string or a list of strings", "stop")
    if len(stop_strs) > MAX_STOP or any(not s for s in stop_strs):
        raise ApiError(f"'stop': at most {MAX_STOP} non-empty strings", "stop")
    ignore_eos = _bool(body, "ignore_eos")
    stop_ids = set() if ignore_eos else {int(e) for e in (ctx.model.generation_eos or ctx.model.config.eos_token_id)}
    if chat:
        logprobs = None
        if _bool(body, "logprobs"):
            logprobs = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        elif body.get("top_logprobs") is not None:
            raise ApiError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        lp = body.get("logprobs")
        logprobs = None if lp is None or lp is False else _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError("'stream_options' must be an object", "stream_options")
    include_usage = _bool(so or {}, "include_usage")
    steering = parse_steering(ctx, body.get("steering"))
    return dict(prompts=prompts, n=n, max_tokens=max_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids,
                stop_strs=stop_strs, steering=steering, logprobs=logprobs), \
        dict(stream=stream, include_usage=include_usage, return_token_ids=_bool(body, "return_token_ids"))


def parse_input(ctx, body, what):
    """{text} or {tokens} (exactly one) -> token ids."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    text, tokens = body.get("text"), body.get("tokens")
    if (text is None) == (tokens is None):
        raise ApiError(f"{what}: give exactly one of 'text' (a string) or 'tokens' (token ids)", "text")
    if text is not None:
        if not isinstance(text, str):
            raise ApiError("'text' must be a string", "text")
        ids = _text_ids(ctx, text, "text", add_bos=_bool(body, "add_bos", True))
    else:
        ids = _token_ids(tokens, ctx.model.config.vocab_size, "tokens")
    if len(ids) > ctx.engine.max_seq_len:
        raise ApiError(f"the input has {len(ids)} tokens, more than this server's max_seq_len "
                       f"{ctx.engine.max_seq_len}", "text" if text is not None else "tokens",
                       code="context_length_exceeded")
    return ids


def parse_activations(ctx, body):
    ids = parse_input(ctx, body, "/v1/activations")
    hooks = body.get("hooks")
    if isinstance(hooks, str):
        hooks = [hooks]
    if not isinstance(hooks, list) or not hooks or not all(isinstance(h, str) for h in hooks):
        raise ApiError("'hooks' must be a hook name or a non-empty list of them (see model.hook_names)", "hooks")
    if len(hooks) > MAX_HOOKS:
        raise ApiError(f"'hooks': at most {MAX_HOOKS} names", "hooks")
    table, cfg = ctx.model._hook_table, ctx.model.config
    total = 0
    T = len(ids)
    for h in hooks:
        try:
            table.resolve(h)
        except ValueError as e:
            raise ApiError(f"'hooks': {e}", "hooks") from None
        w = site_width(cfg, h)
        total += cfg.num_attention_heads * T * T if w is None else T * w
    if total > MAX_ACTIVATION_FLOATS:
        raise ApiError(f"these hooks hold {total} floats for {T} tokens, more than one response carries "
                       f"({MAX_ACTIVATION_FLOATS}); ask for fewer hooks or tokens", "hooks")
    encoding = body.get("encoding", "npy")
    if encoding not in ("npy", "list"):
        raise ApiError("'encoding' must be 'npy' (base64 of a .npy file, the default) or 'list' (nested lists)",
                       "encoding")
    return dict(ids=ids, hooks=list(dict.fromkeys(hooks)), encoding=encoding,
                steering=parse_steering(ctx, body.get("steering")))


def parse_features(ctx, body):
    ids = parse_input(ctx, body, "/v1/features")
    name = body.get("sae", body.get("source"))
    if not isinstance(name, str) or name not in ctx.saes:
        known = ", ".join(sorted(ctx.saes)) or "none (start the server with --sae DIR)"
        raise ApiError(f"'sae': unknown SAE {name!r}; loaded: {known}", "sae")
    top_k = _int(body, "top_k", 5, 1, MAX_FEATURES_TOP_K)
    return dict(ids=ids, sae=name, top_k=top_k, ignore_bos=_bool(body, "ignore_bos"),
                steering=parse_steering(ctx, body.get("steering")))


def npy_base64(arr):
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")
