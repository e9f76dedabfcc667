"""SentencePiece tokenizer with Gemma's conventions (BOS once, special tokens parsed in text, chat turns)."""
import math
import numbers
import os
import re

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

_TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_USER_DEFINED, _TYPE_UNUSED, _TYPE_BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    """A Gemma tokenizer over the ``sentencepiece`` package.

    >>> tok = gl.Tokenizer("tokenizer.model")
    >>> ids = tok.encode("Hello world")            # [bos, ...]
    >>> tok.decode(ids, skip_special_tokens=True)
    'Hello world'
    """

    def __init__(self, path=None, *, model_proto=None):
        self._sp = spm.SentencePieceProcessor()
        if model_proto is not None:
            try:
                self._sp.LoadFromSerializedProto(model_proto)
            except (OSError, RuntimeError) as e:
                raise ValueError(f"not a valid SentencePiece model: {e}") from None
            self.path = None
        else:
            path = os.fspath(path)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no tokenizer model at '{path}'")
            try:
                self._sp.LoadFromFile(path)
            except (OSError, RuntimeError) as e:
                raise ValueError(f"'{path}' is not a SentencePiece model: {e}") from None
            self.path = path
        # The checkpoint's own chat template (Jinja text from tokenizer_config.json / chat_template.jinja, or GGUF
        # tokenizer.chat_template), set by gl.load; None when it carries none, as base (pretrained) models do.
        # apply_chat_template always writes Gemma 3's turn format (what the official template renders).
        self.chat_template = None
        sp = self._sp
        self.vocab_size = sp.GetPieceSize()
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()
        self.start_of_turn_id = sp.PieceToId("<start_of_turn>")
        self.end_of_turn_id = sp.PieceToId("<end_of_turn>")
        if self.start_of_turn_id == self.unk_id:
            self.start_of_turn_id = None
        if self.end_of_turn_id == self.unk_id:
            self.end_of_turn_id = None
        # Control and unknown pieces never come out of SentencePiece's own encoder; like HF's special tokens,
        # they are recognised when they appear literally in text ("<bos>", "<start_of_turn>", ...).
        self._special = {sp.IdToPiece(i): i for i in range(self.vocab_size) if sp.IsControl(i) or sp.IsUnknown(i)}
        self._special_ids = set(self._special.values())
        for i in (self.start_of_turn_id, self.end_of_turn_id):
            if i is not None:
                self._special_ids.add(i)
        pieces = sorted((p for p in self._special if p), key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(p) for p in pieces) + ")") if pieces else None

    def __len__(self):
        return self.vocab_size

    def __repr__(self):
        return f"gemmalens.Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})"

    def encode(self, text, add_bos=True):
        """text -> token ids. BOS is prepended once (not again if the text already starts with it)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = []
        parts = self._special_re.split(text) if self._special_re else [text]
        for k, part in enumerate(parts):
            if not part:
                continue
            if k % 2 == 1:  # a special token
                ids.append(self._special[part])
            else:
                ids.extend(self._sp.EncodeAsIds(part))
        if add_bos and self.bos_id >= 0 and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids, skip_special_tokens=False):
        """token ids -> text. Special tokens are written out (``<bos>``) unless skip_special_tokens."""
        ids = [int(i) for i in ids]
        for i in ids:
            if i < 0 or i >= self.vocab_size:
                raise ValueError(f"decode: token id {i} is out of range [0, {self.vocab_size})")
        out, run = [], []
        for i in ids:
            if i in self._special_ids:
                if run:
                    out.append(self._sp.DecodeIds(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._sp.IdToPiece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.DecodeIds(run))
        return "".join(out)

    def decoder(self, skip_special_tokens=False):
        """An :class:`IncrementalDecoder`: ``decode(ids)`` of a growing list of ids, kept up to date one id at a time
        at a cost that does not grow with the list (what streaming generation and ``gemmalens serve`` need)."""
        return IncrementalDecoder(self, skip_special_tokens)

    def serialized_proto(self):
        """The SentencePiece ModelProto bytes (what a tokenizer.model file holds)."""
        return self._sp.serialized_model_proto()

    def id_to_piece(self, i):
        return self._sp.IdToPiece(int(i))

    def piece_to_id(self, piece):
        return self._sp.PieceToId(piece)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        """Gemma 3's turn format: ``<bos><start_of_turn>user\n{msg}<end_of_turn>\n<start_of_turn>model\n``.

        messages: [{"role": "system" | "user" | "assistant" | "model", "content": str or [{"type": "text", "text":
        str}, ...]}, ...]. Renders what the chat template of Google's instruction-tuned Gemma 3 checkpoints renders
        (HF transformers' models/gemma3/convert_gemma3_weights.py, _CHAT_TEMPLATE; tests/test_chat.py compares the
        two token for token): each turn's text is stripped (each text item of a list, separately); a leading system
        message is folded into the first user turn as written (unstripped) + "\n\n" (of a list, its first item's
        text). Returns the text, or token ids with tokenize=True.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")

        def items(c):
            if not isinstance(c, (list, tuple)) or not all(isinstance(item, dict) for item in c):
                raise ValueError(f"message content must be a string or a list of {{'type': 'text', 'text': ...}} "
                                 f"dicts, got {type(c).__name__}")
            for item in c:
                if item.get("type") == "image":
                    raise ValueError("image content is not supported: gemmalens runs Gemma 3's text model")
                if item.get("type") == "text" and not isinstance(item.get("text"), str):
                    raise ValueError(f"a text item's 'text' must be a string, got {item.get('text')!r}")
            return [item["text"] for item in c if item.get("type") == "text"]

        def content(m):
            c = m.get("content", "")
            return c.strip() if isinstance(c, str) else "".join(t.strip() for t in items(c))

        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"each message needs a 'role' and 'content', got {m!r}")
        prefix = ""
        if messages[0]["role"] == "system":
            c = messages[0].get("content", "")
            if not isinstance(c, str):
                texts = items(c)
                if not texts:
                    raise ValueError("a system message given as a list needs a text item")
                c = texts[0]
            prefix = c + "\n\n"
            messages = messages[1:]
        bos = self._sp.IdToPiece(self.bos_id) if self.bos_id >= 0 else ""
        text = bos
        for k, m in enumerate(messages):
            role = m["role"]
            if (role == "user") != (k % 2 == 0):
                raise ValueError("conversation roles must alternate user/assistant/user/... (after an optional system message)")
            if role not in ("user", "assistant", "model"):
                raise ValueError(f"unknown role {role!r}; use 'system', 'user' or 'assistant'")
            role = "model" if role == "assistant" else role
            text += f"<start_of_turn>{role}\n" + (prefix if k == 0 else "") + content(m) + "<end_of_turn>\n"
        if add_generation_prompt:
            text += "<start_of_turn>model\n"
        return self.encode(text, add_bos=False) if tokenize else text

    @classmethod
    def from_gguf_metadata(cls, meta):
        """Rebuild the SentencePiece ModelProto from a GGUF file's tokenizer.ggml.* metadata.

        llama.cpp's converter stores SentencePiece pieces, scores and types (the ModelProto enum), but for
        added tokens it replaced "▁" by " " (user-defined pieces) and set the score to -1000: undone here.
        """
        if meta.get("tokenizer.ggml.model") != "llama":
            raise ValueError(f"GGUF tokenizer.ggml.model = {meta.get('tokenizer.ggml.model')!r}: only SentencePiece "
                             "('llama') tokenizers are supported")
        tokens = meta.get("tokenizer.ggml.tokens")
        scores = meta.get("tokenizer.ggml.scores")
        types = meta.get("tokenizer.ggml.token_type")
        if (not isinstance(tokens, list) or not tokens or not isinstance(scores, list) or not isinstance(types, list)
                or not (len(tokens) == len(scores) == len(types))):
            raise ValueError("GGUF tokenizer metadata is incomplete (tokens, scores and token_type must be arrays of equal "
                             "lengths)")
        if not all(isinstance(t, str) for t in tokens):
            raise ValueError("GGUF tokenizer.ggml.tokens must be an array of strings")
        for i, t in enumerate(tokens):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:  # undecodable bytes in the file arrive as lone surrogates
                raise ValueError(f"GGUF tokenizer.ggml.tokens[{i}] is not valid UTF-8") from None
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores):
            raise ValueError("GGUF tokenizer.ggml.scores must be an array of finite numbers")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in types):
            raise ValueError("GGUF tokenizer.ggml.token_type must be an array of integers")

        def special(key, default):
            v = meta.get(key, default)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < len(tokens):
                raise ValueError(f"GGUF {key} = {v!r} is not a token id in [0, {len(tokens)})")
            return v

        m = pb.ModelProto()
        for piece, score, typ in zip(tokens, scores, types):
            p = m.pieces.add()
            if typ == _TYPE_USER_DEFINED:
                piece = piece.replace(" ", "\u2581")
            if typ in (_TYPE_USER_DEFINED, _TYPE_CONTROL) and score == -1000.0:
                score = 0.0
            p.piece = piece
            p.score = float(score)
            p.type = int(typ) if 1 <= int(typ) <= 6 else _TYPE_NORMAL
        ts = m.trainer_spec
        ts.model_type = pb.TrainerSpec.BPE
        ts.vocab_size = len(tokens)
        ts.byte_fallback = True
        ts.split_digits = True
        ts.allow_whitespace_only_pieces = True
        ts.unk_id = special("tokenizer.ggml.unknown_token_id", 3)
        ts.bos_id = special("tokenizer.ggml.bos_token_id", 2)
        ts.eos_id = special("tokenizer.ggml.eos_token_id", 1)
        ts.pad_id = special("tokenizer.ggml.padding_token_id", 0)
        ts.unk_piece, ts.bos_piece = tokens[ts.unk_id], tokens[ts.bos_id]
        ts.eos_piece, ts.pad_piece = tokens[ts.eos_id], tokens[ts.pad_id]
        ns = m.normalizer_spec
        ns.name = "identity"
        ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
        ns.remove_extra_whitespaces = False
        ns.escape_whitespaces = True
        return cls(model_proto=m.SerializeToString())


