"""PPO's and GRPO's data: replies sampled with the current policy, scored, turned into
advantages.

One rollout (`Rollouts.collect`), as the loop of train/rl/stage.py calls it before its
updates:

    prompts   rollout_prompts prompts (x group_size each for advantage=group), drawn anew
              for every rollout and rank from (seed, rollout number, rank): balanced across
              the tasks, and within a task across the forms of question the evaluation
              asks (alone, as a later question, after a system line) in its shares
    replies   sampled with the KV-cache sampler at temperature 1 (model/generate.py), each
              with the evaluation's budget (2 n + 8 tokens for an answer of n tokens; the
              prompts without an answer reply_tokens); a reply that does not end its turn
              within its budget gets `unfinished_penalty` as its score
    scores    the reward model's (normalised) score of each finished reply, or with
              reward=tasks the judge's grade (data/judge.py); the judge's grade is kept
              beside it in either case: the gold score that shows reward hacking
    groups    (advantage=group) a group whose replies all score the same carries no signal:
              with drop_constant_groups it is dropped and more prompts are drawn, up to
              MAX_ATTEMPTS draws (DAPO's dynamic sampling); the share dropped is a figure
    log-probs log pi_old(a_t | s_t) from one no-grad training forward of the policy (in eval
              mode: no dropout), so that an update's ratio starts at exactly 1; the
              sampler's own log-probabilities are kept only as a check (sampler_gap)
    advantages GAE from the value function, with the KL to the reference in the rewards,
              or group-relative from the scores alone (train/rl/advantages.py), the KL then
              a loss term of its own (train/rl/losses.py: kl_penalty)

The rollout's minibatches (`Rollout.minibatches`) are ppo_epochs passes over it, each in a
new random order, cut into minibatch_size replies. After each rollout the KL coefficient
adapts when kl_target is set (Ziegler et al. 2019):

    beta <- beta * (1 + clip((KL - KL_target) / KL_target, -0.2, 0.2) * n / horizon)

with KL the mean per-reply sum of log pi_old - log pi_ref and n the replies of the rollout.
Under DDP every rank collects its own rollouts; gradients are averaged by the Trainer.
"""

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from checks import choice, flag, integer, number, setting

from ..eval.replies import Sampler, SamplingSettings
from .advantages import gae, group_advantages, kl_rewards, whiten

FIGURES = ("score", "gold", "kl", "length", "beta", "unfinished", "dropped", "sampler_gap")
MAX_ATTEMPTS = 4  # draws of prompts per rollout when groups without signal are dropped


@dataclass
class RolloutSettings(SamplingSettings):
    """How rollouts are collected and turned into advantages (conf/ppo.yaml)."""

    rollout_prompts: int = setting(integer(1))
    group_size: int = setting(integer(1))
    ppo_epochs: int = setting(integer(1))
    minibatch_size: int = setting(integer(1))
    beta: float = setting(number(0))
    kl_target: float | None = setting(number(above=0), null=True)
    kl_horizon: int = setting(integer(1))
    advantage: str = setting(choice("gae", "group"))
    scale_rewards: bool = setting(flag())
    drop_constant_groups: bool = setting(flag())
    balanced: bool = setting(flag())
    gamma: float = setting(number(0, 1))
    lam: float = setting(number(0, 1))


@dataclass
class Rollout:
    """One rollout: its tensors (ids (B, T); per reply token, (B, T-1): mask, old_logprobs,
    ref_logprobs, advantages, and with a value function returns and old_values) and its
    figures."""

    batch: dict
    figures: dict[str, float]
    order: np.random.Generator  # the minibatches' shuffles

    def minibatches(self, epochs: int, size: int) -> list[dict]:
        """`epochs` passes over the replies, each in a new random order, in minibatches."""
        B, out = self.batch["ids"].size(0), []
        for _ in range(epochs):
            order = self.order.permutation(B)
            for first in range(0, B, size):
                rows = torch.as_tensor(order[first : first + size])
                out.append(_trim({k: v[rows] for k, v in self.batch.items()}))
        return out


