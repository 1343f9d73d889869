"""python -m train.ppo: reinforcement learning from the reward model (make ppo), InstructGPT's
step 3.

Four models, as in InstructGPT:
    policy      the GPT being trained, initialised from the SFT checkpoint
    reference   the SFT weights, frozen: the KL leash keeps the policy near them
    reward      the reward model (out/rm), frozen; with reward=tasks, the tasks' judge instead
                (RL from a verifiable reward)
    value       V(s_t), its own trunk initialised from the reward model (InstructGPT and
                TRL do so: it starts from a network that already reads how good a reply
                is, and its loss never pulls on the policy's weights); none with
                advantage=group (GRPO), which needs no value function

The loop, written out in `train_policy`:

    while the budget lasts:
        rollout = sample replies to a batch of prompts with the policy, score them, and turn
                  the per-token rewards into advantages (train/rl/rollouts.py, advantages.py)
        log the rollout's figures (reward, gold, KL, length ...) once
        for each of ppo_epochs passes, for each minibatch of the rollout:
            one optimizer update (the shared Trainer's) on train/rl/losses.py: ppo_step

    r_t  = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))   (+ the score at the last token)
    L    = -mean min(rho A, clip(rho, 1-eps, 1+eps) A)  +  vf_coef * L_V  (+ ptx_coef * L_ptx)

Every rollout logs the reward model's score beside the judge's grade of the same replies
(the gold); the run ends with a PNG of both against the KL (train/eval/plots.py), and the SFT
and PPO models scored on the same held-out items (eval.json).
"""

import copy
import dataclasses
import math
import time
from functools import partial
from pathlib import Path

import torch

from command import entry_point
from data.instruct import to_prompt_item
from data.loader import TokenLoader, eval_windows
from data.prepare import prepare
from data.records import file_entry, read_data_file
from data.tasks import builtin_tasks
from errors import UserError
from model.heads import PolicyWithValue

from .core.checkpoint import CHECKPOINT_NAME, load_kind, load_policy
from .core.metrics import read_metrics
from .core.stage import Stage
from .core.trainer import Trainer
from .eval.lm_eval import language_model_metrics
from .eval.plots import reward_vs_kl
from .eval.task_eval import check_budget, eval_file_items, format_table, score
from .rl.losses import ppo_step
from .rl.rollouts import FIGURES, Rollouts
from .settings import PPOSettings


def prompt_items(s: PPOSettings, log) -> tuple[list[dict], list[dict]]:
    """(rollout prompts, held-out items): the built-in tasks' training and held-out items,
    and the user's prompt files (JSONL {"prompt"} or {"messages"}) and eval files."""
    train, test = [], []
    if s.tasks.weight > 0:
        tasks = builtin_tasks(s.tasks, s.data)
        train, test = tasks.train, tasks.test
    for entry in s.prompt_files:
        path, _ = file_entry(entry, "prompt_files")
        report = read_data_file(path, to_prompt_item, s.max_bad_fraction, log, what="prompt")
        train += [{"task": Path(path).stem, "match": "exact", **item} for item in report.items]
    test += eval_file_items(s.eval_files, s.max_bad_fraction, [i["task"] for i in test], log)
    if not train:
        raise UserError("no prompts: set tasks.weight > 0 or give prompt_files=[...]")
    if s.reward == "tasks" and not all("answer" in item for item in train):
        raise UserError(
            "reward=tasks scores replies against the items' answers, and some prompts have "
            'none: give every prompt_files record an "answer", or use reward=model'
        )
    return train, test


def build_models(s: PPOSettings, stage: Stage):
    """(the model to train, the frozen models, the tokenizer, the SFT checkpoint's path)."""
    sft, tok, init = load_policy(s.init_from)
    frozen = {"reference": copy.deepcopy(sft).requires_grad_(False)}
    if s.reward == "model":
        frozen["reward"] = load_kind(s.reward_model, "reward")[0].requires_grad_(False)
    if s.advantage == "gae":
        model = PolicyWithValue(sft.config)
        model.policy.load_state_dict(sft.state_dict())
        model.value.load_state_dict(frozen["reward"].state_dict())
    else:
        model = sft
    if stage.resumed is not None:
        kind = "policy_value" if s.advantage == "gae" else "gpt"
        model = load_kind(stage.resumed["path"], kind)[0]
    for m in frozen.values():
        m.to(stage.runtime.device).eval()
    return model, frozen, tok, init["path"]


def rollouts_for(s: PPOSettings, model, frozen, tok, items, stage: Stage) -> Rollouts:
    """A Rollouts collector of `model` (a policy with or without a value function)."""
    is_pv = isinstance(model, PolicyWithValue)
    models = {
        **frozen,
        "policy": model.policy if is_pv else model,
        "value": model.value if is_pv else None,
    }
    rt = stage.runtime
    return Rollouts(models, tok, items, s, rt.device, rt.rank, rt.autocast)


