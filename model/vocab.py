"""Growing a GPT's vocabulary: rows for new token ids in the embedding and the tied LM head.

A pretrained GPT-2 knows 50257 tokens; our control tokens (<|user|>, <|end|>, ...) get the
ids after them, and the table is padded to a multiple of 64. The token embedding W_te
(V, C), which the LM head shares, gets the new rows

    W_te[v] = (1/V) * sum_{u < V} W_te[u]        for V <= v < V_new

As a row of the LM head the mean gives each new id the average of the old ids' logits,
and exp(mean logit) <= mean exp(logit) (Jensen), so each new id takes at most about 1/V
of the probability: the predictions over the old ids hardly change. Random rows could
instead get large logits and disturb every prediction.
Fine-tuning then moves the rows of the tokens it uses. An untied LM head (the Llama
family's tie_embeddings=false) gets its own mean rows likewise: W_head[v] = mean_u W_head[u].
"""

import dataclasses

import torch
from torch import nn

from .gpt import GPT


def grow_vocab(model: GPT, vocab_size: int) -> GPT:
    """Give `model` vocab_size token ids, the new rows the mean of the old (in place).

    The existing rows are unchanged, so every logit of an old id stays what it was; a tied
    LM head stays tied to the embedding. Returns the model.
    """
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
    if vocab_size == old:
        return model
    wte = model.embed.wte.weight  # (V, C)
    model.embed.wte = nn.Embedding.from_pretrained(_with_mean_rows(wte, vocab_size), freeze=False)
    if model.config.tie_embeddings:
        model.lm_head = nn.Linear(wte.size(1), vocab_size, bias=False, device="meta")
        model.lm_head.weight = model.embed.wte.weight  # tied again: one matrix, two uses
    else:
        head = _with_mean_rows(model.lm_head.weight, vocab_size)  # (V_new, C)
        model.lm_head = nn.Linear(wte.size(1), vocab_size, bias=False, device="meta")
        model.lm_head.weight = nn.Parameter(head)
    model.config = dataclasses.replace(model.config, vocab_size=vocab_size)
    return model


def _with_mean_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """weight (V, C) with rows V .. rows-1 added, each the mean of its V rows: (rows, C)."""
    with torch.no_grad():
        mean = weight.mean(dim=0, keepdim=True)  # (1, C)
        return torch.cat([weight, mean.expand(rows - weight.size(0), -1)])
