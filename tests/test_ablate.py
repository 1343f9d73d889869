"""python -m train.ablate: its rows (cumulative, with the matched-parameter twin), the table's
figures against a hand computation, the order of the runs (round the rows, seed by seed), a
real two-row ablation of tiny runs that is read back instead of run again, one-line errors."""

import json
import math
import re
from pathlib import Path

import pytest
import yaml

import train.ablate as ablate
from errors import UserError
from model import GPTConfig
from train.eval.ablation import Row, build_rows, format_table, matched_width, num_params, summarise
from train.settings import load

ROOT = Path(__file__).resolve().parents[1]
SPECS = [
    {"name": "GPT-2"},
    {"name": "+ RoPE", "set": {"position": "rope"}},
    {"name": "+ RMSNorm", "set": {"norm": "rmsnorm"}},
    {"name": "+ untied head", "set": {"tie_embeddings": False}, "matched": True},
    {"name": "+ QK-norm", "set": {"qk_norm": True}},
]


def test_rows_add_their_changes_in_turn():
    rows = build_rows(SPECS)
    assert [r.name for r in rows] == [
        "GPT-2",
        "+ RoPE",
        "+ RMSNorm",
        "+ untied head",
        "+ untied head, matched",
        "+ QK-norm",
    ]
    assert rows[0].settings == {} and rows[0].base is None
    assert rows[2].settings == {"position": "rope", "norm": "rmsnorm"} and rows[2].base == 1
    assert rows[3].settings == {**rows[2].settings, "tie_embeddings": False}
    assert rows[4].settings == rows[3].settings and rows[4].matched == {"n_embd": None}
    assert rows[3].base == rows[4].base == 2  # both against the row before the change
    assert rows[5].base == 3 and rows[5].settings["qk_norm"] is True  # builds on the plain row


def test_the_matched_width_is_the_one_nearest_the_target():
    tied = GPTConfig(
        n_layer=3,
        n_head=3,
        n_embd=192,
        block_size=128,
        vocab_size=4096,
        bias=False,
        position="rope",
    )
    untied = GPTConfig(**{**tied.to_dict(), "tie_embeddings": False})
    target = num_params(tied)
    assert num_params(untied) - target == 4096 * 192  # the head's own matrix
    width = matched_width(untied, target)
    assert width % 6 == 0 and width < 192  # n_head 3, an even head width
    best = min(
        range(6, 385, 6),
        key=lambda w: abs(num_params(GPTConfig(**{**untied.to_dict(), "n_embd": w})) - target),
    )
    assert width == best
    assert (
        abs(num_params(GPTConfig(**{**untied.to_dict(), "n_embd": width})) - target) < 0.03 * target
    )


def runs(*bpbs: float, params: int = 2_000_000) -> list[dict]:
    return [
        {"bpb": b, "tokens_per_sec": 1000.0 + i, "params": params, "steps": 100}
        for i, b in enumerate(bpbs)
    ]


def test_the_table_by_hand():
    rows = build_rows(SPECS[:4])  # GPT-2, +RoPE, +RMSNorm, +untied, +untied matched
    results = {
        0: runs(2.0, 2.1, 2.2),
        1: runs(1.9, 2.0, 1.95),
        2: runs(1.8),
        3: runs(1.7, 1.8, params=2_800_000),
        4: runs(1.75, 1.85),
    }
    table = summarise(rows, results)
    first, second = table[0], table[1]
    assert first["bpb"] == pytest.approx(2.1) and first["sd"] == pytest.approx(0.1)
    assert second["bpb"] == pytest.approx(1.95) and second["sd"] == pytest.approx(0.05)
    assert second["delta"] == pytest.approx(-0.15)
    assert second["se"] == pytest.approx(math.sqrt(0.1**2 / 3 + 0.05**2 / 3))
    assert table[2]["sd"] is None and table[2]["se"] is None  # one seed: no spread
    assert table[3]["params_added"] == 800_000 and table[3]["base"] == 2
    assert table[4]["delta"] == pytest.approx(1.8 - 1.8) and table[4]["base"] == 2
    assert first["tokens_per_sec"] == pytest.approx(1001.0)  # the mean over the seeds

    rows[4] = Row(rows[4].name, rows[4].settings, rows[4].base, {"n_embd": 156})
    text = format_table(summarise(rows, results))
    lines = text.splitlines()
    assert lines[2].split()[:4] == ["GPT-2", "2.100", "±", "0.100"]
    assert "-0.150 ± 0.065" in lines[3]
    assert "1.800 ± - (n=1)" in lines[4]
    assert "2.80M (+0.80M)" in lines[5]
    assert "+ untied head, matched (n_embd 156)" in lines[6] and "(+" not in lines[6]
    assert "more parameters: + untied head" in text
    assert "+ untied head against GPT-2: -0.350 bits/byte ±" in text  # the last plain row


