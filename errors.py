"""The one exception type meant for the user, and how entry points report it.

Every layer (tokenizer, data, train) raises `UserError` for bad input: a missing file, a
corrupt checkpoint, an impossible setting. Its message is one line that says what is
wrong, where, and what to do. The entry points catch it, print the message and exit
non-zero; anything else is a bug and keeps its traceback:

    @hydra.main(version_base=None, config_path="../conf", config_name="pretrain")
    @report_user_errors
    def main(cfg): ...

A `UserError` anywhere below prints `error: <message>` on stderr and exits with status
2; Ctrl-C exits with 130 (the shell's code for an interrupt), so `make pretrain && make
sft` never carries on after an interrupted stage.
"""

import functools
import os
import re
import sys
from pathlib import Path


class UserError(Exception):
    """Bad input from the user, reported as a single line without a traceback."""


def require_file(path: str | Path, what: str, fix: str) -> Path:
    """`path` as a Path when it is a file; else a UserError that says whether it is a
    directory (a folder given where a file is expected) or missing, then `fix`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file; give the path of a file in it")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {fix}")
    return path


def report_user_errors(fn):
    """Wrap an entry point: UserError -> one line on stderr and exit 2; Ctrl-C -> exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


# ------------------------------------------------------------------------ Hydra entry points

CONF = Path(__file__).resolve().parent / "conf"


def entry_point(config_name: str):
    """@hydra.main for conf/<config_name>.yaml with the one-line error boundary around it:

        @entry_point("sft")
        def main(cfg): run(cfg)

    Hydra's own errors, raised while it reads the command line and composes the config
    (an unknown setting, a malformed override, an unknown preset), become one line and
    exit 2, like a UserError; Hydra alone prints several lines and a hint about stack
    traces. The task itself runs under report_user_errors. Everything else of Hydra's
    command line (--help, --cfg job, -m, +key=value) is unchanged.
    """
    import hydra  # entry points only: the library modules never need Hydra

    def decorate(fn):
        started = []  # the task began: errors from here on are the task's, not Hydra's

        @functools.wraps(fn)
        def task(cfg):
            started.append(True)
            return report_user_errors(fn)(cfg)

        hydra_main = hydra.main(version_base=None, config_path=str(CONF), config_name=config_name)(
            task
        )

        @functools.wraps(fn)
        def main(cfg=None):
            if cfg is not None:  # called with a composed config (tests, train.align)
                return task(cfg)
            started.clear()
            before = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors, not prints them
            try:
                return hydra_main()
            except BrokenPipeError:  # --cfg job | head: the reader went away; stop quietly
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                sys.exit(1)
            except Exception as e:
                if started:
                    raise  # a bug in the task: keep its traceback
                print(f"error: {hydra_error(e, config_name)}", file=sys.stderr)
                sys.exit(2)
            finally:
                if before is None:
                    os.environ.pop("HYDRA_FULL_ERROR", None)
                else:
                    os.environ["HYDRA_FULL_ERROR"] = before

        return main

    return decorate


AMBIGUOUS = re.compile(r"Ambiguous value for argument '([^=]+)=(.*)'$")  # Hydra's words


def _lines(e: BaseException | None) -> list[str]:
    return [line.strip() for line in str(e or "").splitlines() if line.strip()]


def hydra_error(e: Exception, config_name: str) -> str:
    """One line for an error Hydra raised while composing conf/<config_name>.yaml."""
    lines, cause = _lines(e), _lines(e.__cause__)
    where = f"conf/{config_name}.yaml"
    if cause and "not in struct" in cause[0]:  # Key 'foo' is not in struct, full_key: data.foo
        full = [line.split(":", 1)[1].strip() for line in cause if line.startswith("full_key:")]
        key = full[0] if full else cause[0].split("'")[1]
        return (
            f"unknown setting '{key}': {where} has no such key; check its spelling "
            "(--cfg job lists the settings)"
        )
    ambiguous = AMBIGUOUS.match(lines[0]) if lines else None
    if ambiguous:  # prompt=Hello, world: an unquoted comma
        key, value = ambiguous.groups()
        return (
            f"{key}={value}: Hydra reads the comma as a list of values; quote the value: "
            f"'{key}=\"{value}\"' (single quotes for the shell, double quotes for Hydra)"
        )
    options = getattr(e, "options", None)
    if options:  # an unknown preset: model=huge
        first = next((line for line in lines if "Could not" in line), lines[0])
        return f"{first}; available: {', '.join(options)}"
    message = (lines[0] if lines else type(e).__name__).rstrip(".")
    if cause and cause[0] not in message:
        message += f" ({cause[0].rstrip('.')})"
    if isinstance(getattr(e, "override", None), str):
        message = f"cannot read the override {e.override!r}: {message}"
    return f"{message}; see {where} and https://hydra.cc/docs/advanced/override_grammar/basic"
