"""TransformerLens-style hooks over the native forward pass: names, hook checks, one HookSet per forward call."""
import difflib

import numpy as np

from . import _core
from .activation_cache import ActivationCache  # noqa: F401 (gemmalens.hooks.ActivationCache, as before)
from .interventions import Intervention


class _Layer(int):
    """A block index that is also callable: ``hook.layer()`` as in TransformerLens, ``hook.layer`` as before."""

    def __call__(self):
        return int(self)


class HookPoint:
    """What a hook function receives as its second argument: ``hook.name``, ``hook.layer()`` (TransformerLens's
    method; ``hook.layer`` also reads as the int) -- None for model-level hooks."""

    __slots__ = ("name", "layer")

    def __init__(self, name, layer):
        self.name, self.layer = name, None if layer is None else _Layer(layer)

    def __repr__(self):
        return f"HookPoint({self.name!r})"


def family(name):
    """'blocks.3.attn.hook_pattern' -> 'pattern'; 'blocks.3.ln1.hook_normalized' -> 'ln1'; 'hook_embed' -> 'embed'."""
    parts = name.split(".")
    if parts[0] == "blocks":
        parts = parts[2:]
    if parts[-1] == "hook_normalized":
        return parts[-2]
    return parts[-1][len("hook_"):]


class HookTable:
    """Hook names for one model, in forward order, with their native (site, layer) ids."""

    def __init__(self, n_layers):
        self.n_layers = n_layers
        self.names = list(_core.hook_names(n_layers))
        sites = {suffix: sid for sid, suffix, _ in _core.hook_sites()}
        self.ids = {}
        for n in self.names:
            if n.startswith("blocks."):
                _, layer, suffix = n.split(".", 2)
                self.ids[n] = (sites[suffix], int(layer))
            else:
                self.ids[n] = (sites[n], -1)
        self.by_family = {}
        for n in self.names:
            sid, layer = self.ids[n]
            self.by_family[(family(n), None if layer < 0 else layer)] = n

    def resolve(self, name):
        if name in self.ids:
            return self.ids[name]
        close = difflib.get_close_matches(name, self.names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see model.hook_names"
        raise ValueError(f"unknown hook name {name!r}{hint}")

    def select(self, names_filter):
        """str | list[str] | callable | None -> list of names (forward order)."""
        if names_filter is None:
            return list(self.names)
        if isinstance(names_filter, str):
            self.resolve(names_filter)
            return [names_filter]
        if callable(names_filter):
            return [n for n in self.names if names_filter(n)]
        names = list(names_filter)
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"names_filter entries must be hook names, got {n!r}")
            self.resolve(n)
        wanted = set(names)
        return [n for n in self.names if n in wanted]


def _wrap_callable(fn, hook):
    def call(act):
        out = fn(act, hook)
        if out is None:
            return act  # in-place edits (if any) are written back
        if not isinstance(out, np.ndarray):
            raise TypeError(f"hook {hook.name!r} returned {type(out).__name__}; return None or an np.ndarray")
        if out.shape != act.shape:
            raise ValueError(f"hook {hook.name!r} returned shape {tuple(out.shape)} but the activation has shape "
                             f"{tuple(act.shape)}")
        if not np.issubdtype(out.dtype, np.floating):
            raise TypeError(f"hook {hook.name!r} returned dtype {out.dtype}; return a floating-point array")
        return out
    return call


def as_pairs(fwd_hooks):
    """fwd_hooks entries -> (target, fn) pairs: an intervention that knows its site stands for (site, itself)."""
    return [(f.site, f) if isinstance(f, Intervention) else f for f in fwd_hooks]


def check_hooks(table, fwd_hooks, extra_names=(), what="fwd_hooks"):
    """The shape of fwd_hooks (or bwd_hooks: ``what`` names the argument in errors), before anything is built: (name | filter, fn) pairs, or interventions with a site,
    whose names exist (in the table or among extra_names, the hooks of spliced SAEs). The functions themselves are
    checked when the HookSet is built."""
    extra_names = set(extra_names)
    for item in fwd_hooks:
        if isinstance(item, Intervention):
            if item.site is None:
                raise TypeError(f"{item!r} has no site of its own: pass (hook_name, intervention)")
            continue
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"{what} entries are (name or filter, fn) pairs, got {item!r}")
        target, _ = item
        if isinstance(target, str):
            if target not in extra_names:
                table.resolve(target)
        elif not callable(target):
            raise TypeError(f"hook target must be a hook name or a filter function, got {target!r}")


def build_hookset(table, n_layers, fwd_hooks, captures=()):
    """fwd_hooks: [(name | filter callable, fn | Intervention | list of them)] -> _core.HookSet (or None)."""
    fwd_hooks = as_pairs(fwd_hooks)
    if not fwd_hooks and not captures:
        return None
    hs = _core.HookSet(n_layers)
    for name in captures:
        sid, layer = table.ids[name]
        hs.add_capture(sid, layer)
    for target, fn in fwd_hooks:
        names = [n for n in table.names if target(n)] if callable(target) and not isinstance(target, str) else [target]
        for name in names:
            sid, layer = table.resolve(name)
            hook = HookPoint(name, None if layer < 0 else layer)
            fns = fn if isinstance(fn, (list, tuple)) else [fn]
            for f in fns:
                if isinstance(f, Intervention):
                    f._register(hs, sid, layer, hook)
                elif callable(f):
                    hs.add_callback(sid, layer, _wrap_callable(f, hook))
                else:
                    raise TypeError(f"hook for {name!r} must be a callable or a gl.interventions object, got {f!r}")
    return hs


def plan_hookset(table, fwd_hooks, captures=(), splice=None):
    """One forward call's hooks and captures -> its one HookSet (None when there is nothing to do). splice, the
    call's sae.Splice, takes over what is aimed at SAE tensors and adds the callbacks that run the SAEs."""
    pairs, captures = as_pairs(fwd_hooks), list(captures)
    if splice is not None:
        pairs, captures = splice.route(pairs, captures)
    return build_hookset(table, table.n_layers, pairs, captures)
