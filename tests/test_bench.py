"""python -m train.bench on a micro model: every figure is there, sane, and written as JSON."""

import json
from pathlib import Path

import pytest

import train.bench as bench
from errors import report_user_errors
from train.settings import load

ROOT = Path(__file__).resolve().parents[1]
MICRO = (
    "model=tiny",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.block_size=32",
    "model.vocab_size=64",
    "device=cpu",
    "precision=float32",
    "repeats=2",
    "train_batch_size=2",
    "train_seq_len=16",
    "train_steps=1",
    "prompt_tokens=4",
    "new_tokens=8",
    "batch_sizes=[1,3]",
    "batch_new_tokens=4",
)


def config(*overrides: str):
    return load("bench", overrides)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bench_measures_everything_and_writes_json(tmp_path, capsys, optimizer):
    hf = "true" if _has_transformers() else "false"
    results = bench.run(config(*MICRO, f"out_dir={tmp_path}", f"hf={hf}", f"optimizer={optimizer}"))
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["params"] == results["params"] > 0
    train, sample = written["train"], written["sample"]
    assert train["seq_len"] == 16 and len(train["tokens_per_sec"]["runs"]) == 2
    assert all(r > 0 for r in train["tokens_per_sec"]["runs"])
    assert 0 < train["mfu"]["best"] < 1  # a fraction of the measured peak
    peak = written["machine"]["peak_flops"]
    expected_mfu = train["tokens_per_sec"]["best"] * train["flops_per_token"] / peak
    assert train["mfu"]["best"] == pytest.approx(expected_mfu)
    for key in ("cached", "uncached") + (("transformers",) if hf == "true" else ()):
        assert sample[key]["best"] >= sample[key]["median"] > 0
    assert sample["cached_over_uncached"] == pytest.approx(
        sample["cached"]["best"] / sample["uncached"]["best"]
    )
    assert train["peak_memory_mb"] > 0 and sample["peak_memory_mb"] > 0
    # the bandwidth limit: every weight (the position table aside) read once per token
    n_weights = results["params"] - 32 * 32  # block_size x n_embd positions
    assert sample["weight_bytes_per_token"] == 4 * n_weights
    limit = sample["read_bytes_per_sec"] / sample["weight_bytes_per_token"]
    assert sample["limit_tokens_per_sec"] == pytest.approx(limit)
    assert sample["cached"]["of_limit"] == pytest.approx(sample["cached"]["best"] / limit)
    batched = written["batched"]
    assert set(batched["batches"]) == {"1", "3"} and batched["new_tokens"] == 4
    for r in batched["batches"].values():
        assert r["tokens_per_sec"]["best"] >= r["tokens_per_sec"]["median"] > 0
        assert 0 < r["of_peak"]["best"] < 1
    best = {k: r["tokens_per_sec"]["best"] for k, r in batched["batches"].items()}
    assert batched["largest_over_batch_1"] == pytest.approx(best["3"] / best["1"])
    if optimizer == "muon":  # Newton-Schulz apart from MFU
        assert train["newton_schulz_flops_per_step"] > 0 and train["optimizer_mfu"]["best"] > 0
    else:
        assert "optimizer_mfu" not in train
    table = capsys.readouterr().out
    for line in ("train tokens/s", "KV cache", "peak memory", "batch 3 tokens/s", "limit",
                 "GFLOP/s (measured"):  # fmt: skip
        assert line in table, line


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "override",
    [
        "repeats=0",
        "new_tokens=-1",
        "prompt_tokens=100",
        "temperature=0",
        "top_k=0",
        "batch_sizes=[0]",
        "batch_sizes=3",
        "batch_new_tokens=32",
        "optimizer=sgd",
    ],
)
def test_bad_settings_fail_fast_with_one_line(tmp_path, capsys, override):
    with pytest.raises(SystemExit) as e:
        report_user_errors(lambda: bench.run(config(*MICRO, f"out_dir={tmp_path}", override)))()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "bench.json").exists()
