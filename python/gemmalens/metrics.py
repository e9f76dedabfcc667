"""Scalar metrics of a forward pass's logits, with their gradient dMetric/dLogits.

A gradient run (the reverse pass) starts from dMetric/dLogits; these are the metrics interpretability work uses
most (TransformerLens users write them as torch functions of the logits):

>>> m = gl.metrics.logit_diff(" Paris", " London")      # mean over the batch of logit[good] - logit[bad]
>>> value, dlogits = m.evaluate(logits, tokens, tokenizer=model.tokenizer)

``evaluate`` returns the value (a Python float) and dlogits (float32, the logits' shape). Metrics see the final
(soft-capped) logits [batch, pos, vocab], exactly what ``model.forward`` returns. Left padding (``row_start``,
each row's first real position) is honoured where it matters (the loss). Any other metric can be given to a
gradient run as its dMetric/dLogits array directly (see ``dlogits_for``).
"""
import numbers

import numpy as np

from . import _core

__all__ = ["Metric", "loss", "logit_diff", "logprob", "dlogits_for", "next_token_loss"]


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    mx = x.max(axis=-1, keepdims=True)
    return x - (mx + np.log(np.exp(x - mx).sum(axis=-1, keepdims=True)))


def _check_logits(logits):
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"metrics: logits must be [batch, pos, vocab], got shape {logits.shape}")
    return logits


def _position(pos, T, what):
    if not isinstance(pos, numbers.Integral) or isinstance(pos, bool):
        raise TypeError(f"{what}: pos must be an int, got {type(pos).__name__}")
    p = int(pos) + T if pos < 0 else int(pos)
    if not 0 <= p < T:
        raise ValueError(f"{what}: position {pos} is out of range for {T} positions")
    return p


def _token_ids(ids, B, V, tokenizer, what):
    """One token id per row from an int, a one-token string, or a per-row sequence of those."""
    def one(x):
        if isinstance(x, str):
            if tokenizer is None:
                raise ValueError(f"{what}: token {x!r} is a string; pass tokenizer= (model.tokenizer) or a token id")
            enc = list(tokenizer.encode(x, add_bos=False))
            if len(enc) != 1:
                raise ValueError(f"{what}: {x!r} is {len(enc)} tokens {enc}, not one; pass a single token or its id")
            x = enc[0]
        if not isinstance(x, numbers.Integral) or isinstance(x, bool):
            raise TypeError(f"{what}: a token must be an int id or a one-token string, got {type(x).__name__}")
        if not 0 <= int(x) < V:
            raise ValueError(f"{what}: token id {int(x)} is out of range [0, vocab_size = {V})")
        return int(x)

    if isinstance(ids, (str, numbers.Number, np.generic)):
        return np.full(B, one(ids), dtype=np.int64)
    if not hasattr(ids, "__len__"):
        raise TypeError(f"{what}: tokens must be an id, a one-token string or a sequence of those per row, got "
                        f"{type(ids).__name__}")
    ids = list(ids)
    if len(ids) != B:
        raise ValueError(f"{what}: {len(ids)} per-row tokens for a batch of {B}")
    return np.array([one(x) for x in ids], dtype=np.int64)


def _at_position(logits, pos, token_args, tokenizer, what):
    """Checked logits, the position index, and each argument of token_args as one id per row."""
    logits = _check_logits(logits)
    B, T, V = logits.shape
    return logits, _position(pos, T, what), tuple(_token_ids(t, B, V, tokenizer, what) for t in token_args)


class Metric:
    """A scalar function of the logits. Subclasses implement ``evaluate``."""

    def evaluate(self, logits, tokens=None, row_start=None, tokenizer=None):
        """(value, dlogits): the metric and its gradient w.r.t. logits [B, T, V] (float32, same shape).

        tokens [B, T] are the input ids (needed by the loss), row_start [B] each row's first real position (left
        padding; None for none), tokenizer resolves string tokens."""
        raise NotImplementedError

    def __call__(self, logits, tokens=None, row_start=None, tokenizer=None):
        return self.evaluate(logits, tokens, row_start, tokenizer)[0]


class _Loss(Metric):
    def __init__(self, mask=None):
        self.mask = None if mask is None else np.asarray(mask)

    def __repr__(self):
        return "metrics.loss()" if self.mask is None else "metrics.loss(mask=...)"

    def evaluate(self, logits, tokens=None, row_start=None, tokenizer=None):
        return next_token_loss(logits, tokens, row_start, self.mask)


