"""python -m train.reward: the reward model (make rm), InstructGPT's step 2.

load the SFT checkpoint; the reward model is its trunk with a scalar head (model/heads.py)
preference data: the built-in set (the SFT model's samples ranked by the tasks' judge,
    train/rl/preference_data.py) and/or the user's files (data/preferences.py)
train on comparisons with the shared loop: every response of a prompt scored once,
    all the prompt's pairs in one batch (train/rl/losses.py: reward_step)
normalise: shift the head's bias so that the SFT model's samples score 0 on average
score the held-out pairs (train/eval/reward_eval.py); write eval.json

r(x, y)  = w . h_L(x, y)[last token] + b            the head reads the final <|end|>
loss     = -log sigmoid( r(x, y_w) - r(x, y_l) )     averaged per prompt, then over prompts
b       <- b - mean over SFT samples of r(x, y)      after training (InstructGPT's shift)
"""

from functools import partial

import torch

from command import entry_point
from data.batching import LengthGroupedLoader
from data.preferences import collate_groups
from model.heads import ScalarModel

from .core.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint, load_kind, load_model
from .core.stage import Stage
from .core.trainer import epochs_to_updates
from .eval.reward_eval import format_reward_table, group_rewards, reward_metrics
from .rl.losses import reward_step
from .rl.preference_data import preference_groups, rendered
from .settings import RewardSettings


def reward_model_from(sft) -> ScalarModel:
    """The SFT model's trunk (its weights) with a new scalar head that starts at 0."""
    model = ScalarModel(sft.config)
    model.gpt.load_state_dict(sft.state_dict())
    return model


def normalise(model: ScalarModel, groups, pad_id: int, stage: Stage) -> tuple[float, float]:
    """Scale and shift the head so that the rewards of `groups`' replies have mean 0 and
    standard deviation 1 (the N implementation details': beta, unfinished_penalty and
    value_clip then mean the same whatever the reward model): w <- w / s, b <- (b - m) / s.
    Returns (m, s), the mean and spread before."""
    model.eval()
    with stage.runtime.autocast():
        rewards = torch.cat(group_rewards(model, groups, pad_id, stage.runtime.device)).float()
    mean, std = float(rewards.mean()), float(rewards.std(unbiased=False).clamp(min=1e-6))
    with torch.no_grad():
        model.head.proj.weight /= std
        model.head.proj.bias.sub_(mean).div_(std)
    return mean, std


def kept(stage: Stage, model: ScalarModel) -> ScalarModel:
    """The weights best.pt holds (the best validation accuracy), else the last ones."""
    path = stage.out_dir / BEST_NAME
    if stage.is_main and path.is_file():
        model.load_state_dict(load_checkpoint(path)["model"])
    return model


def run(settings: RewardSettings) -> dict:
    s = settings
    with Stage("reward", s) as stage:
        rt = stage.runtime
        sft, tok, init = load_model(s.init_from, dropout=0.0)
        groups = preference_groups(s, stage, sft, tok, init["path"])
        model = reward_model_from(sft)
        if stage.resumed is not None:
            model, tok, _ = load_kind(stage.resumed["path"], "reward", dropout=0.0)
        T = model.config.block_size
        train, val, test = (
            rendered(tok, groups[split], T, f"{what} comparisons", stage.log)
            for split, what in (("train", "training"), ("val", "validation"), ("test", "held-out"))
        )
        pad = partial(collate_groups, pad_id=tok.pad_id)
        loader = LengthGroupedLoader(
            train, lambda g: g.length, pad, s.batch_size, s.seed, rt.rank, rt.world_size
        )
        max_iters = s.max_iters
        if max_iters is None:
            per_update = s.batch_size * s.grad_accum * rt.world_size
            max_iters = epochs_to_updates(s.epochs, len(train), per_update)

        def evaluate(m) -> dict:  # the validation pairs: what picks best.pt
            if not val:
                return {}
            figures = reward_metrics(m, val, tok.pad_id, rt.device)
            return {
                "val_accuracy": figures["pairwise_accuracy"],
                "val_right_vs_wrong": figures["right_vs_wrong"]["accuracy"],
                "val_rank_correlation": figures["rank_correlation"],
            }

        step = partial(reward_step, margin=s.margin, center=s.center)
        builtin_dir = s.preferences.dir if s.preferences.builtin else None
        stage.train(model, tok, loader, step, evaluate=evaluate, model_kind="reward",
                    flops_per_token=model.gpt.flops_per_token(T), max_iters=max_iters,
                    init_from=init["path"], preferences=builtin_dir)  # fmt: skip
        model = kept(stage, model)
        # normalised on the SFT model's own samples of validation prompts (never the test's);
        # the training set also holds off-task replies, which would pull the mean down
        mean, std = normalise(model, val or train, tok.pad_id, stage)
        which = "validation" if val else "training"
        stage.log(f"normalised on the {which} replies: mean {mean:+.4f}, std {std:.4f} -> 0, 1")
        stage.update_checkpoint(model, reward_offset=mean, reward_scale=std)
        if not test:
            return {}
        model.eval()
        with torch.no_grad(), rt.autocast():
            figures = reward_metrics(model, test, tok.pad_id, rt.device)
        stage.log("held-out comparisons:\n" + format_reward_table(figures))
        stage.save_eval({"checkpoint": str(stage.out_dir / CHECKPOINT_NAME), "reward": figures})
        return figures


@entry_point("reward", RewardSettings)
def main(settings: RewardSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
