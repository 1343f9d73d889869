"""Replies sampled from a policy and scored: the measurement both the RL stage and the
side-by-side comparisons make.

For each prompt a reply is sampled at temperature 1 (model/generate.py) with the
evaluation's budget (2 n + 8 tokens for an answer of n tokens; reply_tokens for a prompt
without one), then scored: by the reward model, or with reward=tasks the tasks' judge
(data/judge.py), the judge's grade kept beside it in either case (the gold), a reply that
never ends its turn given `unfinished_penalty`; and measured: its log-probabilities under
the policy (a training forward in eval mode) and the reference, so its KL to the reference.
"""

import contextlib
from dataclasses import dataclass

import torch
from tqdm import tqdm

from checks import Settings, choice, flag, integer, number, setting
from data.batching import pad_rows
from data.instruct import prompt_messages, reply_budgets
from data.judge import grade
from model.generate import Completion, complete, reply_logprobs
from tokenizer.chat import render_prompt


@dataclass
class SamplingSettings(Settings):
    """How replies are sampled and scored (values and meaning in conf/ppo.yaml)."""

    reply_tokens: int = setting(integer(1))
    sample_batch: int = setting(integer(1))
    reward: str = setting(choice("model", "tasks"))
    partial_credit: bool = setting(flag())  # reward=tasks: the judge's graded score, or 1/0
    unfinished_penalty: float = setting(number())
    seed: int = setting(integer())


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
                replies = self.sample(chunk)
                scores, gold, finished = self.score(chunk, replies)
                batch = self.tensors(replies)
                figures = self.figures(batch, scores, gold, finished)
            for k in keys:
                sums[k] += figures[k] * len(chunk)
        return {k: v / len(items) for k, v in sums.items()}

    def sample(self, items: list[dict], stream: int = 0) -> list[tuple[list[int], Completion]]:
        """A reply to each item, with the evaluation's budget; `stream` seeds another draw
        within the same rollout."""
        policy = self.models["policy"]
        was_training = policy.training
        policy.eval()
        T = policy.config.block_size  # prompt + reply must fit the context, for training
        prompts = [render_prompt(self.tok, prompt_messages(item))[-(T - 1) :] for item in items]
        budgets = [min(b, T - len(p)) for b, p in zip(self.budgets(items), prompts, strict=True)]
        seed = self.s.seed * 7919 + self.iteration + 100_003 * stream
        g = torch.Generator(device=self.device).manual_seed(seed)
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

    def budgets(self, items: list[dict]) -> list[int]:
        """The evaluation's reply budget for items with an answer, reply_tokens for others."""
        with_answer = [i for i in items if "answer" in i]
        evaluation = iter(reply_budgets(self.tok, with_answer, None))
        return [next(evaluation) if "answer" in i else self.s.reply_tokens for i in items]

    def score(self, items, replies) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores (B,), gold (B,), finished (B,) bool) of the replies: the reward model's
        (or the judge's) score of a finished reply, the penalty for one never finished."""
        finished = torch.tensor([c.stopped and c.tokens[-1] == self.tok.end_id for _, c in replies])
        texts = [self.tok.decode(c.text_tokens) for _, c in replies]
        gold = torch.tensor(
            [self.gold(i, t, bool(f)) for i, t, f in zip(items, texts, finished, strict=True)]
        )
        if self.s.reward == "tasks":  # the judge: its grade, or right (1) and wrong (0)
            scores = gold.clone() if self.s.partial_credit else (gold == 1.0).float()
        else:
            ids, lengths = pad_rows([p + c.tokens for p, c in replies], self.tok.pad_id)
            ids = ids.to(self.device)
            scores = self.models["reward"](ids, lengths.to(self.device)).float().cpu()
        penalty = torch.full_like(scores, self.s.unfinished_penalty)
        return torch.where(finished, scores, penalty), gold, finished

    @staticmethod
    def gold(item: dict, text: str, finished: bool) -> float:
        """The judge's grade of a reply (0 if it never ended its turn; NaN if the item has
        no answer to judge by)."""
        if "answer" not in item:
            return float("nan")
        return grade(item, text) if finished else 0.0

    def tensors(self, replies) -> dict:
        """The replies as one batch: ids (B, T), lengths (B,), and per reply token (B, T-1)
        its mask, the policy's log-probs (a training forward) and the reference's, and the
        sampler's own log-probs (to check the forward against)."""
        ids, lengths = pad_rows([p + c.tokens for p, c in replies], self.tok.pad_id)  # (B, T)
        mask = torch.zeros(ids.size(0), ids.size(1) - 1)  # (B, T-1): 1 on reply tokens
        sampled = torch.zeros_like(mask)
        for b, (p, c) in enumerate(replies):
            mask[b, len(p) - 1 : len(p) - 1 + len(c.tokens)] = 1
            sampled[b, len(p) - 1 : len(p) - 1 + len(c.tokens)] = torch.tensor(c.logprobs)
        old = self.logprobs(self.models["policy"], ids) * mask
        ref = self.logprobs(self.models["reference"], ids) * mask
        return {
            "ids": ids,
            "lengths": lengths,
            "mask": mask,
            "old_logprobs": old,
            "ref_logprobs": ref,
            "sampled_logprobs": sampled,
        }

    def logprobs(self, model, ids: torch.Tensor) -> torch.Tensor:
        """log pi(ids[t+1] | ids[..t]) by a training forward in eval mode (no dropout), no
        gradient: (B, T) -> (B, T-1), on the CPU."""
        was_training = model.training
        model.eval()
        ids_d = ids.to(self.device)
        out = reply_logprobs(model(ids_d)[0], ids_d).float().cpu()
        model.train(was_training)
        return out

    def figures(self, batch: dict, scores, gold, finished) -> dict[str, float]:
        """The mean score, gold, KL to the reference (per reply), reply length, share of
        replies never finished, and the largest gap between the sampler's log-probs and
        the training forward's (float32: ~1e-5)."""
        mask = batch["mask"]
        kl = ((batch["old_logprobs"] - batch["ref_logprobs"]) * mask).sum(1)  # (B,)
        gap = ((batch["sampled_logprobs"] - batch["old_logprobs"]).abs() * mask).max()
        figures = {
            "score": scores.mean(),
            "gold": gold.nanmean(),
            "kl": kl.mean(),
            "length": mask.sum(1).mean(),
            "unfinished": 1 - finished.float().mean(),
            "sampler_gap": gap,
        }
        return {k: float(v) for k, v in figures.items()}
