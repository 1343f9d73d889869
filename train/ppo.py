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

Each rollout (train/rollouts.py) samples replies to a batch of prompts, scores them, turns
the per-token rewards into advantages (train/advantages.py), and the shared loop takes
ppo_epochs passes of minibatch updates over it (train/losses.py: ppo_step):

    r_t  = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))   (+ the score at the last token)
    L    = -mean min(rho A, clip(rho, 1-eps, 1+eps) A)  +  vf_coef * L_V  (+ ptx_coef * L_ptx)

Every rollout logs the reward model's score beside the judge's grade of the same replies
(the gold); the run ends with a PNG of both against the KL (train/plots.py), and the SFT
and PPO models scored on the same held-out items (eval.json).
"""

import copy
import dataclasses
import math
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from data.instruct import to_prompt_item
from data.loader import TokenLoader, eval_windows
from data.prepare import prepare
from data.records import file_entry, read_data_file
from errors import UserError, entry_point
from model.heads import PolicyWithValue

from .checkpoint import CHECKPOINT_NAME, load_kind, load_policy
from .lm_eval import language_model_metrics
from .losses import ppo_step
from .metrics import read_metrics
from .plots import reward_vs_kl
from .rollouts import Rollouts, RolloutSettings
from .settings import (
    EVAL_FILES,
    MAX_BAD_FRACTION,
    TASKS,
    choice,
    file_list,
    flag,
    integer,
    number,
    optional,
    text,
)
from .stage import Stage
from .task_eval import builtin_tasks, check_budget, eval_file_items, format_table, score

RULES = {
    "init_from": text(),
    "reward_model": text(),
    "prompt_files": file_list(),
    "eval_files": EVAL_FILES,
    **MAX_BAD_FRACTION,
    **TASKS,
    "gamma": number(0, 1),
    "lam": number(0, 1),
    "kl_horizon": integer(1),
    "ptx_batch_size": integer(1),
    "ptx_seq_len": integer(1),
    "ptx_eval_tokens": integer(1),
    "report_bpb": flag(),
    "rollout_prompts": integer(1),
    "group_size": integer(1),
    "reply_tokens": integer(1),
    "ppo_epochs": integer(1),
    "minibatch_size": integer(1),
    "iterations": integer(1),
    "beta": number(0),
    "kl_target": optional(number(above=0)),
    "advantage": choice("gae", "group"),
    "reward": choice("model", "tasks"),
    "clip": number(above=0, below=1),
    "value_clip": number(above=0),
    "vf_coef": number(0),
    "ptx_coef": number(0),
    "unfinished_penalty": number(),
    "eval_max_new_tokens": integer(1),
    "max_iters": optional(integer(0)),
}


def prompt_items(cfg: DictConfig, log) -> tuple[list[dict], list[dict]]:
    """(rollout prompts, held-out items): the built-in tasks' training and held-out items,
    and the user's prompt files (JSONL {"prompt"} or {"messages"}) and eval files."""
    train, test = [], []
    if cfg.tasks.weight > 0:
        tasks = builtin_tasks(cfg)
        train, test = tasks.train, tasks.test
    for entry in cfg.prompt_files:
        path, _ = file_entry(entry, "prompt_files")
        report = read_data_file(path, to_prompt_item, cfg.max_bad_fraction, log, what="prompt")
        train += [{"task": Path(path).stem, "match": "exact", **item} for item in report.items]
    test += eval_file_items(cfg.eval_files, cfg.max_bad_fraction, [i["task"] for i in test], log)
    if not train:
        raise UserError("no prompts: set tasks.weight > 0 or give prompt_files=[...]")
    if cfg.reward == "tasks" and not all("answer" in item for item in train):
        raise UserError(
            "reward=tasks scores replies against the items' answers, and some prompts have "
            'none: give every prompt_files record an "answer", or use reward=model'
        )
    return train, test


def build_models(cfg: DictConfig, stage: Stage):
    """(the model to train, the frozen models, the tokenizer, the SFT checkpoint's path)."""
    sft, tok, init = load_policy(cfg.init_from)
    frozen = {"reference": copy.deepcopy(sft).requires_grad_(False)}
    if cfg.reward == "model":
        frozen["reward"] = load_kind(cfg.reward_model, "reward")[0].requires_grad_(False)
    if cfg.advantage == "gae":
        if cfg.reward != "model":
            raise UserError("advantage=gae starts its value function from the reward model: "
                            "use reward=model, or advantage=group with reward=tasks")  # fmt: skip
        model = PolicyWithValue(sft.config)
        model.policy.load_state_dict(sft.state_dict())
        model.value.load_state_dict(frozen["reward"].state_dict())
    else:
        model = sft
    if stage.resumed is not None:
        kind = "policy_value" if cfg.advantage == "gae" else "gpt"
        model = load_kind(stage.resumed["path"], kind)[0]
    for m in frozen.values():
        m.to(stage.runtime.device).eval()
    return model, frozen, tok, init["path"]


def rollout_source(cfg, model, frozen, tok, items, stage: Stage, ptx=None) -> Rollouts:
    fields = {f.name for f in dataclasses.fields(RolloutSettings)}
    settings = RolloutSettings(**{k: cfg[k] for k in fields if k in cfg})
    is_pv = isinstance(model, PolicyWithValue)
    models = {**frozen, "policy": model.policy if is_pv else model,
              "value": model.value if is_pv else None}  # fmt: skip
    rt = stage.runtime
    return Rollouts(models, tok, items, settings, rt.device, rt.rank, ptx, rt.autocast)