def _trim(mb: dict) -> dict:
    """Cut the columns after the longest row of the minibatch (padding only)."""
    T = int(mb["lengths"].max())
    return {k: (v[:, : T if k == "ids" else T - 1] if v.dim() == 2 else v) for k, v in mb.items()}


def form(item: dict) -> str:
    """How an item asks its question: alone, as a later question, after a system line."""
    if item.get("system"):
        return "system"
    return "later" if item.get("turn", 1) > 1 else "alone"


class PromptPicker:
    """Prompts for a rollout: every task in turn (the same number of prompts each, the
    remainder to tasks drawn at random), and within a task a form of question drawn in the
    shares `weights` gives (the evaluation's); with balanced=False, items at random."""

    def __init__(self, items: list[dict], weights: dict[str, float], balanced: bool) -> None:
        self.items, self.balanced, self.weights = items, balanced, weights
        self.pools: dict[str, dict[str, list[int]]] = {}
        for i, item in enumerate(items):
            self.pools.setdefault(item.get("task", ""), {}).setdefault(form(item), []).append(i)

    def draw(self, n: int, rng: np.random.Generator) -> list[dict]:
        if not self.balanced:  # without replacement, unless there are fewer items than n
            picks = rng.choice(len(self.items), n, replace=n > len(self.items))
            return [self.items[i] for i in picks]
        tasks = sorted(self.pools)
        counts = [n // len(tasks)] * len(tasks)
        for t in rng.permutation(len(tasks))[: n % len(tasks)]:
            counts[t] += 1
        return [
            self.items[i] for t, c in zip(tasks, counts, strict=True) for i in self._take(t, c, rng)
        ]

    def _take(self, task: str, n: int, rng: np.random.Generator) -> list[int]:
        """n items of a task, each of a form drawn by its weight (among the forms it has)."""
        pools = self.pools[task]
        names = sorted(pools)
        w = np.array([self.weights.get(f, 0.0) for f in names])
        p = w / w.sum() if w.sum() > 0 else np.full(len(names), 1 / len(names))
        return [pools[f][rng.integers(len(pools[f]))] for f in rng.choice(names, n, p=p)]


def form_weights(items: list[dict]) -> dict[str, float]:
    """The share of each form of question among `items` (the held-out set's: the evaluation's
    weights)."""
    counts: dict[str, int] = {}
    for item in items:
        counts[form(item)] = counts.get(form(item), 0) + 1
    return {f: c / max(1, len(items)) for f, c in counts.items()}


class Rollouts(Sampler):
    """Collects PPO's and GRPO's rollouts with the current policy; its position (rollouts
    collected, beta) goes into checkpoints."""

    def __init__(
        self,
        models: dict,
        tok,
        items: list[dict],
        settings: RolloutSettings,
        device,
        rank: int = 0,
        autocast=contextlib.nullcontext,
        weights: dict[str, float] | None = None,
    ) -> None:
        """items: the prompts, built-in task items or the user's {"messages": [...]};
        weights: the share of each form of question to draw (form_weights of the held-out
        items), or None for every form alike."""
        super().__init__(models, tok, settings, device, autocast)
        self.picker = PromptPicker(items, weights or {}, settings.balanced)
        self.rank = rank
        self.beta = settings.beta
        self.seconds = {"generation": 0.0, "scoring": 0.0}  # where collecting's time went

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.beta = int(state["iteration"]), float(state["beta"])

    def draw_items(self, n: int, attempt: int = 0) -> list[dict]:
        """n prompts, each group_size times in a row."""
        rng = np.random.default_rng([self.s.seed, self.iteration, self.rank, attempt])
        return [item for item in self.picker.draw(n, rng) for _ in range(self.s.group_size)]

    @torch.no_grad()
    def collect(self) -> Rollout:
        """One rollout with the current policy: sample, score, advantages (module doc)."""
        with self.autocast():
            items, replies, scores, gold, finished, dropped = self.gather()
            start = time.perf_counter()
            batch = self.tensors(replies)
            figures = {**self.figures(batch, scores, gold, finished), "dropped": dropped}
            batch.update(self.advantages(batch, scores))  # and the value function
        self.seconds["scoring"] += time.perf_counter() - start
        figures["beta"] = float(torch.tensor(self.beta))
        self.adapt_beta(figures["kl"], len(items))
        self.iteration += 1
        order = np.random.default_rng([self.s.seed, self.iteration, self.rank, 1])
        del batch["sampled_logprobs"]
        return Rollout(batch, figures, order)

    def gather(self) -> tuple:
        """The rollout's items, replies, scores, gold and finished flags, and the share of
        groups dropped for having no signal (all scores the same; advantage=group with
        drop_constant_groups), more prompts drawn in their place, MAX_ATTEMPTS draws at most.
        When every group drawn had no signal, the last draw is kept (its advantages are 0)."""
        need = self.s.rollout_prompts
        drop = self.s.advantage == "group" and self.s.drop_constant_groups
        kept, dropped, drawn = [], [], 0
        for attempt in range(MAX_ATTEMPTS if drop else 1):
            start = time.perf_counter()
            items = self.draw_items(need - len(kept), attempt)
            replies = self.sample(items, attempt)
            self.seconds["generation"] += time.perf_counter() - start
            groups = self.groups(items, replies, *self.score(items, replies))
            drawn += len(groups)
            constant = [bool(torch.all(g[2] == g[2][0])) and drop for g in groups]
            kept += [g for g, c in zip(groups, constant, strict=True) if not c]
            dropped = [g for g, c in zip(groups, constant, strict=True) if c]
            if len(kept) >= need:
                break
        share = 1 - len(kept) / max(1, drawn)
        parts = kept or dropped
        return (
            [i for g in parts for i in g[0]],
            [r for g in parts for r in g[1]],
            *(torch.cat([g[n] for g in parts]) for n in (2, 3, 4)),
            share,
        )

    def groups(self, items, replies, scores, gold, finished) -> list[tuple]:
        """The draw cut into its groups: (items, replies, scores, gold, finished) of each
        prompt's group_size replies."""
        k = self.s.group_size
        cut = [slice(g, g + k) for g in range(0, len(items), k)]
        return [(items[c], replies[c], scores[c], gold[c], finished[c]) for c in cut]

    def advantages(self, batch: dict, scores: torch.Tensor) -> dict:
        """Group-relative advantages from the scores alone, or GAE over per-token rewards
        (the KL to the reference in them, the score at the last token) with the value
        function's targets."""
        mask, old, ref = batch["mask"], batch["old_logprobs"], batch["ref_logprobs"]
        if self.s.advantage == "group":
            group = torch.arange(mask.size(0)) // self.s.group_size
            per_reply = group_advantages(scores, group, self.s.scale_rewards)  # (B,)
            return {"advantages": mask * per_reply[:, None]}
        ids = batch["ids"].to(self.device)
        values = self.models["value"](ids).float().cpu()[:, :-1] * mask  # (B, T-1)
        advantages, returns = torch.zeros_like(mask), torch.zeros_like(mask)
        for b in range(mask.size(0)):
            where = mask[b].bool()
            rewards = kl_rewards(old[b, where], ref[b, where], float(scores[b]), self.beta)
            advantages[b, where], returns[b, where] = gae(
                rewards, values[b, where], self.s.gamma, self.s.lam
            )
        return {"advantages": whiten(advantages, mask), "returns": returns, "old_values": values}

    def adapt_beta(self, kl: float, n: int) -> None:
        target = self.s.kl_target
        if target:
            error = float(np.clip((kl - target) / target, -0.2, 0.2))
            self.beta *= 1 + error * n / self.s.kl_horizon
