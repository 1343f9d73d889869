"""Left padding in the model (model/gpt.py, attention.py, embedding.py, kv_cache.py).

Rows of different lengths share a batch: a padded row must compute exactly what it
computes alone, in a plain forward and through the KV cache, and no padding slot may turn
into NaN (which would leak into the real rows through the next layer's attention).
"""

import pytest
import torch

from model import GPT, GPTConfig
from model.attention import padded_causal_mask
from model.generate import left_pad

LENGTHS = [7, 3, 12, 1]


def tiny(attention: str) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, attention=attention
    )
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def prompts(lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (n,), generator=g).tolist() for n in lengths]


def test_the_padded_mask_is_causal_without_padding_keys_and_keeps_the_diagonal():
    mask = padded_causal_mask(torch.tensor([0, 2]), t_q=3, t_k=3)  # (B, 1, 3, 3)
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # no padding: causal
    # row 1: slots 0, 1 are padding: they see only themselves; slot 2 sees only itself
    assert mask[1, 0].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    # the last query of a cache: one row of the mask for slots 0 .. 3
    one = padded_causal_mask(torch.tensor([1]), t_q=1, t_k=4)
    assert one[0, 0].tolist() == [[0, 1, 1, 1]]


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_a_left_padded_row_computes_what_it_computes_alone(attention):
    model = tiny(attention)
    rows = prompts(LENGTHS)
    idx, start = left_pad(rows, pad_id=5)
    with torch.no_grad():
        logits, _ = model(idx, start=start)  # (B, T, V)
        assert torch.isfinite(logits).all()  # padding slots included: no NaN anywhere
        for b, p in enumerate(rows):
            alone, _ = model(torch.tensor([p]))
            torch.testing.assert_close(logits[b, int(start[b]) :], alone[0], rtol=0, atol=1e-5)
        other = idx.masked_fill(torch.arange(idx.size(1)) < start[:, None], 9)  # other padding
        again, _ = model(other, start=start)
    real = torch.arange(idx.size(1)) >= start[:, None]  # (B, T)
    torch.testing.assert_close(again[real], logits[real], rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_a_padded_cache_prefill_then_single_tokens_equals_the_full_padded_forward(attention):
    model = tiny(attention)
    idx, start = left_pad(prompts([11, 6, 14, 2]))  # (4, 14)
    with torch.no_grad():
        full, _ = model(idx, start=start)
        cache = model.new_cache(4, start=start)
        logits, _ = model(idx[:, :8], cache=cache)  # prefill: rows 1 and 3 are padding here
        torch.testing.assert_close(logits, full[:, :8], rtol=0, atol=1e-5)
        for t in range(8, idx.size(1)):
            logits, _ = model(idx[:, t : t + 1], cache=cache)  # (B, 1, V)
            torch.testing.assert_close(logits[:, 0], full[:, t], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="new_cache"):
        model(idx[:, :1], cache=model.new_cache(4), start=start)  # the cache carries start


def test_padding_changes_nothing_for_the_loss_of_real_targets():
    """A training forward of left-padded rows: targets -100 on padding, the same loss."""
    model = tiny("sdpa")
    rows = prompts([9, 4])
    idx, start = left_pad([r[:-1] for r in rows])
    targets, _ = left_pad([r[1:] for r in rows], pad_id=-100)
    losses = [model(torch.tensor([r[:-1]]), torch.tensor([r[1:]]))[1] for r in rows]
    _, loss = model(idx, targets, start=start)
    expected = (losses[0] * 8 + losses[1] * 3) / 11  # mean over the 11 real targets
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