def held_out_report(s: PPOSettings, policy, frozen, tok, items, stage: Stage) -> dict:
    """Exact match (greedy) on the held-out items, and the mean score, gold and KL to the
    reference of one sampled reply per held-out prompt."""
    results = score(policy, tok, items, stage.runtime, s.eval_max_new_tokens)
    if results:
        results["sampled"] = rollouts_for(s, policy, frozen, tok, items, stage).measure(items)
    return results


def pretraining_data(s: PPOSettings, stage: Stage, tok):
    """The pretraining corpus (PPO-ptx's and its yardstick's), which must be in the policy's
    token ids: a corpus prepared with another tokenizer would teach other words."""
    data = stage.main_first(partial(prepare, s.data))
    if data.tokenizer.state() != tok.state():
        raise UserError(
            f"PPO-ptx: the corpus data={s.data.name} is prepared with another tokenizer "
            "than the policy's; give the data settings the model was pretrained on, or "
            "ptx_coef=0 report_bpb=false"
        )
    return data


def pretraining_bpb(data, model, stage: Stage, eval_tokens: int) -> float:
    """Bits per byte on the pretraining corpus's validation split (PPO-ptx's yardstick)."""
    val = data.meta["splits"]["val"]
    windows = eval_windows(data.val_path, model.config.block_size, 16, eval_tokens)
    model.eval()
    with torch.no_grad(), stage.runtime.autocast():
        m = language_model_metrics(model, windows, val["tokens"] / val["bytes"], stage.runtime)
    return m["val_bpb"]


class PPOData:
    """What a PPO checkpoint saves of the data: the rollouts collected so far (and beta),
    and the pretraining windows' position (PPO-ptx); it hands out the ptx windows."""

    def __init__(self, rollouts: Rollouts, ptx: TokenLoader | None) -> None:
        self.rollouts, self.ptx = rollouts, ptx

    def with_ptx(self, minibatch: dict) -> dict:
        if self.ptx is None:
            return minibatch
        return {**minibatch, "ptx": self.ptx.next_batch()[0]}  # (B, T) pretraining windows

    def state_dict(self) -> dict:
        ptx = self.ptx.state_dict() if self.ptx is not None else None
        return {**self.rollouts.state_dict(), "ptx": ptx}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts.load_state_dict(state)
        if self.ptx is not None and state.get("ptx"):
            self.ptx.load_state_dict(state["ptx"])


def train_policy(trainer: Trainer, data: PPOData, s: PPOSettings) -> None:
    """PPO's loop: collect a rollout, log its figures, then ppo_epochs passes of minibatch
    updates over it (grad_accum minibatches per update), until the budget ends."""
    step = partial(
        ppo_step, clip=s.clip, value_clip=s.value_clip, vf_coef=s.vf_coef, ptx_coef=s.ptx_coef
    )
    rollouts, n = data.rollouts, s.grad_accum
    with trainer.session(data):
        while trainer.going():
            rollout = rollouts.collect()  # sample, score, advantages
            figures = {f"rollout_{k}": rollout.figures[k] for k in FIGURES}
            trainer.write({"step": trainer.step, "rollout": rollouts.iteration, **figures})
            minibatches = [
                data.with_ptx(mb) for mb in rollout.minibatches(s.ppo_epochs, s.minibatch_size)
            ]
            for first in range(0, len(minibatches), n):
                trainer.record(trainer.update(minibatches[first : first + n], step))
                if not trainer.going():
                    break


def updates_per_rollout(s: PPOSettings) -> int:
    """The optimizer updates of one rollout: ppo_epochs passes of its minibatches."""
    minibatches = math.ceil(s.rollout_prompts * s.group_size / s.minibatch_size)
    return s.ppo_epochs * math.ceil(minibatches / s.grad_accum)


