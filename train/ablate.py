"""python -m train.ablate: what each change since GPT-2 buys here, one change at a time.

    python -m train.ablate                                  # conf/ablate.yaml: 8 rows x 3 seeds
    python -m train.ablate seeds=[1,2,3,4,5] max_minutes=4  # more seeds, shorter runs

Every row is a model: the base preset (tiny.yaml) plus the changes of the rows before it and
its own (GPT-2 -> +RoPE -> +RMSNorm -> +SwiGLU -> +GQA -> +QK-norm -> +untied head, and the
untied head again at matched parameters: train/eval/ablation.py). Each row trains once per seed
for the same training time (max_minutes), on the same data and tokenizer with the same
optimizer: a normal `python -m train.pretrain` run in a process of its own, in
out_dir/<row>/seed<k>. The runs go round the rows, seed 1 of every row, then seed 2, ..., so
that a machine whose speed drifts over the hours drifts alike for every row. Then one table:
bits per byte (mean ± sd over the seeds), the change against the row before (± its standard
error), tokens/s, steps and parameters; also written to out_dir/ablation.json and table.txt.

A run that finished before with the same config (its config.yaml, as train.align decides) is
read, not run again, so an interrupted ablation goes on where it stopped; a run that did not
finish is started again from scratch (overwrite=true of its own folder only).
Timing runs side by side with other work measures that work too: run it on a quiet machine.
"""

import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from command import entry_point
from data.prepare import prepare
from errors import UserError
from model import GPTConfig

from .core.checkpoint import load_checkpoint
from .core.files import atomic_write_text
from .core.stage import finished_with
from .eval.ablation import Row, build_rows, format_table, matched_width, num_params, summarise
from .settings import AblateSettings, load


def _value(v) -> str:
    """A value as Hydra's override grammar writes it: true, null, 3, rope."""
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def run_overrides(s: AblateSettings, row: Row, seed: int, out_dir: Path) -> list[str]:
    """The command line of one run: the preset, the row's settings (++: added to presets
    that do not list them), the shared settings, then the user's."""
    settings = [f"++model.{k}={_value(v)}" for k, v in row.settings.items()]
    shared = [
        f"device={s.device}",
        f"precision={s.precision}",
        f"seed={seed}",
        f"max_minutes={s.max_minutes}",
        f"out_dir={out_dir}",
    ]
    return [f"model={s.model}", *settings, *shared, *s.pretrain]


def pretrain_settings(overrides: list[str]):
    """The typed settings `python -m train.pretrain <overrides>` would run with."""
    try:
        return load("pretrain", overrides)
    except UserError as e:
        raise UserError(f"ablate: {e}") from None


def train(overrides: list[str], out_dir: Path) -> None:
    """One pretraining run in its own process, its output in out_dir/ablate.log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "ablate.log"
    cmd = [sys.executable, "-m", "train.pretrain", *overrides, "overwrite=true"]
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines() or ["(no output)"]
        raise UserError(
            f"python -m train.pretrain {' '.join(overrides)} failed (exit {done.returncode}): "
            f"{lines[-1]} (whole output: {log})"
        )


def read_run(out_dir: Path) -> dict:
    """A finished run's figures: the last validation bits per byte, the median logged
    training tokens/s, the steps, the parameters (from its checkpoint's config)."""
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_bpb"] for r in records if "val_bpb" in r]
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    if not evals or not speeds:
        raise UserError(f"{out_dir} has no evaluation or no logged step; delete it and run again")
    config = GPTConfig(**load_checkpoint(out_dir)["model_config"])
    return {
        "bpb": evals[-1],
        "tokens_per_sec": statistics.median(speeds),
        "steps": max(r["step"] for r in records),
        "params": num_params(config),
    }


def with_matched_widths(s: AblateSettings, rows: list[Row], vocab_size: int) -> list[Row]:
    """Every row's model config checked (a typo in the last row must not wait for the first
    runs), and each matched row's width filled in: the parameter count of its base row."""
    out = []
    for row in rows:
        config = model_config(s, row, vocab_size)
        if row.matched:
            target = num_params(model_config(s, out[row.base], vocab_size))
            width = matched_width(config, target)
            row = replace(
                row, settings={**row.settings, "n_embd": width}, matched={"n_embd": width}
            )
        out.append(row)
    return out


def model_config(s: AblateSettings, row: Row, vocab_size: int) -> GPTConfig:
    """The GPTConfig a row trains (the preset, the row's settings, the tokenizer's size)."""
    shape = pretrain_settings(run_overrides(s, row, 0, Path(s.out_dir))).model
    try:
        return GPTConfig(**{**shape, "vocab_size": vocab_size})
    except (TypeError, ValueError) as e:
        raise UserError(
            f"row {row.name!r}: model config: {e}; fix rows in conf/ablate.yaml"
        ) from None


def run_folder(i: int, row: Row) -> str:
    """'6-untied-head-matched' for row 6, "+ untied head, matched"."""
    words = "".join(c if c.isalnum() else " " for c in row.name.lower()).split()
    return "-".join([str(i), *words])


def run(s: AblateSettings) -> list[dict]:
    out = Path(s.out_dir)
    rows = build_rows(s.rows)
    data = prepare(pretrain_settings(run_overrides(s, rows[0], 0, out)).data)  # once, first
    rows = with_matched_widths(s, rows, data.tokenizer.vocab_size)
    plan = [(seed, i) for seed in s.seeds for i in range(len(rows))]  # round the rows
    folders = [out / run_folder(i, row) for i, row in enumerate(rows)]
    runs = {
        (seed, i): pretrain_settings(run_overrides(s, rows[i], seed, folders[i] / f"seed{seed}"))
        for seed, i in plan
    }  # every override checked before the first run
    results: dict[int, list[dict]] = {}
    for k, (seed, i) in enumerate(plan, 1):
        where = Path(runs[(seed, i)].out_dir)
        if finished_with(runs[(seed, i)]):
            note = "finished before, read"
        else:
            start = time.perf_counter()
            train(run_overrides(s, rows[i], seed, where), where)
            note = f"{(time.perf_counter() - start) / 60:.1f} min"
        results.setdefault(i, []).append(read_run(where))
        r = results[i][-1]
        print(
            f"[{k}/{len(plan)}] {rows[i].name}, seed {seed}: {r['bpb']:.4f} bits/byte, "
            f"{r['tokens_per_sec']:,.0f} tokens/s, {r['steps']} steps ({note})",
            flush=True,
        )
    table = summarise(rows, results)
    text = format_table(table)
    print(text)
    atomic_write_text(out / "table.txt", text + "\n")
    atomic_write_text(out / "ablation.json", json.dumps(table, indent=2) + "\n")
    return table


@entry_point("ablate", AblateSettings)
def main(settings: AblateSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
