"""Writing files that a kill cannot leave half-written, and a full disk cannot leave behind.

    atomic_write(path, lambda f: f.write(data))

writes to `<path>.tmp`, flushes it to the disk (fsync) and renames it over `path`. A
rename within a directory is atomic, so whoever reads `path`, whenever the writer dies,
sees either the old file or the new one, never part of one. Checkpoints, eval.json and
every other result of a run are written this way.

A write that fails (a full disk, a read-only folder) removes its temporary file, so the
space is given back, and becomes one UserError naming the file and the reason. A writer
killed outright cannot clean up: `remove_stale_temporaries` deletes what such a run left,
at the start of the next one.
"""

import errno
import json
import os
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
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({e.strerror or e}); {_advice(e)}") from None
    except BaseException:  # an error inside write(), or Ctrl-C: leave no partial file
        tmp.unlink(missing_ok=True)
        raise
    return path


def _advice(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "free some disk space or choose another out_dir"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = "make the folder writable or choose another out_dir"
    else:
        what = "check the disk or choose another out_dir"
    return what + " (the file's previous version, if any, is unchanged)"


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
