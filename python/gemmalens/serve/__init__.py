"""``gemmalens serve``: an OpenAI-compatible HTTP server over one loaded model, with per-request steering, activation
capture and SAE features, for many clients at once (continuous batching: engine.py). Needs the serve extra:
``pip install "gemmalens[serve]"`` (FastAPI and uvicorn)."""
import os
import sys


def _need_serve_extra():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"gemmalens serve needs FastAPI and uvicorn ({e.name} is missing): "
                          "pip install 'gemmalens[serve]'") from None


def parse_sae_args(items):
    """--sae values: DIR or NAME=DIR -> [(name, dir)] (the name defaults to the folder's name)."""
    out = []
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(item)), item
        if not name or not path:
            raise ValueError(f"--sae {item!r}: give a folder, or NAME=FOLDER")
        if name in dict(out):
            raise ValueError(f"--sae: two SAEs named {name!r}; name them with NAME=FOLDER")
        out.append((name, path))
    return out


def build(model="gemma3-270m", dtype="bfloat16", weights="auto", threads=None, max_batch=8, max_seq_len=None,
          api_key=None, saes=(), max_body=16 << 20, model_name=None, progress=None, kv_dtype=None):
    """Load the model and SAEs and make the application: (ASGI app, ServerContext). saes: [(name, folder)];
    kv_dtype: the batch KV cache's (None: the model's dtype; "int8")."""
    _need_serve_extra()
    import gemmalens as gl

    from .app import ServerContext, create_app
    from .engine import Engine

    m = gl.load(model, dtype=dtype, weights=weights, threads=threads, progress=progress)
    if m.tokenizer is None:
        raise ValueError(f"'{model}' has no tokenizer (tokenizer.model beside the weights, or a GGUF with one); "
                         "gemmalens serve needs one")
    loaded = {}
    for name, path in saes:
        sae = gl.SAE.load(path)
        sae.check_model(m)
        loaded[name] = sae
    if max_seq_len is None:
        max_seq_len = min(m.max_seq_len, 4096)
    engine = Engine(m, max_batch=max_batch, max_seq_len=max_seq_len, kv_dtype=kv_dtype)
    if model_name is None:
        model_name = model if not os.path.exists(str(model)) else os.path.basename(os.path.normpath(str(model)))
    ctx = ServerContext(m, engine, loaded, model_id=model_name, api_key=api_key, max_body=max_body)
    return create_app(ctx), ctx


def run(host="127.0.0.1", port=8000, log_level="warning", **kw):
    """Build the server and serve until interrupted (Ctrl-C)."""
    _need_serve_extra()
    import uvicorn

    app, ctx = build(**kw)
    m = ctx.model
    if m.tokenizer.chat_template is None:
        print(f"gemmalens serve: note: '{ctx.model_id}' carries no chat template (a base model?); "
              "/v1/chat/completions writes Gemma's turn format anyway", file=sys.stderr)
    print(f"gemmalens serve: {ctx.model_id} ({m.dtype}, weights {m.weights}, max batch {ctx.engine.max_batch}, "
          f"max_seq_len {ctx.engine.max_seq_len}, KV cache {ctx.engine.cache.kv_dtype}"
          f"{', API key required' if ctx.api_key else ''}"
          f"{', SAEs ' + ', '.join(ctx.saes) if ctx.saes else ''}) on http://{host}:{port}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    finally:
        ctx.engine.close()
