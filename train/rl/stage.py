"""The reinforcement-learning stage, PPO's and GRPO's: one policy learning from its own
samples (python -m train.ppo, python -m train.grpo: the same code, other settings).

Four models, as in InstructGPT:
    policy      the GPT being trained, initialised from the SFT checkpoint
    reference   the SFT weights, frozen: the KL leash keeps the policy near them
    reward      the reward model (out/rm), frozen; with reward=tasks, the tasks' judge instead
                (RL from a verifiable reward)
    value       V(s_t), its own trunk initialised from the reward model (InstructGPT and
                TRL do so: it starts from a network that already reads how good a reply
                is, and its loss never pulls on the policy's weights); none with
                advantage=group (GRPO), which needs no value function

Dropout is off in every one of them: the updates are corrections of the policy's own
samples, not regularised training, and a ratio must start at exactly 1.

The loop, written out in `train_policy`:

    while the budget lasts:
        rollout = sample replies to a batch of prompts with the policy, score them, and turn
                  them into advantages (train/rl/rollouts.py, advantages.py)
        log the rollout's figures (reward, gold, KL, length, groups dropped ...) once
        for each of ppo_epochs passes, for each minibatch of the rollout:
            one optimizer update (the shared Trainer's) on train/rl/losses.py: ppo_step

The checkpoint kept is chosen on the validation split (greedy accuracy, every
eval_interval updates: best.pt), never on the test items, which are scored once at the end,
for the kept checkpoint and the last, beside the SFT model: per task, with McNemar's paired
test, and on a fixed subset one sample's accuracy and pass@k (train/eval/compare.py).
Every rollout logs the reward model's score beside the judge's grade of the same replies
(the gold); the run ends with a PNG of both against the KL (train/eval/plots.py).
"""

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data.instruct import to_prompt_item
from data.loader import TokenLoader, eval_windows
from data.prepare import prepare
from data.records import file_entry, read_data_file
from data.tasks import builtin_tasks
from errors import UserError
from model.heads import PolicyWithValue

from ..core.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_kind, load_policy
from ..core.metrics import read_metrics
from ..core.stage import Stage
from ..core.trainer import Trainer
from ..eval.compare import format_paired
from ..eval.lm_eval import language_model_metrics
from ..eval.plots import reward_vs_kl
from ..eval.sampled import sampling_entry
from ..eval.task_eval import check_budget, eval_file_items, format_table, score
from .losses import ppo_step
from .rollouts import FIGURES, Rollouts, form_weights

if TYPE_CHECKING:  # the settings are built from this package's pieces (train/settings.py)
    from ..settings import PPOSettings


@dataclass
class Items:
    """The RL stage's items: rollout prompts, the validation items that choose the
    checkpoint, the test items scored once at the end, and the evaluation's forms."""

    train: list[dict]
    val: list[dict]
    test: list[dict]
    weights: dict[str, float]  # the share of each form of question among the held-out items


def prompt_items(s: "PPOSettings", log) -> Items:
    """The built-in tasks' training, validation and test items, and the user's prompt files
    (JSONL {"prompt"} or {"messages"}) and eval files (more test items)."""
    train, val, test, held_out = [], [], [], []
    if s.tasks.weight > 0:
        tasks = builtin_tasks(s.tasks, s.data)
        train, val, test = tasks.train, tasks.val, tasks.test
        held_out = tasks.test + tasks.test_turns
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
    return Items(train, val, test, form_weights(held_out))


def build_models(s: "PPOSettings", stage: Stage):
    """(the model to train, the frozen models, the tokenizer, the SFT checkpoint's path), all
    without dropout (the module docstring)."""
    sft, tok, init = load_policy(s.init_from, dropout=0.0)
    frozen = {"reference": copy.deepcopy(sft).requires_grad_(False)}
    if s.reward == "model":
        rm = load_kind(s.reward_model, "reward", dropout=0.0)[0]
        frozen["reward"] = rm.requires_grad_(False)
    if s.advantage == "gae":
        model = PolicyWithValue(sft.config)
        model.policy.load_state_dict(sft.state_dict())
        model.value.load_state_dict(frozen["reward"].state_dict())
    else:
        model = sft
    if stage.resumed is not None:
        kind = "policy_value" if s.advantage == "gae" else "gpt"
        model = load_kind(stage.resumed["path"], kind, dropout=0.0)[0]
    for m in frozen.values():
        m.to(stage.runtime.device).eval()
    return model, frozen, tok, init["path"]