def held_out_report(cfg, policy, frozen, tok, items, stage: Stage) -> dict:
    """Exact match (greedy) on the held-out items, and the mean score, gold and KL to the
    reference of one sampled reply per held-out prompt."""
    rt = stage.runtime
    results = score(policy, tok, items, rt, cfg.eval_max_new_tokens)
    if results:
        probe = rollout_source(cfg, policy, frozen, tok, items, stage)
        results["sampled"] = probe.measure(items)
    return results


def pretraining_data(cfg, stage: Stage, tok):
    """The pretraining corpus (PPO-ptx's and its yardstick's), which must be in the policy's
    token ids: a corpus prepared with another tokenizer would teach other words."""
    data = stage.main_first(partial(prepare, cfg.data))
    if data.tokenizer.state() != tok.state():
        raise UserError(
            f"PPO-ptx: the corpus data={cfg.data.name} is prepared with another tokenizer "
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


def run(cfg: DictConfig) -> dict:
    with Stage("ppo", cfg, RULES) as stage:
        rt = stage.runtime
        model, frozen, tok, sft_path = build_models(cfg, stage)
        policy = model.policy if isinstance(model, PolicyWithValue) else model
        policy.to(rt.device)
        train_items, test_items = prompt_items(cfg, stage.log)
        warning = check_budget(tok, test_items, cfg.eval_max_new_tokens)
        if warning:
            stage.log(f"warning: {warning}")
        before = {}
        if stage.resumed is None:
            before = held_out_report(cfg, policy, frozen, tok, test_items, stage)
            if before:
                stage.log(f"SFT, held-out accuracy: {before['overall']['accuracy']:.1%}")
        ptx, bpb, data = None, {}, None
        if cfg.ptx_coef > 0 or cfg.report_bpb:
            data = pretraining_data(cfg, stage, tok)
            bpb["before"] = pretraining_bpb(data, policy, stage, cfg.ptx_eval_tokens)
        if cfg.ptx_coef > 0:
            ptx = TokenLoader(data.train_path, cfg.ptx_seq_len, cfg.ptx_batch_size, cfg.seed,
                              rt.rank, rt.world_size)  # fmt: skip
        source = rollout_source(cfg, model, frozen, tok, train_items, stage, ptx)
        per_rollout = cfg.ppo_epochs * math.ceil(
            cfg.rollout_prompts * cfg.group_size / cfg.minibatch_size
        )
        max_iters = cfg.max_iters if cfg.max_iters is not None else cfg.iterations * per_rollout

        seconds = {"evaluation": 0.0}

        def evaluate(m) -> dict:
            start = time.perf_counter()
            p = m.policy if isinstance(m, PolicyWithValue) else m
            r = score(p, tok, test_items, rt, cfg.eval_max_new_tokens)
            seconds["evaluation"] += time.perf_counter() - start
            return {"val_accuracy": r["overall"]["accuracy"]} if r else {}

        step = partial(ppo_step, clip=cfg.clip, value_clip=cfg.value_clip,
                       vf_coef=cfg.vf_coef, ptx_coef=cfg.ptx_coef)  # fmt: skip
        kind = "policy_value" if isinstance(model, PolicyWithValue) else "gpt"
        shown = ("rollout_score", "rollout_gold", "rollout_kl", "clip_frac", "val_accuracy")
        start = time.perf_counter()
        stage.train(model, tok, source, step, evaluate=evaluate, model_kind=kind, show=shown,
                    loop={"max_iters": max_iters}, init_from=sft_path,
                    flops_per_token=policy.flops_per_token(policy.config.block_size))  # fmt: skip
        seconds.update(source.seconds)
        seconds["optimisation"] = time.perf_counter() - start - sum(seconds.values())
        stage.log("training time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
        bpb_after = partial(pretraining_bpb, data, policy, stage, cfg.ptx_eval_tokens)
        return finish(cfg, stage, policy, frozen, tok, test_items, before, bpb, seconds, bpb_after)


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


def finish(cfg, stage: Stage, policy, frozen, tok, items, before: dict, bpb: dict,
           seconds: dict, bpb_after) -> dict:  # fmt: skip
    """The held-out comparison, the pretraining bpb after, the reward-vs-KL picture;
    seconds: where the training time went (generation, scoring, evaluation, optimisation)."""
    after = held_out_report(cfg, policy, frozen, tok, items, stage)
    if "before" in bpb:
        bpb["after"] = bpb_after()
        stage.log(f"pretraining split, bits per byte: {bpb['before']:.4f} -> {bpb['after']:.4f}")
    if not stage.is_main:
        return after
    records = read_metrics(stage.out_dir / "metrics.jsonl")
    title = f"PPO ({cfg.reward} reward, {cfg.advantage}, beta {cfg.beta:g})"
    picture = reward_vs_kl(records, stage.out_dir / "reward_vs_kl.png", title)
    stage.log(f"reward and gold against KL: {picture}")
    if after:
        results = {"sft": before, "ppo": after} if before else {"ppo": after}
        stage.log("held-out accuracy (greedy, chat format):\n" + format_table(results))
        for name, r in results.items():
            s = r["sampled"]
            stage.log(f"{name}: sampled replies' reward {s['score']:+.3f}, gold {s['gold']:.3f}, "
                      f"KL to the reference {s['kl']:.3f}")  # fmt: skip
        if before:
            stage.log(verdict(before["sampled"], after["sampled"]))
        stage.save_eval({"checkpoint": str(stage.out_dir / CHECKPOINT_NAME), **results,
                         "pretraining_bpb": bpb or None, "training_seconds": seconds,
                         "settings": OmegaConf.to_container(cfg, resolve=True)})  # fmt: skip
    return after


@entry_point("ppo")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
