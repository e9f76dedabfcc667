"""The HTTP side of ``gemmalens serve`` (FastAPI): OpenAI's completion and chat endpoints (JSON and server-sent
events), the interpretability endpoints, errors as OpenAI error bodies, the API key and the body size limit."""
import asyncio
import json
import re
import secrets
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import GenerationRequest, new_id
from .protocol import ApiError, npy_base64, parse_activations, parse_features, parse_generation


class ServerContext:
    """What the endpoints share: the model, its engine, the loaded SAEs (name -> gl.SAE) and the server's settings."""

    def __init__(self, model, engine, saes=None, model_id="gemmalens", api_key=None, max_body=16 << 20):
        self.model, self.engine, self.saes = model, engine, dict(saes or {})
        self.model_id, self.api_key, self.max_body = model_id, api_key, int(max_body)
        self.created = int(time.time())


class _ClientGone(Exception):
    pass


def _error(status, message, type_="invalid_request_error", param=None, code=None):
    return JSONResponse(ApiError(message, param, status, type_, code).body(), status_code=status)


class _ApiKey:
    """ASGI middleware: every path but /health needs ``Authorization: Bearer KEY`` when the server has a key."""

    def __init__(self, app, key):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
            if not secrets.compare_digest(token, self.key):
                resp = _error(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                              "authentication_error", code="invalid_api_key")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_json(request, limit):
    """The request's JSON body; 413 past limit bytes (by Content-Length, or counted as it arrives), 400 if not JSON."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError("bad Content-Length header")
        if int(length) > limit:
            raise ApiError(f"the request body ({length} bytes) exceeds this server's limit of {limit} bytes", None, 413,
                           code="request_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ApiError(f"the request body exceeds this server's limit of {limit} bytes", None, 413,
                           code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError("the request body nests JSON too deeply") from None


def _token_str(tok, t):
    """A token as OpenAI's logprobs write it: its text, or 'bytes:\\xNN' for a byte-fallback piece; and its bytes."""
    if t >= len(tok):  # past the tokenizer's vocabulary (a padded embedding)
        return f"<id {t}>", []
    piece = tok.id_to_piece(t)
    m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if m:
        return f"bytes:\\x{m.group(1).lower()}", [int(m.group(1), 16)]
    s = piece.replace("\u2581", " ")
    return s, list(s.encode("utf-8"))


class _Pending:
    """A generation request in flight: the engine's events, handed to this event loop, and a watch on the client's
    connection (a client that goes away cancels the request: its rows are freed before the engine's next step)."""

    def __init__(self, ctx, args, request):
        self.ctx, self.loop = ctx, asyncio.get_running_loop()
        self.queue = asyncio.Queue()
        self.req = GenerationRequest(**args, emit=self._emit)
        self.finished = False
        ctx.engine.submit(self.req)
        self.watch = asyncio.ensure_future(self._watch(request))

    def _emit(self, event):  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is gone (shutdown)
            pass

    async def _watch(self, request):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if not self.finished:
                    self.finished = True
                    self.ctx.engine.cancel(self.req)
                self.queue.put_nowait({"type": "gone"})
                return

    async def next(self):
        """The next event; raises _ClientGone when the client went away."""
        ev = await self.queue.get()
        if ev["type"] == "gone":
            raise _ClientGone()
        if ev["type"] in ("done", "error"):
            self.finished = True
            self.watch.cancel()
        return ev

    def cancel(self):
        self.watch.cancel()
        if not self.finished:
            self.finished = True
            self.ctx.engine.cancel(self.req)


def _raise_if_error(ev):
    if ev["type"] == "error":
        raise ApiError(ev["message"], None, ev.get("status", 500),
                       "invalid_request_error" if ev.get("status", 500) < 500 else "server_error")


