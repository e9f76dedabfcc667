"""Native interventions: usable wherever a hook function is, applied inside the C++ forward pass without a
Python call per site. Several at one site apply in order (they compose). They take part in gradient runs with
their exact VJPs, and in every step of generate inside ``model.hooks(...)``.

``positions`` (every intervention): indices on the activation's position axis (negative from the end; None: all) --
axis 1 of [batch, pos, ...] sites, axis 2 of [batch, head, pos, ...] ones (attn_scores, pattern, the q_norm /
k_norm sites, hook_q_normed / hook_k_normed). A "position's values" are everything after that axis.

>>> model.run_with_hooks(toks, fwd_hooks=[("blocks.6.hook_resid_post", gl.interventions.add(v, scale=4.0))])
>>> model.run_with_hooks(toks, fwd_hooks=[("blocks.3.attn.hook_z", gl.interventions.ablate_heads([1, 2]))])
>>> _, clean = model.run_with_cache(clean_toks, names_filter="blocks.5.hook_resid_pre")
>>> model.run_with_hooks(corrupt_toks, fwd_hooks=[("blocks.5.hook_resid_pre",
...                      gl.interventions.replace(clean["blocks.5.hook_resid_pre"], positions=[-1]))])
"""
import copy

import numpy as np


class Intervention:
    site = None  # a default hook name (steer / ablate_features know theirs)

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
        self.rows = []  # batch rows it applies to; empty = all (for_rows)

    def for_rows(self, rows):
        """A copy that edits only these rows of the batch (one request among others: gemmalens serve's per-request
        steering); the other rows run as if it were not there."""
        rows = [rows] if isinstance(rows, (int, np.integer)) else list(rows)
        if not rows or any(not isinstance(r, (int, np.integer)) or r < 0 for r in rows):
            raise ValueError(f"for_rows: give one or more batch rows (ints >= 0), got {rows!r}")
        out = copy.copy(self)
        out.rows = [int(r) for r in rows]
        return out

    def _register(self, hs, site, layer, hook):
        try:
            hs.add_intervention(site, layer, self.kind, self.values, self.positions, self.scale, self.heads, self.mean,
                                self.rows)
        except ValueError as e:
            raise ValueError(f"{hook.name}: {e}") from None

    def _sel(self, a):
        """The index of the batch rows and positions it edits in an array [batch, pos, ...]."""
        rows = slice(None) if not self.rows else [r for r in self.rows if r < a.shape[0]]
        pos = slice(None) if not self.positions else self.positions
        if isinstance(rows, list) and not isinstance(pos, slice):
            return np.ix_(rows, pos)
        return rows, pos

    def __repr__(self):
        return f"gl.interventions.{self.kind}(...)"

    def apply_numpy(self, a):
        """The same operation on a numpy array [batch, pos, ...] (used on SAE feature tensors)."""
        a = np.array(a, dtype=np.float32, copy=True)
        sel = self._sel(a)
        if self.kind == "add":
            a[sel] += self.scale * self.values.reshape(a.shape[2:])
        elif self.kind == "scale":
            a[sel] *= self.scale
        elif self.kind == "zero":
            a[sel] = 0
        elif self.kind == "replace":
            v = np.broadcast_to(self.values.reshape(self.values.shape if self.values.ndim == a.ndim else a.shape[1:]), a.shape)
            a[sel] = v[sel]
        else:
            raise ValueError(f"interventions.{self.kind} does not apply to SAE tensors")
        return a

    def vjp_numpy(self, g):
        """The VJP of apply_numpy: the gradient at its output -> at its input."""
        g = np.array(g, dtype=np.float32, copy=True)
        sel = self._sel(g)
        if self.kind == "scale":
            g[sel] *= self.scale
        elif self.kind in ("zero", "replace"):
            g[sel] = 0
        elif self.kind != "add":
            raise ValueError(f"interventions.{self.kind} does not apply to SAE tensors")
        return g


def _need_sae(sae, what):
    from .sae import SAE  # (sae imports this module)

    if not isinstance(sae, SAE):
        raise TypeError(f"{what}: expected a gl.SAE, got {type(sae).__name__}; for a gl.CLT splice it (run_with_saes) "
                        "and hook blocks.L.hook_clt_acts_post, or add clt.W_dec(L)[feature, j - L] at layer j's "
                        "hook_mlp_out; for a gl.TranscoderSet use tset[L]")


