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

from .core.checkpoint import CHECKPOINT_NAME, load_kind, load_model
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


def normalise(model: ScalarModel, groups, pad_id: int, stage: Stage) -> float:
    """Shift the head's bias so that the mean reward over `groups`' replies is 0."""
    model.eval()
    with stage.runtime.autocast():
        rewards = torch.cat(group_rewards(model, groups, pad_id, stage.runtime.device))
    offset = float(rewards.mean())
    with torch.no_grad():
        model.head.proj.bias -= offset
    return offset


def run(settings: RewardSettings) -> dict:
    s = settings
    with Stage("reward", s) as stage:
        rt = stage.runtime
        sft, tok, init = load_model(s.init_from)
        groups = preference_groups(s, stage, sft, tok, init["path"])
        model = reward_model_from(sft)
        if stage.resumed is not None:
            model, tok, _ = load_kind(stage.resumed["path"], "reward")
        T = model.config.block_size
        train = rendered(tok, groups["train"], T, "training comparisons", stage.log)
        test = rendered(tok, groups["test"], T, "held-out comparisons", stage.log)
        pad = partial(collate_groups, pad_id=tok.pad_id)
        loader = LengthGroupedLoader(
            train, lambda g: g.length, pad, s.batch_size, s.seed, rt.rank, rt.world_size
        )
        per_update = s.batch_size * s.grad_accum * rt.world_size
        max_iters = s.max_iters
        if max_iters is None:
            max_iters = epochs_to_updates(s.epochs, len(train), per_update)

        def evaluate(m) -> dict:
            if not test:
                return {}
            figures = reward_metrics(m, test, tok.pad_id, rt.device)
            return {
                "val_accuracy": figures["pairwise_accuracy"],
                "val_rank_correlation": figures["rank_correlation"],
            }

        builtin_dir = s.preferences.dir if s.preferences.builtin else None
        stage.train(
            model,
            tok,
            loader,
            reward_step,
            evaluate=evaluate,
            model_kind="reward",
            flops_per_token=model.gpt.flops_per_token(T),
            max_iters=max_iters,
            init_from=init["path"],
            preferences=builtin_dir,
        )
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


@entry_point("reward", RewardSettings)
def main(settings: RewardSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
