"""Every command's settings, typed: one dataclass per entry point, built from the pieces the
stages share.

The values, and what each one means, are in conf/ (conf/<command>.yaml and the files it
lists in its defaults: base.yaml for every command, training.yaml for the training
stages...): each written once. Here is each setting's type and rule (checks.py), also
written once: Hydra checks the types as it reads the files and the command line, and
building the object checks the rules, so a wrong value stops a command before any work.

    PretrainSettings = CommandSettings + LoopSettings + OptimizerSettings + its own
                       (device...)       (train/core/trainer.py) (train/core/optim.py)

`load(command, overrides)` gives the settings `python -m train.<command> <overrides>` would
run with (train.align checks every stage this way before running any; the tests use it).
"""

import ipaddress
from dataclasses import dataclass
from typing import Any

from checks import (
    EVAL_FILES,
    TEMPERATURE,
    TRAINING_FILES,
    CommandSettings,
    Rule,
    anything,
    choice,
    file_list,
    flag,
    integer,
    list_of,
    mapping_of,
    number,
    setting,
    text,
)
from command import load_settings
from data.sources import DataConfig
from data.tasks import TasksConfig
from errors import UserError

from .core.optim import OptimizerSettings
from .core.trainer import LoopSettings
from .eval.sampled import SampledSettings
from .rl.preference_data import PreferenceSources
from .rl.rollouts import RolloutSettings

MODEL = Rule("a mapping of the model's settings (conf/model/)", lambda v: isinstance(v, dict))


@dataclass
class TrainingSettings(CommandSettings, LoopSettings, OptimizerSettings):
    """What every training stage has (conf/training.yaml)."""

    resume: bool = setting(flag())
    overwrite: bool = setting(flag())
    batch_size: int = setting(integer(1))


@dataclass
class HeldOut(SampledSettings):
    """The held-out instruction items: the built-in tasks' (made from the `data` corpus) and
    the user's eval files (conf/heldout.yaml)."""

    eval_files: list[Any] = setting(EVAL_FILES)
    max_bad_fraction: float = setting(number(0, 1))
    data: DataConfig
    tasks: TasksConfig


@dataclass
class PretrainSettings(TrainingSettings):
    """python -m train.pretrain (conf/pretrain.yaml)."""

    model: dict[str, Any] = setting(MODEL)
    data: DataConfig
    eval_tokens: int | None = setting(integer(1), null=True)
    sample_tokens: int = setting(integer(1))


@dataclass
class SFTSettings(TrainingSettings, HeldOut):
    """python -m train.sft (conf/sft.yaml)."""

    init_from: str = setting(text())
    files: list[Any] = setting(TRAINING_FILES)
    eval_max_new_tokens: int | None = setting(integer(1), null=True)


@dataclass
class PreferenceTraining(TrainingSettings, PreferenceSources):
    """What the reward model and DPO share: a start and passes over the preference data."""

    init_from: str = setting(text())
    epochs: float = setting(number(above=0))


@dataclass
class RewardSettings(PreferenceTraining):
    """python -m train.reward (conf/reward.yaml)."""

    margin: float = setting(number(0))
    center: float = setting(number(0))


@dataclass
class DPOSettings(PreferenceTraining, SampledSettings):
    """python -m train.dpo (conf/dpo.yaml): the reward model's data, DPO's loss."""

    beta: float = setting(number(above=0))
    label_smoothing: float = setting(number(0, below=0.5))
    nll_coef: float = setting(number(0))
    min_chosen_score: float | None = setting(number(0, 1), null=True)
    online: bool = setting(flag())
    round_prompts: int = setting(integer(1))
    eval_tasks: bool = setting(flag())
    eval_max_new_tokens: int = setting(integer(1))  # also the sampled replies' budget


