"""The losses of the reward model, PPO and DPO, and their step functions: one batch in,
StepResult(loss, tokens, metrics) out (the contract of train/core/trainer.py; pretraining
and SFT's next-token step is there too).
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.generate import reply_logprobs

from ..core.trainer import StepResult


def pairwise_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    group: torch.Tensor,
    gap: torch.Tensor | None = None,
    margin: float = 0.0,
    center: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward model's loss over comparisons, and the margins.

        margin_p = r(x, y_w) - r(x, y_l)                  for each pair p (y_w preferred)
        loss_p   = -log sigmoid(margin_p - m * gap_p)     gap_p: the judge's score difference
        loss     = mean over prompts of (mean over the prompt's pairs of loss_p)
                   + c * mean over pairs of (r(x, y_w) + r(x, y_l))^2

    m (margin, Llama 2's): a pair the judge ranks far apart must be scored further apart than
    a close one (a right answer against nonsense, not against a near miss). c (center, TRL's
    center_rewards_coefficient): the pair-loss only sees differences; the second term keeps
    the rewards themselves near 0. rewards: (R,) one per response row; better, worse, group,
    gap: (P,) the rows of each pair, its prompt, its score gap. Every prompt weighs the same,
    however many pairs it has (InstructGPT). Returns (loss, margins (P,))."""
    diff = rewards[better] - rewards[worse]  # (P,)
    wanted = margin * gap if gap is not None and margin else 0.0  # (P,)
    per_pair = -F.logsigmoid(diff - wanted)  # (P,)
    n = int(group.max()) + 1
    total = torch.zeros(n, device=rewards.device).index_add(0, group, per_pair.float())  # (n,)
    count = torch.zeros(n, device=rewards.device).index_add(0, group, torch.ones_like(total[group]))
    loss = (total / count).mean()
    if center:
        loss = loss + center * ((rewards[better] + rewards[worse]).float() ** 2).mean()
    return loss, diff


def reward_step(
    model: nn.Module, batch: dict, margin: float = 0.0, center: float = 0.0
) -> StepResult:
    """One batch of preference groups (data/preferences.py: collate_groups) for the reward
    model: every response scored once at its last token, all pairs of a prompt compared."""
    rewards = model(batch["ids"], batch["lengths"])  # (R,)
    loss, margin = pairwise_loss(
        rewards, batch["better"], batch["worse"], batch["group"], batch["gap"], margin, center
    )
    accuracy = (margin > 0).float().mean()
    return StepResult(loss, batch["lengths"].sum(), {"accuracy": accuracy, "margin": margin.mean()})


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of x over the entries where mask is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate over reply tokens (all (B, T) tensors):

        rho_t  = exp(log pi_theta(a_t | s_t) - log pi_old(a_t | s_t))
        L      = -mean( min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) )

    Returns (L, the share of tokens whose ratio was clipped, the approximate KL between the
    old and the new policy, mean of (rho - 1) - log rho)."""
    log_ratio = logprobs - old
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    clipped = ((ratio - 1).abs() > clip).float()
    approx_kl = (ratio - 1) - log_ratio
    return -masked_mean(surrogate, mask), masked_mean(clipped, mask), masked_mean(approx_kl, mask)


def clipped_value_loss(
    values: torch.Tensor,
    old: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """The value function's loss, with the update of V clipped around the rollout's values:

    V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
    L_V    = 1/2 mean( max((V - R)^2, (V_clip - R)^2) )
    """
    v_clipped = old + (values - old).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The KL to the reference per token, by the k3 estimator (Schulman 2020), (B, T-1):

        r_t  = log pi_ref(a_t|s_t) - log pi(a_t|s_t)
        kl_t = exp(r_t) - r_t - 1                        >= 0, unbiased for KL(pi || pi_ref)

    As a loss term (weight kl_coef) its gradient pulls each sampled token's probability
    back towards the reference's: d kl_t / d log pi = 1 - exp(r_t)."""
    r = ref_logprobs - logprobs
    return r.exp() - r - 1