class _Choices:
    """Accumulates the deltas of every choice of one request into OpenAI's response shapes."""

    def __init__(self, ctx, pending, chat, opts, logprobs):
        self.ctx, self.chat, self.opts, self.lp_wanted = ctx, chat, opts, logprobs
        self.n = len(pending.req.seqs)
        self.text = [""] * self.n
        self.lp = [[] for _ in range(self.n)]
        self.finish = [None] * self.n
        self.ids = [None] * self.n
        self.completion_tokens = 0
        self.prompt_tokens = sum(len(p) for p in {s.prompt_index: s.prompt for s in pending.req.seqs}.values())

    def logprobs_obj(self, entries, offset):
        tok = self.ctx.model.tokenizer
        if self.chat:
            content = []
            for t, lp, alts in entries:
                s, b = _token_str(tok, t)
                top = []
                for a, alp in alts:
                    sa, ba = _token_str(tok, a)
                    top.append({"token": sa, "logprob": alp, "bytes": ba})
                content.append({"token": s, "logprob": lp, "bytes": b, "top_logprobs": top})
            return {"content": content}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, alts in entries:
            s, _ = _token_str(tok, t)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({_token_str(tok, a)[0]: alp for a, alp in alts})
            out["text_offset"].append(offset)
            offset += len(s)
        return out

    def add(self, ev):
        i = ev["index"]
        self.text[i] += ev["text"]
        self.lp[i].extend(ev["logprobs"])
        if "finish_reason" in ev:
            self.finish[i] = ev["finish_reason"]
            self.ids[i] = ev["token_ids"]
            self.completion_tokens += ev["completion_tokens"]

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def response(self, rid, created):
        choices = []
        for i in range(self.n):
            lp = self.logprobs_obj(self.lp[i], 0) if self.lp_wanted else None
            if self.chat:
                c = {"index": i, "message": {"role": "assistant", "content": self.text[i]}, "logprobs": lp,
                     "finish_reason": self.finish[i]}
            else:
                c = {"index": i, "text": self.text[i], "logprobs": lp, "finish_reason": self.finish[i]}
            if self.opts["return_token_ids"]:
                c["token_ids"] = self.ids[i]
            choices.append(c)
        return {"id": rid, "object": "chat.completion" if self.chat else "text_completion", "created": created,
                "model": self.ctx.model_id, "choices": choices, "usage": self.usage()}


