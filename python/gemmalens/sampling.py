"""Next-token selection: greedy, temperature, top-k, top-p, min-p, repetition penalty (HF's order and semantics).

A Gemma 3 vocabulary has 262144 entries, and a decode step of the 270M takes ~11 ms, so the sampler's passes over a
row count: written plainly in numpy (a fresh float64 temporary per operation, a stable argsort of the whole row for
top-p, numpy's ``Generator.choice``) one draw took 4 ms with a temperature and 33 ms with top-p. Here every pass
over the row writes into two buffers the SamplingParams keeps, top-p sorts only the highest probabilities (those
at or above the k-th largest, k grown until their mass reaches top_p), and the draw searches the cumulative sum of
the ids that can still be drawn. The values and the draw are the plain version's, bit for bit: the same float64
operations on the same arrays, and ``Generator.choice(n, p=p)``'s draw (one ``random()`` u, the first id whose
cumulative probability over the whole row, divided by its last value, exceeds u; the ids left out add exact zeros),
so a seed gives the same tokens.
"""
import numpy as np


class SamplingParams:
    def __init__(self, temperature=0.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None, seed=None):
        if not isinstance(temperature, (int, float)) or not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if min_p is not None and (not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
        if repetition_penalty is not None and (not isinstance(repetition_penalty, (int, float)) or repetition_penalty <= 0):
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty!r}")
        self.temperature = float(temperature)
        self.top_k, self.top_p, self.min_p = top_k, top_p, min_p
        self.repetition_penalty = repetition_penalty
        self.rng = np.random.default_rng(seed)
        self._x = self._p = None  # float64 work rows, reused from draw to draw

    @property
    def greedy(self):
        return self.temperature == 0.0

    def _penalised(self, logits, seen):
        """The row as float64 in the first work buffer, the repetition penalty applied."""
        logits = _row(logits)
        if self._x is None or self._x.size != logits.size:
            self._x, self._p = np.empty(logits.size), np.empty(logits.size)
        x = self._x
        np.copyto(x, logits, casting="unsafe")
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0 and seen is not None and len(seen):
            idx = np.unique(np.asarray(seen, dtype=np.int64))
            if idx[0] < 0 or idx[-1] >= x.size:
                raise ValueError(f"seen holds token id {idx[0] if idx[0] < 0 else idx[-1]}, outside the row's "
                                 f"[0, {x.size}): pass the ids of the prompt and of the tokens generated so far")
            v = x[idx]
            x[idx] = np.where(v > 0, v / self.repetition_penalty, v * self.repetition_penalty)
        return x

    def _filtered(self, logits, seen):
        """The filtered distribution (float64, in the second work buffer: valid until the next call) and the ids it
        can be nonzero at (ascending), or None where that may be any id."""
        x = self._penalised(logits, seen)
        p = self._p
        if self.greedy:
            p.fill(0.0)
            p[int(np.argmax(x))] = 1.0
            return p, None
        if self.temperature != 1.0:
            x /= self.temperature
        n = x.size
        support = None
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, refused just below
            if self.top_k is not None and self.top_k < n:
                np.copyto(p, x)
                p.partition(n - self.top_k)
                kth = p[n - self.top_k]
                support = np.flatnonzero(x >= kth)  # the top k and any tie with the k-th (NaN compares false)
                # the others' logits are -inf: exp gives them exact zeros, written directly
                p.fill(0.0)
                p[support] = np.exp(x[support] - x.max())
            else:
                np.subtract(x, x.max(), out=p)
                np.exp(p, out=p)
        total = p.sum()
        if not np.isfinite(total) or total <= 0:
            raise ValueError("the logits hold NaN or infinity: no distribution to sample from")
        p /= total
        if self.top_p is not None and self.top_p < 1.0:
            support = _keep_only(p, np.sort(_nucleus(p, self.top_p, support, self._x)))
            p[support] /= p.sum()
        if self.min_p is not None and self.min_p > 0:
            thr = self.min_p * p.max()
            if support is None:  # the ids at or above the threshold become the support
                support = _keep_only(p, np.flatnonzero(p >= thr))
            else:
                p[support[p[support] < thr]] = 0.0
            p[support] /= p.sum()
        return p, support

    def probs(self, logits, seen=None):
        """Filtered next-token distribution (float64, a new array) for one row of logits; `seen`: ids for the penalty."""
        return self._filtered(logits, seen)[0].copy()

    def sample(self, logits, seen=None):
        if self.greedy and (self.repetition_penalty in (None, 1.0)):
            return int(np.argmax(_row(logits)))
        p, support = self._filtered(logits, seen)
        if self.greedy:
            return int(np.argmax(p))
        # Generator.choice(p.size, p=p): cdf = cumsum(p) / its last value, the first id whose cdf exceeds one
        # random() draw. Over `support` only: the ids outside it add zeros, so its entries' sums are the same.
        u = self.rng.random()
        if support is None:
            cdf = np.cumsum(p, out=self._x)
            cdf /= cdf[-1]
            return int(np.searchsorted(cdf, u, side="right"))
        cdf = np.cumsum(p[support])
        cdf /= cdf[-1]
        return int(support[np.searchsorted(cdf, u, side="right")])


def _row(logits):
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"sampling takes one non-empty row of logits, got shape {logits.shape}")
    return logits


def _keep_only(p, ids):
    """p zero outside `ids` (in place); returns ids."""
    vals = p[ids]
    p.fill(0.0)
    p[ids] = vals
    return ids


def _nucleus(p, top_p, support, scratch):
    """The ids top-p keeps: the shortest prefix of the ids in order of decreasing p (ties by id) whose mass reaches
    top_p, at least one. Sorts the k largest (and their ties) only, k grown until their mass reaches top_p: they are
    the order's first ids, so their running sum is the whole order's. scratch: a float64 row of p's size."""
    vals = p if support is None else p[support]
    n = vals.size
    k = 256
    while True:
        if k >= n:
            cand = np.arange(n)
        else:
            part = scratch[:n]
            np.copyto(part, vals)
            part.partition(n - k)
            cand = np.flatnonzero(vals >= part[n - k])  # the k largest and their ties, ascending
        order = cand[np.argsort(-vals[cand], kind="stable")]  # the stable sort breaks ties by id
        cum = np.cumsum(vals[order])
        if k >= n or cum[-1] >= top_p:
            ids = order[: int(np.searchsorted(cum, top_p, side="left")) + 1]
            return ids if support is None else support[ids]
        k *= 8
