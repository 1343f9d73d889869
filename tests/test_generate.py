"""The inference engine (model/generate.py), pinned to plain references:

- filtering keeps exactly the tokens a brute-force loop over the sorted probabilities keeps;
- greedy generation, cached or not, picks argmax of the model's own full forward pass;
- stop ids end generation, finished rows repeat their stop token;
- past the context the cached path slides exactly as documented and keeps going.
"""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import GPT, GPTConfig
from model.generate import filter_logits, generate, prepare_for_decoding, sample_next

NEG_INF = float("-inf")


@pytest.fixture(scope="module", params=["sdpa", "manual"])
def model(request) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, attention=request.param
    )
    model = GPT(config).eval()
    with torch.no_grad():  # large random weights: the next token depends on all the context,
        for p in model.parameters():  # where GPT-2's small init would repeat one token
            p.normal_(0.0, 0.5)
    return model


def run(model, idx, n, **kw) -> torch.Tensor:
    """All yielded tokens as (B, steps)."""
    return torch.stack(list(generate(model, idx, n, **kw)), dim=1)


@torch.no_grad()
def reference_greedy(model, idx: torch.Tensor, n: int, window) -> torch.Tensor:
    """Greedy decoding by full forward passes: at each step the model reads window(seq)."""
    seq = idx.clone()
    out = []
    for _ in range(n):
        logits, _ = model(window(seq))
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------- filtering


