"""The training machinery, in-process: device and precision resolution, the optimizer and the
learning-rate schedule, checkpoints (atomic, safe, exact RNG state) and the loop's ways of
stopping (max_iters, max_minutes, Ctrl-C, NaN).

The loop tests drive `Trainer` directly with a GPT of a few thousand parameters and random
token batches, so the whole file runs in a few seconds on a CPU.
"""

import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_loop import loop_settings

import train.core.checkpoint as checkpoint
import train.core.files as files
import train.core.peak as peak
import train.core.runtime as runtime
from errors import UserError
from model import GPT, GPTConfig
from train.core import guards
from train.core.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from train.core.optim import build_optimizer, fraction_done, lr_at
from train.core.runtime import Runtime, resolve_device, resolve_precision
from train.core.trainer import StepResult, Trainer

ROOT = Path(__file__).resolve().parents[1]

# No biases: the key projection's bias has a gradient of exactly zero (softmax ignores it),
# and Adam blows that zero's rounding noise up into lr-sized steps that no tolerance survives.
TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, bias=False)


# --- device ---------------------------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3", "CUDA"])
def test_cuda_without_a_gpu_is_a_user_error(no_gpu, name):
    with pytest.raises(UserError, match=f"device={name.lower()}.*CUDA is not available"):
        resolve_device(name)


def test_cuda_index_beyond_the_gpus_is_a_user_error(two_gpus):
    with pytest.raises(UserError, match=r"device=cuda:3 .* 2 GPU\(s\)") as e:
        resolve_device("cuda:3")
    assert "cuda:0 .. cuda:1" in str(e.value)
    with pytest.raises(UserError, match="cuda:N with N a number"):
        resolve_device("cuda:x")


def test_cuda_devices_that_exist(two_gpus):
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 1)  # wraps around
    assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)


@pytest.mark.parametrize("name", ["bogus", "gpu", "cuda3", ""])
def test_unknown_device_is_a_user_error(name):
    with pytest.raises(UserError, match="not known; use auto, cpu, cuda, cuda:N or mps"):
        resolve_device(name)


def test_auto_and_cpu_without_accelerators(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(UserError, match="device=mps.*not available"):
        resolve_device("mps")


def test_setup_runtime_fails_before_doing_anything(no_gpu, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match="cuda"):
        runtime.setup_runtime("cuda", "float32")
    rt = runtime.setup_runtime("cpu", "float32", seed=3)
    assert (rt.device, rt.dtype, rt.rank, rt.world_size, rt.is_main) == (
        torch.device("cpu"),
        torch.float32,
        0,
        1,
        True,
    )
    seeded = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(seeded, torch.rand(3))


# --- precision ------------------------------------------------------------------------

CPU = torch.device("cpu")


@pytest.mark.parametrize("bf16, expected", [("1", torch.bfloat16), ("0", torch.float32)])
def test_auto_precision_on_cpu(monkeypatch, bf16, expected):
    monkeypatch.setenv(runtime.CPU_BF16_ENV, bf16)
    assert resolve_precision("auto", CPU) == expected


# /proc/cpuinfo flags of the CPUs the project meets (abridged to what the decision reads)
CPUS = {
    "Xeon Sapphire Rapids": ("flags", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile", True),
    "EPYC Zen 4": ("flags", "avx2 avx512f avx512_bf16 avx512_vnni", True),
    "EPYC Zen 2 (AVX2)": ("flags", "sse4_2 avx avx2 fma", False),
    "Xeon Cascade Lake (no bf16)": ("flags", "avx2 avx512f avx512bw avx512_vnni", False),
    "Graviton 3 (BF16)": ("Features", "fp asimd sve bf16 i8mm", True),
    "Graviton 2": ("Features", "fp asimd crc32 atomics", False),
}


@pytest.mark.parametrize("cpu", CPUS)
def test_native_bf16_is_read_from_the_cpus_own_flags(tmp_path, cpu):
    """oneDNN's own answer says yes on any AVX-512 CPU (Cascade Lake emulates bf16, tens of
    times slower); the flags say which instructions the cores have."""
    key, flags, native = CPUS[cpu]
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: {cpu}\n{key}\t\t: {flags}\n\n")
    read = runtime.cpu_flags(str(info))
    assert read == frozenset(flags.split())

    def never() -> float:
        raise AssertionError("measured although the flags say")

    assert runtime.native_bf16(read, never) is native


def test_without_flags_to_read_bf16_is_measured(tmp_path):
    assert runtime.cpu_flags(str(tmp_path / "absent")) is None  # macOS, Windows
    assert runtime.native_bf16(None, lambda: 2.1) is True  # bf16 twice as fast: native
    assert runtime.native_bf16(None, lambda: 1 / 45) is False  # emulated
    assert runtime.bf16_speedup(n=64, repeats=1) > 0  # the measurement runs


def test_the_override_answers_first_and_is_checked(monkeypatch):
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")
    assert runtime.cpu_supports_bf16() is True
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "0")
    assert runtime.cpu_supports_bf16() is False
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "yes")
    with pytest.raises(UserError, match="HANDGPT_CPU_BF16=yes is not valid; set it to 1 or 0"):
        runtime.cpu_supports_bf16()
    monkeypatch.delenv(runtime.CPU_BF16_ENV)
    assert runtime.cpu_supports_bf16() is runtime.detected_cpu_bf16()


