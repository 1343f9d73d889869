"""The inference engine (model/generate.py), pinned to plain references:

- filtering keeps exactly the tokens a brute-force loop over the sorted probabilities keeps;
- greedy generation, cached or not, picks argmax of the model's own full forward pass;
- past the context both paths slide exactly as documented (one window policy) and go on;
- a left-padded batch of prompts of different lengths gives each prompt what it gets alone,
  and past the context its rows slide together as documented;
- log-probabilities equal those of a plain forward of [prompt + reply];
- completions end at their first stop token (kept) or their own budget.
"""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import GPT, GPTConfig
from model.generate import (
    Completion,
    complete,
    filter_logits,
    generate,
    left_pad,
    sample_next,
)
from train.core.decoding import prepare_for_decoding

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
    return torch.stack([tokens for tokens, _ in generate(model, idx, n, **kw)], dim=1)


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


def test_past_the_context_both_paths_slide_as_documented_and_keep_going(model):
    """The window fills at 16 slots; it then keeps the last 8 tokens and goes on, with the
    cache (re-prefill) and without it (rerun on the window): use_cache changes speed only."""
    block, keep = 16, 8
    idx = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    n = 40  # the window slides at least three times
    got = run(model, idx, n, temperature=0.0)
    assert got.shape == (2, n)
    assert torch.equal(got, run(model, idx, n, temperature=0.0, use_cache=False))

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


def test_no_tokens_for_max_new_tokens_zero(model):
    assert list(generate(model, torch.zeros(1, 1, dtype=torch.long), 0)) == []


def widening(weights) -> bool:
    return weights[0].size(0) >= weights[0].size(1)


@pytest.mark.parametrize("choose", [widening, lambda weights: True], ids=["widening", "all"])
def test_prepare_for_decoding_changes_the_layout_not_the_function(model, choose):
    idx = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(7))
    fast = prepare_for_decoding(copy.deepcopy(model), choose)
    w = fast.h[0].mlp.c_fc.weight
    assert w.shape == model.h[0].mlp.c_fc.weight.shape and w.t().is_contiguous()
    narrowing = fast.h[0].mlp.c_proj.weight
    assert narrowing.is_contiguous() == (choose is widening)  # as chosen, set by set
    assert fast.lm_head.weight is fast.embed.wte.weight  # still tied: one tensor
    assert fast.lm_head.weight.t().is_contiguous()
    with torch.no_grad():
        assert torch.allclose(fast(idx)[0], model(idx)[0], atol=1e-5)
    assert torch.equal(run(fast, idx, 9, temperature=0.0), run(model, idx, 9, temperature=0.0))


def test_the_measured_choice_gives_one_layout_per_shape(model):
    fast = prepare_for_decoding(copy.deepcopy(model))  # transposed_reads_faster decides
    weights = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    for shape in {w.shape for w in weights}:
        layouts = {w.is_contiguous() for w in weights if w.shape == shape}
        assert len(layouts) == 1, shape


