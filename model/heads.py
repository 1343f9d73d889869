"""Scalar heads on the GPT's trunk: the reward model and the value function.

InstructGPT's reward model is the SFT model with the LM head replaced by a scalar head;
PPO's value function has the same shape. Both read the trunk's final hidden states:

    h = GPT.hidden(idx)                       (B, T, C)   final normalised hidden states
    s = h w + b                               (B, T)      one scalar per position

The value function uses every position (V(s_t): the expected return from token t on); the
reward model reads one position per row, the last real token of the sequence (the <|end|>
that closes the reply), so whatever padding follows on the right never changes a reward:
with causal attention a position never sees the ones after it.
"""

import torch
from torch import nn

from .config import GPTConfig
from .gpt import GPT


class ScalarHead(nn.Module):
    """Linear C -> 1: a hidden state to one number. (..., C) -> (...)."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.proj.weight)  # starts at 0 for every input: no initial opinion
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).squeeze(-1)


class ScalarModel(nn.Module):
    """A GPT trunk with a scalar head: a reward model, or a value function.

    `gpt` keeps its LM head (tied to the token table, so it costs nothing), which lets the
    trunk be loaded, sampled from and exported like any language model. An untied LM head
    (tie_embeddings=false) is frozen: the scalar never reads it, and a trained parameter
    that gets no gradient is an error under DistributedDataParallel.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.gpt = GPT(config)
        self.head = ScalarHead(config.n_embd)
        if not config.tie_embeddings:
            self.gpt.lm_head.requires_grad_(False)

    @property
    def config(self) -> GPTConfig:
        return self.gpt.config

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """One scalar per position, idx: (B, T) -> (B, T); or, given lengths (B,), the scalar
        at each row's last real token: (B,). Row b's real tokens are idx[b, :lengths[b]];
        padding, if any, follows on the right and changes nothing."""
        h = self.gpt.hidden(idx)  # (B, T, C)
        if lengths is not None:
            h = h[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, C)
        return self.head(h)  # (B, T) or (B,)


class PolicyWithValue(nn.Module):
    """PPO's two trained networks in one module: the policy (a GPT) and the value function
    (its own trunk with a scalar head, initialised from the reward model, as InstructGPT
    and TRL do). Separate trunks keep the value loss's gradients out of the policy."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.policy = GPT(config)
        self.value = ScalarModel(config)

    @property
    def config(self) -> GPTConfig:
        return self.policy.config

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """The parameters whose gradient norms are clipped separately (train/core/trainer.py)."""
        return [list(self.policy.parameters()), list(self.value.parameters())]

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx: (B, T) -> the policy's logits (B, T, V) and the values V(s_t) (B, T)."""
        logits, _ = self.policy(idx)
        return logits, self.value(idx)
