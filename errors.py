"""The one exception type meant for the user, and how entry points report it.

Every layer (tokenizer, data, train) raises `UserError` for bad input: a missing file, a
corrupt checkpoint, an impossible setting. Its message is one line that says what is
wrong, where, and what to do. The entry points catch it (`report_user_errors`), print the
message and exit non-zero; anything else is a bug and keeps its traceback.
"""

import functools
import sys


class UserError(Exception):
    """Bad input from the user, reported as a single line without a traceback."""


def report_user_errors(fn):
    """Wrap an entry point: a UserError prints `error: <message>` on stderr and exits 2;
    Ctrl-C prints `interrupted` and exits 130."""

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
