"""The hand-written GPT: its maths, its cache, its configuration, its initialisation.

Every model here is tiny (a few thousand parameters), so the file runs in seconds on a CPU.
"""

import itertools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import GPT, IGNORE_INDEX, GPTConfig

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=61)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    """A tiny GPT in eval mode. Biases and LayerNorm parameters get random values too (GPT-2
    init leaves them at 0 and 1), so that a mistake in how any of them is used shows."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=g)


def with_attention(model: GPT, attention: str) -> GPT:
    """The same weights under the other attention implementation."""
    other = GPT(GPTConfig(**{**model.config.to_dict(), "attention": attention}))
    other.load_state_dict(model.state_dict())
    return other.eval()


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("bias", [True, False])
def test_manual_attention_equals_sdpa(bias):
    manual = tiny_gpt(bias=bias, attention="manual")
    sdpa = with_attention(manual, "sdpa")
    idx = tokens(3, TINY["block_size"])
    with torch.no_grad():
        a, _ = manual(idx)
        b, _ = sdpa(idx)
    assert a.abs().max() > 0.1  # logits of a size worth comparing
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_manual_attention_equals_sdpa_in_gradients():
    manual = tiny_gpt(attention="manual").train()  # dropout is 0, so train mode is deterministic
    sdpa = with_attention(manual, "sdpa").train()
    idx = tokens(2, 16)
    for model in (manual, sdpa):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
    for (name, p), q in zip(manual.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_manual_attention_equals_sdpa_with_cache():
    """Prefill, single tokens, then a chunk: sdpa takes a different branch for each."""
    manual = tiny_gpt(attention="manual")
    sdpa = with_attention(manual, "sdpa")
    idx = tokens(2, 20)
    pieces = [idx[:, :6], idx[:, 6:7], idx[:, 7:8], idx[:, 8:9], idx[:, 9:14], idx[:, 14:]]
    cache_a, cache_b = manual.new_cache(2), sdpa.new_cache(2)
    with torch.no_grad():
        for piece in pieces:
            a, _ = manual(piece, cache=cache_a)
            b, _ = sdpa(piece, cache=cache_b)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert cache_a.pos == cache_b.pos == 20


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_cached_decoding_one_token_at_a_time_equals_full_forward(attention):
    model = tiny_gpt(attention=attention)
    idx = tokens(2, TINY["block_size"])  # fill the whole context
    prompt = 5
    with torch.no_grad():
        full, _ = model(idx)  # (B, T, V)
        cache = model.new_cache(batch_size=2)
        logits, _ = model(idx[:, :prompt], cache=cache)  # prefill
        torch.testing.assert_close(logits, full[:, :prompt], rtol=0, atol=1e-5)
        for t in range(prompt, idx.size(1)):
            logits, _ = model(idx[:, t : t + 1], cache=cache)  # (B, 1, V)
            torch.testing.assert_close(logits[:, 0], full[:, t], rtol=0, atol=1e-5)
    assert cache.pos == idx.size(1)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_cached_decoding_in_chunks_equals_full_forward(attention):
    model = tiny_gpt(attention=attention)
    idx = tokens(2, 21)
    bounds = [0, 3, 7, 11, 16, 21]  # chunks of 3, 4, 4, 5, 5 tokens
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(batch_size=2)
        for start, end in itertools.pairwise(bounds):
            logits, _ = model(idx[:, start:end], cache=cache)
            torch.testing.assert_close(logits, full[:, start:end], rtol=0, atol=1e-5)


def test_cache_reset_starts_over():
    model = tiny_gpt()
    a, b = tokens(1, 8, seed=2), tokens(1, 8, seed=3)
    with torch.no_grad():
        cache = model.new_cache(batch_size=1)
        model(a, cache=cache)
        cache.reset()
        logits, _ = model(b, cache=cache)
        expected, _ = model(b)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_cache_refuses_to_overflow():
    model = tiny_gpt()
    cache = model.new_cache(batch_size=1, max_len=6)
    with torch.no_grad():
        model(tokens(1, 4), cache=cache)
        with pytest.raises(ValueError, match="KV cache holds 6 positions"):
            model(tokens(1, 3), cache=cache)


# ----------------------------------------------------------------------------- the forward


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_causality(attention):
    """Changing the token at position t changes no logits before t, and does change t's."""
    model = tiny_gpt(attention=attention)
    idx = tokens(2, TINY["block_size"])
    t = 9
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-3


def test_ignored_targets_do_not_count():
    """The loss is the mean cross-entropy over the targets that are not -100, computed here
    from log-probabilities by hand."""
    model = tiny_gpt()
    idx = tokens(2, 12)
    targets = tokens(2, 12, seed=5)
    keep = torch.rand(2, 12, generator=torch.Generator().manual_seed(6)) < 0.5
    keep[0, 0] = True  # at least one kept target
    masked = torch.where(keep, targets, torch.full_like(targets, IGNORE_INDEX))
    logits, loss = model(idx, masked)
    logits.retain_grad()
    loss.backward()

    log_probs = torch.log_softmax(logits.detach(), dim=-1)  # (B, T, V)
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    expected = nll[keep].mean()
    assert not torch.isclose(expected, nll.mean())  # the masking matters for this draw
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-6)
    # No gradient reaches the logits of ignored positions; every kept one gets some.
    assert torch.all(logits.grad[~keep] == 0)
    assert torch.all(logits.grad[keep].abs().sum(-1) > 0)


