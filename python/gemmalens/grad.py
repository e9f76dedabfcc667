"""Gradient runs: the native reverse pass (csrc/model/gemma3_grad.cpp) behind ``run_with_cache(incl_bwd=True)``.

The forward records the residual stream entering each block and, within ``keep_bytes``, each block's intermediates
(a ``_core.GradTape``); the metric turns the logits into dMetric/dLogits (``gl.metrics``); the reverse pass runs
each block's vector-Jacobian product, last block first, from the kept intermediates or from the block run again
from its recorded input. Every hook site captures the gradient arriving there under
TransformerLens's key, ``name + "_grad"``.
"""
import numpy as np

from . import _core
from .activation_cache import ActivationCache
from .hooks import as_pairs, build_hookset, check_hooks, plan_hookset
from .metrics import dlogits_for, next_token_loss
from .sae import Splice, SpliceGrad

# The most memory (bytes) a gradient run's forward may keep of the blocks' intermediates for the reverse pass; past
# it the reverse pass recomputes each block from its input instead (about one more forward's time, little memory).
keep_bytes = 2 << 30


def _edits(model, fwd_hooks, stop_at_layer, return_type, splice):
    """The forward edits of a gradient run, checked: the registered hooks, then fwd_hooks. Each takes part in the
    reverse pass: gl.interventions with their native VJPs, Python hooks with theirs (hooks._GradHook), spliced SAEs
    with sae.splice_hooks'."""
    if stop_at_layer is not None:
        raise ValueError("incl_bwd=True needs the whole model (the metric is a function of the logits): drop stop_at_layer")
    if return_type not in ("logits", "loss", None):
        raise ValueError(f"return_type must be 'logits', 'loss' or None, got {return_type!r}")
    edits = list(model._persistent_hooks) + list(fwd_hooks)
    check_hooks(model._hook_table, edits, splice.names)
    return edits


def _run(model, tokens, attention_mask, metric, allow_longer, captures, bwd_hooks, edits, splice):
    """Forward with a tape, the metric, then the reverse pass. -> (logits, tokens, row_start, value, forward and
    gradient hook sets). captures may name SAE tensors (splice.names): theirs go to splice.captured and
    splice.grad.grads."""
    if metric is None:
        raise ValueError("a gradient run needs metric=: \"loss\", a gl.metrics object (e.g. gl.metrics.logit_diff(good, "
                         "bad)) or a dMetric/dLogits array of the logits' shape")
    table, n_layers = model._hook_table, model.config.num_hidden_layers
    toks, row_start = model._inputs(tokens, attention_mask, None)
    native_bwd, sae_bwd = splice.split_hooks(as_pairs(bwd_hooks))
    ours = set(splice.names)
    splice.grad = SpliceGrad(sae_bwd, [n for n in captures if n in ours])
    fwd = plan_hookset(table, edits, captures, splice, grad=True)
    bwd = build_hookset(table, n_layers, native_bwd, [n for n in captures if n not in ours])
    tape = _core.GradTape(keep_bytes=keep_bytes)
    logits = model._core.forward(toks, row_start, None, "all", fwd, allow_longer=allow_longer, tape=tape)
    value, dlogits = dlogits_for(metric, logits, toks, row_start, model.tokenizer)
    softcapped = model.config.final_logit_softcapping is not None
    model._core.backward(tape, np.ascontiguousarray(dlogits, dtype=np.float32), logits if softcapped else None, bwd, fwd)
    return logits, toks, row_start, value, fwd, bwd


def _output(logits, toks, row_start, return_type):
    if return_type == "loss":
        return next_token_loss(logits, toks, row_start, with_grad=False, what="return_type='loss'")[0]
    return None if return_type is None else logits


def run_with_cache(model, tokens, names_filter, attention_mask, metric, return_type, fwd_hooks, stop_at_layer,
                   allow_longer):
    """Model.run_with_cache(..., incl_bwd=True): (output, cache with activations, their gradients, metric_value)."""
    splice = Splice(model, model._saes)
    edits = _edits(model, fwd_hooks, stop_at_layer, return_type, splice)
    table = model._hook_table
    names = splice.select(names_filter)
    logits, toks, row_start, value, fwd, bwd = _run(model, tokens, attention_mask, metric, allow_longer, names, [],
                                                    edits, splice)
    ids = {v: k for k, v in table.ids.items()}
    acts = {ids[(s, layer)]: a for s, layer, a in fwd.take_captures()} if fwd is not None else {}
    acts.update(splice.captured)
    grads = {ids[(s, layer)] + "_grad": a for s, layer, a in bwd.take_captures()} if bwd is not None else {}
    grads.update(splice.grad.grads)
    ordered = {}
    for n in splice.ordered(acts):
        ordered[n] = acts[n]
        ordered[n + "_grad"] = grads[n + "_grad"]
    cache = ActivationCache(ordered, table, model=model)
    cache.metric_value = value
    return _output(logits, toks, row_start, return_type), cache


def run_with_hooks(model, tokens, fwd_hooks, bwd_hooks, metric, attention_mask, return_type, allow_longer):
    """Model.run_with_hooks(..., bwd_hooks=..., metric=...): TransformerLens's backward hooks, fn(grad, hook) -> None
    or a replacement, fired as the gradient reaches each site; an edited gradient is what flows on."""
    splice = Splice(model, model._saes)
    check_hooks(model._hook_table, bwd_hooks, splice.names, what="bwd_hooks")
    edits = _edits(model, fwd_hooks, None, return_type, splice)
    logits, toks, row_start, _, _, _ = _run(model, tokens, attention_mask, metric, allow_longer, [], list(bwd_hooks),
                                            edits, splice)
    return _output(logits, toks, row_start, return_type)
