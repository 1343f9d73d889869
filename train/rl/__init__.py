"""Reinforcement learning and preferences: PPO's rollouts (rollouts.py), advantages
(advantages.py), the losses of the reward model, PPO and DPO (losses.py), and the built-in
preference set the reward model and DPO learn from (preference_data.py)."""
