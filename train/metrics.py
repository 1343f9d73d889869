"""metrics.jsonl: one JSON object per log or eval step, appended as the run goes.

Keys: step, train_loss, lr, tokens_per_sec (and mfu, and the stage's own metrics) on log
steps; eval steps add the stage's evaluation figures (val_loss in nats per token, val_ppl,
val_bpb in bits per byte, ...). Written by rank 0 only.
Each line is flushed as it is written, so a killed run keeps every line it finished.
"""

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, path: str | Path, resume_from_step: int | None = None) -> None:
        """Open `path` for appending; on resume, first drop lines past the resumed step."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_from_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def _jsonable(v):
    """Plain JSON: NaN and infinities become null, tensors and numpy scalars become numbers."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