@pytest.mark.parametrize(
    "requested, recorded, native, expected",
    [
        ("auto", "float32", "1", "float32"),  # the stage's precision, on either CPU
        ("auto", "float32", "0", "float32"),
        ("auto", "bfloat16", "1", "bfloat16"),
        ("auto", "bfloat16", "0", "float32"),  # emulated here: float32, said so
        ("auto", "float16", "1", "float32"),  # float16 on a CPU: emulated
        ("auto", None, "1", "bfloat16"),  # nothing recorded: auto's pick
        ("auto", None, "0", "float32"),
        ("bfloat16", "float32", "0", "bfloat16"),  # asked by name: as asked
    ],
)
def test_evaluation_replays_the_stages_precision(monkeypatch, requested, recorded, native,
                                                 expected):  # fmt: skip
    monkeypatch.setenv(runtime.CPU_BF16_ENV, native)
    precision, why = runtime.replay_precision(requested, recorded, CPU)
    assert precision == expected
    if recorded and expected != recorded and requested == "auto":
        assert "only emulates" in why


def test_explicit_precisions():
    assert resolve_precision("float32", CPU) == torch.float32
    assert resolve_precision("BFloat16", CPU) == torch.bfloat16
    assert resolve_precision("float16", CPU) == torch.float16


@pytest.mark.parametrize("name", ["fp8", "half", "float64", "bogus"])
def test_unknown_precision_is_a_user_error(name):
    with pytest.raises(UserError, match=f"precision={name} is not known"):
        resolve_precision(name, CPU)