def test_a_row_without_a_finished_run_says_so():
    rows = build_rows(SPECS[:2])
    text = format_table(summarise(rows, {0: runs(2.0, 2.2)}))
    assert "+ RoPE" in text and "(no finished run)" in text


# ----------------------------------------------------------------------------- running


def ablate_config(tmp_path: Path, corpus: dict, *extra: str):
    data = [
        "data=text",
        f"data.paths=['{corpus['file']}']",
        f"data.root='{corpus['root']}'",
        "data.vocab_size=400",
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=32",
        "batch_size=4",
        "max_iters=4",
        "max_minutes=null",
        "eval_interval=4",
        "log_interval=1",
        "eval_tokens=1024",
        "sample_tokens=4",
        "peak_tflops=1",
    ]
    overrides = [f"out_dir={tmp_path / 'ablate'}", "device=cpu", "precision=float32", *extra]
    cfg = load("ablate", overrides)
    cfg.pretrain = data  # (on the command line: pretrain="[data=text,...]", quoted for Hydra)
    return cfg


def test_the_runs_go_round_the_rows_seed_by_seed(tmp_path, corpus, monkeypatch):
    order = []

    def fake_train(overrides, out_dir):
        order.append((next(o for o in overrides if o.startswith("seed=")), out_dir.parent.name))

    monkeypatch.setattr(ablate, "train", fake_train)
    monkeypatch.setattr(ablate, "read_run", lambda out_dir: runs(2.0)[0])
    cfg = ablate_config(tmp_path, corpus, "seeds=[3,1]")
    table = ablate.run(cfg)
    folders = [
        "0-gpt-2-tiny-yaml",
        "1-rope",
        "2-rmsnorm",
        "3-swiglu",
        "4-gqa-1-key-value-head",
        "5-qk-norm",
        "6-untied-head",
        "7-untied-head-matched",
    ]
    assert order == [(f"seed={s}", f) for s in (3, 1) for f in folders]
    assert len(table) == 8 and all(line["n"] == 2 for line in table)


@pytest.mark.slow
def test_a_two_row_ablation_of_tiny_runs_and_its_rerun(tmp_path, corpus, capsys):
    rows = "rows=[{name:'GPT-2'},{name:'+ RoPE',set:{position:rope}}]"
    cfg = ablate_config(tmp_path, corpus, "seeds=[1]", rows)
    table = ablate.run(cfg)
    out = capsys.readouterr().out
    assert "[2/2] + RoPE, seed 1:" in out and "bits/byte (mean ± sd)" in out
    run = tmp_path / "ablate" / "1-rope" / "seed1"
    assert {"ckpt.pt", "config.yaml", "metrics.jsonl", "done.json"} <= {
        p.name for p in run.iterdir()
    }
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["position"] == "rope" and config["seed"] == 1
    assert table[1]["params"] < table[0]["params"]  # no position table
    assert all(0 < line["bpb"] < 20 for line in table)
    saved = json.loads((tmp_path / "ablate" / "ablation.json").read_text())
    assert [line["bpb"] for line in saved] == [line["bpb"] for line in table]

    again = ablate.run(cfg)  # everything finished with the same config: read, not run
    assert "finished before, read" in capsys.readouterr().out
    assert [line["bpb"] for line in again] == [line["bpb"] for line in table]


@pytest.mark.parametrize(
    "override, words",
    [
        ("seeds=[]", "seeds=[] is not valid: it must be a list of different integers"),
        ("seeds=[1,1]", "must be a list of different integers"),
        ("max_minutes=0", "max_minutes=0 is not valid: it must be a number > 0"),
        ("rows=[{nam:x}]", "rows=[{'nam': 'x'}] is not valid: it must be a list of {name"),
        ("rows=[{name:x,set:{positon:rope}}]", "row 'x': model config"),
        ("rows=[{name:x,set:{n_kv_head:3}}]", "n_kv_head=3 must divide n_head=2"),
    ],
)
def test_bad_settings_are_one_line_before_any_run(tmp_path, corpus, monkeypatch, override, words):
    monkeypatch.setattr(ablate, "train", lambda *a: pytest.fail("a run started"))
    with pytest.raises(UserError, match=re.escape(words)) as info:
        ablate.run(ablate_config(tmp_path, corpus, override))
    assert "\n" not in str(info.value)