class _AblateFeatures(Intervention):
    def __init__(self, sae, features, positions=None):
        super().__init__("ablate_features", positions=positions)
        _need_sae(sae, "ablate_features")
        if sae.architecture == "jumprelu_signed":
            raise ValueError("ablate_features: a jumprelu_signed SAE (circuit-tracer's JumpReLU, no ReLU) is not "
                             "supported natively; use run_with_saes with a hook on hook_sae_acts_post")
        if sae.is_transcoder:
            raise ValueError("ablate_features: transcoders read and write different sites; splice them with run_with_saes")
        if sae.architecture == "topk":
            raise ValueError("ablate_features: a TopK SAE's features depend on each other; use run_with_saes with a hook on "
                             "hook_sae_acts_post")
        feats = np.atleast_1d(np.asarray(features, dtype=np.int64))
        if feats.size == 0 or feats.min() < 0 or feats.max() >= sae.d_sae:
            raise ValueError(f"ablate_features: features must be in [0, {sae.d_sae})")
        self.site = sae.hook_name
        self.enc = np.ascontiguousarray(sae.W_enc[:, feats].T)
        self.b_enc = sae.b_enc[feats]
        self.threshold = None if sae.threshold is None or sae.architecture != "jumprelu" else sae.threshold[feats]
        self.dec = np.ascontiguousarray(sae.W_dec[feats])
        self.b_dec_in = sae.b_dec if sae.apply_b_dec_to_input else None

    def _register(self, hs, site, layer, hook):
        try:
            hs.add_ablate_features(site, layer, self.enc, self.b_enc, self.threshold, self.dec, self.b_dec_in, self.positions,
                                   self.rows)
        except ValueError as e:
            raise ValueError(f"{hook.name}: {e}") from None


def add(vector, scale=1.0, positions=None):
    """x[:, pos] += scale * vector: vector holds one value per element of a position ([d_model] at the residual
    stream, [n_heads * d_head] at hook_z, [d_head] at a [batch, head, pos, d_head] site, added to every head).
    A steering vector; its gradient is the identity."""
    v = np.asarray(vector, dtype=np.float32)
    if not np.all(np.isfinite(v)):
        raise ValueError("interventions.add: the vector has non-finite values")
    return Intervention("add", v.reshape(-1), positions, scale)


def replace(values, positions=None):
    """x[:, pos] = values[:, pos] (values: the activation's shape, e.g. from a clean run's cache, or without
    the batch axis to broadcast) -- activation patching."""
    return Intervention("replace", np.asarray(values, dtype=np.float32), positions)


def scale(s, positions=None):
    """x[:, pos] *= s (s a float)."""
    return Intervention("scale", None, positions, s)


def zero(positions=None):
    """x[:, pos] = 0: zero-ablation (its gradient is zero there)."""
    return Intervention("zero", None, positions)


def ablate_heads(heads, mode="zero", positions=None):
    """Ablate attention heads: their values set to zero (mode="zero") or to their mean over the batch and the
    selected positions (mode="mean"). On per-head activations, [batch, pos, head, d_head] (attn.hook_z, hook_q,
    hook_v, hook_rot_q, ...) or [batch, head, pos, ...] (hook_pattern, hook_attn_scores, the q_norm / k_norm sites,
    hook_q_normed); heads: indices on the head axis (key/value heads at hook_k / hook_v)."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"ablate_heads: mode must be 'zero' or 'mean', got {mode!r}")
    heads = [heads] if isinstance(heads, (int, np.integer)) else list(heads)
    if not heads:
        raise ValueError("ablate_heads: give at least one head")
    return Intervention("ablate_heads", None, positions, heads=heads, mean=mode == "mean")


def project_out(direction, positions=None):
    """x -= (x . d) d / |d|^2 at each selected position: remove a direction (d: one value per element of a
    position). The projection is its own VJP."""
    d = np.asarray(direction, dtype=np.float32).reshape(-1)
    if not np.any(d):
        raise ValueError("project_out: the direction is zero")
    return Intervention("project_out", d, positions)


def steer(sae, feature, scale=1.0, positions=None):
    """Add scale * W_dec[feature] at the SAE's output site (its ``hook_name_out``)."""
    _need_sae(sae, "steer")
    if not 0 <= int(feature) < sae.d_sae:
        raise ValueError(f"steer: feature {feature} is out of range [0, {sae.d_sae})")
    it = add(sae.W_dec[int(feature)], scale=scale, positions=positions)
    it.site = sae.hook_name_out
    return it


def ablate_features(sae, features, positions=None):
    """Remove the features' contributions act_f(x) * W_dec[f] at the SAE's site, natively; the rest of the
    activation (other features and the SAE's error) is kept."""
    return _AblateFeatures(sae, features, positions)