def test_precision_on_a_gpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    gpu = torch.device("cuda", 0)
    assert resolve_precision("auto", gpu) == torch.float16
    with pytest.raises(UserError, match="bfloat16 is not supported on Tesla T4"):
        resolve_precision("bfloat16", gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", gpu) == torch.bfloat16


FAULTS_PER_STEP = """
import resource, sys, torch
from model import GPT, GPTConfig
from train.core.runtime import setup_runtime
from train.core.optim import build_optimizer
setup_runtime("cpu", "float32")  # on a CPU this keeps freed memory (keep_freed_memory)
torch.set_num_threads(1)
model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=16384))
opt = build_optimizer(model, 1e-3, 0.0, kind="muon")
x, y = torch.randint(0, 16384, (2, 6, 128))  # logits (6, 128, 16384): 48 MiB, and its grads
def step():
    model(x, y)[1].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(2):
    step()
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_cpu_training_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
    """glibc by default maps a block above its mmap threshold afresh at every allocation
    and unmaps it on free, so each step faults in fresh zeroed pages: 49,156 minor faults
    per step for these 48 MiB logits, measured (glibc raises its threshold after a free,
    but never above 32 MiB, so smaller blocks, such as the tiny demo's 16 MiB logits, fault
    only at times). With the runtime's malloc settings a step reuses the heap."""
    if not runtime.keep_freed_memory():
        pytest.skip("not glibc: malloc's thresholds cannot be set here")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP], env=env, capture_output=True,
                         text=True, check=True, timeout=300)  # fmt: skip
    faults = sorted(int(n) for n in out.stdout.split())  # per step
    # the median step: now and then a step still faults once (15,000-49,000 in one step of
    # eight, seen), while without the settings every step takes > 49,000
    assert faults[len(faults) // 2] < 1500, faults


def test_runtime_autocast_and_scaler():
    assert not Runtime(CPU, torch.float32).grad_scaler().is_enabled()
    assert Runtime(CPU, torch.float16).grad_scaler().is_enabled()
    assert not Runtime(CPU, torch.bfloat16).grad_scaler().is_enabled()
    a = torch.randn(4, 4)
    with Runtime(CPU, torch.bfloat16).autocast():
        assert (a @ a).dtype == torch.bfloat16
    with Runtime(CPU, torch.float32).autocast():
        assert (a @ a).dtype == torch.float32


def test_measuring_peak_flops_leaves_the_global_rng_alone():
    """Measuring MFU's denominator must not shift the dropout stream (rank 0 measures, the
    other ranks do not; a run must not depend on whether peak_tflops was given)."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    flops = peak.measured_matmul_flops(CPU, torch.float32, seconds=0.01)
    assert flops > 0
    assert torch.equal(torch.get_rng_state(), before)
    assert peak.peak_flops(CPU, torch.float32, override_tflops=2.5).flops == 2.5e12


# --- optimizer and schedule -----------------------------------------------------------


def expected_lr(step, f, max_lr, min_lr, warmup):
    """The schedule as the docs state it, written out independently."""
    warm = min(1.0, (step + 1) / warmup)
    return warm * (min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(f, 1.0))))


MAX_LR, MIN_LR, WARMUP, ITERS = 1e-3, 1e-4, 10, 100


def schedule():
    return [lr_at(s, s / ITERS, MAX_LR, MIN_LR, WARMUP) for s in range(ITERS)]


def test_lr_during_warm_up():
    assert lr_at(0, 0.0, MAX_LR, MIN_LR, WARMUP) == pytest.approx(MAX_LR / WARMUP, rel=1e-12)
    # step 0 is the ramp's first tenth of whatever the cosine gives at that point of the run
    cos_half = MIN_LR + (MAX_LR - MIN_LR) * 0.5
    assert lr_at(0, 0.5, MAX_LR, MIN_LR, WARMUP) == pytest.approx(cos_half / WARMUP, rel=1e-12)
    lrs = schedule()
    for s in range(WARMUP):  # a linear ramp, times a cosine still close to 1
        assert lrs[s] == pytest.approx(expected_lr(s, s / ITERS, MAX_LR, MIN_LR, WARMUP))
        assert lrs[s] == pytest.approx(MAX_LR * (s + 1) / WARMUP, rel=0.03)
    assert all(a < b for a, b in zip(lrs[:WARMUP], lrs[1:WARMUP], strict=False))


def test_lr_peaks_at_the_end_of_warm_up_then_decays_to_min_lr():
    lrs = schedule()
    peak = int(np.argmax(lrs))
    assert peak == WARMUP - 1
    # the cosine runs from step 0, so the peak is max_lr times c(9/100) = 0.98 max_lr
    assert lrs[peak] == pytest.approx(MAX_LR, rel=0.02)
    assert lrs[peak] == pytest.approx(expected_lr(peak, peak / ITERS, MAX_LR, MIN_LR, WARMUP))
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))
    assert lrs[ITERS // 2] == pytest.approx((MAX_LR + MIN_LR) / 2, rel=1e-12)
    assert lrs[-1] == pytest.approx(MIN_LR, rel=0.01) and lrs[-1] > MIN_LR
    assert lr_at(ITERS, 1.0, MAX_LR, MIN_LR, WARMUP) == pytest.approx(MIN_LR, rel=1e-12)
    assert lr_at(ITERS, 1.7, MAX_LR, MIN_LR, WARMUP) == pytest.approx(MIN_LR, rel=1e-12)
    assert lr_at(5, 0.0, MAX_LR, MIN_LR, 0) == MAX_LR  # no warm-up


def test_wsd_holds_the_peak_then_decays_linearly_to_min_lr():
    def wsd(step, f):
        return lr_at(step, f, MAX_LR, MIN_LR, WARMUP, schedule="wsd", cooldown=0.4)

    assert wsd(0, 0.0) == pytest.approx(MAX_LR / WARMUP, rel=1e-12)  # the same warm-up
    assert wsd(WARMUP, 0.1) == MAX_LR and wsd(50, 0.6) == MAX_LR  # stable until 1 - cooldown
    assert wsd(80, 0.8) == pytest.approx((MAX_LR + MIN_LR) / 2, rel=1e-12)  # halfway down
    assert wsd(99, 0.9) == pytest.approx(MIN_LR + (MAX_LR - MIN_LR) / 4, rel=1e-12)
    assert wsd(100, 1.0) == pytest.approx(MIN_LR, rel=1e-12)
    lrs = [wsd(s, s / ITERS) for s in range(60, ITERS + 1)]
    steps = np.diff(lrs)  # a straight line down: equal decrements
    assert np.all(steps < 0) and np.allclose(steps, steps[0])
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, 0.0, MAX_LR, MIN_LR, WARMUP, schedule="linear")


def test_schedule_settings_are_checked():
    with pytest.raises(
        UserError, match="schedule='linear' is not valid: it must be one of cosine, wsd"
    ):
        loop_settings(schedule="linear")
    with pytest.raises(
        UserError, match="cooldown=0 is not valid: it must be a number > 0 and <= 1"
    ):
        loop_settings(schedule="wsd", cooldown=0.0)
    with pytest.raises(UserError, match="min_lr=0.1 is above lr=0.01"):
        loop_settings(lr=0.01, min_lr=0.1)


def test_fraction_done_takes_the_bound_that_applies():
    assert fraction_done(25, 100, 0.0, None) == 0.25
    assert fraction_done(25, 100, 30.0, 1.0) == 0.5  # half a minute of a one-minute budget
    assert fraction_done(75, 100, 30.0, 1.0) == 0.75  # the step bound is further along
    assert fraction_done(25, 100, 600.0, 1.0) == 1.0  # past the budget: clamped
    assert fraction_done(100, 100, 0.0, None) == 1.0
    assert fraction_done(0, 0, 0.0, None) == 1.0  # max_iters=0: nothing to do, no crash
    # with the time bound ahead, the schedule is further down its cosine than the step says
    f = fraction_done(10, 100, 45.0, 1.0)
    assert lr_at(10, f, MAX_LR, MIN_LR, WARMUP) < lr_at(10, 10 / 100, MAX_LR, MIN_LR, WARMUP)


def test_weight_decay_on_matrices_only():
    model = GPT(GPTConfig(**{**TINY, "bias": True}))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["params"] and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # tied weight once
    assert opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.95)


# --- checkpoints ----------------------------------------------------------------------


def small_state(step: int) -> dict:
    torch.manual_seed(step)
    model = GPT(GPTConfig(**TINY))
    return {
        "stage": "test",
        "model_config": model.config.to_dict(),
        "model": model.state_dict(),
        "tokenizer": {"kind": "none", "model": b"spm"},
        "step": step,
        "rng": rng_state(),
    }


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "run" / "ckpt.pt"
    state = small_state(7)
    save_checkpoint(path, state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no .tmp left
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 7 and raw["format"] == checkpoint.CHECKPOINT_FORMAT
    for where in (path, path.parent):  # a file or its run directory
        ckpt = load_checkpoint(where)
        assert ckpt["path"] == str(path)
        for k, v in state["model"].items():
            assert torch.equal(ckpt["model"][k], v)


class _Boom(Exception):
    pass


def _garbage_then_fail(obj, f, *args, **kwargs):
    f.write(b"\x80\x02 half a checkpoint" * 100)
    raise _Boom("disk full")


def _replace_fails(src, dst):
    raise _Boom("killed before the rename")


@pytest.mark.parametrize("where", ["while writing", "before the rename"])
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, small_state(1))
    before = path.read_bytes()
    if where == "while writing":
        monkeypatch.setattr(checkpoint.torch, "save", _garbage_then_fail)
    else:
        monkeypatch.setattr(files.os, "replace", _replace_fails)
    with pytest.raises(_Boom):
        save_checkpoint(path, small_state(2))
    monkeypatch.undo()
    assert path.read_bytes() == before  # nothing replaced it, not even partly
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1
    # the next save goes through, over whatever the failed one left in the .tmp
    save_checkpoint(path, small_state(3))
    assert load_checkpoint(path)["step"] == 3
    assert not path.with_name("ckpt.pt.tmp").exists()


def test_damaged_checkpoints_are_user_errors(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, small_state(1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or not a checkpoint"):
        load_checkpoint(path)
    torch.save({"format": 99, "model": {}}, path)
    with pytest.raises(UserError, match="not in this project's format"):
        load_checkpoint(path)
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "model": {}}, path)
    with pytest.raises(UserError, match="has no 'model_config'"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint in"):
        load_checkpoint(tmp_path / "empty")


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": 1, "model": _Payload(marker)}, f, protocol=2)
    with pytest.raises(UserError, match="is not a safe checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_rng_state_round_trip(tmp_path):
    """Every RNG continues exactly where it was saved, mid-stream included."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.random(3), np.random.standard_normal(), torch.rand(5)
    saved = rng_state()
    torch.save(saved, tmp_path / "rng.pt")  # through a file, as a checkpoint carries it
    saved = torch.load(tmp_path / "rng.pt", weights_only=True)

    def draws():
        return (random.random(), np.random.random(4).tolist(), np.random.standard_normal(),
                torch.rand(4).tolist())  # fmt: skip

    first = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(saved)
    assert draws() == first


# --- the loop -------------------------------------------------------------------------


class RandomBatches:
    """Random token windows, the stream's position one integer, like data.loader.TokenLoader."""

    def __init__(self, batch_size=4, seed=0):
        self.batch_size, self.seed, self.step = batch_size, seed, 0

    def next_batch(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.step)
        self.step += 1
        w = torch.randint(
            0, TINY["vocab_size"], (self.batch_size, TINY["block_size"] + 1), generator=g
        )
        return w[:, :-1], w[:, 1:]

    def state_dict(self):
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state):
        self.seed, self.step = state["seed"], state["step"]


