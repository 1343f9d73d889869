"""python -m train.grpo: reinforcement learning from a verifiable reward (make grpo).

The judge of the built-in tasks (data/judge.py) scores every reply, as a unit test scores
code: no reward model to over-optimise. For each prompt the policy samples group_size
replies, and each reply is pushed up or down by how much better it scored than its group
(GRPO, Shao et al. 2024; without the division by the group's spread, Dr. GRPO):

    A_i  = s_i - mean of the group's s                      (every token of reply i)
    L    = -mean min(rho A, clip(rho, 1-eps, 1+eps) A)      (+ beta * KL_k3 to the SFT model)

A group whose replies all score the same teaches nothing and is replaced by a new prompt
(dynamic sampling); prompts are drawn evenly across the tasks. Reinforcement learning here
mostly sharpens: it turns answers the model gives sometimes into answers it gives first
(pass@k against greedy accuracy, docs/alignment.md).

The stage is train/rl/stage.py, shared with python -m train.ppo; conf/grpo.yaml holds the
settings that differ.
"""

from command import entry_point

from .rl import stage
from .settings import PPOSettings


def run(settings: PPOSettings) -> dict:
    return stage.run("grpo", settings)


@entry_point("grpo", PPOSettings)
def main(settings: PPOSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
