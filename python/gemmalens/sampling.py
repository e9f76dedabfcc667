"""Next-token selection: greedy, temperature, top-k, top-p, min-p, repetition penalty (HF's order and semantics)."""
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

    @property
    def greedy(self):
        return self.temperature == 0.0

    def probs(self, logits, seen=None):
        """Filtered next-token distribution (float64) for one row of logits; `seen`: ids for the penalty."""
        x = np.asarray(logits, dtype=np.float64).copy()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0 and seen is not None and len(seen):
            idx = np.unique(np.asarray(seen, dtype=np.int64))
            v = x[idx]
            x[idx] = np.where(v > 0, v / self.repetition_penalty, v * self.repetition_penalty)
        if self.greedy:
            p = np.zeros_like(x)
            p[int(np.argmax(x))] = 1.0
            return p
        x /= self.temperature
        if self.top_k is not None and self.top_k < x.size:
            kth = np.partition(x, -self.top_k)[-self.top_k]
            x[x < kth] = -np.inf
        p = np.exp(x - x.max())
        p /= p.sum()
        if self.top_p is not None and self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            n_keep = int(np.searchsorted(cum, self.top_p, side="left")) + 1
            drop = order[n_keep:]
            p[drop] = 0.0
            p /= p.sum()
        if self.min_p is not None and self.min_p > 0:
            p[p < self.min_p * p.max()] = 0.0
            p /= p.sum()
        return p

    def sample(self, logits, seen=None):
        if self.greedy and (self.repetition_penalty in (None, 1.0)):
            return int(np.argmax(logits))
        p = self.probs(logits, seen)
        if self.greedy:
            return int(np.argmax(p))
        return int(self.rng.choice(p.size, p=p))
