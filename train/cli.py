"""What every entry point shares at its boundary: user errors become one line and exit 2.

    @hydra.main(version_base=None, config_path="../conf", config_name="pretrain")
    @report_user_errors
    def main(cfg): ...

A `UserError` anywhere below prints `error: <message>` on stderr and exits with status
2; Ctrl-C exits with 130. Any other exception is a bug and keeps its traceback.
"""

import functools
import sys

from errors import UserError


def report_user_errors(fn):
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
