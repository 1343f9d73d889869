"""Writing files that a kill cannot leave half-written.

    atomic_write(path, lambda f: f.write(data))

writes to `<path>.tmp`, flushes it to the disk (fsync) and renames it over `path`. A
rename within a directory is atomic, so whoever reads `path`, whenever the writer dies,
sees either the old file or the new one, never part of one. Checkpoints, eval.json and
every other result of a run are written this way.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call write(f) on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """atomic_write for UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
