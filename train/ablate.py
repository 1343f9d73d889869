"""python -m train.ablate: what each change since GPT-2 buys here, one change at a time.

    python -m train.ablate                                  # conf/ablate.yaml: 8 rows x 3 seeds
    python -m train.ablate seeds=[1,2,3,4,5] max_minutes=4  # more seeds, shorter runs

Every row is a model: the base preset (tiny.yaml) plus the changes of the rows before it and
its own (GPT-2 -> +RoPE -> +RMSNorm -> +SwiGLU -> +GQA -> +QK-norm -> +untied head, and the
untied head again at matched parameters: train/ablation.py). Each row trains once per seed
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

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.prepare import prepare
from errors import UserError, entry_point, hydra_error
from model import GPTConfig

from .ablation import Row, build_rows, format_table, matched_width, num_params, summarise
from .checkpoint import load_checkpoint
from .files import atomic_write_text
from .stage import DONE_FILE

CONF = Path(__file__).resolve().parents[1] / "conf"
IGNORED = ("resume", "overwrite")  # how a run starts, not what it computes


def check_settings(cfg: DictConfig) -> None:
    """ablate's own settings, one line for the first bad one (before any run)."""
    seeds = OmegaConf.to_container(cfg.seeds)
    if not seeds or not all(type(s) is int for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds={seeds} must be a list of different integers, e.g. [1,2,3]")
    minutes = cfg.max_minutes
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0:
        raise UserError(f"max_minutes={minutes} must be a number > 0: every row trains that long")
    rows = OmegaConf.to_container(cfg.rows)
    for i, row in enumerate(rows or [None]):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("name"), str)
            or (set(row) - {"name", "set", "matched"})
        ):
            raise UserError(
                f"rows[{i}]={row!r} must be {{name: ..., set: {{model field: value}}, "
                "matched: true|false}}; see conf/ablate.yaml"
            )
    if not isinstance(OmegaConf.to_container(cfg.pretrain), list):
        raise UserError(f"pretrain={cfg.pretrain} must be a list of overrides, e.g. [data=text]")


def pretrain_config(overrides: list[str]) -> DictConfig:
    """The resolved config `python -m train.pretrain <overrides>` would run with."""
    GlobalHydra.instance().clear()  # this entry point's own Hydra has done its work
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            return compose(config_name="pretrain", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"ablate: {hydra_error(e, 'pretrain')}") from None


def _value(v) -> str:
    """A value as Hydra's override grammar writes it: true, null, 3, rope."""
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def run_overrides(cfg: DictConfig, row: Row, seed: int, out_dir: Path) -> list[str]:
    """The command line of one run: the preset, the row's settings (++: added to presets
    that do not list them), the shared settings, then the user's."""
    settings = [f"++model.{k}={_value(v)}" for k, v in row.settings.items()]
    shared = [
        f"device={cfg.device}",
        f"precision={cfg.precision}",
        f"seed={seed}",
        f"max_minutes={cfg.max_minutes}",
        f"out_dir={out_dir}",
    ]
    return [f"model={cfg.model}", *settings, *shared, *cfg.pretrain]


def is_done(run_cfg: DictConfig) -> bool:
    """True when the run's out_dir holds a finished run of this very config."""
    out = Path(run_cfg.out_dir)
    try:
        before = yaml.safe_load((out / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    now = OmegaConf.to_container(run_cfg, resolve=True)
    same = {k: v for k, v in before.items() if k not in IGNORED} == {
        k: v for k, v in now.items() if k not in IGNORED
    }
    return (out / DONE_FILE).is_file() and same


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


def with_matched_widths(cfg: DictConfig, rows: list[Row], vocab_size: int) -> list[Row]:
    """Every row's model config checked (a typo in the last row must not wait for the first
    runs), and each matched row's width filled in: the parameter count of its base row."""
    out = []
    for row in rows:
        config = model_config(cfg, row, vocab_size)
        if row.matched:
            target = num_params(model_config(cfg, out[row.base], vocab_size))
            width = matched_width(config, target)
            row = replace(
                row, settings={**row.settings, "n_embd": width}, matched={"n_embd": width}
            )
        out.append(row)
    return out


def model_config(cfg: DictConfig, row: Row, vocab_size: int) -> GPTConfig:
    """The GPTConfig a row trains (the preset, the row's settings, the tokenizer's size)."""
    composed = pretrain_config(run_overrides(cfg, row, 0, Path(cfg.out_dir)))
    values = OmegaConf.to_container(composed.model, resolve=True)
    try:
        return GPTConfig(**{**values, "vocab_size": vocab_size})
    except (TypeError, ValueError) as e:
        raise UserError(
            f"row {row.name!r}: model config: {e}; fix rows in conf/ablate.yaml"
        ) from None


def run_folder(i: int, row: Row) -> str:
    """'6-untied-head-matched' for row 6, "+ untied head, matched"."""
    words = "".join(c if c.isalnum() else " " for c in row.name.lower()).split()
    return "-".join([str(i), *words])


def run(cfg: DictConfig) -> list[dict]:
    check_settings(cfg)
    out = Path(cfg.out_dir)
    rows = build_rows(OmegaConf.to_container(cfg.rows))
    data = prepare(pretrain_config(run_overrides(cfg, rows[0], 0, out)).data)  # once, first
    rows = with_matched_widths(cfg, rows, data.tokenizer.vocab_size)
    plan = [(seed, i) for seed in cfg.seeds for i in range(len(rows))]  # round the rows
    folders = [out / run_folder(i, row) for i, row in enumerate(rows)]
    configs = {
        (s, i): pretrain_config(run_overrides(cfg, rows[i], s, folders[i] / f"seed{s}"))
        for s, i in plan
    }  # every override checked before the first run
    results: dict[int, list[dict]] = {}
    for k, (seed, i) in enumerate(plan, 1):
        run_cfg = configs[(seed, i)]
        where = Path(run_cfg.out_dir)
        if is_done(run_cfg):
            note = "finished before, read"
        else:
            start = time.perf_counter()
            train(run_overrides(cfg, rows[i], seed, where), where)
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


@entry_point("ablate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
