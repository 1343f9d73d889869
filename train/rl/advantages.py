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
  group  GRPO (Shao et al. 2024): K replies per prompt, no value function; each reply's
         return R_i = sum_t r_t, and every token of reply i gets
             A_i = (R_i - mean of its group's R) / (std of its group's R + eps)
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


def group_advantages(returns: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """One advantage per reply: (R_i - mean_g R) / (std_g R + eps), with g reply i's group.

    returns: (N,) each reply's total reward; group: (N,) the prompt it answers (0 .. G-1).
    A group whose replies all have the same return gives them all 0: nothing to learn.
    """
    zeros = torch.zeros(int(group.max()) + 1, dtype=returns.dtype, device=returns.device)
    count = zeros.index_add(0, group, torch.ones_like(returns))  # (G,)
    mean = zeros.index_add(0, group, returns) / count  # (G,)
    var = zeros.index_add(0, group, (returns - mean[group]) ** 2) / count  # (G,)
    return (returns - mean[group]) / (var.sqrt()[group] + eps)
