"""The engine behind ``gemmalens serve``: one thread owns the model and runs continuous batching.

Every running sequence (one choice of one request) holds a row of one batch KV cache. A new request is prefilled on
its own (batch 1, its own steering), its cache row placed into the batch cache (``KVCache.place_row``), and from the
next step on it decodes together with the others: one native forward per step over the running rows
(``cache_rows``), each row with its own sampling state and its own interventions (``Intervention.for_rows``), so a
row's tokens are those of ``model.generate`` run alone with the same arguments. Finished and cancelled sequences
leave between steps. Activation and feature requests run on the same thread, between steps.

The batch cache's rows share one timeline of slots: a row's sequence is the slots [row_start, seq_len), its positions
count from its row_start. A joining prompt ends at seq_len (the cache is shifted when it is longer than seq_len);
the cache holds 2 * max_seq_len slots, so that a sequence joining beside the longest one always fits (after a shift
that gives back the slots before the earliest row).
"""
import collections
import concurrent.futures
import itertools
import os
import queue
import threading
import time

import numpy as np

from ..generation import push_text, safe_end
from ..hooks import build_hookset
from ..sampling import SamplingParams


class Sequence:
    """One choice of a generation request: its prompt, sampling state and output; a cache row while it runs."""

    def __init__(self, req, index, prompt_index, prompt, params):
        self.req, self.index, self.prompt_index = req, index, prompt_index
        self.prompt = prompt                 # token ids
        self.params = params                 # SamplingParams (its own random generator)
        self.sampled = []                    # every sampled id (a stop id included): generate(ids)'s output
        self.new = []                        # the ids whose text is the output (a stop id excluded)
        self.text = ""                       # their text, cut at a stop string
        self.decoder = None                  # the tokenizer's IncrementalDecoder of new (made at the first id)
        self.sent = 0                        # characters of text already handed out
        self.pending = []                    # logprob entries not yet handed out
        self.row = None                      # batch cache row while running
        self.finish = None                   # "stop" | "length" once finished
        self.final_len = len(prompt) + req.max_tokens  # the most slots it may ever need

    @property
    def last(self):
        return self.sampled[-1]


class GenerationRequest:
    """A completion request as the engine runs it. prompts: token id lists (one or more); each gets n sequences.
    steering: [(hook name, gl.interventions object)] for this request only. logprobs: None, or how many top
    alternatives each token's entry lists (0: only the token's own). emit(event): called on the engine thread with
    the request's events (dicts); it must be thread-safe (the server hands them to its event loop)."""

    def __init__(self, prompts, n, max_tokens, sampling, seed, stop_ids, stop_strs, steering, logprobs, emit):
        self.max_tokens = int(max_tokens)
        self.stop_ids, self.stop_strs = set(stop_ids), list(stop_strs)
        self.steering = list(steering)
        self.logprobs = logprobs
        self.emit = emit
        self.seqs = []
        for p, prompt in enumerate(prompts):
            for j in range(n):
                # choice j of a prompt draws from seed + j: choice 0 is model.generate(prompt, seed=seed)
                params = SamplingParams(seed=None if seed is None else seed + j, **sampling)
                self.seqs.append(Sequence(self, p * n + j, p, list(prompt), params))
        self.cancelled = False
        self.cancel_step = None
        self.unfinished = len(self.seqs)


