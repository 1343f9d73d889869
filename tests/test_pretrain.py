"""python -m train.pretrain end to end, on a corpus the tests write: the smoke run and its
run directory, resuming a killed or Ctrl-C'd run exactly, start-up errors, and bits per byte
of a checkpoint on a text file (python -m train.evaluate).

The model is tiny (2 layers of width 32, context 32) and the vocabulary 400 pieces, so a
run takes seconds. Subprocesses get OMP_NUM_THREADS=1: on a busy 2-core machine a model
this small runs many times faster on one thread than on two.
"""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import train.core.trainer as loop
import train.evaluate as evaluate
import train.pretrain as pretrain
from errors import UserError
from train.core.checkpoint import load_model
from train.settings import load

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the king and queen of love shall speak to thee my lord what is this night "
         "good sir I pray you come hither now fair sweet death life heart").split()  # fmt: skip


def fake_play(seed: int, lines: int) -> str:
    """Play-like text with a little structure (speakers, verse), so a model can learn it."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        if i % 6 == 0:
            out.append(f"\n{rng.choice(WORDS).upper()}.")
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        out.append(words.capitalize() + rng.choice(".,;:!?"))
    return "\n".join(out) + "\n"


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def overrides(corpus: dict, out_dir: Path, **extra) -> list[str]:
    """Command-line overrides for a tiny run; the data settings are the same for every run,
    so the data is prepared once and found up to date afterwards."""
    settings = {
        "data": "text",
        "data.paths": f"['{corpus['file']}']",
        "data.root": f"'{corpus['root']}'",
        "data.vocab_size": 400,
        "out_dir": f"'{out_dir}'",
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 32,
        "batch_size": 4,
        "lr": 1e-2,
        "min_lr": 1e-3,
        "warmup_iters": 2,
        "max_iters": 12,
        "max_minutes": "null",  # step-bounded, so runs are exactly repeatable
        "eval_interval": 6,
        "log_interval": 1,
        "eval_tokens": 2048,
        "sample_tokens": 8,
        "peak_tflops": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items() if v is not None]


def pretrain_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train.pretrain", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, **kwargs)


def pretrain_in_process(args: list[str]) -> dict:
    """The same run as the command line, composed by Hydra and run in this process."""
    return pretrain.run(load("pretrain", args))


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(run) if "train_loss" in r}


def val_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}


# --- the smoke run ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """12 steps on the command line, default precision, MFU measured (peak_tflops=null)."""
    run = tmp_path_factory.mktemp("smoke") / "run"
    result = pretrain_cli(overrides(corpus, run, peak_tflops="null"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


def test_smoke_run_directory(smoke_run, corpus):
    run, result = smoke_run
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock",  # held while a run writes the folder (released when it exits)
        "best.pt",
        "ckpt.pt",
        "config.yaml",
        "done.json",  # the stage finished (train/align.py skips finished stages)
        "metrics.jsonl",
    ]  # no .tmp, no Hydra folders or logs
    assert "Traceback" not in result.stderr
    assert re.search(
        r"done: step 12, val loss [\d.]+ nats/token, .* [\d.]+ bits/byte", result.stdout
    )
    assert result.stdout.count("--- sample ---") == 2  # at steps 6 and 12, not twice at 12

    text = (run / "config.yaml").read_text()
    assert "${" not in text  # fully resolved
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.max_iters == 12 and cfg.model.n_embd == 32 and cfg.batch_size == 4
    assert cfg.data.cache_dir == f"{corpus['root']}/cache"
    assert cfg.out_dir == str(run) and cfg.data.paths == [str(corpus["file"])]


def test_smoke_run_metrics(smoke_run, corpus):
    run, _ = smoke_run
    records = read_metrics(run)
    logs = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in logs] == list(range(1, 13))
    for r in logs:
        assert {"step", "train_loss", "lr", "tokens_per_sec", "mfu"} <= r.keys()
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 and r["lr"] > 0
    assert [r["step"] for r in evals] == [6, 12]
    meta = json.loads((corpus["root"] / "text" / "meta.json").read_text())
    tokens_per_byte = meta["splits"]["val"]["tokens"] / meta["splits"]["val"]["bytes"]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-9)
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) * tokens_per_byte)

    # it learns: from ln(400) ~ 6 nats at the start to clearly less
    first, last = [r["train_loss"] for r in logs[:3]], [r["train_loss"] for r in logs[-3:]]
    assert first[0] == pytest.approx(math.log(400), abs=0.3)
    assert sum(last) / 3 < sum(first) / 3 - 0.5
    assert evals[1]["val_loss"] < evals[0]["val_loss"] < math.log(400)


def test_smoke_run_checkpoints(smoke_run):
    run, _ = smoke_run
    ckpt = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)
    for key in ("model_config", "model", "tokenizer", "optimizer", "step", "per_rank", "config"):
        assert key in ckpt, key
    assert ckpt["step"] == 12 and ckpt["stage"] == "pretrain"
    assert ckpt["model_config"]["n_embd"] == 32 and ckpt["model_config"]["vocab_size"] == 400
    assert ckpt["per_rank"][0]["data"]["step"] == 12  # one batch per step
    assert {"python", "numpy", "torch"} <= ckpt["per_rank"][0]["rng"].keys()
    assert ckpt["config"]["max_iters"] == 12
    assert ckpt["optimizer"]["state"]  # moments, for resuming
    evals = [r for r in read_metrics(run) if "val_loss" in r]
    assert ckpt["metrics"] == evals[-1]

    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    lowest = min(evals, key=lambda r: r["val_loss"])
    assert best["step"] == lowest["step"] and best["best"]["value"] == lowest["val_loss"]

    model, tok, _ = load_model(run)  # enough on its own to sample from
    assert tok.vocab_size == model.config.vocab_size == 400
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k])


# --- start-up errors --------------------------------------------------------------------


def test_missing_device_fails_at_start_up(tmp_path, corpus):
    """One line on stderr, no traceback, before data preparation or training."""
    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    run = tmp_path / "run"
    missing = f"['{tmp_path / 'missing.txt'}']"  # preparing the data would fail differently
    result = pretrain_cli(overrides(corpus, run, device=device, **{"data.paths": missing}))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: device={device} ")
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not run.exists() or not any(run.iterdir())  # Hydra makes its run dir, empty


def test_unknown_optimizer_fails_before_any_work(tmp_path, corpus):
    with pytest.raises(
        UserError, match="optimizer='lion' is not valid: it must be one of adamw, muon"
    ):
        pretrain_in_process(overrides(corpus, tmp_path / "run", optimizer="lion"))
    assert not (tmp_path / "run").exists()


def test_resume_without_a_checkpoint(tmp_path, corpus):
    with pytest.raises(UserError, match="does not exist; train one first"):
        pretrain_in_process(overrides(corpus, tmp_path / "run", resume="true"))


# --- resume -----------------------------------------------------------------------------

# Dropout, so that resuming must restore the RNG too; evaluations at 5 and 10 and the end.
RESUME = dict(max_iters=12, eval_interval=5, **{"model.dropout": 0.1})


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    pretrain_in_process(overrides(corpus, run, **RESUME))
    return run


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, nothing after it runs."""


