"""gl.metrics: values and dMetric/dLogits against torch autograd on the same logits."""
import numpy as np
import pytest
import torch

import gemmalens as gl
from gemmalens import metrics

B, T, V = 3, 6, 17


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((B, T, V)) * 3).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T))
    row_start = np.array([0, 2, 1])
    return logits, tokens, row_start


def autograd(fn, logits):
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    value = fn(x)
    value.backward()
    return value.item(), x.grad.numpy()


def check(metric, logits, torch_fn, **kw):
    value, grad = metric.evaluate(logits, **kw)
    ref_value, ref_grad = autograd(torch_fn, logits)
    assert grad.dtype == np.float32 and grad.shape == logits.shape
    np.testing.assert_allclose(value, ref_value, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)


def torch_loss(x, tokens, row_start, mask=None):
    terms = []
    for b in range(B):
        for t in range(int(row_start[b]), T - 1):
            if mask is None or mask[b, t]:
                terms.append(-torch.log_softmax(x[b, t], -1)[int(tokens[b, t + 1])])
    return torch.stack(terms).mean()


def test_loss_matches_autograd_and_forward_loss(data):
    logits, tokens, row_start = data
    check(metrics.loss(), logits, lambda x: torch_loss(x, tokens, row_start), tokens=tokens, row_start=row_start)
    # return_type="loss" goes through the same computation (value only), equal to torch's float64 loss
    from gemmalens.model import _next_token_loss
    ref = torch_loss(torch.tensor(logits, dtype=torch.float64), tokens, row_start).item()
    assert metrics.loss()(logits, tokens, row_start) == pytest.approx(_next_token_loss(logits, tokens, row_start), rel=1e-7)
    assert _next_token_loss(logits, tokens, row_start) == pytest.approx(ref, rel=1e-6)


def test_loss_mask(data):
    logits, tokens, row_start = data
    mask = np.random.default_rng(1).random((B, T)) < 0.6
    mask[:, 3] = True
    check(metrics.loss(mask=mask), logits, lambda x: torch_loss(x, tokens, row_start, mask), tokens=tokens,
          row_start=row_start)


def test_logit_diff_and_logprob(data):
    logits, _, _ = data
    good, bad = [3, 5, 7], 4
    rows = torch.arange(B)
    check(metrics.logit_diff(good, bad), logits,
          lambda x: (x[rows, -1, torch.tensor(good)] - x[rows, -1, bad]).mean())
    check(metrics.logit_diff(2, 2, pos=1), logits, lambda x: (x[:, 1, 2] - x[:, 1, 2]).mean())
    check(metrics.logprob([1, 2, 16], pos=2), logits,
          lambda x: torch.log_softmax(x[:, 2], -1)[rows, torch.tensor([1, 2, 16])].mean())


class _Tok:  # a tokenizer with three one-token words and one two-token word
    ids = {" Paris": [9], " London": [11], " Rome": [12], " New York": [5, 6]}

    def encode(self, text, add_bos=True):
        return ([2] if add_bos else []) + self.ids[text]


def test_string_tokens_resolve_through_the_tokenizer(data):
    logits, _, _ = data
    a = metrics.logit_diff(" Paris", [" London", " Rome", 3]).evaluate(logits, tokenizer=_Tok())
    b = metrics.logit_diff(9, [11, 12, 3]).evaluate(logits)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("make, kw, err, match", [
    (lambda: metrics.logit_diff(3, V), {}, ValueError, "out of range"),
    (lambda: metrics.logit_diff(3, -1), {}, ValueError, "out of range"),
    (lambda: metrics.logit_diff([1, 2], 3), {}, ValueError, "2 per-row tokens for a batch of 3"),
    (lambda: metrics.logit_diff(" Paris", 3), {}, ValueError, "pass tokenizer="),
    (lambda: metrics.logit_diff(" New York", 3), {"tokenizer": _Tok()}, ValueError, "2 tokens"),
    (lambda: metrics.logit_diff(1.5, 3), {}, TypeError, "int id"),
    (lambda: metrics.logprob(1, pos=T), {}, ValueError, "position 6 is out of range"),
    (lambda: metrics.logprob(1, pos=-T - 1), {}, ValueError, "out of range"),
    (lambda: metrics.loss(), {}, ValueError, "needs the input tokens"),
    (lambda: metrics.loss(mask=np.zeros((B, T), bool)), {"tokens": np.zeros((B, T), int)}, ValueError, "no position"),
    (lambda: metrics.loss(mask=np.ones((2, 2), bool)), {"tokens": np.zeros((B, T), int)}, ValueError, "mask must be"),
    (lambda: metrics.loss(), {"tokens": np.full((B, T), V)}, ValueError, f"target token id {V} is out of range"),
    (lambda: metrics.loss(), {"tokens": np.full((B, T), -2)}, ValueError, "target token id -2 is out of range"),
    (lambda: metrics.loss(), {"tokens": np.zeros((B, T), float)}, TypeError, "integer ids"),
    (lambda: metrics.loss(), {"tokens": np.zeros((B, T - 1), int)}, ValueError, "do not match"),
])
def test_bad_metric_input_is_a_clear_error(data, make, kw, err, match):
    with pytest.raises(err, match=match):
        make().evaluate(data[0], **kw)


def test_dlogits_for(data):
    logits, tokens, row_start = data
    v, g = metrics.dlogits_for("loss", logits, tokens, row_start)
    assert v == pytest.approx(metrics.loss()(logits, tokens, row_start))
    arr = np.random.default_rng(2).standard_normal(logits.shape)
    v, g = metrics.dlogits_for(arr, logits)
    assert np.isnan(v) and g.dtype == np.float32
    np.testing.assert_allclose(g, arr.astype(np.float32))
    with pytest.raises(ValueError, match="needs metric="):
        metrics.dlogits_for(None, logits)
    with pytest.raises(ValueError, match="shape"):
        metrics.dlogits_for(arr[:, :2], logits)
    bad = arr.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.dlogits_for(bad, logits)
    with pytest.raises(ValueError, match="string metric"):
        metrics.dlogits_for("los", logits)
    with pytest.raises(TypeError, match="metric must be"):
        metrics.dlogits_for(3, logits)


def test_exposed_on_the_package():
    assert gl.metrics is metrics
