"""The one exception type meant for the user, and how entry points report it.

Every layer (tokenizer, data, train) raises `UserError` for bad input: a missing file, a
corrupt checkpoint, an impossible setting. Its message is one line that says what is
wrong, where, and what to do. The entry points (command.py: entry_point) catch it, print
the message and exit non-zero; anything else is a bug and keeps its traceback.

A `UserError` anywhere below prints `error: <message>` on stderr and exits with status
2; `NothingToDo` prints its message and exits 0; Ctrl-C exits with 130 (the shell's code
for an interrupt), so `make pretrain && make sft` never carries on after an interrupted
stage.
"""

import functools
import sys
from pathlib import Path


class UserError(Exception):
    """Bad input from the user, reported as a single line without a traceback."""


class NothingToDo(Exception):
    """A request already fulfilled (resuming a run that finished): its message is printed
    and the command exits 0, having changed nothing."""


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
        except NothingToDo as e:
            print(e)
            return None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
