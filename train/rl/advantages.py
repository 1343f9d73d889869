"""From a reply's rewards to how much better each of its tokens did than expected.

An episode: the prompt is the first state, each reply token a_t an action, the reply ends
at its end-of-turn token or when the budget runs out. Rewards per reply token
(InstructGPT, Ziegler et al. 2019):

    r_t = -beta * (log pi(a_t | s_t) - log pi_ref(a_t | s_t))        every token: the KL leash
    r_T += score                                                        the last token: the
                                                                        reward model (or judge)

Two ways to turn rewards into advantages, one flag (`advantage`) and the same PPO around it:

  gae    Generalised advantage estimation with the value function V:
             delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)    (V after the last token: 0)
             A_t     = delta_t + gamma * lambda * A_{t+1}    = sum_l (gamma lambda)^l delta_{t+l}
             R_t     = A_t + V(s_t)                          the value function's target
         then A is whitened over the batch's reply tokens (mean 0, std 1).
  group  GRPO (Shao et al. 2024): K replies per prompt, no value function; every token of
         reply i gets its score s_i against its group's (the same prompt's replies):
             A_i = s_i - mean of its group's s                     (Dr. GRPO; the default)
             A_i = (s_i - mean of its group's s) / (std + eps)      (scale_rewards: GRPO's)
         from the scores alone: the KL to the reference is then a term of the loss of its
         own (train/rl/losses.py: kl_penalty), never part of what the group normalises.
         Why: once the policy has moved, replies with equal scores have different KLs,
         and a return score - beta * KL normalised by its group's std turns those small
         differences into advantages of +-1 (an all-right group with KLs 0.10, 0.45,
         -0.05, 0.30 got [0.5, -1.3, 1.3, -0.5]): the reply sharpened most was pushed down
         hardest, in every group the task gave no signal in. The std division has a bias
         of its own (Dr. GRPO): groups whose scores barely differ weigh as much as groups
         of clear rights and wrongs.
"""

import torch


def kl_rewards(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, score: float, beta: float
) -> torch.Tensor:
    """Per-token rewards of one reply: (L,) log-probs of its tokens -> (L,) rewards."""
    rewards = -beta * (logprobs - ref_logprobs)  # (L,)
    rewards[-1] += score
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of one reply: rewards, values (L,) -> A (L,), R (L,)."""
    advantages = torch.zeros_like(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0  # terminal after the last
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x shifted and scaled to mean 0, std 1 over the entries where mask is 1 (0 elsewhere)."""
    m = mask.bool()
    mean, std = x[m].mean(), x[m].std(unbiased=False)
    return torch.where(m, (x - mean) / (std + eps), torch.zeros_like(x))


def group_advantages(
    scores: torch.Tensor, group: torch.Tensor, scale: bool = False, eps: float = 1e-4
) -> torch.Tensor:
    """One advantage per reply: s_i - mean_g s, over (std_g s + eps) when `scale`, with g
    reply i's group.

    scores: (N,) each reply's score; group: (N,) the prompt it answers (0 .. G-1).
    A group whose replies all score the same gives them all 0: nothing to learn.
    """
    zeros = torch.zeros(int(group.max()) + 1, dtype=scores.dtype, device=scores.device)
    count = zeros.index_add(0, group, torch.ones_like(scores))  # (G,)
    mean = zeros.index_add(0, group, scores) / count  # (G,)
    centred = scores - mean[group]  # (N,)
    if not scale:
        return centred
    var = zeros.index_add(0, group, centred**2) / count  # (G,)
    return centred / (var.sqrt()[group] + eps)
