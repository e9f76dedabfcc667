"""Continuous batching in the native cache (what gemmalens serve runs on): sequences prefilled alone join a batch
cache (place_row), decode together over some of its rows (cache_rows), leave, and the rows' slots move (shift); each
sequence's logits equal those of the sequence run alone, with its own interventions (Intervention.for_rows) touching
only its row."""
import numpy as np
import pytest

import gemmalens as gl

N = 12  # tokens decoded per sequence


def alone(model, prompt, hooks=()):
    """Greedy decode of one prompt in its own cache: (tokens, logits of every step)."""
    with model.hooks(fwd_hooks=list(hooks)):
        cache = model.new_cache(max_seq_len=len(prompt) + N)
        lg = model.next_token_logits(prompt, cache=cache)[0]
        toks, rows = [int(lg.argmax())], [lg]
        for _ in range(N - 1):
            lg = model.next_token_logits([[toks[-1]]], cache=cache)[0]
            toks.append(int(lg.argmax()))
            rows.append(lg)
    return toks, np.array(rows)


class Batch:
    """A small scheduler over one batch cache, as gemmalens serve's engine does it."""

    def __init__(self, model, rows, cap):
        self.model, self.cache = model, model._core.new_cache(rows, cap)
        self.active = {}  # cache row -> [request, tokens, logits, hooks]

    def join(self, req, row, prompt, hooks=()):
        m = self.model
        with m.hooks(fwd_hooks=list(hooks)):
            tmp = m.new_cache(max_seq_len=len(prompt))
            lg = m.next_token_logits(prompt, cache=tmp)[0]
        if not self.active:
            self.cache.truncate(0)
        if len(prompt) > self.cache.seq_len:
            self.cache.shift(len(prompt) - self.cache.seq_len)
        self.cache.place_row(row, tmp, 0)
        self.active[row] = [req, [int(lg.argmax())], [lg], list(hooks)]

    def step(self):
        rows = sorted(self.active)
        toks = [[self.active[r][1][-1]] for r in rows]
        # each row's interventions on that row only: its index in this step's batch
        hooks = [(site, it.for_rows([i])) for i, r in enumerate(rows) for site, it in self.active[r][3]]
        with self.model.hooks(fwd_hooks=hooks):
            lg = self.model.next_token_logits(toks, cache=self.cache, cache_rows=rows, allow_longer=True)
        for i, r in enumerate(rows):
            self.active[r][1].append(int(lg[i].argmax()))
            self.active[r][2].append(lg[i])

    def leave(self, row):
        req, toks, lgs, _ = self.active.pop(row)
        return req, toks[:N], np.array(lgs[:N])

    def compact(self):
        """Give back the slots before the earliest sequence."""
        self.cache.shift(-min(self.cache.row_start[r] for r in self.active))


@pytest.mark.parametrize("name,dtype", [("gqa2", "float32"), ("mqa_scaled_softcap", "float32"),
                                        ("gqa4_hd24", "bfloat16")])
def test_sequences_joining_and_leaving_equal_each_alone(hf_models, name, dtype):
    model = gl.load(hf_models[name][1], dtype=dtype)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, 300, n).tolist() for n in (5, 9, 3, 14, 2)]  # rings of 5-7 slots wrap
    D = model.config.hidden_size
    steer = [("blocks.1.hook_resid_post", gl.interventions.add(rng.standard_normal(D).astype(np.float32), scale=2.0)),
             ("blocks.2.hook_mlp_out", gl.interventions.add(rng.standard_normal(D).astype(np.float32), scale=1.5,
                                                            positions=[0, 2]))]
    hooks = {1: steer[:1], 3: steer}  # requests 1 and 3 are steered, the others not
    want = {r: alone(model, p, hooks.get(r, ())) for r, p in enumerate(prompts)}
    assert want[1][0] != alone(model, prompts[1])[0]  # the steering matters

    b = Batch(model, rows=3, cap=64)
    done = []
    b.join(0, 0, prompts[0])
    for _ in range(3):
        b.step()
    b.join(1, 2, prompts[1], hooks[1])  # longer than the cache's sequence so far: every row shifts right
    b.step()
    b.join(2, 1, prompts[2])            # shorter: ends at seq_len, no shift
    while len(b.active[0][1]) < N:
        b.step()
    done.append(b.leave(0))
    b.compact()
    b.join(3, 0, prompts[3], hooks[3])
    for _ in range(2):
        b.step()
    done.append(b.leave(1))              # request 2 leaves early: its row is taken by request 4
    b.join(4, 1, prompts[4])
    while b.active:
        b.step()
        for r in list(b.active):
            if len(b.active[r][1]) >= N:
                done.append(b.leave(r))
    assert sorted(d[0] for d in done) == [0, 1, 2, 3, 4]
    for req, toks, lgs in done:
        w_toks, w_lgs = want[req]
        n = len(toks)
        assert toks == w_toks[:n], req
        # the same sums in the same order: equal, not just close (a row's attention tiles start at its own first slot)
        np.testing.assert_array_equal(lgs, w_lgs[:n], err_msg=f"request {req}")


