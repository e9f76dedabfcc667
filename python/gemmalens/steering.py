"""Steering vectors without an SAE."""
import numpy as np


def mean_difference(model, positive_prompts, negative_prompts, hook_name, skip_bos=True):
    """mean(activation at hook_name over the positive prompts' positions) - the same over the negative prompts.

    Returns a vector with one value per element of a position (e.g. [d_model]) for gl.interventions.add.
    Each prompt contributes the mean over its positions (BOS skipped), prompts weigh equally.
    """
    model._hook_table.resolve(hook_name)

    def mean_of(prompts):
        if isinstance(prompts, str) or not prompts:
            raise ValueError("mean_difference: give lists of prompts (non-empty)")
        means = []
        for p in prompts:
            ids = model.tokenizer.encode(p) if isinstance(p, str) else list(p)
            _, cache = model.run_with_cache(ids, names_filter=hook_name)
            a = cache[hook_name][0]
            a = a.reshape(a.shape[0], -1)
            if skip_bos and len(ids) > 1 and ids[0] == model.config.bos_token_id:
                a = a[1:]
            means.append(a.mean(axis=0))
        return np.mean(means, axis=0)

    return (mean_of(positive_prompts) - mean_of(negative_prompts)).astype(np.float32)
