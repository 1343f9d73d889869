"""Loop settings for tests that drive the Trainer directly: the values a short test run
wants, any of them overridden (the stages' own values live in conf/training.yaml)."""

from train.core.trainer import LoopSettings

TEST_LOOP = {
    "max_iters": 4,
    "max_minutes": None,
    "grad_accum": 1,
    "grad_clip": 1.0,
    "lr": 1e-3,
    "min_lr": 1e-4,
    "warmup_iters": 100,
    "schedule": "cosine",
    "cooldown": 0.4,
    "log_interval": 10,
    "eval_interval": 250,
    "compile": False,
    "best_metric": None,
    "best_mode": "min",
    "max_regression": 4.0,
    "peak_tflops": None,
}


def loop_settings(**overrides) -> LoopSettings:
    return LoopSettings(**{**TEST_LOOP, **overrides})