def lm_loss(model, batch):
    """The mean next-token loss of a (x, y) batch."""
    return model(*batch)[1]


def make_trainer(out_dir, loss_fn=lm_loss, batch_size=4, rt=None, evaluate=True, **loop):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    cfg = loop_settings(
        **{
            "max_iters": 6,
            "warmup_iters": 1,
            "log_interval": 1,
            "lr": 1e-2,
            "eval_interval": 3,
            "best_metric": "val_loss",
            **loop,
        }
    )
    x_val, y_val = RandomBatches(8, seed=99).next_batch()
    calls = {"evaluate": 0, "sample": 0}

    def evaluate_fn(m):
        calls["evaluate"] += 1
        return {"val_loss": lm_loss(m, (x_val, y_val)).item()}

    def sample_fn(m):
        calls["sample"] += 1
        return "sample"

    trainer = Trainer(
        model,
        opt,
        rt or Runtime(CPU, torch.float32),
        cfg,
        out_dir,
        checkpoint_meta={
            "stage": "test",
            "model_config": model.config.to_dict(),
            "tokenizer": {"kind": "none", "model": b"spm"},
        },  # fmt: skip
        evaluate=evaluate_fn if evaluate else None,
        sample=sample_fn,
    )
    trainer.calls = calls
    trainer.batches = RandomBatches(batch_size)  # what run(trainer) trains on
    trainer.step_fn = lambda m, batch: StepResult(loss_fn(m, batch), batch[0].numel())
    return trainer


