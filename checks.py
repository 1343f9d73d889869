"""What a setting may be, said once, beside its type: the rule every typed settings object checks.

A settings object is a dataclass whose fields carry their rule:

    @dataclass
    class LoopSettings(Settings):
        max_iters: Optional[int] = setting(integer(0), null=True)
        schedule: str = setting(choice("cosine", "wsd"))

Its values come from the YAML files in conf/ (Hydra validates their types as it reads them);
building the object checks every field against its rule, so a value out of range stops the
run before any work, with one line naming the setting, the value and what it must be:

    batch_size=0 is not valid: it must be an integer >= 1; fix the override or the config file

Settings that depend on each other (min_lr <= lr) are checked by `check_relations`.
"""

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from errors import UserError

HINT = "fix the override or the config file"


@dataclass(frozen=True)
class Rule:
    """What a setting must be: `ok(value)` says whether it is, `describe` says it in words."""

    describe: str
    ok: Callable[[Any], bool]
    hint: str = HINT  # what to do when the rule is broken


def setting(rule: Rule, null: bool = False) -> Any:
    """A dataclass field with this rule (and null allowed when `null`); no default: every
    value is written once, in conf/."""
    if null:
        ok = rule.ok
        rule = Rule(f"{rule.describe}, or null", lambda v: v is None or ok(v), rule.hint)
    return dataclasses.field(metadata={"rule": rule})


def shown(value) -> str:
    """A value as the user would have typed it: 5 for 5.0, [2, 3] for [2.0, 3.0], strings
    quoted."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(shown, value)) + "]"
    return repr(value)


def rule_of(field: dataclasses.Field) -> Rule | None:
    return field.metadata.get("rule")


class Settings:
    """Base of every settings dataclass: its fields are checked when it is built."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            rule, value = rule_of(field), getattr(self, field.name)
            if rule is not None and not rule.ok(value):
                raise UserError(
                    f"{self.prefix()}{field.name}={shown(value)} is not valid: it must be "
                    f"{rule.describe}; {rule.hint}"
                )
        self.check_relations()

    def prefix(self) -> str:
        """How the settings are named on the command line: "" at the top, "data." in a group."""
        return ""

    def check_relations(self) -> None:
        """The settings that depend on each other (none by default)."""


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


def anything() -> Rule:
    return Rule("any value", lambda v: True)


def pair(rule: Rule) -> Rule:
    """A list of two values, each obeying `rule`."""
    return Rule(
        f"a list of two values, each {rule.describe}",
        lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(map(rule.ok, v)),
    )


def list_of(rule: Rule) -> Rule:
    return Rule(
        f"a list, each {rule.describe}",
        lambda v: isinstance(v, (list, tuple)) and all(map(rule.ok, v)),
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


# Sampling temperature: 0 is greedy; tiny positive values would divide the logits into
# infinities (1e-45 did), and below 1e-3 sampling is greedy in all but name anyway.
TEMPERATURE = Rule(
    "0 (greedy) or a number >= 0.001", lambda v: _is_number(v) and (v == 0 or v >= 1e-3)
)
# Files of training data, with a weight each; held-out instruction files, each scored as one
# task, by exact match unless it says match: normalised (data/judge.py), named by its stem
# unless it says name: ...
TRAINING_FILES = file_list(weight=number(0))
EVAL_FILES = file_list(match=choice("exact", "normalised"), name=text())


@dataclass
class CommandSettings(Settings):
    """What every entry point has (conf/base.yaml): where it runs and where it writes.
    The device and precision are checked when they are resolved (train/core/runtime.py)."""

    device: str = setting(text())
    precision: str = setting(text())
    seed: int = setting(integer())
    out_dir: str = setting(text())