def rollouts_for(s: "PPOSettings", model, frozen, tok, items: Items, stage: Stage) -> Rollouts:
    """A Rollouts collector of `model` (a policy with or without a value function)."""
    is_pv = isinstance(model, PolicyWithValue)
    models = {
        **frozen,
        "policy": model.policy if is_pv else model,
        "value": model.value if is_pv else None,
    }
    rt = stage.runtime
    return Rollouts(models, tok, items.train, s, rt.device, rt.rank, rt.autocast, items.weights)


def held_out_report(
    s: "PPOSettings", policy, frozen, tok, items: Items, stage: Stage, checkpoint: str | None = None
) -> dict:
    """Greedy exact match on the test items, the mean score, gold and KL to the reference of
    one sampled reply per test prompt, and (sampled_k > 0) one sample's accuracy and pass@k
    on a fixed subset, cached beside `checkpoint` when the policy is that checkpoint's."""
    rt = stage.runtime
    results = score(policy, tok, items.test, rt, s.eval_max_new_tokens)
    if results:
        sampler = Rollouts(
            {**frozen, "policy": policy, "value": None},
            tok,
            items.test,
            s,
            rt.device,
            autocast=rt.autocast,
        )
        results["sampled"] = sampler.measure(items.test)
        if s.sampled_k:
            results["sampling"] = sampling_entry(
                policy, tok, items.test, s.sampled_k, s.sampled_per_task, rt, s.seed, checkpoint
            )
    return results


