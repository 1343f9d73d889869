"""The optimizer and the learning-rate schedule every training stage uses.

Two optimizers (`optimizer: adamw | muon` in the stage's config):

- adamw: AdamW (Loshchilov & Hutter) with decoupled weight decay applied to matrices only:
  embeddings and Linear weights decay; biases and LayerNorm gains do not (shrinking them
  towards zero is not regularisation, it just fights the normalisation).
- muon: Muon (train/core/muon.py) for the 2-D weights inside the transformer blocks, at its own
  peak rate muon_lr; AdamW, as above, for embeddings, LM head, norms and biases at lr.
  c_attn stacks W_q, W_k and W_v, and Muon orthogonalises them one by one (with grouped-
  query attention W_k and W_v have fewer rows than W_q: attention_parts).

Both scale every group's rate by the same schedule: group lr = lr(step) * lr_scale, with
lr_scale = muon_lr / lr for the Muon groups and 1 for the others.

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
import re
from dataclasses import dataclass

import torch
from torch import nn

from checks import Settings, choice, number, pair, setting

from .muon import Muon

OPTIMIZERS = ("adamw", "muon")
_BLOCK_PARAM = re.compile(r"(^|\.)h\.\d+\.")  # a parameter inside block i: "h.<i>." in its name


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    device_type: str = "cpu",
    kind: str = "adamw",
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
) -> torch.optim.Optimizer:
    """The `kind` optimizer over the model's trainable parameters (see the module doc).

    AdamW uses the fused kernel on CUDA and CPU (one kernel for all parameters instead of a
    loop over them), foreach elsewhere.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; use one of {OPTIMIZERS}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if kind == "adamw":
        groups = [
            {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused, foreach=not fused)

    hidden = {n: p for n, p in named if p.dim() == 2 and _BLOCK_PARAM.search(n)}
    rest = [p for n, p in named if n not in hidden]
    muon = {"use_muon": True, "lr_scale": muon_lr / lr, "weight_decay": weight_decay}
    stacked = attention_parts(model, hidden)  # c_attn's name -> its row blocks
    groups = [
        {**muon, "params": [p for n, p in hidden.items() if n not in stacked]},
        *[
            {**muon, "params": [hidden[n] for n in stacked if stacked[n] == parts], "parts": parts}
            for parts in dict.fromkeys(stacked.values())  # each distinct split once, in order
        ],
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return Muon(groups, lr=lr, momentum=muon_momentum, betas=betas)


def attention_parts(model: nn.Module, hidden: dict[str, nn.Parameter]) -> dict:
    """Muon's `parts` for each c_attn weight among `hidden`: 3 (equal Q, K, V blocks), or
    the rows of Q, K and V when they differ (CausalSelfAttention.qkv_widths)."""
    parts = {}
    for name in hidden:
        if name.endswith("c_attn.weight"):
            widths = model.get_submodule(name.removesuffix(".c_attn.weight")).qkv_widths
            parts[name] = 3 if len(set(widths)) == 1 else tuple(widths)
    return parts


def optimizer_from_config(model: nn.Module, cfg, device_type: str) -> torch.optim.Optimizer:
    """build_optimizer with a stage's settings (optimizer, lr, weight_decay, betas, muon_*)."""
    return build_optimizer(
        model,
        cfg.lr,
        cfg.weight_decay,
        cfg.betas,
        device_type,
        kind=cfg.optimizer,
        muon_lr=cfg.muon_lr,
        muon_momentum=cfg.muon_momentum,
    )


@dataclass
class OptimizerSettings(Settings):
    """The optimizer's settings; their values and meaning are in conf/training.yaml."""

    optimizer: str = setting(choice(*OPTIMIZERS))
    weight_decay: float = setting(number(0))
    betas: list[float] = setting(pair(number(0, below=1)))
    muon_lr: float = setting(number(above=0))
    muon_momentum: float = setting(number(0, below=1))

    def build(self, model: nn.Module, lr: float, device_type: str) -> torch.optim.Optimizer:
        """build_optimizer with these settings and the peak rate lr."""
        return build_optimizer(
            model,
            lr,
            self.weight_decay,
            self.betas,
            device_type,
            self.optimizer,
            self.muon_lr,
            self.muon_momentum,
        )


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
    """Set every group's rate: lr times the group's lr_scale (Muon's groups), or lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
