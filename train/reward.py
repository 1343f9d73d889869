"""python -m train.reward: the reward model (make rm), InstructGPT's step 2.

load the SFT checkpoint; the reward model is its trunk with a scalar head (model/heads.py)
preference data: the built-in set (the SFT model's samples ranked by the tasks' judge,
    train/preference_data.py) and/or the user's files (data/preferences.py)
train on comparisons with the shared loop: every response of a prompt scored once,
    all the prompt's pairs in one batch (train/losses.py: reward_step)
normalise: shift the head's bias so that the SFT model's samples score 0 on average
score the held-out pairs (train/reward_eval.py); write eval.json

r(x, y)  = w . h_L(x, y)[last token] + b            the head reads the final <|end|>
loss     = -log sigmoid( r(x, y_w) - r(x, y_l) )     averaged per prompt, then over prompts
b       <- b - mean over SFT samples of r(x, y)      after training (InstructGPT's shift)
"""

import math
from functools import partial

import torch
from omegaconf import DictConfig, OmegaConf

from data.batching import LengthGroupedLoader
from data.preferences import collate_groups, load_preference_data, render_group
from errors import UserError, entry_point
from model.heads import ScalarModel

from .checkpoint import CHECKPOINT_NAME, load_kind, load_model
from .losses import reward_step
from .preference_data import builtin_preferences
from .reward_eval import format_reward_table, group_rewards, reward_metrics
from .settings import (
    MAX_BAD_FRACTION,
    PREFERENCES,
    TASKS,
    TRAINING_FILES,
    file_list,
    integer,
    number,
    optional,
    text,
)
from .stage import Stage
from .task_eval import builtin_tasks

RULES = {
    "init_from": text(),
    "files": TRAINING_FILES,
    "eval_files": file_list(),
    "batch_size": integer(1),
    "epochs": number(above=0),
    "max_iters": optional(integer(0)),
    **MAX_BAD_FRACTION,
    **TASKS,
    **PREFERENCES,
}


def reward_model_from(sft) -> ScalarModel:
    """The SFT model's trunk (its weights) with a new scalar head that starts at 0."""
    model = ScalarModel(sft.config)
    model.gpt.load_state_dict(sft.state_dict())
    return model


def preference_groups(
    cfg: DictConfig, stage: Stage, sft, tok, sft_path: str, keep_builtin=None
) -> dict:
    """{"train": groups, "test": groups}: the built-in set and the user's files;
    keep_builtin(groups), when given, selects among the built-in training groups (DPO's
    min_chosen_score: the judge's scores, which users' files do not share)."""
    sets = {"train": [], "test": []}
    if cfg.preferences.builtin:
        tasks = builtin_tasks(cfg)
        device = stage.runtime.device
        build = partial(
            builtin_preferences, cfg, sft.to(device), tok, tasks, sft_path, device, stage.log
        )
        sets = stage.main_first(build)
        if keep_builtin is not None:
            sets["train"] = keep_builtin(sets["train"])
    if cfg.files:
        sources = OmegaConf.to_container(cfg.files, resolve=True)
        sets["train"] += load_preference_data(sources, cfg.max_bad_fraction, cfg.seed, stage.log)
    for path in cfg.eval_files:
        sets["test"] += load_preference_data(
            [path], cfg.max_bad_fraction, cfg.seed, stage.log, setting="eval_files"
        )
    if not sets["train"]:
        raise UserError("no preference data: set preferences.builtin=true or give files=[...]")
    return sets


def rendered(tok, groups, block_size: int, what: str, log) -> list:
    out = [r for r in (render_group(tok, g, block_size) for g in groups) if r is not None]
    pairs = sum(len(r.pairs) for r in out)
    log(f"{what}: {len(out)} prompts, {sum(len(r.rows) for r in out)} replies, {pairs} pairs")
    return out


def normalise(model: ScalarModel, groups, pad_id: int, stage: Stage) -> float:
    """Shift the head's bias so that the mean reward over `groups`' replies is 0."""
    model.eval()
    with stage.runtime.autocast():
        rewards = torch.cat(group_rewards(model, groups, pad_id, stage.runtime.device))
    offset = float(rewards.mean())
    with torch.no_grad():
        model.head.proj.bias -= offset
    return offset


def run(cfg: DictConfig) -> dict:
    with Stage("reward", cfg, RULES) as stage:
        rt = stage.runtime
        sft, tok, init = load_model(cfg.init_from)
        groups = preference_groups(cfg, stage, sft, tok, init["path"])
        model = reward_model_from(sft)
        if stage.resumed is not None:
            model, tok, _ = load_kind(stage.resumed["path"], "reward")
        T = model.config.block_size
        train = rendered(tok, groups["train"], T, "training comparisons", stage.log)
        test = rendered(tok, groups["test"], T, "held-out comparisons", stage.log)
        pad = partial(collate_groups, pad_id=tok.pad_id)
        loader = LengthGroupedLoader(train, lambda g: g.length, pad, cfg.batch_size, cfg.seed,
                                     rt.rank, rt.world_size)  # fmt: skip
        per_step = cfg.batch_size * cfg.grad_accum * rt.world_size
        max_iters = (
            cfg.max_iters
            if cfg.max_iters is not None
            else math.ceil(cfg.epochs * len(train) / per_step)
        )

        def evaluate(m) -> dict:
            if not test:
                return {}
            figures = reward_metrics(m, test, tok.pad_id, rt.device)
            return {
                "val_accuracy": figures["pairwise_accuracy"],
                "val_rank_correlation": figures["rank_correlation"],
            }

        builtin_dir = str(cfg.preferences.dir) if cfg.preferences.builtin else None
        stage.train(model, tok, loader, reward_step, evaluate=evaluate, model_kind="reward",
                    flops_per_token=model.gpt.flops_per_token(T),
                    loop={"max_iters": max_iters}, init_from=init["path"],
                    preferences=builtin_dir)  # fmt: skip
        # the held-out replies are the SFT model's own samples; the built-in training set
        # also holds off-task replies (preference_data.py), which would pull the mean down
        offset = normalise(model, test or train, tok.pad_id, stage)
        which = "held-out" if test else "training"
        stage.log(f"normalised: the {which} replies' mean reward {offset:+.4f} is now 0")
        stage.update_checkpoint(model, reward_offset=offset)
        if not test:
            return {}
        model.eval()
        with torch.no_grad(), rt.autocast():
            figures = reward_metrics(model, test, tok.pad_id, rt.device)
        stage.log("held-out comparisons:\n" + format_reward_table(figures))
        stage.save_eval({"checkpoint": str(stage.out_dir / CHECKPOINT_NAME), "reward": figures})
        return figures


@entry_point("reward")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
