"""The ablation's rows and its table (python -m train.ablate runs them).

A row is a model: the base preset plus the settings of every row before it and its own, so
the rows add one change at a time (GPT-2 -> +RoPE -> +RMSNorm -> ...). A change that adds
parameters (the untied head) is also shown at matched parameters: the same settings with the
width (n_embd) whose parameter count is nearest the row before it.

Each row trains once per seed; its figures are the mean over the seeds and their spread:

    mean = (1/n) sum_i x_i          sd = sqrt( sum_i (x_i - mean)^2 / (n - 1) )
    the change against the row it builds on:  d = mean_row - mean_before,
    with its standard error  se = sqrt( sd_row^2 / n_row + sd_before^2 / n_before )

A change is resolved when |d| > 2 se (about 95% confidence with a normal spread).
"""

import math
import statistics
from dataclasses import dataclass, field

import torch

from model import GPT, GPTConfig


@dataclass(frozen=True)
class Row:
    """One line of the table: the model settings it trains with (on top of the preset)."""

    name: str
    settings: dict  # GPTConfig fields -> values, every change so far included
    base: int | None = None  # the row it is compared with (index), None for the first
    matched: dict = field(default_factory=dict)  # the settings changed to match parameters


def build_rows(specs: list[dict]) -> list[Row]:
    """Cumulative rows from the config's list of {name, set, matched}: row i has the `set`
    of rows 0..i and is compared with the row before it. A row with matched: true is
    followed by its matched-parameter twin, compared with the row before the change; its
    width (matched_width) is filled in once the vocabulary is known."""
    rows, settings, previous = [], {}, None
    for spec in specs:
        settings = {**settings, **spec.get("set", {})}
        rows.append(Row(spec["name"], settings, previous))
        here = len(rows) - 1
        if spec.get("matched"):
            twin = Row(f"{spec['name']}, matched", settings, previous, {"n_embd": None})
            rows.append(twin)
        previous = here
    return rows


def num_params(config: GPTConfig) -> int:
    """The model's parameter count, built on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return GPT(config).num_params()


def matched_width(config: GPTConfig, target: int) -> int:
    """The n_embd whose model has the parameter count nearest `target`, among widths the
    config accepts (a multiple of n_head; of 2 n_head with rotary embeddings, whose head
    width must be even), up to twice the config's own."""
    step = config.n_head * (2 if config.position == "rope" else 1)
    widths = range(step, 2 * config.n_embd + 1, step)
    return min(widths, key=lambda w: (abs(num_params(_with_width(config, w)) - target), w))


def _with_width(config: GPTConfig, width: int) -> GPTConfig:
    return GPTConfig(**{**config.to_dict(), "n_embd": width})


# ----------------------------------------------------------------------------- the table


def summarise(rows: list[Row], results: dict[int, list[dict]]) -> list[dict]:
    """Per row: bits per byte mean, sd and n over its seeds, the change against its base row
    with its standard error, tokens/s (mean), parameters and steps. results: row index ->
    one dict per finished seed, {"bpb", "tokens_per_sec", "params", "steps"}."""
    table = []
    for i, row in enumerate(rows):
        runs = results.get(i, [])
        bpb = [r["bpb"] for r in runs]
        line = {"row": row.name, "n": len(bpb), "runs": runs, "matched": row.matched}
        line["bpb"], line["sd"] = _mean(bpb), _sd(bpb)
        line["tokens_per_sec"] = _mean([r["tokens_per_sec"] for r in runs])
        line["params"] = runs[0]["params"] if runs else None
        line["steps"] = _mean([r["steps"] for r in runs])
        line["base"] = row.base
        if row.base is not None and line["bpb"] is not None and table[row.base]["bpb"] is not None:
            before = table[row.base]
            line["delta"] = line["bpb"] - before["bpb"]
            line["se"] = _se(line, before)
            line["params_added"] = (line["params"] or 0) - (before["params"] or 0)
        table.append(line)
    return table


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _sd(values: list[float]) -> float | None:
    """The sample standard deviation (n - 1), None below two values."""
    return statistics.stdev(values) if len(values) >= 2 else None


def _se(a: dict, b: dict) -> float | None:
    """Standard error of a's mean minus b's: sqrt(sd_a^2 / n_a + sd_b^2 / n_b)."""
    if a["sd"] is None or b["sd"] is None:
        return None
    return math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])


def _adds_parameters(line: dict) -> bool:
    """Whether a row has more than 1% more parameters than the row it is compared with."""
    return line.get("params_added", 0) > 0.01 * (line["params"] or 0)


def format_table(table: list[dict]) -> str:
    """The table as text: one line per row, then what the columns mean."""
    head = (
        f"{'row':40} {'bits/byte (mean ± sd)':>22} {'vs row before (± se)':>20} "
        f"{'tokens/s':>9} {'steps':>7} {'parameters':>18}"
    )
    lines = [head, "-" * len(head)]
    for line in table:
        lines.append(_format_line(line, table))
    lines += _footer(table)
    return "\n".join(lines)


def _format_line(line: dict, table: list[dict]) -> str:
    if line["bpb"] is None:
        return f"{line['row']:40} {'(no finished run)':>22}"
    sd = f"{line['sd']:.3f}" if line["sd"] is not None else "-"
    bpb = f"{line['bpb']:.3f} ± {sd} (n={line['n']})"
    delta = ""
    if "delta" in line:
        se = f"{line['se']:.3f}" if line["se"] is not None else "-"
        delta = f"{line['delta']:+.3f} ± {se}"
    params = f"{line['params'] / 1e6:.2f}M"
    name = line["row"]
    if line["matched"]:
        name += f" (n_embd {line['matched']['n_embd']})"
    elif _adds_parameters(line):
        params += f" (+{line['params_added'] / 1e6:.2f}M)"
    return (
        f"{name:40} {bpb:>22} {delta:>20} {line['tokens_per_sec']:9,.0f} "
        f"{line['steps']:7,.0f} {params:>18}"
    )


def _footer(table: list[dict]) -> list[str]:
    notes = [
        "bits/byte: validation bits per byte at the end of each run, mean over the seeds ± "
        "their sample standard deviation (n - 1);",
        "vs row before: the change of the mean against the row it builds on (a matched row: "
        "against the row before the change), ± its standard error sqrt(sd1²/n1 + sd2²/n2); "
        "|change| > 2 se is resolved;",
        "tokens/s: the median logged training throughput of a run, mean over the seeds; steps: "
        "optimizer steps in the time budget.",
    ]
    added = [t["row"] for t in table if _adds_parameters(t) and not t["matched"]]
    if added:
        notes.append(
            f"more parameters: {', '.join(added)} (+M in the last column); a 'matched' row "
            "has about the parameter count of the row before the change (the nearest width)."
        )
    first, last = table[0], [t for t in table if not t["matched"]][-1]
    if first["bpb"] is not None and last["bpb"] is not None and first is not last:
        se = _se(last, first)
        resolved = (
            f" ± {se:.3f} (|d| / se = {abs(last['bpb'] - first['bpb']) / se:.1f})" if se else ""
        )
        notes.append(
            f"{last['row']} against {first['row']}: {last['bpb'] - first['bpb']:+.3f} bits/byte"
            + resolved
        )
    return notes