def test_interventions_for_rows_touch_only_their_rows(hf_models):
    model = gl.load(hf_models["gqa2"][1])
    rng = np.random.default_rng(2)
    ids = rng.integers(4, 300, (3, 6))
    v = rng.standard_normal(model.config.hidden_size).astype(np.float32)
    plain = model.forward(ids)
    for it in (gl.interventions.add(v, scale=3.0), gl.interventions.scale(0.5), gl.interventions.zero(positions=[1]),
               gl.interventions.project_out(v), gl.interventions.replace(np.ones((6, model.config.hidden_size))),
               gl.interventions.ablate_heads([0], mode="mean")):
        site = "blocks.1.attn.hook_z" if it.kind == "ablate_heads" else "blocks.1.hook_resid_post"
        every = model.run_with_hooks(ids, fwd_hooks=[(site, it)])
        got = model.run_with_hooks(ids, fwd_hooks=[(site, it.for_rows([0, 2]))])
        if it.kind != "ablate_heads":  # mean over the selected rows only: checked below
            np.testing.assert_array_equal(got[[0, 2]], every[[0, 2]])
        np.testing.assert_array_equal(got[1], plain[1])
        assert not np.array_equal(got[0], plain[0]), it
    # the mean ablation averages over the rows it edits
    it = gl.interventions.ablate_heads([0], mode="mean").for_rows([2])
    alone2 = model.run_with_hooks(ids[2:], fwd_hooks=[("blocks.1.attn.hook_z", gl.interventions.ablate_heads([0], mode="mean"))])
    np.testing.assert_allclose(model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", it)])[2], alone2[0],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="for_rows"):
        gl.interventions.add(v).for_rows([])
    with pytest.raises(ValueError, match="for_rows"):
        gl.interventions.add(v).for_rows([-1])


def test_cache_row_errors(hf_models):
    model = gl.load(hf_models["gqa2"][1])
    big = model._core.new_cache(3, 32)
    tmp = model.new_cache(max_seq_len=8)
    model.next_token_logits([5, 6, 7, 8], cache=tmp)
    with pytest.raises(ValueError, match="shift"):
        big.place_row(0, tmp, 0)  # the source is longer than the cache's sequence
    big.shift(4)
    big.place_row(0, tmp, 0)
    assert big.row_start == [0, 4, 4] and big.seq_len == 4
    model.next_token_logits([[9]], cache=big, cache_rows=[0])
    assert big.row_valid(0) and not big.row_valid(1)
    with pytest.raises(ValueError, match="missed positions"):
        model.next_token_logits([[9], [9]], cache=big, cache_rows=[0, 1])
    with pytest.raises(ValueError, match="twice"):
        model.next_token_logits([[9], [9]], cache=big, cache_rows=[0, 0])
    with pytest.raises(ValueError, match="out of range"):
        model.next_token_logits([[9]], cache=big, cache_rows=[3])
    with pytest.raises(ValueError, match="cache_rows"):
        model.next_token_logits([[9]], cache=big, cache_rows=[0, 1])
    with pytest.raises(ValueError, match="batch 3"):
        model.next_token_logits([[9]], cache=big)  # all rows by default: the cache's batch
    with pytest.raises(ValueError, match="before slot 0"):
        big.shift(-1)
    with pytest.raises(ValueError, match="max_seq_len"):
        big.shift(40)
    other = gl.load(hf_models["gqa4_hd24"][1]).new_cache(max_seq_len=8)
    with pytest.raises(ValueError, match="another model"):
        big.place_row(1, other, 0)
    with pytest.raises(ValueError, match="out of range"):
        big.place_row(3, tmp, 0)
    with pytest.raises(ValueError, match="another cache"):
        big.place_row(1, big, 0)
    big.truncate(0)
    assert all(big.row_valid(r) for r in range(3))


def test_a_row_reused_after_non_finite_values_is_clean(hf_models):
    """A sequence whose steering blew its activations up (inf / NaN keys and values) leaves garbage in its row's slots;
    the next sequence placed in that row never sees it, also where the attention gathers slots for another, longer
    row of the batch."""
    model = gl.load(hf_models["gqa2"][1])
    rng = np.random.default_rng(3)
    long_p, short_p, bad_p = (rng.integers(4, 300, n).tolist() for n in (4, 3, 10))
    D = model.config.hidden_size
    boom = [("blocks.0.hook_resid_pre", gl.interventions.add(np.full(D, 1e38, np.float32), scale=1e3))]
    want = alone(model, short_p)
    b = Batch(model, rows=2, cap=64)
    b.join("bad", 1, bad_p, boom)
    b.join("long", 0, long_p)  # row 0 starts later than row 1's garbage
    b.step()
    assert not np.isfinite(b.active[1][2][-1]).all()  # the blown-up sequence's logits
    b.leave(1)
    for _ in range(4):
        b.step()              # row 0 grows; its sequence now starts before the next one's
    b.join("short", 1, short_p)
    while len(b.active[1][1]) < N:
        b.step()
    _, toks, lgs = b.leave(1)
    assert np.isfinite(lgs).all()
    np.testing.assert_array_equal(lgs, want[1])