def test_forward_without_targets_returns_no_loss():
    logits, loss = tiny_gpt()(tokens(3, 7))
    assert loss is None
    assert logits.shape == (3, 7, TINY["vocab_size"])


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=32))
    batch = torch.randint(0, 32, (4, 17))
    x, y = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _, first = model(x, y)
    for _ in range(200):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first.item() > 3.0  # about ln(32) = 3.47 at initialisation
    assert loss.item() < 0.05


def test_input_longer_than_block_size_is_refused():
    model = tiny_gpt()
    n = TINY["block_size"]
    with pytest.raises(ValueError, match=rf"position {n + 1}.*block_size.*{n}"):
        model(tokens(1, n + 1))
    cache = model.new_cache(batch_size=1)
    model(tokens(1, n - 1), cache=cache)
    with pytest.raises(ValueError, match="block_size"):  # also when the cache fills the context
        model(tokens(1, 2), cache=cache)


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "overrides, field, value",
    [
        (dict(n_embd=30, n_head=4), "n_embd", "30"),
        (dict(n_layer=0), "n_layer", "0"),
        (dict(n_head=-2), "n_head", "-2"),
        (dict(n_embd=0), "n_embd", "0"),
        (dict(block_size=-1), "block_size", "-1"),
        (dict(vocab_size=0), "vocab_size", "0"),
        (dict(n_layer=2.5), "n_layer", "2.5"),
        (dict(dropout=1.0), "dropout", "1.0"),
        (dict(dropout=-0.1), "dropout", "-0.1"),
        (dict(attention="flash"), "attention", "'flash'"),
        (dict(bias="yes"), "bias", "'yes'"),
    ],
)
def test_invalid_config_names_field_and_value(overrides, field, value):
    with pytest.raises(ValueError) as info:
        GPTConfig(**{**TINY, **overrides})
    message = str(info.value)
    assert field in message and value in message, message


def test_valid_edge_configs_are_accepted():
    GPTConfig(**{**TINY, "dropout": 0.0, "n_head": 1})
    GPTConfig(**{**TINY, "dropout": 0.999, "n_head": 32})


# ----------------------------------------------------------------------------- parameters


def test_gpt2_initialisation_statistics():
    n_layer = 4
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=128, block_size=64, vocab_size=1000))
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            expected_std = residual_std
        elif name.endswith(".weight") and p.dim() == 2:
            expected_std = 0.02
        elif ".ln_" in name or name.startswith("ln_f"):
            expected = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
            assert torch.equal(p, expected), name
            continue
        else:  # Linear biases
            assert torch.equal(p, torch.zeros_like(p)), name
            continue
        assert abs(p.std().item() - expected_std) < 0.05 * expected_std, name
        assert abs(p.mean().item()) < 0.1 * expected_std, name


def test_lm_head_is_tied_to_token_embedding():
    model = tiny_gpt()
    assert model.lm_head.weight is model.embed.wte.weight
    # It stays one matrix through training: a step moves both uses together.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, loss = model(tokens(2, 8), tokens(2, 8, seed=2))
    loss.backward()
    optimizer.step()
    assert model.lm_head.weight.data_ptr() == model.embed.wte.weight.data_ptr()
    # And it is counted once.
    untied = sum(p.numel() for name, p in model.named_parameters())
    assert model.num_params() == untied
    c = model.config
    assert model.num_params() - model.num_params(include_position_embedding=False) == (
        c.block_size * c.n_embd
    )


@pytest.mark.parametrize("bias", [True, False])
def test_num_params_formula(bias):
    """Count by hand: embeddings, then per block 2 LayerNorms, QKV, W_o, FFN; final LN."""
    c = GPTConfig(**{**TINY, "bias": bias})
    C, b = c.n_embd, int(bias)
    layer_norm = C + b * C
    per_block = 2 * layer_norm + (3 * C * C + b * 3 * C) + (C * C + b * C)
    per_block += (4 * C * C + b * 4 * C) + (4 * C * C + b * C)
    expected = c.vocab_size * C + c.block_size * C + c.n_layer * per_block + layer_norm
    assert GPT(c).num_params() == expected


def test_flops_per_token_matches_torch_flop_counter():
    """The matmul part of flops_per_token equals what torch counts for a forward + backward.

    flops_per_token is 6 N + 12 L T C with N all parameters except the position embedding;
    the 6 N term also counts biases and LayerNorm parameters, which do no matmul, so we
    take those out before comparing. ("manual" attention: torch counts its matmuls.)
    """
    model = tiny_gpt(attention="manual").train()
    B, T = 3, TINY["block_size"]
    idx = tokens(B, T)
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    no_matmul = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    expected = (model.flops_per_token(T) - 6 * no_matmul) * B * T
    assert counter.get_total_flops() == expected


def test_loss_is_float32_for_low_precision_logits():
    model = tiny_gpt().to(torch.bfloat16)
    idx = tokens(2, 8)
    logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