def next_token_loss(logits, tokens, row_start=None, mask=None, with_grad=True, what="metrics.loss"):
    """(mean next-token cross-entropy, its dLoss/dLogits or None): position t predicts token t + 1; left padding
    (row_start) excluded; mask [batch, pos] keeps only the predictions made at its True positions. The one loss
    computation: ``forward(return_type="loss")`` uses it too (with_grad=False)."""
    logits = _check_logits(logits)
    B, T, V = logits.shape
    if tokens is None:
        raise ValueError(f"{what} needs the input tokens (the targets are the next tokens)")
    tokens = np.asarray(tokens)
    if tokens.shape != (B, T):
        raise ValueError(f"{what}: tokens {tokens.shape} do not match logits {logits.shape[:2]}")
    if T < 2:
        raise ValueError(f"{what} needs at least 2 positions (position t predicts token t + 1)")
    # Position t of row b counts when it is real (t >= row_start[b]), not the last, and the mask allows it.
    count = np.zeros((B, T), dtype=bool)
    for b in range(B):
        count[b, (0 if row_start is None else int(row_start[b])):T - 1] = True
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape not in ((B, T), (B, T - 1)):
            raise ValueError(f"{what}: mask must be [batch, pos] {(B, T)} (or {(B, T - 1)}), got {mask.shape}")
        m = mask.astype(bool)
        count[:, :m.shape[1]] &= m
        if m.shape[1] == T:
            count[:, T - 1] = False
    n = int(count.sum())
    if n == 0:
        raise ValueError(f"{what}: no position is counted (each row needs two real tokens, and the mask must keep at "
                         "least one)")
    # The native kernel (softmax sums in double, one parallel pass per row): the logits of a long prompt are 256k
    # floats per position.
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"{what}: tokens must be integer ids, got dtype {tokens.dtype}")
    targets = np.zeros((B, T), dtype=np.int64)
    targets[:, :-1] = tokens[:, 1:]
    counted = targets[count]
    if counted.min() < 0 or counted.max() >= V:
        bad = int(counted.min() if counted.min() < 0 else counted.max())
        raise ValueError(f"{what}: target token id {bad} is out of range [0, vocab_size = {V})")
    weights = np.where(count, np.float32(1.0 / n), np.float32(0.0)).astype(np.float32)
    total, grad = _core.cross_entropy_grad(np.ascontiguousarray(logits, dtype=np.float32).reshape(B * T, V),
                                           targets.reshape(-1), weights.reshape(-1), with_grad)
    return total, (None if grad is None else grad.reshape(B, T, V))


class _LogitDiff(Metric):
    def __init__(self, good, bad, pos=-1):
        self.good, self.bad, self.pos = good, bad, pos

    def __repr__(self):
        return f"metrics.logit_diff({self.good!r}, {self.bad!r}, pos={self.pos})"

    def evaluate(self, logits, tokens=None, row_start=None, tokenizer=None):
        logits, p, (good, bad) = _at_position(logits, self.pos, (self.good, self.bad), tokenizer, "metrics.logit_diff")
        B = logits.shape[0]
        rows = np.arange(B)
        value = float(np.mean(logits[rows, p, good].astype(np.float64) - logits[rows, p, bad]))
        grad = np.zeros(logits.shape, dtype=np.float32)
        np.add.at(grad, (rows, p, good), 1.0 / B)
        np.add.at(grad, (rows, p, bad), -1.0 / B)
        return value, grad


class _LogProb(Metric):
    def __init__(self, ids, pos=-1):
        self.ids, self.pos = ids, pos

    def __repr__(self):
        return f"metrics.logprob({self.ids!r}, pos={self.pos})"

    def evaluate(self, logits, tokens=None, row_start=None, tokenizer=None):
        logits, p, (ids,) = _at_position(logits, self.pos, (self.ids,), tokenizer, "metrics.logprob")
        B = logits.shape[0]
        rows = np.arange(B)
        lsm = _log_softmax(logits[:, p])
        value = float(lsm[rows, ids].mean())
        g = -np.exp(lsm)
        g[rows, ids] += 1.0
        grad = np.zeros(logits.shape, dtype=np.float64)
        grad[:, p] = g / B
        return value, grad.astype(np.float32)


def loss(mask=None):
    """Mean next-token cross-entropy, as ``model.forward(..., return_type="loss")``: position t predicts token
    t + 1, left padding excluded; ``mask`` [batch, pos] (bool) keeps only the predictions made at its True
    positions."""
    return _Loss(mask)


def logit_diff(good, bad, pos=-1):
    """Mean over the batch of logit[good] - logit[bad] at position ``pos``. ``good`` / ``bad``: a token id, a
    one-token string (resolved with the tokenizer), or one of those per row."""
    return _LogitDiff(good, bad, pos)


def logprob(ids, pos=-1):
    """Mean over the batch of the log-probability of token ``ids`` (one, or one per row) at position ``pos``."""
    return _LogProb(ids, pos)


def dlogits_for(metric, logits, tokens=None, row_start=None, tokenizer=None):
    """(value, dlogits) for a gradient run. ``metric``: "loss", a Metric, or an array dMetric/dLogits of the logits'
    shape (any custom metric; its value is reported as NaN)."""
    logits = _check_logits(logits)
    if metric is None:
        raise ValueError("a gradient run needs metric=: \"loss\", a gl.metrics object, or a dMetric/dLogits array")
    if isinstance(metric, str):
        if metric != "loss":
            raise ValueError(f"metric {metric!r}: the string metric is \"loss\"; use gl.metrics for others")
        metric = _Loss()
    if isinstance(metric, Metric):
        return metric.evaluate(logits, tokens, row_start, tokenizer)
    if isinstance(metric, np.ndarray) or isinstance(metric, (list, tuple)):
        g = np.asarray(metric)
        if g.shape != logits.shape:
            raise ValueError(f"dMetric/dLogits has shape {g.shape}; the logits have {logits.shape}")
        if not np.issubdtype(g.dtype, np.floating) and not np.issubdtype(g.dtype, np.integer):
            raise TypeError(f"dMetric/dLogits must be numeric, got dtype {g.dtype}")
        g = g.astype(np.float32)
        if not np.isfinite(g).all():
            raise ValueError("dMetric/dLogits holds NaN or inf")
        return float("nan"), g
    raise TypeError(f"metric must be \"loss\", a gl.metrics object or a dMetric/dLogits array, got {type(metric).__name__}")
