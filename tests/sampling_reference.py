"""Next-token filters written out directly in numpy: the reference for gemmalens.sampling (tests/test_generation.py)
and the "plain" column of bench/sampling_bench.py. No torch here: the bench times gemmalens in the same process."""
import numpy as np


def plain_probs(temperature, top_k, top_p, min_p, penalty, logits, seen):
    """The filters written out directly in numpy (HF's order), one fresh array per step: the reference for
    SamplingParams, which reuses buffers and sorts only the head of the distribution for top-p."""
    x = np.asarray(logits, dtype=np.float64).copy()
    if penalty is not None and seen:
        idx = np.unique(np.asarray(seen, dtype=np.int64))
        v = x[idx]
        x[idx] = np.where(v > 0, v / penalty, v * penalty)
    x /= temperature
    if top_k is not None and top_k < x.size:
        x[x < np.partition(x, -top_k)[-top_k]] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        n_keep = int(np.searchsorted(np.cumsum(p[order]), top_p, side="left")) + 1
        p[order[n_keep:]] = 0.0
        p /= p.sum()
    if min_p is not None and min_p > 0:
        p[p < min_p * p.max()] = 0.0
        p /= p.sum()
    return p