def create_app(ctx):
    """The FastAPI application over a ServerContext."""
    app = FastAPI(title="gemmalens serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return _error(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.get("/health")
    async def health():
        eng = ctx.engine
        return {"status": "ok", "model": ctx.model_id, "running": eng.running, "waiting": eng.waiting,
                "max_batch": eng.max_batch, "max_seq_len": eng.max_seq_len, **eng.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": ctx.model_id, "object": "model", "created": ctx.created,
                                            "owned_by": "gemmalens"}]}

    @app.get("/v1/saes")
    async def saes():
        return {"object": "list", "data": [
            {"id": name, "object": "sae", "hook_name": s.hook_name, "hook_name_out": s.hook_name_out,
             "d_in": s.d_in, "d_sae": s.d_sae, "architecture": s.architecture, "transcoder": s.is_transcoder}
            for name, s in ctx.saes.items()]}

    async def generation(request, chat):
        body = await _read_json(request, ctx.max_body)
        args, opts = parse_generation(ctx, body, chat)
        pending = _Pending(ctx, args, request)
        rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        acc = _Choices(ctx, pending, chat, opts, args["logprobs"] is not None)
        streaming = False
        try:
            ev = await pending.next()  # "started" once prefilled (or an error: a 4xx before any byte is sent)
            _raise_if_error(ev)
            if opts["stream"]:
                streaming = True
                return StreamingResponse(_stream(ctx, pending, acc, rid, created, chat, opts),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            while True:
                ev = await pending.next()
                if ev["type"] == "done":
                    break
                _raise_if_error(ev)
                acc.add(ev)
            return acc.response(rid, created)
        except _ClientGone:
            return JSONResponse({}, status_code=499)
        finally:
            if not streaming:
                pending.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generation(request, chat=True)

    async def on_engine(fn):
        """Run fn(model) on the engine thread (between decode steps) and wait for it."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done(result, exc):
            def settle():
                if fut.cancelled():
                    return
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)
            loop.call_soon_threadsafe(settle)

        ctx.engine.call(fn, done)
        try:
            return await fut
        except ValueError as e:
            raise ApiError(str(e)) from None

    def token_strings(ids):
        tok = ctx.model.tokenizer
        return [_token_str(tok, t)[0] for t in ids]

    @app.post("/v1/activations")
    async def activations(request: Request):
        body = await _read_json(request, ctx.max_body)
        spec = parse_activations(ctx, body)

        def run(model):
            _, cache = model.run_with_cache(np.asarray([spec["ids"]], np.int32), names_filter=spec["hooks"],
                                            fwd_hooks=spec["steering"])
            return {h: cache[h] for h in spec["hooks"]}

        arrays = await on_engine(run)

        def encode():
            out = {}
            for h, a in arrays.items():
                data = npy_base64(a) if spec["encoding"] == "npy" else a.tolist()
                out[h] = {"shape": list(a.shape), "dtype": "float32", "encoding": spec["encoding"], "data": data}
            return out

        acts = await asyncio.get_running_loop().run_in_executor(None, encode)
        return {"object": "activations", "model": ctx.model_id, "tokens": spec["ids"],
                "token_strings": token_strings(spec["ids"]), "activations": acts}

    @app.post("/v1/features")
    async def features(request: Request):
        body = await _read_json(request, ctx.max_body)
        spec = parse_features(ctx, body)
        sae = ctx.saes[spec["sae"]]

        def run(model):
            _, cache = model.run_with_cache(np.asarray([spec["ids"]], np.int32), names_filter=sae.hook_name,
                                            fwd_hooks=spec["steering"])
            acts = cache[sae.hook_name][0]
            return sae.encode_topk(acts.reshape(acts.shape[0], -1), spec["top_k"])

        idx, val = await on_engine(run)
        ids, strs = spec["ids"], token_strings(spec["ids"])
        results = []
        for p in range(len(ids)):
            if spec["ignore_bos"] and p == 0 and ids[0] == ctx.model.config.bos_token_id:
                continue
            top = [{"feature_index": int(f), "activation_value": float(v)} for f, v in zip(idx[p], val[p]) if v > 0]
            results.append({"token_position": p, "token": strs[p], "top_features": top})
        return {"object": "features", "model": ctx.model_id, "sae": spec["sae"], "hook_name": sae.hook_name,
                "tokens": strs, "token_ids": ids, "results": results}

    if ctx.api_key:
        return _ApiKey(app, ctx.api_key)
    return app


def _sse(obj):
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _stream(ctx, pending, acc, rid, created, chat, opts):
    """Server-sent events: one chunk per delta of a choice, [DONE] at the end. A client that goes away cancels the
    request (its rows are freed before the engine's next step)."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    offsets = [0] * acc.n

    def chunk(choice):
        return _sse({"id": rid, "object": obj, "created": created, "model": ctx.model_id, "choices": [choice]})

    try:
        if chat:
            for i in range(acc.n):
                yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
        while True:
            try:
                ev = await pending.next()
            except _ClientGone:
                return
            if ev["type"] == "done":
                break
            if ev["type"] == "error":
                yield _sse(ApiError(ev["message"], None, ev.get("status", 500), "server_error").body())
                return
            i = ev["index"]
            acc.add(ev)
            lp = acc.logprobs_obj(ev["logprobs"], offsets[i]) if acc.lp_wanted else None
            offsets[i] += sum(len(_token_str(ctx.model.tokenizer, t)[0]) for t, _, _ in ev["logprobs"])
            fin = ev.get("finish_reason")
            if chat:
                c = {"index": i, "delta": {"content": ev["text"]} if ev["text"] or not fin else {}, "logprobs": lp,
                     "finish_reason": fin}
            else:
                c = {"index": i, "text": ev["text"], "logprobs": lp, "finish_reason": fin}
            if fin and opts["return_token_ids"]:
                c["token_ids"] = ev["token_ids"]
            yield chunk(c)
        if opts["include_usage"]:
            yield _sse({"id": rid, "object": obj, "created": created, "model": ctx.model_id, "choices": [],
                        "usage": acc.usage()})
        yield "data: [DONE]\n\n"
    finally:
        pending.cancel()