class IncrementalDecoder:
    """``tok.decode(ids, skip_special_tokens)`` of ids pushed one at a time, without decoding the whole list per id.

    >>> dec = tok.decoder(skip_special_tokens=True)
    >>> for i in ids:
    ...     text = dec.push(i)      # == tok.decode(ids[:k + 1], skip_special_tokens=True)

    Decoding every id's whole prefix costs O(n) per id (0.4 ms at 2000 ids on the 270M's tokenizer), so a long
    generation spent O(n^2) in it. Here the text is kept as a settled head, ``decode(ids[:k])``, plus the decode of the
    last ids; the head moves forward in steps while the tail is kept a few ids long. SentencePiece writes each piece's
    text in turn ("▁" as a space), except that a run of byte pieces (<0xE2><0x82><0xAC>) becomes one UTF-8 string,
    U+FFFD where it is incomplete, so the head only ever ends after a piece that is not a byte piece. Each tail is
    decoded with a few settled ids before it as context (what HF's and vLLM's incremental detokenisers do:
    "prefix_offset"), and the context's own text is cut from its front; where the tail's text does not begin with the
    context's (a tokenizer that rewrites across pieces), the whole list is decoded instead, so the result is always
    ``decode(ids)``.

    ``settled``: the length of the text's part no later id can change (a stop string's search can start near it).
    """

    _CONTEXT = 4   # settled ids decoded before the tail for context
    _TAIL = 16     # the head moves on when the tail holds twice this many ids

    def __init__(self, tokenizer, skip_special_tokens=False):
        self._tok = tokenizer
        self._skip = bool(skip_special_tokens)
        self.ids = []
        self.text = ""
        self._k = 0          # the head is decode(ids[:k])
        self._head = ""
        self._ctx = ""       # decode(ids[max(0, k - CONTEXT):k]): the tail's context, decoded when the head moves

    @property
    def settled(self):
        return len(self._head)

    def _tail_text(self, end):
        """decode(ids[:end]) - decode(ids[:k]) for end >= k, or None where that cannot be had from the tail alone."""
        tail = self._tok.decode(self.ids[max(0, self._k - self._CONTEXT):end], self._skip)
        return tail[len(self._ctx):] if tail.startswith(self._ctx) else None

    def push(self, i):
        """Appends id i; returns the decode of every id pushed so far."""
        if not isinstance(i, numbers.Integral):
            raise TypeError(f"push takes one token id (an int), got {type(i).__name__}")
        i = int(i)
        if i < 0 or i >= self._tok.vocab_size:
            raise ValueError(f"decode: token id {i} is out of range [0, {self._tok.vocab_size})")
        self.ids.append(i)
        n = len(self.ids)
        if n - self._k >= 2 * self._TAIL:
            # move the head to n - TAIL, or back to the nearest point after a piece that is not a byte piece
            k = n - self._TAIL
            while k > self._k and self._tok._sp.IsByte(self.ids[k - 1]):
                k -= 1
            if k > self._k:
                part = self._tail_text(k)
                if part is None:
                    self._head = self._tok.decode(self.ids[:k], self._skip)
                else:
                    self._head += part
                self._k = k
                self._ctx = self._tok.decode(self.ids[max(0, k - self._CONTEXT):k], self._skip)
        part = self._tail_text(n)
        self.text = self._head + part if part is not None else self._tok.decode(self.ids, self._skip)
        return self.text