@dataclass
class PPOSettings(TrainingSettings, HeldOut, RolloutSettings):
    """python -m train.ppo and python -m train.grpo (conf/ppo.yaml, conf/grpo.yaml)."""

    init_from: str = setting(text())
    reward_model: str = setting(text())
    prompt_files: list[Any] = setting(file_list())
    iterations: int = setting(integer(1))
    clip: float = setting(number(above=0, below=1))
    value_clip: float = setting(number(above=0))
    vf_coef: float = setting(number(0))
    ptx_coef: float = setting(number(0))
    ptx_batch_size: int = setting(integer(1))
    ptx_seq_len: int = setting(integer(1))
    ptx_eval_tokens: int = setting(integer(1))
    report_bpb: bool = setting(flag())
    eval_max_new_tokens: int = setting(integer(1))

    def check_relations(self) -> None:
        super().check_relations()
        if self.advantage == "group" and self.group_size < 2:
            raise UserError(
                f"advantage=group compares replies to the same prompt, so it needs "
                f"group_size >= 2 (got {self.group_size}); set group_size=8, say"
            )
        if self.advantage == "gae" and self.reward != "model":
            raise UserError(
                "advantage=gae starts its value function from the reward model: use "
                "reward=model, or advantage=group with reward=tasks"
            )


@dataclass
class SampleSettings(CommandSettings):
    """python -m train.sample (conf/sample.yaml)."""

    checkpoint: str | None = setting(text(), null=True)
    mode: str = setting(choice("generate", "chat"))
    prompt: str | None = setting(anything(), null=True)
    prompt_file: str | None = setting(text(), null=True)
    num_samples: int = setting(integer(1))
    system: str | None = setting(text(), null=True)
    max_new_tokens: int = setting(integer(1))
    temperature: float = setting(TEMPERATURE)
    top_k: int | None = setting(integer(0), null=True)
    top_p: float | None = setting(number(above=0, high=1), null=True)
    use_cache: bool = setting(flag())


@dataclass
class EvaluateSettings(CommandSettings, HeldOut):
    """python -m train.evaluate (conf/evaluate.yaml)."""

    checkpoint: str = setting(text())
    text_file: str | None = setting(text(), null=True)
    task_eval: bool | None = setting(flag(), null=True)
    eval_max_new_tokens: int | None = setting(integer(1), null=True)
    checkpoints: list[str] = setting(list_of(text()))
    reference: str = setting(text())
    reward_model: str | None = setting(text(), null=True)
    report_dir: str | None = setting(text(), null=True)


@dataclass
class BenchSettings(CommandSettings):
    """python -m train.bench (conf/bench.yaml)."""

    model: dict[str, Any] = setting(MODEL)
    repeats: int = setting(integer(1))
    train: bool = setting(flag())
    optimizer: str = setting(choice("adamw", "muon"))
    train_batch_size: int = setting(integer(1))
    train_seq_len: int | None = setting(integer(1), null=True)
    train_steps: int = setting(integer(1))
    peak_tflops: float | None = setting(number(above=0), null=True)
    sample: bool = setting(flag())
    prompt_tokens: int = setting(integer(1))
    new_tokens: int = setting(integer(1))
    top_k: int | None = setting(integer(1), null=True)
    temperature: float = setting(number(above=0))  # the benchmark samples
    uncached_new_tokens: int | None = setting(integer(1), null=True)
    hf: Any = setting(Rule("auto, true or false", lambda v: v in ("auto", True, False)))
    batch_sizes: list[int] = setting(list_of(integer(1)))
    batch_new_tokens: int = setting(integer(1))

    def check_relations(self) -> None:
        """The prompts and the batched runs stay within the model's context."""
        block = self.model.get("block_size")
        if isinstance(block, int) and self.prompt_tokens > block:
            raise UserError(f"prompt_tokens={self.prompt_tokens} exceeds block_size={block}")
        if isinstance(block, int) and self.batch_new_tokens >= block:
            raise UserError(
                f"batch_new_tokens={self.batch_new_tokens} must be below block_size="
                f"{block}: the batched runs stay within the context"
            )


@dataclass
class ExportSettings(CommandSettings):
    """python -m train.export (conf/export.yaml)."""

    checkpoint: str = setting(text())
    out: str | None = setting(text(), null=True)
    dtype: str = setting(choice("float32", "bfloat16", "float16"))
    overwrite: bool = setting(flag())


