"""Scoring models: held-out task accuracy (task_eval.py), loss and bits per byte (lm_eval.py),
a reward model's held-out accuracy (reward_eval.py), several models side by side
(compare.py) and the pictures of a run (plots.py)."""