def run(settings: PPOSettings) -> dict:
    s = settings
    with Stage("ppo", s) as stage:
        rt = stage.runtime
        model, frozen, tok, sft_path = build_models(s, stage)
        policy = model.policy if isinstance(model, PolicyWithValue) else model
        policy.to(rt.device)
        train_items, test_items = prompt_items(s, stage.log)
        warning = check_budget(tok, test_items, s.eval_max_new_tokens)
        if warning:
            stage.log(f"warning: {warning}")
        before = {}
        if stage.resumed is None:
            before = held_out_report(s, policy, frozen, tok, test_items, stage)
            if before:
                stage.log(f"SFT, held-out accuracy: {before['overall']['accuracy']:.1%}")
        ptx, bpb, corpus = None, {}, None
        if s.ptx_coef > 0 or s.report_bpb:
            corpus = pretraining_data(s, stage, tok)
            bpb["before"] = pretraining_bpb(corpus, policy, stage, s.ptx_eval_tokens)
        if s.ptx_coef > 0:
            ptx = TokenLoader(
                corpus.train_path, s.ptx_seq_len, s.ptx_batch_size, s.seed, rt.rank, rt.world_size
            )
        data = PPOData(rollouts_for(s, model, frozen, tok, train_items, stage), ptx)
        max_iters = (
            s.max_iters if s.max_iters is not None else s.iterations * updates_per_rollout(s)
        )
        seconds = {"evaluation": 0.0}

        def evaluate(m) -> dict:
            start = time.perf_counter()
            p = m.policy if isinstance(m, PolicyWithValue) else m
            r = score(p, tok, test_items, rt, s.eval_max_new_tokens)
            seconds["evaluation"] += time.perf_counter() - start
            return {"val_accuracy": r["overall"]["accuracy"]} if r else {}

        kind = "policy_value" if isinstance(model, PolicyWithValue) else "gpt"
        shown = ("rollout_score", "rollout_gold", "rollout_kl", "clip_frac", "val_accuracy")
        trainer = stage.trainer(
            model,
            tok,
            data,
            evaluate=evaluate,
            model_kind=kind,
            show=shown,
            max_iters=max_iters,
            init_from=sft_path,
            flops_per_token=policy.flops_per_token(policy.config.block_size),
        )
        train_policy(trainer, data, s)
        seconds.update(data.rollouts.seconds)
        seconds["optimisation"] = trainer.update_seconds
        stage.log("training time: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
        bpb_after = partial(pretraining_bpb, corpus, policy, stage, s.ptx_eval_tokens)
        return finish(s, stage, policy, frozen, tok, test_items, before, bpb, seconds, bpb_after)


def verdict(before: dict, after: dict, tolerance: float = 0.005) -> str:
    """Whether the reward model's score (the proxy) and the judge's (the gold) of sampled
    held-out replies rose together: the check against reward hacking, in words."""
    proxy, gold = after["score"] - before["score"], after["gold"] - before["gold"]
    if gold != gold:  # NaN: no answers to judge by (the user's prompts only)
        return f"reward model {proxy:+.3f}; no gold score (the held-out items have no answers)"
    if proxy > tolerance and gold < -tolerance:
        words = "the proxy rose while the gold fell: the reward model is being over-optimised"
    elif proxy > tolerance and gold <= tolerance:
        words = "the proxy rose while the gold stalled: the reward model is being over-optimised"
    elif gold > tolerance:
        words = "the gold rose" + (" with the proxy" if proxy > tolerance else "")
    else:
        words = "neither rose"
    return f"reward model {proxy:+.3f}, gold {gold:+.3f}: {words}"


def finish(
    s: PPOSettings,
    stage: Stage,
    policy,
    frozen,
    tok,
    items,
    before: dict,
    bpb: dict,
    seconds: dict,
    bpb_after,
) -> dict:
    """The held-out comparison, the pretraining bpb after, the reward-vs-KL picture;
    seconds: where the training time went (generation, scoring, evaluation, optimisation)."""
    after = held_out_report(s, policy, frozen, tok, items, stage)
    if "before" in bpb:
        bpb["after"] = bpb_after()
        stage.log(f"pretraining split, bits per byte: {bpb['before']:.4f} -> {bpb['after']:.4f}")
    if not stage.is_main:
        return after
    records = read_metrics(stage.out_dir / "metrics.jsonl")
    title = f"PPO ({s.reward} reward, {s.advantage}, beta {s.beta:g})"
    picture = reward_vs_kl(records, stage.out_dir / "reward_vs_kl.png", title)
    stage.log(f"reward and gold against KL: {picture}")
    if after:
        results = {"sft": before, "ppo": after} if before else {"ppo": after}
        stage.log("held-out accuracy (greedy, chat format):\n" + format_table(results))
        for name, r in results.items():
            m = r["sampled"]
            stage.log(
                f"{name}: sampled replies' reward {m['score']:+.3f}, gold {m['gold']:.3f}, "
                f"KL to the reference {m['kl']:.3f}"
            )
        if before:
            stage.log(verdict(before["sampled"], after["sampled"]))
        stage.save_eval(
            {
                "checkpoint": str(stage.out_dir / CHECKPOINT_NAME),
                **results,
                "pretraining_bpb": bpb or None,
                "training_seconds": seconds,
                "settings": dataclasses.asdict(s),
            }
        )
    return after


@entry_point("ppo", PPOSettings)
def main(settings: PPOSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
