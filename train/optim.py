"""The optimizer and the learning-rate schedule every training stage uses.

AdamW (Loshchilov & Hutter) with decoupled weight decay applied to matrices only:
embeddings and Linear weights decay; biases and LayerNorm gains do not (shrinking them
towards zero is not regularisation, it just fights the normalisation).

Learning rate, with w the warm-up ramp and f in [0, 1] the fraction of the run done:

    w(step) = min(1, (step + 1) / warmup_iters)
    c(f)    = 0.5 * (1 + cos(pi * f))             schedule "cosine"
    c(f)    = min(1, (1 - f) / cooldown)          schedule "wsd": warm-up, stable, decay
    lr      = w(step) * ( min_lr + (max_lr - min_lr) * c(f) )

"wsd" holds the peak rate and decays linearly to min_lr over the last `cooldown`
fraction of the run; on short runs it reaches a lower loss than the cosine, which spends
half the run well below the peak.

f is the larger of step / max_iters and elapsed / max_minutes, so the schedule reaches
min_lr at whichever bound ends the run: the schedule follows the bound that applies.
"""

import math

import torch
from torch import nn


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    device_type: str = "cpu",
) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters, decay on matrices (ndim >= 2) only.

    Uses the fused kernel on CUDA and CPU (one kernel for all parameters instead of a
    loop over them), foreach elsewhere.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused, foreach=not fused)


SCHEDULES = ("cosine", "wsd")


def lr_at(
    step: int,
    fraction_done: float,
    max_lr: float,
    min_lr: float,
    warmup_iters: int,
    schedule: str = "cosine",
    cooldown: float = 0.4,
) -> float:
    """The learning rate for optimizer step `step` (0-based) at `fraction_done` of the run."""
    warm = min(1.0, (step + 1) / max(1, warmup_iters))
    f = min(max(fraction_done, 0.0), 1.0)
    if schedule == "cosine":
        c = 0.5 * (1.0 + math.cos(math.pi * f))
    elif schedule == "wsd":
        c = min(1.0, (1.0 - f) / cooldown)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    return warm * (min_lr + (max_lr - min_lr) * c)


def fraction_done(step: int, max_iters: int, elapsed_s: float, max_minutes: float | None) -> float:
    """How far through the run we are: the larger of the step and the time fraction."""
    f = step / max_iters if max_iters > 0 else 1.0
    if max_minutes:
        f = max(f, elapsed_s / (60.0 * max_minutes))
    return min(f, 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