def kill_after_checkpoint(monkeypatch, step: int) -> None:
    """The process dies right after writing ckpt.pt at `step` (and before best.pt)."""
    real_save = loop.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if Path(path).name == "ckpt.pt" and state["step"] == step:
            raise Killed

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)


def ctrl_c_during_step(monkeypatch, step: int) -> None:
    """Ctrl-C arrives while the batch of optimizer step `step` (1-based) is drawn."""
    real_next = pretrain.TokenLoader.next_batch

    def next_batch(self):
        if self.step == step - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self)

    monkeypatch.setattr(pretrain.TokenLoader, "next_batch", next_batch)


@pytest.mark.parametrize("how", ["killed after the checkpoint at step 5", "ctrl-c at step 7"])
def test_resume_equals_the_uninterrupted_run(
    uninterrupted, corpus, tmp_path, monkeypatch, capsys, how
):
    """A run stopped at step k (of max_iters=12), then `resume=true`, gives the uninterrupted
    run's losses step for step and its final weights, exactly.

    The first run is stopped, not ended by max_iters=k: a run that ends at k has followed a
    cosine over k steps, so continuing it to 12 rightly gives other learning rates."""
    run = tmp_path / "run"
    args = overrides(corpus, run, **RESUME)
    if how.startswith("killed"):
        kill_after_checkpoint(monkeypatch, 5)
        with pytest.raises(Killed):
            pretrain_in_process(args)
        stopped_at = 5
    else:
        ctrl_c_during_step(monkeypatch, 7)
        with pytest.raises(KeyboardInterrupt):  # a real SIGINT: the step finishes, it saves
            pretrain_in_process(args)
        assert "stopped at step 7 (Ctrl-C); checkpoint saved" in capsys.readouterr().out
        stopped_at = 7
    monkeypatch.undo()
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == stopped_at
    assert max(train_losses(run)) == stopped_at

    pretrain_in_process(args + ["resume=true"])

    expected, got = train_losses(uninterrupted), train_losses(run)
    assert list(got) == list(range(1, 13)) and list(expected) == list(range(1, 13))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step
    assert val_losses(run) == pytest.approx(val_losses(uninterrupted), abs=1e-6, rel=0)
    assert list(val_losses(run)) == [5, 10, 12]

    a = torch.load(uninterrupted / "ckpt.pt", weights_only=True)
    b = torch.load(run / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-6, rtol=0), k
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for i, state in a["optimizer"]["state"].items():  # Muon's momentum, AdamW's moments
        assert state.keys() == b["optimizer"]["state"][i].keys()
        for key, value in state.items():  # tensors, and AdamW-in-Muon's step count
            other = b["optimizer"]["state"][i][key]
            assert torch.allclose(torch.as_tensor(value), torch.as_tensor(other), atol=1e-6), key
    assert a["per_rank"][0]["data"] == b["per_rank"][0]["data"]


