"""python -m train.ppo: reinforcement learning from the reward model (make ppo), InstructGPT's
step 3.

The policy (the SFT model) samples replies, the reward model scores them, and PPO updates
the policy towards the replies that scored above what its value function expected, with a
KL leash to the SFT model in the rewards:

    r_t  = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))   (+ the score at the last token)
    A_t  = GAE of r_t with the value function V (its own trunk, from the reward model)
    L    = -mean min(rho A, clip(rho, 1-eps, 1+eps) A)  +  vf_coef * L_V  (+ ptx_coef * L_ptx)

The stage itself (the four models, the loop of rollouts and updates, the checkpoint chosen
on the validation split, the comparison with SFT) is train/rl/stage.py, which
python -m train.grpo shares with other settings (the judge as reward, group advantages).
"""

from command import entry_point

from .rl import stage
from .settings import PPOSettings


def run(settings: PPOSettings) -> dict:
    return stage.run("ppo", settings)


@entry_point("ppo", PPOSettings)
def main(settings: PPOSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
