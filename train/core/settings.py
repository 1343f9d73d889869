"""Config checks: one style for every entry point, a table of rules checked at start-up.

    check(cfg, {**RUNTIME, **LOOP, **OPTIMIZER, "batch_size": integer(1), "tasks.seed": integer()})

Each rule says what a setting may be ("an integer >= 1", "one of adamw, muon"); a value
that breaks it stops the run before any work, with one line naming the setting, the value
and what it must be. A dotted name is a setting inside a group (tasks.weight). Settings
that depend on each other (min_lr <= lr) are checked by `check_relations` right after the
table. Unknown settings never get this far: Hydra refuses them (errors.entry_point).
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from errors import UserError


@dataclass(frozen=True)
class Rule:
    """What a setting must be: `ok(value)` says whether it is, `describe` says it in words."""

    describe: str
    ok: Callable[[Any], bool]
    hint: str = "fix the override or the config file"  # what to do, when the rule is broken


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(low: int | None = None) -> Rule:
    """A whole number, at least `low`."""
    if low is None:
        return Rule("an integer", _is_int)
    return Rule(f"an integer >= {low}", lambda v: _is_int(v) and v >= low)


def number(low: float | None = None, high: float | None = None, *, above=None, below=None) -> Rule:
    """A finite number: low <= v <= high, above < v < below (each bound optional)."""
    words, tests = [], [_is_number]
    for bound, sign, test in (
        (low, ">=", lambda v, b: v >= b),
        (above, ">", lambda v, b: v > b),
        (high, "<=", lambda v, b: v <= b),
        (below, "<", lambda v, b: v < b),
    ):
        if bound is not None:
            words.append(f"{sign} {bound:g}")
            tests.append(lambda v, b=bound, t=test: t(v, b))
    describe = "a number" + (" " + " and ".join(words) if words else "")
    return Rule(describe, lambda v: all(t(v) for t in tests))


def choice(*options) -> Rule:
    return Rule("one of " + ", ".join(map(str, options)), lambda v: v in options)


def flag() -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool))


def text() -> Rule:
    return Rule("a string", lambda v: isinstance(v, str) and bool(v))


def optional(rule: Rule) -> Rule:
    """The rule, or null."""
    return Rule(f"{rule.describe}, or null", lambda v: v is None or rule.ok(v))


def pair(rule: Rule) -> Rule:
    """A list of two values, each obeying `rule`."""
    return Rule(
        f"a list of two values, each {rule.describe}",
        lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(map(rule.ok, v)),
    )


def file_list(**fields: Rule) -> Rule:
    """A list of files, each a path or {path: ..., and any of `fields`}: files=[a.jsonl,
    {path: b.jsonl, weight: 0.5}] (data/records.py: file_entry reads an entry)."""

    def entry_ok(entry) -> bool:
        if isinstance(entry, str):
            return bool(entry)
        return (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and bool(entry["path"])
            and set(entry) <= {"path", *fields}
            and all(fields[k].ok(v) for k, v in entry.items() if k != "path")
        )

    keys = "".join(f", {k}: {rule.describe}" for k, rule in fields.items())
    return Rule(
        f"a list of files, each a path or {{path{keys}}}",
        lambda v: isinstance(v, list) and all(map(entry_ok, v)),
        hint="write a list, even of one file: [a.jsonl] or [{path: a.jsonl}]",
    )


def mapping_of(rule: Rule, keys: tuple[str, ...] | None = None) -> Rule:
    """A mapping whose values obey `rule` (and whose keys are among `keys`, when given)."""
    known = f" with keys among {', '.join(keys)}" if keys else ""
    return Rule(
        f"a mapping{known}, each value {rule.describe}",
        lambda v: (
            isinstance(v, dict)
            and (keys is None or set(v) <= set(keys))
            and all(map(rule.ok, v.values()))
        ),
    )


def list_of(rule: Rule) -> Rule:
    return Rule(
        f"a list, each {rule.describe}",
        lambda v: isinstance(v, list) and all(map(rule.ok, v)),
    )


# Sampling temperature: 0 is greedy; tiny positive values would divide the logits into
# infinities (1e-45 did), and below 1e-3 sampling is greedy in all but name anyway.
TEMPERATURE = Rule(
    "0 (greedy) or a number >= 0.001", lambda v: _is_number(v) and (v == 0 or v >= 1e-3)
)

# The settings every training stage has (conf/base.yaml and the stage's own file).
RUNTIME = {
    "seed": integer(),
    "device": text(),
    "precision": text(),
    "resume": flag(),
    "overwrite": flag(),
}
LOOP = {
    "max_iters": integer(0),
    "max_minutes": optional(number(above=0)),
    "grad_accum": integer(1),
    "grad_clip": number(0),
    "lr": number(above=0),
    "min_lr": number(0),
    "warmup_iters": integer(0),
    "schedule": choice("cosine", "wsd"),
    "cooldown": number(above=0, high=1),
    "log_interval": integer(1),
    "eval_interval": integer(1),
    "compile": flag(),
    "best_metric": optional(text()),
    "best_mode": choice("min", "max"),
    "max_regression": optional(number(above=1)),
    "peak_tflops": optional(number(above=0)),
}
# The built-in tasks (conf/tasks/builtin.yaml); data/tasks.py: task_sizes checks n_train's keys.
TASKS = {
    "tasks.weight": number(0),
    "tasks.seed": integer(),
    "tasks.n_train": Rule(
        "an integer >= 0, or a mapping of each task to one",
        lambda v: (_is_int(v) and v >= 0) or isinstance(v, dict),
    ),
    "tasks.n_test": integer(0),
    "tasks.multi_turn": number(0, 1),
    "tasks.system_share": number(0, 1),
    "tasks.n_test_turns": integer(0),
}
# The built-in preference set (conf/preferences/builtin.yaml).
PREFERENCES = {
    "preferences.builtin": flag(),
    "preferences.dir": text(),
    "preferences.samples": integer(2),
    "preferences.borrowed": integer(0),
    "preferences.prompts": integer(1),
    "preferences.temperature": number(above=0),
    "preferences.max_new_tokens": integer(1),
    "preferences.batch_size": integer(1),
    "preferences.seed": integer(),
}
# Data files and how many malformed records they may hold.
MAX_BAD_FRACTION = {"max_bad_fraction": number(0, 1)}
TRAINING_FILES = file_list(weight=number(0))
# Held-out instruction files: each scored as one task, by exact match unless it says
# match: normalised (data/judge.py), named by its stem unless it says name: ...
EVAL_FILES = file_list(match=choice("exact", "normalised"), name=text())
OPTIMIZER = {
    "optimizer": choice("adamw", "muon"),
    "weight_decay": number(0),
    "betas": pair(number(0, below=1)),
    "muon_lr": number(above=0),
    "muon_momentum": number(0, below=1),
}


def check(cfg: Mapping, rules: Mapping[str, Rule]) -> None:
    """UserError for the first setting in `cfg` that breaks its rule (absent ones pass)."""
    for name, rule in rules.items():
        value = _lookup(cfg, name)
        if value is _ABSENT:
            continue
        if isinstance(value, (DictConfig, ListConfig)):  # plain Python values first
            value = OmegaConf.to_container(value, resolve=True)
        if not rule.ok(value):
            raise UserError(
                f"{name}={value!r} is not valid: it must be {rule.describe}; {rule.hint}"
            )


_ABSENT = object()


def _lookup(cfg: Mapping, name: str):
    """cfg's value at a dotted name ("tasks.weight"), or _ABSENT."""
    value = cfg
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def check_relations(cfg: Mapping) -> None:
    """The settings that depend on each other."""
    if "lr" in cfg and "min_lr" in cfg and cfg["min_lr"] > cfg["lr"]:
        raise UserError(f"min_lr={cfg['min_lr']} is above lr={cfg['lr']}; need min_lr <= lr")