def run(trainer) -> dict:
    return trainer.run(trainer.batches, trainer.step_fn)


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_loop_logs_evaluates_and_saves(tmp_path, capsys):
    trainer = make_trainer(tmp_path, max_iters=6, eval_interval=3)
    result = run(trainer)
    records = read_metrics(tmp_path)
    logs = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "train_loss", "lr", "tokens_per_sec"} <= r.keys() for r in logs)
    assert [r["step"] for r in evals] == [3, 6]  # the last step is evaluated once, not twice
    assert trainer.calls == {"evaluate": 2, "sample": 2}
    assert result == evals[-1]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 6 and ckpt["per_rank"][0]["data"] == {"seed": 0, "step": 6}
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["best"]["value"] == min(r["val_loss"] for r in evals)
    assert capsys.readouterr().out.count("--- sample ---") == 2


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """grad_accum=2 over batches of 4 == one step over the same 8 sequences."""
    accum = make_trainer(tmp_path / "a", batch_size=4, grad_accum=2, max_iters=3, grad_clip=0.5)
    run(accum)

    class Joined(RandomBatches):  # the two micro-batches accum sees, as one batch
        def next_batch(self):
            (x1, y1), (x2, y2) = super().next_batch(), super().next_batch()
            return torch.cat([x1, x2]), torch.cat([y1, y2])

    whole = make_trainer(tmp_path / "b", batch_size=4, grad_accum=1, max_iters=3, grad_clip=0.5)
    whole.batches = Joined(4)
    run(whole)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=1e-6)
    for (name, p), q in zip(accum.raw_model.named_parameters(), whole.raw_model.parameters(),
                            strict=True):  # fmt: skip
        assert torch.allclose(p, q, atol=1e-6), name
    assert a[0]["train_loss"] != pytest.approx(a[-2]["train_loss"], abs=1e-4)  # it trained