@pytest.fixture(scope="module")
def trained() -> GPT:
    """A tiny model trained until it is sure of every next token: each sequence walks one
    fixed cycle through the 64 tokens. Greedy tokens then do not hang on rounding."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=64))
    cycle = torch.randperm(64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, 64, (16, 1))
        seq = cycle[(starts + torch.arange(33)) % 64]  # (16, 33)
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05
    return model.eval()


def test_bfloat16_decoding_in_either_layout_gives_the_plain_forwards_tokens(trained):
    """Greedy in bfloat16 (as train.sample casts the weights): every weight transposed or
    as nn.Linear keeps it, cached decoding writes what the plain forward picks."""
    plain = copy.deepcopy(trained).to(torch.bfloat16)
    transposed = prepare_for_decoding(copy.deepcopy(plain), lambda weights: True)
    assert transposed.h[0].attn.c_attn.weight.t().is_contiguous()
    idx = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    n = 32 - 5  # within the context, where the plain forward reads the whole sequence
    expected = reference_greedy(plain, idx, n, lambda seq: seq)
    assert torch.equal(run(transposed, idx, n, temperature=0.0), expected)
    assert torch.equal(run(plain, idx, n, temperature=0.0), expected)
    # the walk it learnt, so that the comparison is not between two kinds of noise
    assert (expected[:, 1:] != expected[:, :-1]).all()


# ----------------------------------------------------------------------------- batches


def prompts_of(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (n,), generator=g).tolist() for n in lengths]


def test_left_pad_puts_each_prompt_at_the_right_end():
    idx, start = left_pad([[7, 8], [9], [1, 2, 3]], pad_id=0)
    assert idx.tolist() == [[0, 7, 8], [0, 0, 9], [1, 2, 3]]
    assert start.tolist() == [1, 2, 0]


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_greedy_batch_of_mixed_lengths_gives_each_prompt_what_it_gets_alone(model, use_cache):
    prompts = prompts_of([3, 9, 1, 12, 5, 9], seed=8)
    n = 16 - 12 + 1  # the longest row's last token is drawn from a full window: no slide yet
    batch = complete(model, prompts, n, temperature=0.0, use_cache=use_cache)
    for p, c in zip(prompts, batch, strict=True):
        alone = complete(model, [p], n, temperature=0.0, use_cache=use_cache)[0]
        assert c.tokens == alone.tokens
        assert c.tokens == reference_greedy(model, torch.tensor([p]), n, lambda s: s)[0].tolist()


@torch.no_grad()
def test_past_the_context_the_rows_of_a_batch_slide_together_as_documented(model):
    block, keep = 16, 8
    prompts = prompts_of([2, 11, 6], seed=9)
    n = 30  # the longest row fills the window after 5 tokens, then every 8
    cached = complete(model, prompts, n, temperature=0.0)
    uncached = complete(model, prompts, n, temperature=0.0, use_cache=False)
    assert [c.tokens for c in cached] == [c.tokens for c in uncached]

    # Reference: each row alone, by full forward passes over its own real tokens; when the
    # shared slots are full, every row keeps at most its last keep - 1 tokens, then the new one.
    windows, expected = [list(p) for p in prompts], [[] for _ in prompts]
    slots = max(map(len, prompts))
    for _ in range(n):
        for w, e in zip(windows, expected, strict=True):
            e.append(int(model(torch.tensor([w]))[0][0, -1].argmax()))
        if slots == block:
            windows, slots = [w[-(keep - 1) :] for w in windows], keep - 1
        for w, e in zip(windows, expected, strict=True):
            w.append(e[-1])
        slots += 1
    assert [c.tokens for c in cached] == expected


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, None), (0.5, 5), (0.0, None)])
def test_logprobs_equal_those_of_a_plain_forward_of_prompt_and_reply(model, temperature, top_k):
    """log softmax(logits / temperature)[token], unfiltered; temperature 0 counts as 1."""
    prompts = prompts_of([3, 9, 1, 7], seed=10)
    g = torch.Generator().manual_seed(0)
    out = complete(model, prompts, 6, temperature, top_k, generator=g, logprobs=True)
    t = temperature or 1.0
    seqs = [p + c.tokens for p, c in zip(prompts, out, strict=True)]
    idx, start = left_pad([s[:-1] for s in seqs])  # a padded training forward, as PPO's
    with torch.no_grad():
        padded = torch.log_softmax(model(idx, start=start)[0] / t, dim=-1)  # (B, T, V)
    for row, (p, c) in enumerate(zip(prompts, out, strict=True)):
        with torch.no_grad():
            logits, _ = model(torch.tensor([seqs[row][:-1]]))  # alone
        reply = torch.tensor(c.tokens)[:, None]
        alone = torch.log_softmax(logits[0, len(p) - 1 :] / t, -1).gather(-1, reply)[:, 0]
        got = torch.tensor(c.logprobs)
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
        together = padded[row, -len(c.tokens) :].gather(-1, reply)[:, 0]
        torch.testing.assert_close(got, together, rtol=0, atol=1e-5)
    assert all(lp <= 0 for c in out for lp in c.logprobs)
    assert complete(model, prompts, 2)[0].logprobs is None  # only on request


def test_completions_end_at_their_first_stop_token_or_their_own_budget(model):
    prompts = prompts_of([3, 8, 5, 4], seed=14)
    free = complete(model, prompts, 12, temperature=0.0)  # no stop tokens
    budgets = [12, 12, 4, 0]
    # a token row 0 writes after its first, and row 2 not within its budget
    stop = next(t for t in free[0].tokens[1:] if t not in free[2].tokens[:4])
    got = complete(model, prompts, budgets, temperature=0.0, stop_ids=(stop, 10_000))
    for c, f, b in zip(got, free, budgets, strict=True):
        if stop in f.tokens[:b]:
            end = f.tokens.index(stop) + 1
            assert c == Completion(f.tokens[:end], stopped=True)
            assert c.text_tokens == f.tokens[: end - 1]
        else:
            assert c == Completion(f.tokens[:b], stopped=False)
            assert c.text_tokens == c.tokens
    assert got[0].stopped and len(got[0].tokens) > 1
    assert not got[2].stopped and len(got[2].tokens) == 4
    assert got[3].tokens == []
    assert complete(model, [], 5) == []


def test_completions_grow_one_token_per_step_while_live(model):
    from model.generate import completions

    prompts = prompts_of([2, 6, 4], seed=12)
    lengths = [
        [len(c.tokens) for c in out]
        for out in completions(model, prompts, [3, 1, 5], temperature=0.0)
    ]
    assert lengths == [[1, 1, 1], [2, 1, 2], [3, 1, 3], [3, 1, 4], [3, 1, 5]]


def test_batch_size_splits_the_prompts_without_changing_greedy_replies(model):
    prompts = prompts_of([5, 2, 7, 3, 1], seed=13)
    whole = complete(model, prompts, 6, temperature=0.0)
    assert complete(model, prompts, 6, temperature=0.0, batch_size=2) == whole


def test_an_empty_prompt_is_a_clear_error(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        complete(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="empty"):
        list(generate(model, torch.zeros(1, 0, dtype=torch.long), 3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        complete(model, [[1], [2]], [3])  # one budget for two prompts
