"""How a command line becomes the typed settings of an entry point, or one line of error.

    @entry_point("sft", SFTSettings)
    def main(settings: SFTSettings) -> None:
        run(settings)

`python -m train.sft lr=3e-4` then:
1. Hydra composes conf/sft.yaml (its defaults list starts with `sft_schema`: the settings
   dataclass, registered here with Hydra's ConfigStore) with the overrides. As it reads them,
   Hydra checks each value's type against the dataclass and refuses a key it does not have.
2. The composed config becomes the dataclass (`typed`), whose construction checks each value's
   rule and the settings that depend on each other (checks.py).
3. The entry point runs with it, under errors.report_user_errors.

Any error on the way (a wrong type, an unknown key, a malformed override, an unknown preset,
a value out of range) is one line naming the setting and what it must be, and exit 2; Hydra
alone prints several lines and a hint about stack traces. Hydra's --help, --cfg job and -m
are unchanged. `load_settings` does steps 1 and 2 for a program (train.align, the tests).
"""

import dataclasses
import functools
import os
import re
import sys
import types
import typing
from pathlib import Path

from checks import HINT, rule_of, shown
from errors import UserError, report_user_errors

CONF = Path(__file__).resolve().parent / "conf"
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic"
AMBIGUOUS = re.compile(r"Ambiguous value for argument '([^=]+)=(.*)'$")  # Hydra's words


def register(config_name: str, schema: type) -> None:
    """Make `schema` the `<config_name>_schema` entry conf/<config_name>.yaml starts from."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)


def typed(cfg, schema: type, config_name: str):
    """The composed config as an instance of `schema`, every value checked (checks.py).
    A key the schema does not have (added with +key=value) is refused."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    extra = _unknown_keys(OmegaConf.to_container(cfg, resolve=False), schema)
    if extra:
        raise UserError(_unknown(extra[0], config_name))
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # a value left missing, an interpolation that fails
        raise UserError(f"{_first_line(e)}; see conf/{config_name}.yaml") from None


def _unknown_keys(values: dict, schema: type, prefix: str = "") -> list[str]:
    """The dotted keys of `values` that `schema` (a dataclass) has no field for."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    found = []
    for key, value in values.items():
        field = fields.get(key)
        if field is None:
            found.append(prefix + key)
        elif dataclasses.is_dataclass(field.type) and isinstance(value, dict):
            found += _unknown_keys(value, field.type, f"{prefix}{key}.")
    return found


def load_settings(config_name: str, schema: type, overrides: list[str]):
    """The typed settings `python -m <entry point> <overrides>` would run with; one-line
    UserError for whatever Hydra or the checks refuse."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register(config_name, schema)
    GlobalHydra.instance().clear()  # an entry point's own Hydra may have run already
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(hydra_error(e, config_name, schema)) from None
    return typed(cfg, schema, config_name)


def entry_point(config_name: str, schema: type):
    """@hydra.main for conf/<config_name>.yaml, typed by `schema`, with the one-line error
    boundary around it (module docstring). main(settings) may also be called directly with
    settings already typed (tests)."""
    import hydra

    register(config_name, schema)

    def decorate(fn):
        started = []  # the task began: errors from here on are the task's, not Hydra's

        @functools.wraps(fn)
        def task(cfg):
            started.append(True)
            return report_user_errors(lambda: fn(typed(cfg, schema, config_name)))()

        hydra_main = hydra.main(version_base=None, config_path=str(CONF), config_name=config_name)
        composed = hydra_main(task)

        @functools.wraps(fn)
        def main(settings=None):
            if settings is not None:
                return report_user_errors(fn)(settings)
            started.clear()
            return _run_hydra(composed, started, config_name, schema)

        return main

    return decorate


def _run_hydra(composed, started: list, config_name: str, schema: type):
    """Hydra's main with its errors as one line each (its own printing turned off)."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors, not prints them
    try:
        return composed()
    except BrokenPipeError:  # --cfg job | head: the reader went away; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as e:
        if started:
            raise  # a bug in the task: keep its traceback
        print(f"error: {hydra_error(e, config_name, schema)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


# ------------------------------------------------------------------------ Hydra's errors


def hydra_error(e: Exception, config_name: str, schema: type) -> str:
    """One line for an error Hydra raised while composing conf/<config_name>.yaml, read from
    the exception's own fields (the key, the value), not from its text."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    if isinstance(cause, ValidationError) and key:  # a value of the wrong type
        must, hint = _describe(schema, key)
        return f"{key}={shown(cause.value)} is not valid: it must be {must}; {hint}"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        return _unknown(key, config_name)
    ambiguous = AMBIGUOUS.match(_first_line(e))
    if ambiguous:  # prompt=Hello, world: an unquoted comma (Hydra says it in words only)
        key, value = ambiguous.groups()
        return (
            f"{key}={value}: Hydra reads the comma as a list of values; quote the value: "
            f"'{key}=\"{value}\"' (single quotes for the shell, double quotes for Hydra)"
        )
    options = getattr(e, "options", None)
    if options:  # an unknown preset: model=huge
        return f"{_first_line(e).rstrip('.')}; available: {', '.join(options)}"
    message = _first_line(e).rstrip(".")
    if cause is not e and _first_line(cause) not in message:
        message += f" ({_first_line(cause).rstrip('.')})"
    if isinstance(getattr(e, "override", None), str):
        message = f"cannot read the override {e.override!r}: {message}"
    return f"{message}; see conf/{config_name}.yaml and {GRAMMAR}"


def _unknown(key: str, config_name: str) -> str:
    return (
        f"unknown setting '{key}': conf/{config_name}.yaml has no such key; check its spelling "
        "(--cfg job lists the settings)"
    )


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _describe(schema: type, dotted: str) -> tuple[str, str]:
    """What the setting at `dotted` must be (its field's rule, else its type in words), and
    what to do."""
    field = None
    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(schema)} if schema else {}
        field = fields.get(part)
        if field is None:
            return "a value of the right type", HINT
        schema = field.type if dataclasses.is_dataclass(field.type) else None
    rule = rule_of(field)
    return (rule.describe, rule.hint) if rule else (_type_words(field.type), HINT)


def _type_words(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return _type_words(args[0]) + ", or null"
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return words.get(hint, "a value of the right type")
