"""The step functions of the training stages: one batch in, StepResult(loss, tokens, metrics) out.

Each is what train/loop.py calls on every micro-batch (see its docstring for the contract).
"""

import torch
from torch import nn

from .loop import StepResult


def next_token_step(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], pad_id: int | None = None
) -> StepResult:
    """Next-token cross-entropy (pretraining and SFT).

    batch = (x, y), both (B, T); y[b, t] is the token after x[b, :t+1], or -100 where the
    position is not trained on (SFT: everything but the assistant's replies; padding).

        loss = mean over (b, t) with y[b, t] != -100 of  -log p(y[b, t] | x[b, :t+1])

    tokens: the positions the model ran on, padding (x == pad_id) excluded.
    """
    x, y = batch
    _, loss = model(x, y)
    tokens = x.numel() if pad_id is None else (x != pad_id).sum()
    return StepResult(loss, tokens)
