"""Distributed data parallel: torchrun with 2 CPU processes (gloo) equals one process with
the same global batch reached by gradient accumulation.

With batch_size B per process and grad_accum 1, the two ranks draw global batches 2s and
2s+1 at step s, which are the two micro-batches one process draws with grad_accum=2
(data/loader.py); DDP averages the two gradients, accumulation sums the
two halves. So the losses and the weights must agree to rounding.
"""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train.pretrain as pretrain
from train.settings import load

ROOT = Path(__file__).resolve().parents[1]
WORDS = "to be or not that is the question whether tis nobler in mind suffer".split()
B, T = 4, 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_two_processes_equal_one_with_gradient_accumulation(tmp_path, preset):
    rng = random.Random(5)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(900)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    args = {
        "data": "text",
        "data.paths": f"['{tmp_path / 'corpus.txt'}']",
        "data.root": f"'{tmp_path / 'data'}'",
        "data.vocab_size": 300,
        "model": preset,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": T,
        "batch_size": B,
        "lr": 1e-2,
        "warmup_iters": 2,
        "max_iters": 4,
        "max_minutes": "null",  # step-bounded: the schedule must not depend on the clock
        "eval_interval": 2,
        "log_interval": 1,
        "eval_tokens": 2048,
        "sample_tokens": 4,
        "peak_tflops": 1,
        "device": "cpu",
        "precision": "float32",
    }
    if preset == "llama-tiny":
        args["model.n_kv_head"] = 1  # grouped-query attention: 2 query heads share 1 kv head

    def argv(out_dir: Path, grad_accum: int) -> list[str]:
        run = {**args, "out_dir": f"'{out_dir}'", "grad_accum": grad_accum}
        return [f"{k}={v}" for k, v in run.items()]

    # one process, grad_accum = 2 (in this process; it also prepares the data)
    single = tmp_path / "single"
    pretrain.run(load("pretrain", argv(single, 2)))

    # two processes under torchrun, grad_accum = 1
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "train.pretrain", *argv(ddp, 1)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "4 x 1 x 2 per step" in result.stdout  # B x grad_accum 1 x 2 processes
    assert result.stdout.count("done: step 4") == 1  # rank 0 alone prints

    a, b = read_metrics(single), read_metrics(ddp)  # rank 0 alone wrote: each step once
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 2, 3, 4, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "lr", "val_loss", "val_bpb"):
            assert (key in ra) == (key in rb)
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-5, rel=0), (ra["step"], key)
    losses = [r["train_loss"] for r in a if "train_loss" in r]
    assert abs(losses[-1] - losses[0]) > 1e-3  # the model moved: equality is not trivial

    ca = torch.load(single / "ckpt.pt", weights_only=True)
    cb = torch.load(ddp / "ckpt.pt", weights_only=True)
    assert ca["step"] == cb["step"] == 4
    for k, v in ca["model"].items():
        assert torch.allclose(cb["model"][k], v, atol=1e-5, rtol=0), k
    # each rank's own stream position is in the checkpoint, for resuming on 2 processes
    assert [r["data"]["step"] for r in cb["per_rank"]] == [4, 4]
    assert [r["data"]["step"] for r in ca["per_rank"]] == [8]
