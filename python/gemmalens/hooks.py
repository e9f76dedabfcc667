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


_NORM_HOOKS = ("hook_scale", "hook_normalized", "hook_out")


def family(name):
    """'blocks.3.attn.hook_pattern' -> 'pattern'; 'hook_embed' -> 'embed'; a norm's hook_normalized -> the norm
    ('blocks.3.ln1.hook_normalized' -> 'ln1', 'attn.q_norm.hook_normalized' -> 'q_norm'); its hook_scale / hook_out ->
    None (reached by TransformerLens's keys: ("scale", 3, "ln1"), see act_name)."""
    parts = name.split(".")
    if parts[0] == "blocks":
        parts = parts[2:]
    if parts[-1] in _NORM_HOOKS and len(parts) > 1:
        return parts[-2] if parts[-1] == "hook_normalized" else None
    return parts[-1][len("hook_"):]


# TransformerLens's get_act_name (transformer_lens.utils), its rules restated: the families that live in attn / mlp.
_ATTN = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores", "q_normed", "k_normed")
_MLP = ("pre", "post", "mid", "pre_linear")
_ACT_ALIAS = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
              "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_LAYER_TYPE_ALIAS = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}


def act_name(name, layer=None, layer_type=None):
    """A TransformerLens activation key -> its full hook name, by TransformerLens's ``utils.get_act_name`` rules:
    ("resid_post", 3) -> 'blocks.3.hook_resid_post', ("pattern", 5) -> 'blocks.5.attn.hook_pattern',
    ("normalized", 3, "ln1") -> 'blocks.3.ln1.hook_normalized', ("scale", 3, "ln2") -> 'blocks.3.ln2.hook_scale',
    "normalized" / "scale" without a layer -> ln_final's. (q_normed / k_normed are placed in attn as well.)"""
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    name = _ACT_ALIAS.get(name, name)
    full = "" if layer is None else f"blocks.{layer}."
    if name in _ATTN:
        layer_type = "attn"
    elif name in _MLP:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIAS:
        layer_type = _LAYER_TYPE_ALIAS[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


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
            fam = family(n)
            if fam is not None:
                self.by_family[(fam, None if layer < 0 else layer)] = n

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


def with_vjp(fn, vjp):
    """A forward hook with its own gradient, for gradient runs (``run_with_cache(incl_bwd=True)``): ``fn(act, hook)``
    as usual, and ``vjp(grad, act, hook)`` -> the gradient at the hook's input, given ``grad`` at its output and the
    activation ``act`` the hook received. Without one, a gradient run differentiates a Python hook by running it again
    on a torch tensor (torch autograd)."""
    if not callable(fn) or not callable(vjp):
        raise TypeError("with_vjp(fn, vjp): both must be callables")

    def hook_fn(act, hook):
        return fn(act, hook)

    hook_fn.vjp = vjp
    hook_fn.__name__ = getattr(fn, "__name__", "hook")
    return hook_fn


class _GradHook:
    """A Python forward hook in a gradient run. The forward calls it on numpy (as any run) and keeps what it got and
    gave; the reverse pass replays that output (the block is run again, the hook is not) and asks for the VJP: the
    hook's own ``vjp`` (``with_vjp``) or, by default, torch autograd over the hook run again on a torch copy of its
    input -- hooks written with indexing and arithmetic work unchanged on both. Its output there must equal the numpy
    one, or the gradient would be of another function: that is refused."""

    def __init__(self, fn, hook):
        self.fn, self.hook = fn, hook
        self.call = _wrap_callable(fn, hook)
        self.x = self.y = None
        if hasattr(fn, "inject"):  # fn reads the site for a later one (a transcoder): inject(grad) adds what came back
            self.inject = fn.inject

    def __call__(self, act):
        x = act.copy()
        y = self.call(act)
        self.x, self.y = x, np.array(y, dtype=np.float32, copy=True)
        return y

    def replay(self, act):
        if self.y is None:
            raise RuntimeError(f"hook {self.hook.name!r}: replayed before its forward ran (a gemmalens bug)")
        return self.y

    def vjp(self, g):
        name = self.hook.name
        if self.x is None:
            raise RuntimeError(f"hook {name!r}: its VJP was asked before its forward ran (a gemmalens bug)")
        custom = getattr(self.fn, "vjp", None)
        if custom is not None:
            out = custom(g, self.x, self.hook)
            if out is None:
                return None
            out = np.asarray(out)
            if out.shape != g.shape or not np.issubdtype(out.dtype, np.floating):
                raise ValueError(f"the vjp of hook {name!r} returned {out.dtype} {out.shape}; it must return a "
                                 f"floating-point array of the activation's shape {g.shape} (or None: unchanged)")
            return out.astype(np.float32, copy=False)
        return _torch_vjp(self.fn, self.hook, self.x, self.y, g)


_NUMPY_TENSOR = []


def _numpy_tensor(torch):
    """A torch.Tensor subclass that takes numpy operands where numpy code passes them -- ``t + ndarray``,
    ``ndarray @ t``, ``t[idx] = ndarray`` (plain tensors refuse these when they require grad) -- so that a hook
    written for numpy arrays runs unchanged on it. numpy ufuncs on it (np.tanh(t)) are a TypeError."""
    if not _NUMPY_TENSOR:
        def conv(v):
            if isinstance(v, np.ndarray):
                return torch.from_numpy(np.ascontiguousarray(v))
            return v.item() if isinstance(v, np.generic) else v

        class NumpyTensor(torch.Tensor):
            __array_ufunc__ = None  # ndarray (op) tensor: numpy defers to the tensor's reflected operator

            def __setitem__(self, idx, value):
                return torch.Tensor.__setitem__(self, idx, conv(value))

        def binop(name):
            base = getattr(torch.Tensor, name)

            def op(self, other):
                return base(self, conv(other))

            op.__name__ = name
            return op

        for name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
                     "__rtruediv__", "__matmul__", "__rmatmul__", "__pow__", "__iadd__", "__isub__", "__imul__",
                     "__itruediv__", "__lt__", "__le__", "__gt__", "__ge__"):
            setattr(NumpyTensor, name, binop(name))
        _NUMPY_TENSOR.append(NumpyTensor)
    return _NUMPY_TENSOR[0]