class Engine:
    """Runs generation requests with continuous batching, and other model calls between steps, on one thread."""

    def __init__(self, model, max_batch=8, max_seq_len=None, kv_dtype=None):
        if model.tokenizer is None:
            raise ValueError("gemmalens serve needs a tokenizer (tokenizer.model beside the weights, or a GGUF with one)")
        self.model = model
        self.max_batch = int(max_batch)
        self.max_seq_len = int(max_seq_len or model.max_seq_len)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 1 <= self.max_seq_len <= model.config.max_position_embeddings:
            raise ValueError(f"max_seq_len must be in [1, {model.config.max_position_embeddings}] (the model's "
                             f"max_position_embeddings), got {max_seq_len}")
        self.cap = 2 * self.max_seq_len
        self._vocab = len(model.tokenizer)
        self.kv_dtype = kv_dtype
        self.cache = model._core.new_cache(self.max_batch, self.cap, kv_dtype)
        self._inbox = queue.Queue()
        self._waiting = collections.deque()
        self._running = []                      # Sequences, in row order of the batch
        self._free = list(range(self.max_batch))
        self._hs_key, self._hs = None, None     # the batch's HookSet, kept while the running set is unchanged
        self._closing = False
        # Sampled rows of a step are drawn on this thread and up to _sample_threads - 1 of the pool's
        # (Engine._sample_accept); the pool is made at the first step that shares its rows.
        self._sample_threads = min(len(os.sched_getaffinity(0)), 8)
        self._sampling_pool = None
        self.stats = dict(decode_steps=0, prefills=0, finished=0, cancelled=0, steps_after_cancel_max=0, errors=0,
                          peak_running=0, busy=None)
        self._thread = threading.Thread(target=self._loop, name="gemmalens-engine", daemon=True)
        self._thread.start()

    # ---- called from other threads ----
    def submit(self, req):
        self._inbox.put(("gen", req))

    def call(self, fn, done):
        """Run fn(model) on the engine thread between steps; done(result, exception) is called there afterwards."""
        self._inbox.put(("call", (fn, done)))

    def cancel(self, req):
        """Stop a request (its client went away): its rows are freed before the next step."""
        if not req.cancelled:
            req.cancel_step = self.stats["decode_steps"]
            req.cancelled = True
            self._inbox.put(("wake", None))

    def close(self):
        self._closing = True
        self._inbox.put(("wake", None))
        self._thread.join(timeout=30)
        if self._sampling_pool is not None:
            self._sampling_pool.shutdown(wait=False)

    @property
    def running(self):
        return len(self._running)

    @property
    def waiting(self):
        return len(self._waiting)

    # ---- the engine thread ----
    def _loop(self):
        while not self._closing:
            try:
                self._take_inbox(block=not self._running and not self._waiting)
                if self._closing:
                    break
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._step()
            except Exception as e:  # a bug: fail what runs, keep serving
                self.stats["errors"] += 1
                for s in list(self._running):
                    self._fail(s.req, f"internal error: {type(e).__name__}: {e}", 500)
                self._running, self._free = [], list(range(self.max_batch))
                self.cache.truncate(0)
        for s in self._running:
            self._fail(s.req, "the server is shutting down", 503)
        for r in self._waiting:
            self._fail(r, "the server is shutting down", 503)

    def _take_inbox(self, block):
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "gen":
                self._waiting.append(payload)
            elif kind == "call":
                fn, done = payload
                self.stats["busy"] = "call"
                try:
                    result = fn(self.model)
                except Exception as e:
                    done(None, e)
                else:
                    done(result, None)
                finally:
                    self.stats["busy"] = None
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drop_cancelled(self):
        keep = []
        for s in self._running:
            if s.req.cancelled:
                self._release(s)
                self.stats["steps_after_cancel_max"] = max(self.stats["steps_after_cancel_max"],
                                                          self.stats["decode_steps"] - s.req.cancel_step)
            else:
                keep.append(s)
        if len(keep) != len(self._running):
            self._running = keep
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            self.stats["cancelled"] += 1

    def _release(self, s):
        self._free.append(s.row)
        s.row = None
        if s.req.cancelled and s.req.unfinished > 0:
            s.req.unfinished -= 1
            if s.req.unfinished == 0:
                self.stats["cancelled"] += 1

    def _fail(self, req, message, status):
        if req.unfinished > 0:
            req.unfinished = 0
            req.emit({"type": "error", "message": message, "status": status})

    def _admit(self):
        while self._waiting:
            req = self._waiting[0]
            if len(req.seqs) > len(self._free):
                return  # first come, first served: it waits for rows
            self._waiting.popleft()
            try:
                self._start(req)
            except Exception as e:  # a bug: this request fails, the others go on
                self.stats["errors"] += 1
                for s in req.seqs:
                    if s.row is not None:
                        self._free.append(s.row)
                        s.row = None
                self._running = [s for s in self._running if s.req is not req]
                self._fail(req, f"internal error: {type(e).__name__}: {e}", 500)

    def _room(self, P, final_len):
        """Shift the batch cache so that a sequence of P slots can end at seq_len and grow to final_len slots while
        every running row can grow to its own final length. False when it cannot (it then waits)."""
        c = self.cache
        if not self._running:
            c.truncate(0)
        S = c.seq_len
        rs = c.row_start
        starts = [(rs[s.row], s.final_len) for s in self._running]

        def fits(d):
            return (S + d >= P and all(r + d + f <= self.cap for r, f in starts) and S + d - P + final_len <= self.cap)

        for d in (max(P - S, 0), max(P - S, -min((r for r, _ in starts), default=0))):
            if fits(d):
                if d:
                    c.shift(d)
                return True
        return False

    def _start(self, req):
        """Prefill each prompt of a request alone, with its steering, and place its sequences into the batch."""
        model, core = self.model, self.model._core
        first = {}
        for s in req.seqs:
            if s.prompt_index in first:
                continue
            if req.cancelled:
                break
            self.stats["busy"] = "prefill"
            try:
                hs = build_hookset(model._hook_table, model.config.num_hidden_layers, req.steering)
                tmp = core.new_cache(1, len(s.prompt), self.kv_dtype)
                logits = core.forward(np.asarray([s.prompt], np.int32), None, tmp, "last", hs)
            except (ValueError, TypeError) as e:
                self._fail(req, str(e), 400)
                return
            finally:
                self.stats["busy"] = None
            self.stats["prefills"] += 1
            first[s.prompt_index] = (tmp, logits[0])
        if req.cancelled:
            self.stats["cancelled"] += 1
            return
        req.emit({"type": "started"})
        for s in req.seqs:
            tmp, logits = first[s.prompt_index]
            if not self._room(len(s.prompt), s.final_len):
                raise RuntimeError("no room in the batch cache (a gemmalens bug: it holds 2 * max_seq_len slots)")
            s.row = self._free.pop(0)
            self.cache.place_row(s.row, tmp, 0)
            self._running.append(s)
            self._accept(s, logits)
        self._retire()

    def _batch_hookset(self):
        """The step's HookSet: each running request's steering on its own rows only."""
        key = tuple(id(s) for s in self._running)
        if key != self._hs_key:
            pairs = [(site, it.for_rows([i])) for i, s in enumerate(self._running) for site, it in s.req.steering]
            model = self.model
            self._hs = build_hookset(model._hook_table, model.config.num_hidden_layers, pairs) if pairs else None
            self._hs_key = key
        return self._hs

    def _step(self):
        seqs = self._running
        self.stats["peak_running"] = max(self.stats["peak_running"], len(seqs))
        toks = np.asarray([[s.last] for s in seqs], np.int32)
        rows = np.asarray([s.row for s in seqs], np.int32)
        # every row's positions are below max_seq_len (checked per request); the shared slots may pass
        # max_position_embeddings, hence allow_longer
        logits = self.model._core.forward(toks, None, self.cache, "last", self._batch_hookset(), allow_longer=True,
                                          cache_rows=rows)
        self.stats["decode_steps"] += 1
        self._sample_accept(seqs, logits)
        self._retire()

    def _sample(self, s, logits):
        row = logits
        if self._vocab < row.shape[-1]:
            # text out, as generate's: rows past the tokenizer's pieces (HF's 4b+ checkpoints pad the embedding) have
            # no text and are never sampled
            row = row.copy()
            row[self._vocab:] = -np.inf
        return s.params.sample(row, seen=s.prompt + s.new)

    def _sample_accept(self, seqs, logits):
        """Each sequence's next id, accepted (its text handed out) as soon as it is drawn. The sampled rows (not greedy)
        of a step with several are shared between this thread and up to _sample_threads - 1 others (cores, at most 8): a
        draw is a handful of numpy passes over the vocabulary (1.2-1.7 ms at 262144 ids, bench/README.md), which release
        the GIL, and the model's own threads are idle meanwhile. Each sequence samples with its own SamplingParams (own
        generator, own work rows), so the ids are the ones drawn row after row. This thread accepts each of its rows
        right after drawing it: the server's event loop sends those tokens while the draws go on, rather than all of
        them at once as the next step's forward takes every core (drawing every row first and accepting after put the
        median time to the first token of 4 sampled streams at 0.11 s against 0.04-0.07; bench/README.md)."""
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        n = min(len(sampled), self._sample_threads)  # threads for this step, this one included
        if n > 1 and self._sampling_pool is None:
            self._sampling_pool = concurrent.futures.ThreadPoolExecutor(self._sample_threads - 1,
                                                                        thread_name_prefix="gemmalens-sample")

        def share(k):  # every n-th sampled row from the k-th
            return [(i, self._sample(seqs[i], logits[i])) for i in sampled[k::n]]

        futures = [self._sampling_pool.submit(share, k) for k in range(1, n)]
        theirs = {i for k in range(1, n) for i in sampled[k::n]}
        try:
            for i, s in enumerate(seqs):
                if i not in theirs:
                    self._accept(s, logits[i])
        finally:
            concurrent.futures.wait(futures)  # all done before an error (if any) is raised here
        for f in futures:
            for i, t in f.result():
                self._accept(seqs[i], logits[i], t)

    def _retire(self):
        keep = []
        for s in self._running:
            if s.finish is None:
                keep.append(s)
            else:
                self._release(s)
        self._running = keep

    def _accept(self, s, logits, t=None):
        """One sampled token for sequence s (t, or drawn from logits here), as generation._run does it; hands out what
        can be said."""
        req, tok = s.req, self.model.tokenizer
        if t is None:
            t = self._sample(s, logits)
        s.sampled.append(t)
        if t in req.stop_ids:
            s.finish = "stop"
        else:
            s.new.append(t)
            if req.logprobs is not None:
                s.pending.append(_logprob_entry(logits, t, req.logprobs))
            if s.decoder is None:
                s.decoder = tok.decoder(skip_special_tokens=True)
            s.text, stopped = push_text(s.decoder, t, req.stop_strs)
            if stopped:
                s.finish = "stop"
        if s.finish is None and len(s.sampled) >= req.max_tokens:
            s.finish = "length"
        end = len(s.text) if s.finish else safe_end(s.text, s.sent, req.stop_strs)
        if end > s.sent or s.pending or s.finish:
            event = {"type": "delta", "index": s.index, "text": s.text[s.sent:end], "logprobs": s.pending}
            s.sent = max(s.sent, end)
            s.pending = []
            if s.finish:
                event.update(finish_reason=s.finish, completion_tokens=len(s.sampled), token_ids=list(s.sampled))
            req.emit(event)
        if s.finish:
            self.stats["finished"] += 1
            req.unfinished -= 1
            if req.unfinished == 0:
                req.emit({"type": "done"})


def _logprob_entry(logits, t, top):
    """(token, its log-probability, [(id, logprob)] of the `top` most likely) under the model's own distribution
    (log-softmax of the logits, before any sampling filter)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    alts = []
    if top:
        idx = np.argpartition(-x, top - 1)[:top]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        alts = [(int(i), float(x[i] - lse)) for i in idx]
    return (int(t), float(x[t] - lse), alts)


_ids = itertools.count(1)


def new_id(prefix):
    return f"{prefix}-{int(time.time() * 1000):x}{next(_ids):06x}"
