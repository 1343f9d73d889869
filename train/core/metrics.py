"""metrics.jsonl: one JSON object per log or eval step, appended as the run goes.

Keys: step, train_loss, lr, tokens_per_sec (and mfu, and the stage's own metrics) on log
steps; eval steps add the stage's evaluation figures (val_loss in nats per token, val_ppl,
val_bpb in bits per byte, ...). Written by rank 0 only.

Each line is flushed as it is written, so a killed run keeps every line it finished; a
line cut short by a kill is skipped by `read_metrics`, never an error. A resumed run keeps
the lines up to the step it resumes from: it reads them (tolerantly) and writes them back
atomically (train/core/files.py), so a kill at that moment cannot empty the file either.
"""

import json
import math
from pathlib import Path

from errors import UserError

from .files import atomic_write_text


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; lines that are not whole JSON objects are skipped."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill, or garbage
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLog:
    def __init__(self, path: str | Path, resume_from_step: int | None = None) -> None:
        """Open `path` for appending; a new run starts it empty, a resumed run keeps the
        records up to resume_from_step."""
        self.path = Path(path)
        kept = []
        if resume_from_step is not None:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_from_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(clean) + "\n")
        except OSError as e:
            raise UserError(
                f"could not write {self.path} ({e.strerror or e}); free some disk space"
            ) from None


def _jsonable(v):
    """Plain JSON: NaN and infinities become null, tensors and numpy scalars become numbers."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
