"""The commands, and the parts they are built from.

At the top, one file per command a user types (`python -m train.<name>`): pretrain, sft,
reward, ppo, dpo, align, sample, evaluate, bench, export; and settings.py, every command's
typed settings. No command imports another. Below them, read in this order:

    core/   the machinery every stage shares: where it runs (runtime), the one training loop
            (trainer) and its guards, the set-up around a stage (stage), the optimizer and
            schedule (optim, muon), checkpoints, logs
    rl/     reinforcement learning and preferences: rollouts, advantages, the reward model's,
            PPO's and DPO's losses, the built-in preference set
    eval/   scoring models: held-out task accuracy, bits per byte, reward-model accuracy,
            several models side by side, plots

Imports point down this list: the commands use the parts; eval/ uses rl/ and core/; rl/
uses core/; core/ uses model/, tokenizer/ and data/ only. docs/tour.md is the reading guide.
"""