def ppo_step(
    model: nn.Module,
    batch: dict,
    clip: float = 0.2,
    value_clip: float = 0.2,
    vf_coef: float = 0.1,
    ptx_coef: float = 0.0,
    kl_coef: float = 0.0,
) -> StepResult:
    """One PPO minibatch (train/rl/rollouts.py). Reply tokens are where batch["mask"] is 1, in
    (B, T-1) "target" positions: position t holds what predicts ids[:, t+1].

        loss = L_policy + vf_coef * L_V (a value function) + kl_coef * mean kl_t (GRPO's KL
               to the reference, when kl_coef > 0) + ptx_coef * L_pretraining (PPO-ptx)

    The pretraining rows (batch["ptx"], if any) go through the same forward as the replies,
    appended below them, so that DDP sees one forward per backward."""
    ids, mask = batch["ids"], batch["mask"].float()
    B = ids.size(0)
    if "ptx" in batch:
        ids = _stack_right_padded(ids, batch["ptx"])
    logits, values = model(ids)
    logprobs = reply_logprobs(logits[:B, : batch["ids"].size(1)], batch["ids"])  # (B, T-1)
    pg, clip_frac, approx_kl = clipped_policy_loss(
        logprobs, batch["old_logprobs"], batch["advantages"], mask, clip
    )
    loss, metrics = pg, {"clip_frac": clip_frac, "approx_kl": approx_kl}
    if kl_coef > 0:
        kl = masked_mean(kl_penalty(logprobs, batch["ref_logprobs"]), mask)
        loss = loss + kl_coef * kl
        metrics["kl_penalty"] = kl
    if "returns" in batch:  # a value function (advantage=gae)
        v = values[:B, : batch["ids"].size(1) - 1]
        value_loss = clipped_value_loss(v, batch["old_values"], batch["returns"], mask, value_clip)
        loss = loss + vf_coef * value_loss
        metrics["value_loss"] = value_loss
    if "ptx" in batch:
        ptx = batch["ptx"]
        ptx_loss = F.cross_entropy(
            logits[B:, : ptx.size(1) - 1].flatten(0, 1).float(), ptx[:, 1:].flatten()
        )
        loss = loss + ptx_coef * ptx_loss
        metrics["ptx_loss"] = ptx_loss
    with torch.no_grad():
        p = F.softmax(logits[:B, : batch["ids"].size(1) - 1].float(), dim=-1)
        entropy = -(p * p.clamp(min=1e-12).log()).sum(-1)  # (B, T-1)
        metrics["entropy"] = masked_mean(entropy, mask)
    return StepResult(loss, batch["lengths"].sum(), metrics)


def _stack_right_padded(a: torch.Tensor, b: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Rows of a then rows of b in one (Ba + Bb, max T) tensor, padded on the right."""
    T = max(a.size(1), b.size(1))
    a = F.pad(a, (0, T - a.size(1)), value=pad)
    b = F.pad(b, (0, T - b.size(1)), value=pad)
    return torch.cat([a, b])


def sequence_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(response | prompt) per row: the log-probabilities of the tokens where mask
    is 1 (the response's own tokens), summed. logits (B, T, V), ids and mask (B, T) -> (B,)."""
    logp = reply_logprobs(logits, ids)  # (B, T-1): position t predicts ids[:, t+1]
    return (logp * mask[:, 1:]).sum(-1)


def dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023) over pairs of rows:

        h    = beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ]
        loss = -(1 - s) log sigmoid(h) - s log sigmoid(-h)        s: label smoothing (cDPO)

    policy_logps, ref_logps: (R,) summed log-probs of each row's response; better, worse:
    (P,) the rows of each pair. Returns (the mean loss, the implicit rewards
    beta (log pi - log pi_ref) of the better and of the worse rows, each (P,))."""
    rewards = beta * (policy_logps - ref_logps)  # (R,): DPO's implicit reward
    h = rewards[better] - rewards[worse]  # (P,)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses.mean(), rewards[better], rewards[worse]


def dpo_step(
    model: nn.Module,
    batch: dict,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    nll_coef: float = 0.0,
) -> StepResult:
    """One batch of preference groups (data/preferences.py: collate_groups, with each
    row's reference log-prob in batch["ref_logps"], computed once before training).

    With nll_coef > 0 the chosen replies' next-token loss is added (per token, averaged):

        loss = dpo_loss + nll_coef * mean over pairs of -log pi(y_w|x) / |y_w|

    DPO alone can lower the likelihood of the chosen replies as well as the rejected ones
    (only their difference counts) and move the freed probability to replies neither pair
    holds; the added term keeps the chosen ones likely (Pang et al. 2024's RPO)."""
    logits, _ = model(batch["ids"])
    mask = batch["mask"].float()
    logps = sequence_logprobs(logits, batch["ids"], mask)  # (R,)
    loss, chosen, rejected = dpo_loss(
        logps, batch["ref_logps"], batch["better"], batch["worse"], beta, label_smoothing
    )
    margin = chosen - rejected
    metrics = {
        "chosen_reward": chosen.mean(),
        "rejected_reward": rejected.mean(),
        "margin": margin.mean(),
        "accuracy": (margin > 0).float().mean(),
    }
    if nll_coef > 0:
        per_token = -logps / mask[:, 1:].sum(-1).clamp(min=1)  # (R,)
        nll = per_token[batch["better"]].mean()
        loss = loss + nll_coef * nll
        metrics["chosen_nll"] = nll
    return StepResult(loss, batch["lengths"].sum(), metrics)