def brute_force_kept(logits: list[float], top_k: int | None, top_p: float | None) -> set[int]:
    """Indices a careful by-hand reading of top-k then top-p keeps (no ties in logits)."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if top_k:
        order = order[:top_k]
    if top_p is None:
        return set(order)
    z = sum(math.exp(logits[i]) for i in order)  # renormalised over the top-k survivors
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += math.exp(logits[i]) / z
        if mass >= top_p:
            break
    return set(kept)


def kept(filtered: torch.Tensor) -> set[int]:
    return set(torch.nonzero(filtered[0] > NEG_INF).flatten().tolist())


def test_top_k_keeps_exactly_the_k_largest_and_leaves_them_unchanged():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0]])
    out = filter_logits(logits, top_k=2, top_p=None)
    assert kept(out) == {1, 4}
    assert out[0, 1] == 5.0 and out[0, 4] == 4.0
    assert kept(filter_logits(logits, top_k=1, top_p=None)) == {1}
    assert kept(filter_logits(logits, top_k=5, top_p=None)) == set(range(5))
    assert kept(filter_logits(logits, top_k=None, top_p=None)) == set(range(5))


def test_top_p_keeps_the_smallest_prefix_that_reaches_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 1 (0.5), 3 (0.3), 0 (0.15), 2
    logits = probs.log()
    assert kept(filter_logits(logits, None, 0.5)) == {1}  # 0.5 reaches 0.5: top token only
    assert kept(filter_logits(logits, None, 0.7)) == {1, 3}  # 0.8 >= 0.7
    assert kept(filter_logits(logits, None, 0.81)) == {1, 3, 0}  # 0.95 >= 0.81
    assert kept(filter_logits(logits, None, 0.01)) == {1}  # always at least the top token
    assert kept(filter_logits(logits, None, 1.0)) == {0, 1, 2, 3}
    # top-k first, then the nucleus of the renormalised survivors: 0.5/0.8 = 0.625 < 0.7
    assert kept(filter_logits(logits, 2, 0.7)) == {1, 3}
    assert kept(filter_logits(logits, 2, 0.6)) == {1}


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-8, 8, allow_nan=False), min_size=2, max_size=40, unique=True).filter(
        lambda v: min(abs(a - b) for a in v for b in v if a != b) > 1e-3
    ),
    top_k=st.one_of(st.none(), st.integers(1, 40)),
    top_p=st.one_of(st.none(), st.floats(0.05, 1.0)),
)
def test_filtering_matches_brute_force(values, top_k, top_p):
    logits = torch.tensor([values], dtype=torch.float32)
    expected = brute_force_kept(values, top_k, top_p)
    out = filter_logits(logits, top_k, top_p)
    got = kept(out)
    if got != expected:  # only a cumulative sum within float32 rounding of top_p may differ
        order = sorted(range(len(values)), key=lambda i: -values[i])[: top_k or None]
        z = sum(math.exp(values[i]) for i in order)
        sums = [sum(math.exp(values[i]) / z for i in order[: j + 1]) for j in range(len(order))]
        assert top_p is not None and min(abs(s - top_p) for s in sums) < 1e-5, (got, expected)
    kept_ids = sorted(got)
    assert torch.equal(out[0, kept_ids], logits[0, kept_ids])  # survivors unchanged


def test_sampling_draws_only_kept_tokens_with_the_right_frequencies():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0, 1.5]]).repeat(4000, 1)  # 4000 rows at once
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_k=3, top_p=None, generator=g)
    assert set(draws.tolist()) == {1, 2, 4}
    p = torch.softmax(torch.tensor([2.0, 1.0, 1.5]), 0)  # renormalised over the top 3
    freq = torch.tensor([(draws == i).float().mean() for i in (1, 2, 4)])
    assert torch.allclose(freq, p, atol=0.03)
    nucleus = sample_next(logits, 1.0, None, 0.6, g)  # p(1) = 0.48, + p(4) = 0.77 >= 0.6
    assert set(nucleus.tolist()) == {1, 4}
    greedy = sample_next(logits[:1], temperature=0.0, top_k=None, top_p=None)
    assert greedy.tolist() == [1] and greedy.dtype == torch.int64
    hot = sample_next(logits, 100.0, None, None, g)  # high temperature: nearly uniform
    assert set(hot.tolist()) == set(range(5))


def test_same_generator_seed_gives_the_same_samples(model):
    idx = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(1))

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return run(model, idx, 10, temperature=1.0, top_k=20, generator=g)

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


# ----------------------------------------------------------------------------- decoding


def test_greedy_is_deterministic_and_cached_equals_uncached_equals_full_forward(model):
    idx = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    n = 11  # 5 + 11 = 16 = block_size: stays inside the context
    cached = run(model, idx, n, temperature=0.0)
    assert torch.equal(cached, run(model, idx, n, temperature=0.0))
    assert torch.equal(cached, run(model, idx, n, temperature=0.0, use_cache=False))
    assert torch.equal(cached, reference_greedy(model, idx, n, lambda s: s))


def test_uncached_past_the_context_reads_the_last_block_size_tokens(model):
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(3))  # > 16
    got = run(model, idx, 12, temperature=0.0, use_cache=False)
    assert torch.equal(got, reference_greedy(model, idx, 12, lambda s: s[:, -16:]))


def test_sliding_window_engages_past_the_context_and_keeps_going(model):
    """The cache fills at 16 positions; generation then re-reads the last 8 and goes on."""
    block, keep = 16, 8
    idx = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    n = 40  # the window slides at least three times
    got = run(model, idx, n, temperature=0.0)
    assert got.shape == (2, n)

    start = 0  # the documented policy, by full forward passes

    def window(seq):
        nonlocal start
        if seq.size(1) - start > block:
            start = seq.size(1) - keep
        return seq[:, start:]

    assert torch.equal(got, reference_greedy(model, idx, n, window))
    # and it really is a different context from the plain last-16 crop somewhere
    assert not torch.equal(got, reference_greedy(model, idx, n, lambda s: s[:, -block:]))


def test_a_prompt_longer_than_the_context_is_cropped_from_the_left(model):
    long = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(5))
    assert torch.equal(
        run(model, long, 8, temperature=0.0), run(model, long[:, -16:], 8, temperature=0.0)
    )


def test_stop_ids_end_generation_and_finished_rows_repeat_their_stop(model):
    idx = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(6))
    free = run(model, idx, 12, temperature=0.0)  # what greedy does without stops

    def first(row, token):
        hits = (free[row] == token).nonzero()
        return int(hits[0]) if len(hits) else None

    # a stop token row 0 reaches strictly before row 1 does (or row 1 never does)
    stop = next(
        int(t) for t in free[0] if first(1, int(t)) is None or first(1, int(t)) > first(0, int(t))
    )
    ends = [first(0, stop), first(1, stop)]
    expected_len = 12 if None in ends else max(ends) + 1
    assert ends[0] < expected_len - 1  # row 0 does wait for row 1 (the test is not vacuous)
    got = run(model, idx, 12, temperature=0.0, stop_ids=(stop, 10_000))
    assert got.shape == (2, expected_len)
    for row, end in enumerate(ends):
        stop_at = expected_len if end is None else end
        assert torch.equal(got[row, :stop_at], free[row, :stop_at])
        assert (got[row, stop_at:] == stop).all()  # the stop token, then repeated


def test_no_tokens_for_max_new_tokens_zero(model):
    assert list(generate(model, torch.zeros(1, 1, dtype=torch.long), 0)) == []


def test_prepare_for_decoding_changes_the_layout_not_the_function(model):
    idx = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(7))
    fast = prepare_for_decoding(copy.deepcopy(model))
    w = fast.h[0].mlp.c_fc.weight
    assert w.shape == model.h[0].mlp.c_fc.weight.shape and w.t().is_contiguous()
    assert fast.h[0].mlp.c_proj.weight.is_contiguous()  # narrowing: left row-major
    assert fast.lm_head.weight is fast.embed.wte.weight  # still tied: one tensor
    with torch.no_grad():
        assert torch.allclose(fast(idx)[0], model(idx)[0], atol=1e-5)
    assert torch.equal(run(fast, idx, 9, temperature=0.0), run(model, idx, 9, temperature=0.0))
