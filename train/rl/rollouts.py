"""PPO's data: replies sampled with the current policy, scored, turned into advantages.

One rollout (`Rollouts.collect`), as train/ppo.py's loop calls it before its updates:

    prompts   rollout_prompts prompts (x group_size each for advantage=group), drawn anew for
              every rollout and every rank from (seed, rollout number, rank)
    replies   sampled with the KV-cache sampler at temperature 1 (model/generate.py), with
              their log-probabilities pi_old(a_t | s_t); a reply that does not end its turn
              within reply_tokens gets `unfinished_penalty` as its score
    scores    the reward model's (normalised) score of each finished reply, or with
              reward=tasks the judge's grade (data/judge.py); the judge's grade is kept
              beside it in either case: the gold score that shows reward hacking
    rewards   per token: -beta (log pi_old - log pi_ref), plus the score at the last token
    advantages GAE from the value function, or group-relative (train/rl/advantages.py)

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
from tqdm import tqdm

from checks import Settings, choice, integer, number, setting
from data.batching import pad_rows
from data.instruct import prompt_messages
from data.judge import grade
from model.generate import Completion, complete
from tokenizer.chat import render_prompt

from .advantages import gae, group_advantages, kl_rewards, whiten
from .losses import reply_logprobs

FIGURES = ("score", "gold", "kl", "length", "beta", "unfinished")  # of every rollout


@dataclass
class SamplingSettings(Settings):
    """How replies are sampled and scored (values and meaning in conf/ppo.yaml)."""

    reply_tokens: int = setting(integer(1))
    sample_batch: int = setting(integer(1))
    reward: str = setting(choice("model", "tasks"))
    unfinished_penalty: float = setting(number())
    seed: int = setting(integer())


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
    gamma: float = setting(number(0, 1))
    lam: float = setting(number(0, 1))


@dataclass
class Rollout:
    """One rollout: its tensors (ids (B, T); per reply token, (B, T-1): mask, old_logprobs,
    advantages, and with a value function returns and old_values) and its figures."""

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


class Sampler:
    """Samples replies with a policy and scores them: with the reward model (or the judge),
    the judge's grade beside it (the gold), and the KL to the reference."""

    def __init__(
        self,
        models: dict,
        tok,
        settings: SamplingSettings,
        device,
        autocast=contextlib.nullcontext,
    ) -> None:
        """models: "policy" (the GPT sampled from), "reference" (frozen SFT), "reward"
        (ScalarModel, or None for reward=tasks), and for Rollouts "value" (or None)."""
        self.models, self.tok, self.s = models, tok, settings
        self.device, self.autocast = device, autocast
        self.iteration = 0  # seeds the sampling: rollouts collected so far

    @torch.no_grad()
    def measure(self, items: list[dict]) -> dict:
        """One reply sampled per item and scored as in a rollout: the mean score, gold and
        KL to the reference (for reports on held-out prompts); nothing is learnt."""
        keys, size = ("score", "gold", "kl", "length", "unfinished"), self.s.sample_batch
        sums = dict.fromkeys(keys, 0.0)
        for first in tqdm(range(0, len(items), size), desc="sampled replies", leave=False):
            chunk = items[first : first + size]
            with self.autocast():
                figures = self.score(chunk, self.sample(chunk))[3]
            for k in keys:
                sums[k] += figures[k] * len(chunk)
        return {k: v / len(items) for k, v in sums.items()}

    def sample(self, items: list[dict]) -> list[tuple[list[int], Completion]]:
        policy = self.models["policy"]
        was_training = policy.training
        policy.eval()
        T = policy.config.block_size  # prompt + reply must fit the context, for training
        prompts = [render_prompt(self.tok, prompt_messages(item))[-(T - 1) :] for item in items]
        budgets = [min(self.s.reply_tokens, T - len(p)) for p in prompts]
        g = torch.Generator(device=self.device).manual_seed(self.s.seed * 7919 + self.iteration)
        size, done = self.s.sample_batch, []
        chunks = range(0, len(prompts), size)
        for first in tqdm(chunks, desc="sampling", leave=False, disable=len(chunks) < 4):
            done += complete(
                policy,
                prompts[first : first + size],
                budgets[first : first + size],
                temperature=1.0,
                logprobs=True,
                generator=g,
                stop_ids=(self.tok.end_id, self.tok.eos_id),
            )
        policy.train(was_training)
        return list(zip(prompts, done, strict=True))

    def score(self, items, replies) -> tuple[dict, torch.Tensor, torch.Tensor, dict]:
        """The replies as tensors (ids (B, T); per reply token (B, T-1) its mask and old
        log-probs), the reference's log-probs (B, T-1), the scores (B,) and the figures."""
        ids, lengths = pad_rows([p + c.tokens for p, c in replies], self.tok.pad_id)  # (B, T)
        mask = torch.zeros(ids.size(0), ids.size(1) - 1)  # (B, T-1): 1 on reply tokens
        old = torch.zeros_like(mask)
        for b, (p, c) in enumerate(replies):
            mask[b, len(p) - 1 : len(p) - 1 + len(c.tokens)] = 1
            old[b, len(p) - 1 : len(p) - 1 + len(c.tokens)] = torch.tensor(c.logprobs)
        ids_d = ids.to(self.device)
        ref = reply_logprobs(self.models["reference"](ids_d)[0], ids_d).cpu() * mask
        finished = [c.stopped and c.tokens[-1] == self.tok.end_id for _, c in replies]
        texts = [self.tok.decode(c.text_tokens) for _, c in replies]
        gold = torch.tensor(
            [self.gold(i, t, f) for i, t, f in zip(items, texts, finished, strict=True)]
        )
        scores = self.reward(ids_d, lengths, gold, finished)
        batch = {"ids": ids, "lengths": lengths, "mask": mask, "old_logprobs": old}
        kl = ((old - ref) * mask).sum(1)  # (B,) per reply
        figures = {
            "score": scores.mean(),
            "gold": gold.nanmean(),
            "kl": kl.mean(),
            "length": mask.sum(1).mean(),
            "unfinished": 1 - torch.tensor(finished, dtype=torch.float).mean(),
        }
        return batch, ref, scores, {k: float(v) for k, v in figures.items()}

    @staticmethod
    def gold(item: dict, text: str, finished: bool) -> float:
        """The judge's grade of a reply (0 if it never ended its turn; NaN if the item has
        no answer to judge by)."""
        if "answer" not in item:
            return float("nan")
        return grade(item, text) if finished else 0.0

    def reward(self, ids, lengths, gold, finished) -> torch.Tensor:
        """The score of each reply: the reward model's (or the judge's) for a finished one,
        the fixed penalty for one that never ended its turn."""
        if self.s.reward == "tasks":
            scores = gold.clone()
        else:
            scores = self.models["reward"](ids, lengths.to(ids.device)).float().cpu()
        done = torch.tensor(finished)
        return torch.where(done, scores, torch.full_like(scores, self.s.unfinished_penalty))