def test_micro_batches_share_one_autocast_cast_of_the_weights(tmp_path):
    """bf16, grad_accum=3: the loop casts each weight once per step (one autocast context
    over the micro-batches, backward outside it) and steps exactly as a context per
    micro-batch, which casts every weight three times, does."""
    from torch.profiler import profile

    trainer = make_trainer(tmp_path, rt=Runtime(CPU, torch.bfloat16), grad_accum=3, max_iters=1,
                           grad_clip=0.5, evaluate=False)  # fmt: skip
    reference = make_trainer(tmp_path / "ref", rt=Runtime(CPU, torch.bfloat16), evaluate=False)
    batches = [trainer.batches.next_batch() for _ in range(3)]
    trainer.batches = RandomBatches(4)  # the same three batches again
    with profile() as loop_prof:
        trainer.update((trainer.batches.next_batch() for _ in range(3)), trainer.step_fn)
    with profile() as ref_prof:
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = lm_loss(reference.model, batch) / 3
            loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.raw_model.parameters(), 0.5)
        reference.optimizer.step()
    for p, q in zip(trainer.raw_model.parameters(), reference.raw_model.parameters(), strict=True):
        assert torch.equal(p, q)

    def casts(prof) -> int:
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    weights = sum(1 for p in trainer.raw_model.parameters() if p.dim() == 2)
    assert casts(ref_prof) - casts(loop_prof) >= 2 * (weights - 1)  # the tied table: one use


