"""Kill -9 at every moment of a checkpoint save, then resume: nothing is ever lost.

Pretraining (and PPO and GRPO, killed in the middle of a rollout) runs in a subprocess whose
checkpoint writer is instrumented: at its second save (the first one, at step 6, is the
good checkpoint to protect) the process SIGKILLs itself in the middle of writing the
file, between writing and fsync, or between fsync and the rename. Afterwards:
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
import torch
from test_ppo import tiny  # noqa: F401 (the stand-in SFT model, a fixture)
from test_pretrain import ROOT, env, overrides, train_losses, val_losses

from model.heads import ScalarModel
from train.core.checkpoint import load_checkpoint, save_checkpoint
from train.core.metrics import read_metrics

DRIVER = """
import io, os, signal, sys
import torch
import train.core.checkpoint as checkpoint, train.core.files as files

moment, kill_at, module = sys.argv[1], int(sys.argv[2]), sys.argv[3]
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
sys.argv = [module, *sys.argv[4:]]
runpy.run_module(module, run_name="__main__")  # as python -m <module>
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
    killed = python(str(driver), moment, "2", "train.pretrain", *args)
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


CLOCKS = ("tokens_per_sec", "mfu", "elapsed", "seconds")  # timings: they differ run to run


def save_reward_model(sft: dict, path: Path) -> None:
    """A reward model for PPO to climb: the stand-in SFT model's trunk with a fresh scalar
    head, saved as the reward stage saves one."""
    torch.manual_seed(1)
    model = ScalarModel(sft["model"].config)
    model.gpt.load_state_dict(sft["model"].state_dict())
    state = {"stage": "reward", "model_kind": "reward", "model_config": model.config.to_dict()}
    save_checkpoint(path, {**state, "tokenizer": sft["tok"].state(), "model": model.state_dict()})


# GRPO (the judge, eight replies a prompt, group advantages) and PPO (the reward model, one
# reply a prompt, a value function and GAE): they share the rollout's checkpointing
RL_RUNS = {
    "train.grpo": ["group_size=8", "rollout_prompts=1"],
    "train.ppo": ["group_size=1", "rollout_prompts=8"],
}


@pytest.mark.parametrize("module", RL_RUNS)
def test_rl_killed_inside_a_rollout_resumes_exactly(tiny, tmp_path, module):  # noqa: F811
    """Eight replies and four updates a rollout, a checkpoint every third: the second save
    (step 6, the rollout's second update) is killed half-written, and the run resumes from
    step 3, in the middle of the first rollout. The rest of that rollout comes from the
    checkpoint: every logged figure and the final weights (PPO's value function's too)
    equal those of a run never stopped."""
    d = tiny["dir"]
    save_reward_model(tiny, tmp_path / "rm.pt")
    (tmp_path / "prompts.jsonl").write_text((d / "prompts.jsonl").read_text() * 8)
    args = [f"init_from={d / 'sft.pt'}", f"reward_model={tmp_path / 'rm.pt'}",
            f"prompt_files=[{tmp_path / 'prompts.jsonl'}]", *RL_RUNS[module],
            "minibatch_size=4", "ppo_epochs=2", "iterations=4", "tasks.weight=0",
            f"eval_files=[{d / 'held_out.jsonl'}]",
            "sampled_k=0", "lr=3e-3", "warmup_iters=0", "reply_tokens=4", "eval_interval=3",
            "log_interval=1", "device=cpu", "precision=float32", "max_minutes=null"]  # fmt: skip
    whole = python("-m", module, f"out_dir={tmp_path / 'whole'}", *args)
    assert whole.returncode == 0, whole.stderr[-2000:]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = tmp_path / "run"
    killed = python(str(driver), "write", "2", module, f"out_dir={run}", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert load_checkpoint(run / "ckpt.pt")["step"] == 3  # one update of rollout 1 left
    resumed = python("-m", module, f"out_dir={run}", *args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def logged(path):
        return [{k: v for k, v in r.items() if k not in CLOCKS}
                for r in read_metrics(path / "metrics.jsonl")
                if "train_loss" in r or "rollout_score" in r]  # fmt: skip

    assert logged(run) == logged(tmp_path / "whole")  # every step and rollout once, equal
    a, b = (load_checkpoint(p / "ckpt.pt")["model"] for p in (tmp_path / "whole", run))
    assert all(torch.equal(a[k], b[k]) for k in a)