class Rollouts(Sampler):
    """Collects PPO's rollouts with the current policy; its position (rollouts collected,
    beta) goes into checkpoints."""

    def __init__(
        self,
        models: dict,
        tok,
        items: list[dict],
        settings: RolloutSettings,
        device,
        rank: int = 0,
        autocast=contextlib.nullcontext,
    ) -> None:
        """items: the prompts, built-in task items or the user's {"messages": [...]}."""
        super().__init__(models, tok, settings, device, autocast)
        self.items, self.rank = items, rank
        self.beta = settings.beta
        self.seconds = {"generation": 0.0, "scoring": 0.0}  # where collecting's time went

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.beta = int(state["iteration"]), float(state["beta"])

    def draw_items(self) -> list[dict]:
        rng = np.random.default_rng([self.s.seed, self.iteration, self.rank])
        picks = rng.choice(len(self.items), self.s.rollout_prompts, replace=False)
        return [self.items[i] for i in picks for _ in range(self.s.group_size)]

    @torch.no_grad()
    def collect(self) -> Rollout:
        """One rollout with the current policy: sample, score, advantages (module doc)."""
        items = self.draw_items()
        start = time.perf_counter()
        with self.autocast():
            replies = self.sample(items)
            sampled = time.perf_counter()
            batch, ref, scores, figures = self.score(items, replies)
            batch.update(self.advantages(batch, ref, scores))  # and the value function
        self.seconds["generation"] += sampled - start
        self.seconds["scoring"] += time.perf_counter() - sampled
        figures["beta"] = float(torch.tensor(self.beta))
        self.adapt_beta(figures["kl"], len(items))
        self.iteration += 1
        order = np.random.default_rng([self.s.seed, self.iteration, self.rank, 1])
        return Rollout(batch, figures, order)

    def advantages(self, batch: dict, ref: torch.Tensor, scores: torch.Tensor) -> dict:
        """Per-token rewards, then advantages (and the value targets) for every reply."""
        mask, old = batch["mask"], batch["old_logprobs"]
        advantages, out = torch.zeros_like(mask), {}
        rewards = []
        for b in range(mask.size(0)):
            where = mask[b].bool()
            rewards.append(kl_rewards(old[b, where], ref[b, where], float(scores[b]), self.beta))
        if self.s.advantage == "group":
            returns = torch.stack([r.sum() for r in rewards])  # (B,)
            group = torch.arange(len(rewards)) // self.s.group_size
            per_reply = group_advantages(returns, group)
            out["advantages"] = mask * per_reply[:, None]
            return out
        ids = batch["ids"].to(self.device)
        values = self.models["value"](ids).float().cpu()[:, :-1] * mask  # (B, T-1)
        returns = torch.zeros_like(mask)
        for b, r in enumerate(rewards):
            where = mask[b].bool()
            advantages[b, where], returns[b, where] = gae(
                r, values[b, where], self.s.gamma, self.s.lam
            )
        return {"advantages": whiten(advantages, mask), "returns": returns, "old_values": values}

    def adapt_beta(self, kl: float, n: int) -> None:
        target = self.s.kl_target
        if target:
            error = float(np.clip((kl - target) / target, -0.2, 0.2))
            self.beta *= 1 + error * n / self.s.kl_horizon
