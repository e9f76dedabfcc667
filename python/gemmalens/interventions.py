"""Native interventions: usable wherever a hook function is, applied inside the C++ forward pass without a
Python call per site. Several at one site apply in order (they compose).

>>> model.run_with_hooks(toks, fwd_hooks=[("blocks.6.hook_resid_post", gl.interventions.add(v, scale=4.0))])
"""
import numpy as np


class Intervention:
    def __init__(self, kind, values=None, positions=None, scale=1.0, heads=(), mean=False):
        self.kind = kind
        self.values = None if values is None else np.ascontiguousarray(values, dtype=np.float32)
        if positions is None:
            positions = []
        elif isinstance(positions, (int, np.integer)):
            positions = [int(positions)]
        else:
            positions = [int(p) for p in positions]
        self.positions = positions
        self.scale = float(scale)
        self.heads = [int(h) for h in heads]
        self.mean = bool(mean)

    def _register(self, hs, site, layer, hook):
        try:
            hs.add_intervention(site, layer, self.kind, self.values, self.positions, self.scale, self.heads, self.mean)
        except ValueError as e:
            raise ValueError(f"{hook.name}: {e}") from None

    def __repr__(self):
        return f"gl.interventions.{self.kind}(...)"


def add(vector, scale=1.0, positions=None):
    """x[..., pos, :] += scale * vector (vector: one value per element of a position, e.g. [d_model])."""
    v = np.asarray(vector, dtype=np.float32)
    if not np.all(np.isfinite(v)):
        raise ValueError("interventions.add: the vector has non-finite values")
    return Intervention("add", v.reshape(-1), positions, scale)


def replace(values, positions=None):
    """x[:, pos] = values[:, pos] (values: the activation's shape, e.g. from a clean run's cache, or without
    the batch axis to broadcast) -- activation patching."""
    return Intervention("replace", np.asarray(values, dtype=np.float32), positions)


def scale(s, positions=None):
    """x *= s."""
    return Intervention("scale", None, positions, s)


def zero(positions=None):
    """x = 0."""
    return Intervention("zero", None, positions)


def ablate_heads(heads, mode="zero", positions=None):
    """On a per-head activation ([batch, pos, head, d_head], e.g. attn.hook_z): set the heads to zero or to
    their mean over batch and positions ("mean")."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"ablate_heads: mode must be 'zero' or 'mean', got {mode!r}")
    heads = [heads] if isinstance(heads, (int, np.integer)) else list(heads)
    if not heads:
        raise ValueError("ablate_heads: give at least one head")
    return Intervention("ablate_heads", None, positions, heads=heads, mean=mode == "mean")


def project_out(direction, positions=None):
    """x -= (x . d) d / |d|^2 per position: remove a direction."""
    d = np.asarray(direction, dtype=np.float32).reshape(-1)
    if not np.any(d):
        raise ValueError("project_out: the direction is zero")
    return Intervention("project_out", d, positions)
