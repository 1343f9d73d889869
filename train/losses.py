"""The step functions of the training stages: one batch in, StepResult(loss, tokens, metrics) out.

Each is what train/loop.py calls on every micro-batch (see its docstring for the contract).
"""

import torch
import torch.nn.functional as F
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


def pairwise_loss(
    rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, group: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward model's loss over comparisons, and the margins.

        margin_p = r(x, y_w) - r(x, y_l)                  for each pair p (y_w preferred)
        loss     = mean over prompts of ( mean over the prompt's pairs of -log sigmoid(margin_p) )

    rewards: (R,) one per response row; better, worse, group: (P,) the rows of each pair and
    the prompt it belongs to. Every prompt weighs the same, however many pairs it has
    (InstructGPT divides each prompt's loss by its number of pairs). Returns (loss, margins (P,)).
    """
    margin = rewards[better] - rewards[worse]  # (P,)
    per_pair = -F.logsigmoid(margin)  # (P,)
    n = int(group.max()) + 1
    total = torch.zeros(n, device=rewards.device).index_add(0, group, per_pair.float())  # (n,)
    count = torch.zeros(n, device=rewards.device).index_add(0, group, torch.ones_like(total[group]))
    return (total / count).mean(), margin


def reward_step(model: nn.Module, batch: dict) -> StepResult:
    """One batch of preference groups (data/preferences.py: collate_groups) for the reward
    model: every response scored once at its last token, all pairs of a prompt compared."""
    rewards = model(batch["ids"], batch["lengths"])  # (R,)
    loss, margin = pairwise_loss(rewards, batch["better"], batch["worse"], batch["group"])
    accuracy = (margin > 0).float().mean()
    return StepResult(loss, batch["lengths"].sum(), {"accuracy": accuracy, "margin": margin.mean()})
