"""``gemmalens client``: stream a completion or a chat answer from a ``gemmalens serve`` (or any OpenAI-compatible
server) to the terminal. Standard library only (no serve extra needed)."""
import json
import sys
import urllib.error
import urllib.request


def _post(url, body, api_key, timeout):
    req = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read().decode("utf-8"))["error"]["message"]
        except Exception:
            msg = e.reason
        raise RuntimeError(f"the server answered {e.code}: {msg}") from None
    except urllib.error.URLError as e:
        raise OSError(f"cannot reach {url}: {e.reason} (is `gemmalens serve` running there?)") from None


def events(resp):
    """The JSON objects of a server-sent event stream, up to [DONE]."""
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        obj = json.loads(data)
        if "error" in obj:
            raise RuntimeError(f"the server reported: {obj['error'].get('message')}")
        yield obj


def run(url, completion=None, chat=None, max_tokens=128, temperature=None, top_p=None, seed=None, api_key=None,
        steering=None, out=None, timeout=600):
    """Stream the answer to `out` (stdout); returns the whole text."""
    out = out or sys.stdout
    if (completion is None) == (chat is None):
        raise ValueError("give exactly one of --completion TEXT or --chat TEXT")
    body = {"model": "gemmalens", "max_tokens": max_tokens, "stream": True}
    for k, v in (("temperature", temperature), ("top_p", top_p), ("seed", seed), ("steering", steering)):
        if v is not None:
            body[k] = v
    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    if chat is not None:
        body["messages"] = [{"role": "user", "content": chat}]
        endpoint = base + "/v1/chat/completions"
    else:
        body["prompt"] = completion
        endpoint = base + "/v1/completions"
    text = []
    with _post(endpoint, body, api_key, timeout) as resp:
        for obj in events(resp):
            for c in obj.get("choices", []):
                piece = c.get("delta", {}).get("content") if chat is not None else c.get("text")
                if piece:
                    text.append(piece)
                    out.write(piece)
                    out.flush()
    out.write("\n")
    return "".join(text)
