"""Writing files that a kill cannot leave half-written, and a full disk cannot leave behind.

    atomic_write(path, lambda f: f.write(data))

writes to `<path>.tmp`, flushes it to the disk (fsync) and renames it over `path`. A
rename within a directory is atomic, so whoever reads `path`, whenever the writer dies,
sees either the old file or the new one, never part of one. Checkpoints, eval.json and
every other result of a run are written this way.

A write that fails (a full disk, a read-only folder) removes its temporary file, so the
space is given back, and becomes one UserError naming the file and the reason, whichever
writer met the error: Python's OSError, or torch's and safetensors' own exceptions that
carry it (disk_error). A writer
killed outright cannot clean up: `remove_stale_temporaries` deletes what such a run left,
at the start of the next one.
"""

import errno
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO

from errors import UserError

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call write(f) on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # the disk, a bug inside write(), or Ctrl-C: no partial file
        tmp.unlink(missing_ok=True)
        cause = disk_error(e)
        if cause is None:
            raise
        raise write_error(path, cause) from None
    return path


# A Rust writer's I/O error in its text (safetensors): IoError(Os { code: 28, kind: ... })
RUST_IO_ERROR = re.compile(r"Os \{ code: (\d+),")


def disk_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write, or None when `e` is not one (a bug keeps its
    traceback). Writers other than Python's wrap it: torch's zip writer raises
    RuntimeError ("[enforce fail at inline_container.cc] unexpected pos ...") with the
    OSError as its context; safetensors' SafetensorError has the errno in its text."""
    if isinstance(e, OSError):
        return e
    found = RUST_IO_ERROR.search(str(e))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    if isinstance(e, RuntimeError) and e.__context__ is not None:
        return disk_error(e.__context__)
    return None


def write_error(path: str | Path, e: OSError, setting: str = "out_dir") -> UserError:
    """One line for a write that failed: which file, why, and what to do (`setting`: the
    setting that chose the folder)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"free some disk space or choose another {setting}"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = f"make the folder writable or choose another {setting}"
    else:
        what = f"check the disk or choose another {setting}"
    return UserError(
        f"could not write {path} ({e.strerror or e}); {what} (what was there before, if "
        "anything, is unchanged)"
    )


def atomic_write_text(path: str | Path, text: str) -> Path:
    """atomic_write for UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the `*.tmp` files a killed writer left in `directory`; returns them."""
    directory = Path(directory)
    stale = sorted(directory.glob("*" + TMP_SUFFIX)) if directory.is_dir() else []
    for path in stale:
        if path.is_file():
            path.unlink(missing_ok=True)
    return stale


EVAL_FILE = "eval.json"  # a run's evaluations, beside its checkpoint


def save_eval(results: dict, run_dir: str | Path, name: str = EVAL_FILE) -> Path:
    """Write results as JSON to run_dir/eval.json (or `name`), atomically."""
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_text(Path(run_dir) / name, text)


def load_eval(run_dir: str | Path, name: str = EVAL_FILE) -> dict:
    """The results in run_dir/eval.json; {} when there is none or it cannot be read."""
    try:
        results = json.loads((Path(run_dir) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}
