"""Kill -9 at every moment of a checkpoint save, then resume: nothing is ever lost.

Pretraining runs in a subprocess whose checkpoint writer is instrumented: at its second
save (the first one, at step 6, is the good checkpoint to protect) the process SIGKILLs
itself in the middle of writing the file, between writing and fsync, or between fsync
and the rename. Afterwards:
  - ckpt.pt loads, and is the step-6 checkpoint;
  - the next start (resume=true) removes the half-written temporary file;
  - the resumed run's losses equal those of a run never interrupted;
  - metrics.jsonl has every step exactly once.
"""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_pretrain import ROOT, env, overrides, train_losses, val_losses

from train.core.checkpoint import load_checkpoint
from train.core.metrics import read_metrics

DRIVER = """
import io, os, signal, sys
import torch
import train.core.checkpoint as checkpoint, train.core.files as files

moment, kill_at = sys.argv[1], int(sys.argv[2])
saves = {"n": 0}
real_save, real_fsync, real_replace = checkpoint.save_checkpoint, os.fsync, os.replace


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def dying_now():
    return saves["n"] == kill_at


def save_checkpoint(path, state):
    saves["n"] += str(path).endswith("ckpt.pt")  # best.pt saves are not counted
    if moment == "write" and dying_now():  # half the bytes reach the file, then the kill
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with open(str(path) + files.TMP_SUFFIX, "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
        die()
    real_save(path, state)


def fsync(fd):
    if moment == "fsync" and dying_now():
        die()
    real_fsync(fd)


def replace(src, dst):
    if moment == "rename" and dying_now() and str(dst).endswith("ckpt.pt"):
        die()
    real_replace(src, dst)


import runpy
import train.core.trainer

checkpoint.save_checkpoint = train.core.trainer.save_checkpoint = save_checkpoint
os.fsync, os.replace = fsync, replace
sys.argv = ["train/pretrain.py", *sys.argv[3:]]
runpy.run_module("train.pretrain", run_name="__main__")  # as python -m train.pretrain
"""


def python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


RUN = dict(max_iters=12, eval_interval=6, **{"model.dropout": 0.1})


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("whole") / "run"
    result = python("-m", "train.pretrain", *overrides(corpus, run, **RUN))
    assert result.returncode == 0, result.stderr[-2000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["write", "fsync", "rename"])
def test_a_kill_during_a_save_loses_nothing(moment, uninterrupted, corpus, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = tmp_path / "run"
    args = overrides(corpus, run, **RUN)
    killed = python(str(driver), moment, "2", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert load_checkpoint(run / "ckpt.pt")["step"] == 6  # the good one, whole
    assert (run / "ckpt.pt.tmp").exists()  # what the kill left behind

    resumed = python("-m", "train.pretrain", *args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(run.glob("*.tmp"))
    assert train_losses(run) == pytest.approx(train_losses(uninterrupted), abs=1e-6, rel=0)
    assert val_losses(run) == pytest.approx(val_losses(uninterrupted), abs=1e-6, rel=0)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train_loss" in r]
    assert steps == list(range(1, 13))