def pretraining_data(s: "PPOSettings", stage: Stage, tok):
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
    """What an RL checkpoint saves of the data: the rollouts collected so far (and beta),
    the minibatches of the current rollout not yet trained on, and the pretraining windows'
    position (PPO-ptx). Saving the rest of the rollout makes a resume exact wherever the
    run stopped, in the middle of a rollout too."""

    def __init__(self, rollouts: Rollouts, ptx: TokenLoader | None) -> None:
        self.rollouts, self.ptx = rollouts, ptx
        self.pending: list[dict] = []  # the current rollout's minibatches still to train on

    def next_rollout(self, trainer: Trainer, s: "PPOSettings") -> None:
        """Collect a rollout (sample, score, advantages), log its figures, and queue its
        ppo_epochs passes of minibatches (each with its pretraining windows, PPO-ptx)."""
        rollout = self.rollouts.collect()
        figures = {f"rollout_{k}": rollout.figures[k] for k in FIGURES}
        trainer.write({"step": trainer.step, "rollout": self.rollouts.iteration, **figures})
        minibatches = rollout.minibatches(s.ppo_epochs, s.minibatch_size)
        self.pending = [self.with_ptx(mb) for mb in minibatches]

    def take(self, n: int) -> list[dict]:
        """The next n minibatches of the current rollout (one optimizer update)."""
        chunk, self.pending = self.pending[:n], self.pending[n:]
        return chunk

    def with_ptx(self, minibatch: dict) -> dict:
        if self.ptx is None:
            return minibatch
        return {**minibatch, "ptx": self.ptx.next_batch()[0]}  # (B, T) pretraining windows

    def state_dict(self) -> dict:
        ptx = self.ptx.state_dict() if self.ptx is not None else None
        return {**self.rollouts.state_dict(), "ptx": ptx, "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts.load_state_dict(state)
        self.pending = list(state.get("pending") or [])
        if self.ptx is not None and state.get("ptx"):
            self.ptx.load_state_dict(state["ptx"])


def train_policy(trainer: Trainer, data: PPOData, s: "PPOSettings") -> None:
    """The loop: collect a rollout, log its figures, then ppo_epochs passes of minibatch
    updates over it (grad_accum minibatches per update), until the budget ends."""
    kl_coef = s.beta if s.advantage == "group" else 0.0  # GRPO: the KL is a loss term
    step = partial(
        ppo_step,
        clip=s.clip,
        value_clip=s.value_clip,
        vf_coef=s.vf_coef,
        ptx_coef=s.ptx_coef,
        kl_coef=kl_coef,
    )
    with trainer.session(data):
        while trainer.going():
            if not data.pending:  # a resumed run first finishes the rollout it stopped in
                data.next_rollout(trainer, s)
            trainer.record(trainer.update(data.take(s.grad_accum), step))


def updates_per_rollout(s: "PPOSettings") -> int:
    """The optimizer updates of one rollout: ppo_epochs passes of its minibatches."""
    minibatches = math.ceil(s.rollout_prompts * s.group_size / s.minibatch_size)
    return s.ppo_epochs * math.ceil(minibatches / s.grad_accum)


def run(name: str, s: "PPOSettings") -> dict:
    """The whole stage (the module docstring); `name` ("ppo", "grpo") names its checkpoints
    and its figures."""
    with Stage(name, s) as stage:
        rt = stage.runtime
        model, frozen, tok, sft_path = build_models(s, stage)
        policy = model.policy if isinstance(model, PolicyWithValue) else model
        policy.to(rt.device)
        items = prompt_items(s, stage.log)
        warning = check_budget(tok, items.test, s.eval_max_new_tokens)
        if warning:
            stage.log(f"warning: {warning}")
        seconds = {"evaluation": 0.0}
        start = time.perf_counter()
        evaluate = validation(s, tok, items, rt, seconds)
        before = {}
        if stage.resumed is None:  # a resumed run measured SFT when it started
            before = sft_figures(s, policy, frozen, tok, items, stage, sft_path)
        ptx, bpb, corpus = pretraining_side(s, stage, tok, policy)
        seconds["before"] = time.perf_counter() - start
        data = PPOData(rollouts_for(s, model, frozen, tok, items, stage), ptx)
        updates = s.max_iters if s.max_iters is not None else s.iterations * updates_per_rollout(s)
        shown = (
            "rollout_score",
            "rollout_gold",
            "rollout_kl",
            "rollout_dropped",
            "clip_frac",
            "val_accuracy",
        )
        kind = "policy_value" if isinstance(model, PolicyWithValue) else "gpt"
        trainer = stage.trainer(
            model,
            tok,
            data,
            evaluate=evaluate,
            model_kind=kind,
            show=shown,
            max_iters=updates,
            init_from=sft_path,
            flops_per_token=policy.flops_per_token(policy.config.block_size),
        )
        train_policy(trainer, data, s)
        seconds.update(data.rollouts.seconds)
        seconds["optimisation"] = trainer.update_seconds
        stage.log("training time: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
        bpb_after = partial(pretraining_bpb, corpus, policy, stage, s.ptx_eval_tokens)
        return finish(name, s, stage, model, frozen, tok, items, before, bpb, seconds, bpb_after)


def sft_figures(s: "PPOSettings", policy, frozen, tok, items: Items, stage, sft_path) -> dict:
    """The SFT model's held-out report, and its validation accuracy: the yardstick of the
    figures the run logs."""
    before = held_out_report(s, policy, frozen, tok, items, stage, sft_path)
    if before:
        stage.log(f"SFT, held-out accuracy: {before['overall']['accuracy']:.1%}")
        sft_val = validation(s, tok, items, stage.runtime, {"evaluation": 0.0})  # in "before"
        before.update(sft_val(policy))
        if "val_accuracy" in before:
            stage.log(f"SFT, validation accuracy: {before['val_accuracy']:.1%}")
    return before


def pretraining_side(s: "PPOSettings", stage, tok, policy) -> tuple:
    """PPO-ptx's batches of the pretraining corpus (ptx_coef > 0) and its bits per byte
    before training (or report_bpb): (loader or None, {"before": bpb} or {}, corpus or None)."""
    ptx, bpb, corpus = None, {}, None
    if s.ptx_coef > 0 or s.report_bpb:
        corpus = pretraining_data(s, stage, tok)
        bpb["before"] = pretraining_bpb(corpus, policy, stage, s.ptx_eval_tokens)
    if s.ptx_coef > 0:
        rt = stage.runtime
        ptx = TokenLoader(
            corpus.train_path, s.ptx_seq_len, s.ptx_batch_size, s.seed, rt.rank, rt.world_size
        )
    return ptx, bpb, corpus


def validation(s: "PPOSettings", tok, items: Items, rt, seconds: dict):
    """The evaluation every eval_interval updates: greedy accuracy on the validation items
    (what picks best.pt), never on the test items; its time goes into seconds."""

    def evaluate(m) -> dict:
        start = time.perf_counter()
        policy = m.policy if isinstance(m, PolicyWithValue) else m
        r = score(policy, tok, items.val, rt, s.eval_max_new_tokens)
        seconds["evaluation"] += time.perf_counter() - start
        return {"val_accuracy": r["overall"]["accuracy"]} if r else {}

    return evaluate


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


def kept_policy(stage: Stage, model):
    """The policy of best.pt (the best validation accuracy), or None without one."""
    path = stage.out_dir / BEST_NAME
    if not stage.is_main or not path.is_file():
        return None
    kind = "policy_value" if isinstance(model, PolicyWithValue) else "gpt"
    kept = load_kind(path, kind, dropout=0.0)[0]
    kept = kept.policy if isinstance(kept, PolicyWithValue) else kept
    return kept.to(stage.runtime.device)


def finish(
    name: str,
    s: "PPOSettings",
    stage: Stage,
    model,
    frozen,
    tok,
    items: Items,
    before: dict,
    bpb: dict,
    seconds: dict,
    bpb_after,
) -> dict:
    """The test items scored once: the kept checkpoint's (best.pt, else the last) beside the
    last and the SFT model's, with the paired test and the sampled figures; the pretraining
    bpb after; the reward-vs-KL picture; eval.json."""
    start = time.perf_counter()
    last = model.policy if isinstance(model, PolicyWithValue) else model
    kept = kept_policy(stage, model)
    results = {"sft": before} if before else {}
    results[name] = held_out_report(s, kept or last, frozen, tok, items, stage)
    if kept is not None:
        results[f"{name}_last"] = held_out_report(s, last, frozen, tok, items, stage)
    if "before" in bpb:
        bpb["after"] = bpb_after()
        stage.log(f"pretraining split, bits per byte: {bpb['before']:.4f} -> {bpb['after']:.4f}")
    seconds["after"] = time.perf_counter() - start
    if not stage.is_main or not results.get(name):
        return results.get(name, {})
    records = read_metrics(stage.out_dir / "metrics.jsonl")
    title = f"{name.upper()} ({s.reward} reward, {s.advantage}, beta {s.beta:g})"
    picture = reward_vs_kl(records, stage.out_dir / "reward_vs_kl.png", title)
    stage.log(f"reward and gold against KL: {picture}")
    report(name, stage, results, kept is not None)
    stage.save_eval(
        {
            "checkpoint": str(stage.out_dir / (BEST_NAME if kept else CHECKPOINT_NAME)),
            "kept": "best.pt (validation)" if kept else "the last (no validation)",
            **results,
            "pretraining_bpb": bpb or None,
            "training_seconds": seconds,
            "settings": dataclasses.asdict(s),
        }
    )
    return results[name]


def report(name: str, stage: Stage, results: dict, kept: bool) -> None:
    """The held-out table, the paired comparison with SFT, the sampled replies' figures."""
    what = "the checkpoint kept on the validation split" if kept else "the last checkpoint"
    stage.log(f"held-out accuracy (greedy, chat format; {name}: {what}):\n" + format_table(results))
    if "sft" in results:
        stage.log(format_paired(results, "sft"))
    for key, r in results.items():
        m = r["sampled"]
        stage.log(
            f"{key}: sampled replies' reward {m['score']:+.3f}, gold {m['gold']:.3f}, "
            f"KL to the reference {m['kl']:.3f}"
        )
    if "sft" in results:
        stage.log(verdict(results["sft"]["sampled"], results[name]["sampled"]))