def _rows_ok(rows) -> bool:
    return (
        isinstance(rows, list)
        and bool(rows)
        and all(
            isinstance(r, dict)
            and isinstance(r.get("name"), str)
            and not set(r) - {"name", "set", "matched"}
            for r in rows
        )
    )


def _seeds_ok(seeds) -> bool:
    return list_of(integer()).ok(seeds) and bool(seeds) and len(set(seeds)) == len(seeds)


@dataclass
class AblateSettings(CommandSettings):
    """python -m train.ablate (conf/ablate.yaml)."""

    model: str = setting(text())
    seeds: list[int] = setting(Rule("a list of different integers, e.g. [1,2,3]", _seeds_ok))
    max_minutes: float = setting(number(above=0))
    pretrain: list[str] = setting(list_of(text()))
    rows: list[Any] = setting(
        Rule("a list of {name: ..., set: {model field: value}, matched: true|false}", _rows_ok)
    )


def _port_ok(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535


@dataclass
class ServeSettings(CommandSettings):
    """python -m train.serve (conf/serve.yaml)."""

    checkpoint: str = setting(text())
    model_name: str | None = setting(text(), null=True)
    host: str = setting(text())
    port: int = setting(Rule("an integer from 0 to 65535 (0: any free port)", _port_ok))
    api_key: str | None = setting(text(), null=True)
    top_k: int | None = setting(integer(0), null=True)
    threads: int | None = setting(integer(1), null=True)
    max_batch: int = setting(integer(1))
    max_queue: int = setting(integer(0))
    max_tokens: int = setting(integer(1))
    max_messages: int = setting(integer(1))
    max_n: int = setting(integer(1))
    max_body_kb: int = setting(integer(1))
    access_log: bool = setting(flag())

    def check_relations(self) -> None:
        """A host other machines reach needs a key."""
        if not is_loopback(self.host) and not self.api_key:
            raise UserError(
                f"host={self.host} opens the server to other machines: set an api_key "
                "(HANDGPT_API_KEY=... in the environment) or keep host=127.0.0.1"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@dataclass
class ServeBenchSettings(CommandSettings):
    """python -m train.serve_bench (conf/serve_bench.yaml)."""

    checkpoint: str = setting(text())
    url: str | None = setting(text(), null=True)
    model_name: str | None = setting(text(), null=True)
    api_key: str | None = setting(text(), null=True)
    server_args: list[str] = setting(list_of(text()))
    clients: list[int] = setting(list_of(integer(1)))
    requests_per_client: int = setting(integer(1))
    max_tokens: int = setting(integer(1))
    temperature: float = setting(TEMPERATURE)
    ignore_eos: bool = setting(flag())
    top_k: int | None = setting(integer(0), null=True)
    startup_timeout_s: int = setting(integer(1))
    compare_policies: bool = setting(flag())
    policy_clients: int = setting(integer(1))


STAGES = ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")  # train.align's names for the stages


@dataclass
class AlignSettings(CommandSettings, SampledSettings):
    """python -m train.align (conf/align.yaml)."""

    stages: list[str] = setting(list_of(choice(*STAGES)))
    overrides: dict[str, list[str]] = setting(mapping_of(list_of(text()), ("all", *STAGES)))
    eval_max_new_tokens: int = setting(integer(1))
    best_of: int = setting(integer(0))


COMMANDS = {
    "pretrain": PretrainSettings,
    "sft": SFTSettings,
    "reward": RewardSettings,
    "ppo": PPOSettings,
    "grpo": PPOSettings,
    "dpo": DPOSettings,
    "sample": SampleSettings,
    "evaluate": EvaluateSettings,
    "bench": BenchSettings,
    "export": ExportSettings,
    "align": AlignSettings,
    "ablate": AblateSettings,
    "serve": ServeSettings,
    "serve_bench": ServeBenchSettings,
}


def load(command: str, overrides: list[str] = ()):
    """The typed settings of `python -m train.<command> <overrides>`; one-line UserError for
    any value Hydra or the rules refuse."""
    return load_settings(command, COMMANDS[command], list(overrides))