# --- bits per byte of a checkpoint on a text file --------------------------------------


def direct_bits_per_byte(run: Path, text: str) -> tuple[float, int, int]:
    """Sum of -ln p over every token of the text (after an <|eos|>), context windows of
    block_size, divided by ln 2 and the number of UTF-8 bytes."""
    model, tok, _ = load_model(run)
    ids = [tok.eos_id] + tok.encode(text)
    T = model.config.block_size
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, T):
            x = torch.tensor(ids[start : start + T])
            y = torch.tensor(ids[start + 1 : start + T + 1])
            logits, _ = model(x[None])
            nats += F.cross_entropy(logits[0, : len(y)].double(), y, reduction="sum").item()
    n_bytes = len(text.encode("utf-8"))
    return nats / (math.log(2) * n_bytes), n_bytes, len(ids) - 1


def test_evaluate_bits_per_byte_of_a_text_file(smoke_run, tmp_path):
    run, _ = smoke_run
    text = fake_play(7, 80) + "Ô fair Verona, “where we lay our scene”.\n"  # multi-byte too
    path = tmp_path / "held_out.txt"
    path.write_text(text, encoding="utf-8")
    cmd = [sys.executable, "-m", "train.evaluate", f"checkpoint='{run}'",
           f"text_file='{path}'", "device=cpu", "precision=float32"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    m = re.search(
        r"(\d+) bytes, (\d+) tokens, loss ([\d.]+) nats/token, ([\d.]+) bits/byte", result.stdout
    )
    assert m, result.stdout
    bpb, n_bytes, n_tokens = direct_bits_per_byte(run, text)
    assert (int(m.group(1)), int(m.group(2))) == (n_bytes, n_tokens)
    assert n_bytes > len(text)  # the multi-byte characters count as bytes
    assert float(m.group(4)) == pytest.approx(bpb, abs=1e-4)
    assert float(m.group(3)) == pytest.approx(bpb * math.log(2) * n_bytes / n_tokens, abs=1e-4)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"", "empty"),
        (b"caf\xe9 au lait\n", "not UTF-8"),
    ],
)
def test_evaluate_bad_text_file(smoke_run, tmp_path, content, message):
    run, _ = smoke_run
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    cfg = load("evaluate", [f"checkpoint={run}", f"text_file={path}", "device=cpu",
                            "precision=float32", "seed=0"])  # fmt: skip
    with pytest.raises(UserError, match=message):
        evaluate.run(cfg)