@pytest.mark.parametrize("clip", [0.01, 0.0])
def test_gradient_norm_is_clipped(tmp_path, clip):
    trainer = make_trainer(tmp_path, max_iters=3, grad_clip=clip)
    norms, real_step = [], trainer.optimizer.step

    def step(*args, **kwargs):  # the gradient the optimizer is handed
        grads = [p.grad for p in trainer.raw_model.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    run(trainer)
    assert len(norms) == 3
    if clip:
        assert all(n == pytest.approx(clip, rel=1e-4) for n in norms)
    else:  # 0 = no clipping: the raw gradients are much larger than 0.01
        assert all(n > 0.05 for n in norms)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    holder = {}

    def loss_fn(model, batch):
        loss = lm_loss(model, batch)
        return loss + bad if holder["trainer"].step == 4 else loss  # the 5th step goes bad

    trainer = make_trainer(tmp_path, loss_fn=loss_fn, max_iters=10, eval_interval=2)
    holder["trainer"] = trainer
    previous_handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(
        UserError, match=f"loss became {bad} at step 5.*the checkpoint of step 4 in .* is kept"
    ):
        run(trainer)
    assert signal.getsignal(signal.SIGINT) is previous_handler
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert max(r["step"] for r in read_metrics(tmp_path)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "ckpt.pt", "metrics.jsonl"]


def test_max_minutes_stops_the_run_and_drives_the_schedule(tmp_path):
    def slow_loss(model, batch):  # >= 10 ms a step: 1000 steps would take >= 10 s
        time.sleep(0.01)
        return lm_loss(model, batch)

    budget_s = 0.5
    trainer = make_trainer(
        tmp_path, slow_loss, max_iters=1000, max_minutes=budget_s / 60, eval_interval=1000
    )
    start = time.perf_counter()
    result = run(trainer)
    took = time.perf_counter() - start
    assert budget_s <= took < budget_s + 5
    assert 2 <= trainer.step < 1000
    assert result["step"] == trainer.step  # the final evaluation
    assert load_checkpoint(tmp_path)["step"] == trainer.step
    lrs = [r["lr"] for r in read_metrics(tmp_path) if "lr" in r]
    # the step fraction stays below 5%, so it is the clock that moves the cosine down
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[0] > 0.9e-2 and lrs[-1] < 0.75e-2


def test_max_iters_zero_evaluates_the_initial_model(tmp_path):
    trainer = make_trainer(tmp_path, max_iters=0)
    result = run(trainer)
    assert trainer.step == 0 and result["step"] == 0 and "val_loss" in result
    assert load_checkpoint(tmp_path)["step"] == 0


def test_ctrl_c_saves_a_checkpoint_and_interrupts(tmp_path, capsys):
    holder = {}

    def loss_fn(model, batch):
        if holder["trainer"].step == 2:  # Ctrl-C arrives during the third step
            os.kill(os.getpid(), signal.SIGINT)
        return lm_loss(model, batch)

    trainer = make_trainer(tmp_path, loss_fn=loss_fn, max_iters=10, eval_interval=5)
    holder["trainer"] = trainer
    previous_handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # after the step finishes and the loop saves
        run(trainer)
    assert signal.getsignal(signal.SIGINT) is previous_handler
    assert trainer.step == 3
    assert "stopped at step 3" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 3 and ckpt["per_rank"][0]["data"]["step"] == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # saved without evaluating
    assert trainer.calls["evaluate"] == 0


def test_second_ctrl_c_aborts():
    with guards.CtrlC(is_main=False) as ctrl_c:
        ctrl_c._on_sigint(signal.SIGINT, None)
        assert ctrl_c.requested
        with pytest.raises(KeyboardInterrupt):
            ctrl_c._on_sigint(signal.SIGINT, None)


def test_a_stop_agreed_with_other_ranks_takes_the_ctrl_c_way_out(tmp_path, capsys, monkeypatch):
    """Under DDP only some ranks may see Ctrl-C; the others learn of it through
    guards.agree and must leave the same way (save, no evaluation), or their collectives
    would not match."""
    trainer = make_trainer(tmp_path, max_iters=10, eval_interval=5)
    monkeypatch.setattr(guards, "agree", lambda rt, elapsed, stop: (elapsed, trainer.step == 2))
    with pytest.raises(KeyboardInterrupt):
        run(trainer)
    assert trainer.step == 2
    assert "stopped at step 2" in capsys.readouterr().out
    assert trainer.calls["evaluate"] == 0
    assert load_checkpoint(tmp_path)["step"] == 2


def test_only_rank_zero_writes(tmp_path):
    rt = Runtime(CPU, torch.float32, rank=1, local_rank=1, world_size=1)
    trainer = make_trainer(tmp_path / "run", rt=rt, max_iters=4, eval_interval=2)
    run(trainer)
    assert trainer.step == 4
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
