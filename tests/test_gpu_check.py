"""make gpu-check (scripts/gpu_check.py) runs its steps and sums them up; here on the CPU,
with a micro model, so that the script a lent GPU runs is known to work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MICRO = [
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.block_size=32",
    "precision=float32",
]


@pytest.mark.slow
def test_gpu_check_runs_pretraining_and_bench_and_reports(tmp_path):
    from test_pretrain import fake_play

    (tmp_path / "plays.txt").write_text(fake_play(0, 600))
    data = [
        "data=text",
        f"data.paths=['{tmp_path / 'plays.txt'}']",
        "data.vocab_size=400",
        f"data.root={tmp_path / 'data'}",
    ]
    bench = [
        "model.vocab_size=64",
        "repeats=1",
        "train_batch_size=2",
        "train_seq_len=16",
        "train_steps=1",
        "sample=false",
        "batch_sizes=[1,2]",
        "batch_new_tokens=4",
    ]
    out = tmp_path / "check"
    cmd = [
        sys.executable,
        "scripts/gpu_check.py",
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--steps",
        "3",
        "--no-compile",
        "--skip-tests",
        "--out",
        str(out),
        "--pretrain",
        *MICRO,
        *data,
        "batch_size=2",
        "eval_tokens=512",
        "peak_tflops=1",
        "--bench",
        *MICRO,
        *bench,
        "peak_tflops=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == {"pretrain": True, "bench": True}
    assert summary["pretrain"]["step"] == 3 and summary["pretrain"]["tokens_per_sec"] > 0
    assert 0 < summary["pretrain"]["mfu"] < 1 and summary["pretrain"]["val_bpb"] > 0
    assert summary["bench"]["machine"]["peak_source"] == "peak_tflops=1 given"
    assert set(summary["bench"]["batched"]["batches"]) == {"1", "2"}
    text = proc.stdout
    assert "=== gpu-check summary ===" in text and "pretraining (eager)" in text
    assert "batched sampling, batch 2" in text and (out / "pretrain.log").is_file()