def _torch_vjp(fn, hook, x, y, g):
    """dMetric/d(hook input) for a Python hook, by torch autograd over fn run again on a torch tensor."""
    name = hook.name
    try:
        import torch
    except ImportError:
        raise ImportError(f"hook {name!r}: a gradient run differentiates Python hooks with torch (pip install torch), "
                          "or give the hook its own gradient with gl.hooks.with_vjp(fn, vjp), or use gl.interventions "
                          "(native edits with known gradients)") from None
    leaf = torch.from_numpy(x.copy()).requires_grad_(True)
    work = leaf.clone().as_subclass(_numpy_tensor(torch))  # in-place edits land on a non-leaf, as autograd allows
    fix = ("write it with operations that work on torch tensors as on numpy arrays (indexing, arithmetic), give it "
           "its own gradient with gl.hooks.with_vjp(fn, vjp), or use gl.interventions")
    try:
        with torch.enable_grad():
            out = fn(work, hook)
    except Exception as e:
        raise ValueError(f"hook {name!r}: a gradient run takes a Python hook's gradient by running it again on a torch "
                         f"tensor (autograd), where it raised {type(e).__name__}: {e}. To fix: {fix}") from e
    if out is None:
        out = work
    elif isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    elif not isinstance(out, torch.Tensor):
        raise TypeError(f"hook {name!r} returned {type(out).__name__} on a torch tensor (gradient run); return None, "
                        "an array or a tensor")
    if tuple(out.shape) != y.shape:
        raise ValueError(f"hook {name!r} returned shape {tuple(out.shape)} on a torch tensor but {y.shape} on numpy")
    got = out.detach().double().numpy()
    if not np.allclose(got, y, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(y).max(initial=0.0)))):
        raise ValueError(f"hook {name!r} computed other values on a torch tensor than on the numpy array (largest "
                         f"difference {np.abs(got - y).max():.3g}), so its gradient cannot be taken that way (a random or "
                         f"stateful hook?). To fix: {fix}")
    if not out.requires_grad:
        return np.zeros_like(g)  # the output does not depend on the input (a patch from elsewhere)
    (gx,) = torch.autograd.grad(out, leaf, grad_outputs=torch.from_numpy(g).to(out.dtype), allow_unused=True)
    return np.zeros_like(g) if gx is None else gx.detach().numpy().astype(np.float32, copy=False)


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


def build_hookset(table, n_layers, fwd_hooks, captures=(), grad=False):
    """fwd_hooks: [(name | filter callable, fn | Intervention | list of them)] -> _core.HookSet (or None).
    grad: the forward of a gradient run -- Python hooks are registered as _GradHook (replay and VJP for the reverse
    pass)."""
    fwd_hooks = as_pairs(fwd_hooks)
    if not fwd_hooks and not captures:
        return None
    hs = _core.HookSet(n_layers)
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
                    hs.add_callback(sid, layer, _GradHook(f, hook) if grad else _wrap_callable(f, hook))
                else:
                    raise TypeError(f"hook for {name!r} must be a callable or a gl.interventions object, got {f!r}")
    # Captures come after the edits at their site, as TransformerLens's caching hooks (added by run_with_cache after
    # the hooks in force) do: the cache holds what the model went on with.
    for name in captures:
        sid, layer = table.ids[name]
        hs.add_capture(sid, layer)
    return hs


def plan_hookset(table, fwd_hooks, captures=(), splice=None, grad=False):
    """One forward call's hooks and captures -> its one HookSet (None when there is nothing to do). splice, the
    call's sae.Splice, takes over what is aimed at SAE tensors and adds the callbacks that run the SAEs. grad: the
    forward of a gradient run (see build_hookset)."""
    pairs, captures = as_pairs(fwd_hooks), list(captures)
    if splice is not None:
        pairs, captures = splice.route(pairs, captures)
    return build_hookset(table, table.n_layers, pairs, captures, grad=grad)
