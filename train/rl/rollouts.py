"""PPO's batch source: sample replies with the policy, score them, and serve minibatches.

The training loop (train/core/trainer.py) draws one minibatch per optimizer step. This source
keeps a queue of them; when it runs out, it collects a new rollout with the current policy:

    prompts   rollout_prompts prompts (x samples each for advantage=group), drawn anew for
              every rollout and every rank from (seed, rollout number, rank)
    replies   sampled with the KV-cache sampler at temperature 1 (model/generate.py), with
              their log-probabilities pi_old(a_t | s_t); a reply that does not end its turn
              within reply_tokens gets `unfinished_penalty` as its score
    scores    the reward model's (normalised) score of each finished reply, or with
              reward=tasks the judge's grade (data/judge.py); the judge's grade is kept
              beside it in either case: the gold score that shows reward hacking
    rewards   per token: -beta (log pi_old - log pi_ref), plus the score at the last token
    advantages GAE from the value function, or group-relative (train/rl/advantages.py)

and queues ppo_epochs passes over the rollout, each in a new random order, cut into
minibatches of minibatch_size replies. Every minibatch carries the rollout's figures
(rollout_score, rollout_gold, rollout_kl ...) for the loop to log. After each rollout the
KL coefficient adapts when kl_target is set (Ziegler et al. 2019):

    beta <- beta * (1 + clip((KL - KL_target) / KL_target, -0.2, 0.2) * n / horizon)

with KL the mean per-reply sum of log pi_old - log pi_ref and n the replies of the rollout.
Under DDP every rank collects its own rollouts; gradients are averaged by the loop.
"""

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from data.batching import pad_rows
from data.judge import grade
from model.generate import Completion, complete
from tokenizer.chat import render_prompt

from ..eval.task_eval import prompt_messages
from .advantages import gae, group_advantages, kl_rewards, whiten
from .losses import reply_logprobs


@dataclass
class RolloutSettings:
    """conf/ppo.yaml's rollout and reward settings."""

    rollout_prompts: int = 64  # prompts per rollout (per rank)
    group_size: int = 1  # replies per prompt: K for advantage=group
    reply_tokens: int = 48  # the reply budget
    ppo_epochs: int = 2
    minibatch_size: int = 32  # replies per minibatch
    beta: float = 0.02  # KL coefficient (the start value when adaptive)
    kl_target: float | None = None  # adaptive beta when set
    kl_horizon: int = 10000
    unfinished_penalty: float = -1.0
    advantage: str = "gae"  # gae | group
    gamma: float = 1.0
    lam: float = 0.95
    reward: str = "model"  # model: the reward model | tasks: the judge
    seed: int = 0
    sample_batch: int = 64  # prompts decoded together


class Rollouts:
    """A Batches source (train/core/trainer.py) that collects rollouts as it needs them."""

    def __init__(
        self,
        models: dict,
        tok,
        items: list[dict],
        settings: RolloutSettings,
        device,
        rank: int = 0,
        ptx=None,
        autocast=contextlib.nullcontext,
    ) -> None:
        """models: "policy" (the GPT being trained), "reference" (frozen SFT), "value"
        (ScalarModel or None), "reward" (ScalarModel or None for reward=tasks).
        items: the prompts, built-in task items or the user's {"messages": [...]}.
        ptx: an optional batch source of pretraining windows (PPO-ptx)."""
        self.models, self.tok, self.items, self.s = models, tok, items, settings
        self.device, self.rank, self.ptx, self.autocast = device, rank, ptx, autocast
        self.iteration = 0  # rollouts collected so far
        self.beta = settings.beta
        self.queue: list[dict] = []
        self.last: dict = {}  # the last rollout's figures
        self.seconds = {"generation": 0.0, "scoring": 0.0}  # where collecting's time went

    # -- the Batches protocol -------------------------------------------------------
    def next_batch(self) -> dict:
        if not self.queue:
            self.queue = self.collect()
        batch = self.queue.pop(0)
        if self.ptx is not None:
            batch = {**batch, "ptx": self.ptx.next_batch()[0]}  # (B, T) pretraining windows
        return batch

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.beta, self.queue = int(state["iteration"]), float(state["beta"]), []

    # -- collecting -----------------------------------------------------------------
    def draw_items(self) -> list[dict]:
        rng = np.random.default_rng([self.s.seed, self.iteration, self.rank])
        picks = rng.choice(len(self.items), self.s.rollout_prompts, replace=False)
        return [self.items[i] for i in picks for _ in range(self.s.group_size)]

    @torch.no_grad()
    def collect(self) -> list[dict]:
        """One rollout, as ppo_epochs x (replies / minibatch_size) minibatches."""
        items = self.draw_items()
        start = time.perf_counter()
        with self.autocast():
            replies = self.sample(items)
            sampled = time.perf_counter()
            batch, ref, scores = self.score(items, replies)  # reference and reward model
            batch.update(self.advantages(batch, ref, scores))  # and the value function
        self.seconds["generation"] += sampled - start
        self.seconds["scoring"] += time.perf_counter() - sampled
        self.adapt_beta(batch["rollout_kl"].item(), len(items))
        self.iteration += 1
        return self.minibatches(batch)

    @torch.no_grad()
    def measure(self, items: list[dict]) -> dict:
        """One reply sampled per item and scored as in a rollout: the mean score, gold and
        KL to the reference (for reports on held-out prompts); nothing is learnt."""
        keys, size = ("score", "gold", "kl", "length", "unfinished"), self.s.sample_batch
        sums = dict.fromkeys(keys, 0.0)
        for first in tqdm(range(0, len(items), size), desc="sampled replies", leave=False):
            chunk = items[first : first + size]
            with self.autocast():
                self.score(chunk, self.sample(chunk))
            for k in keys:
                sums[k] += self.last[k] * len(chunk)
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
            done += complete(policy, prompts[first : first + size], budgets[first : first + size],
                             temperature=1.0, logprobs=True, generator=g,
                             stop_ids=(self.tok.end_id, self.tok.eos_id))  # fmt: skip
        policy.train(was_training)
        return list(zip(prompts, done, strict=True))

    def score(self, items, replies) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """The rollout as tensors (ids (B, T); per reply token (B, T-1) its mask and old
        log-probs; its figures), the reference's log-probs (B, T-1) and the scores (B,)."""
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
        stats = {"score": scores.mean(), "gold": gold.nanmean(), "kl": kl.mean(),
                 "length": mask.sum(1).mean(), "beta": torch.tensor(self.beta),
                 "unfinished": 1 - torch.tensor(finished, dtype=torch.float).mean()}  # fmt: skip
        self.last = {k: float(v) for k, v in stats.items()}
        return {**batch, **{f"rollout_{k}": v for k, v in stats.items()}}, ref, scores

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

    def minibatches(self, batch: dict) -> list[dict]:
        B = batch["ids"].size(0)
        rng = np.random.default_rng([self.s.seed, self.iteration, self.rank, 1])
        out = []
        for _ in range(self.s.ppo_epochs):
            order = rng.permutation(B)
            for first in range(0, B, self.s.minibatch_size):
                rows = torch.as_tensor(order[first : first + self.s.minibatch_size])
                mb = {k: (v[rows] if v.dim() > 0 else v) for k, v in batch.items()}
                out.append(_trim(mb))
        return out


def _trim(mb: dict) -> dict:
    """Cut the columns after the longest row of the minibatch (padding only)."""
    T = int(mb["lengths"].max())
    return {k: (v[:, : T if k == "ids" else T - 1] if v.dim() == 2 else v) for k, v in mb.items()}
