"""Never lose a trained model: runs that cannot overwrite, resumes that cannot mix
tokenizers, writes that survive a full disk, divergence that cannot replace a good
checkpoint, preparations that recover from a kill, and bad settings that stop at once
with one line. (Kills at every moment of a save: tests/test_crash.py.)"""

import errno
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_pretrain import ROOT, overrides, pretrain_in_process, read_metrics

import train.core.files as files
import train.core.guards as guards
import train.pretrain as pretrain
from errors import UserError, report_user_errors
from train.core.checkpoint import load_checkpoint, save_checkpoint
from train.core.metrics import MetricsLog
from train.core.metrics import read_metrics as tolerant_read
from train.settings import load

SHORT = {"max_iters": 6, "eval_interval": 3}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """A finished 6-step run to try things against (copied before a test changes it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    pretrain_in_process(overrides(corpus, run, **SHORT))
    return run


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the run folder (but the lock a run holds while it writes there)."""
    return {f.name: f.read_bytes() for f in sorted(run.iterdir()) if f.name != ".lock"}


# --- 1. a second run never destroys the first -----------------------------------------


def test_a_new_run_in_a_folder_holding_a_run_is_refused(trained, corpus, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(UserError, match="holds a run already.*resume=true.*overwrite=true"):
        pretrain_in_process(overrides(corpus, run, **SHORT))
    assert snapshot(run) == before  # not a byte changed


def test_resuming_a_finished_run_says_so_and_changes_nothing(trained, corpus, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    before = snapshot(run)
    report_user_errors(pretrain_in_process)(overrides(corpus, run, **SHORT) + ["resume=true"])
    said = "holds a finished run of these settings: nothing to resume, nothing changed"
    assert said in capsys.readouterr().out
    assert snapshot(run) == before  # no second {"step": 6} line, no new checkpoint


def test_a_second_run_while_one_is_writing_the_folder_is_refused(trained, corpus, tmp_path):
    """Two runs started together into one out_dir: the one that comes second is refused in
    one line, whatever it asks for (overwrite=true too), and touches nothing; the lock is
    the kernel's (flock), so once its holder ends, or dies, the folder is free again."""
    run = copy_run(trained, tmp_path / "run")
    before = snapshot(run)
    main = SimpleNamespace(is_main=True)
    args = overrides(corpus, run, **SHORT) + ["overwrite=true"]
    with guards.hold(run, main):  # the first run, writing
        with pytest.raises(UserError, match="another run is writing .* right now; wait"):
            pretrain_in_process(args)
        assert snapshot(run) == before
    holder = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
    holder += "fcntl.flock(fd, fcntl.LOCK_EX); os.kill(os.getpid(), 9)"
    killed = subprocess.run([sys.executable, "-c", holder, str(run / guards.LOCK_FILE)])
    assert killed.returncode == -9  # it died holding the lock
    pretrain_in_process(args)  # the folder is free: overwrite=true replaces the run
    assert snapshot(run) != before


def test_overwrite_true_replaces_the_run(trained, corpus, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    (run / "eval.json").write_text("{}")
    pretrain_in_process(overrides(corpus, run, max_iters=3, eval_interval=3, overwrite="true"))
    assert load_checkpoint(run)["step"] == 3
    assert max(r["step"] for r in read_metrics(run)) == 3
    assert not (run / "eval.json").exists()  # the old run's files went with it


# --- 2. resume never swaps the tokenizer ------------------------------------------------


def test_resume_after_the_data_changed_stops(trained, corpus, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    changed = tmp_path / "other.txt"
    changed.write_text(corpus["file"].read_text().replace("king", "kestrel"))
    args = overrides(corpus, run, max_iters=9, eval_interval=3, resume="true")
    args = [a for a in args if not a.startswith(("data.paths", "data.root"))]
    args += [f"data.paths=['{changed}']", f"data.root='{tmp_path / 'data'}'"]
    before = snapshot(run)
    with pytest.raises(UserError, match="changed since.*its tokenizer is another one"):
        pretrain_in_process(args)
    assert snapshot(run) == before


# --- 3. preconditions before the first step --------------------------------------------


def test_a_validation_split_shorter_than_the_context_stops_before_training(corpus, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError, match="val.bin has .* tokens, fewer than one window .* raise"):
        pretrain_in_process(overrides(corpus, run, **{"model.block_size": 4096}))
    assert not (run / "metrics.jsonl").exists() and not (run / "ckpt.pt").exists()


# --- 4. metrics.jsonl ---------------------------------------------------------------------


def test_a_cut_last_line_does_not_stop_a_resume(trained, corpus, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train_lo')  # what a kill mid-line leaves
    pretrain_in_process(overrides(corpus, run, max_iters=9, eval_interval=3, resume="true"))
    steps = [r["step"] for r in read_metrics(run) if "train_loss" in r]
    assert steps == list(range(1, 10))


def test_the_resume_rewrite_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": 1.5}\n')
    before = path.read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt  # stands for a kill between writing and renaming

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(path, resume_from_step=1)
    monkeypatch.undo()
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_the_tolerant_reader_skips_what_is_not_a_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n[1, 2]\n\n{"step": 2}\n{"step": 3, "x"')
    assert tolerant_read(path) == [{"step": 1}, {"step": 2}]


# --- 5. disk errors -----------------------------------------------------------------------


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model_config": {}, "model": {}, "tokenizer": {}, "step": 1})
    before = path.read_bytes()

    def full(obj, f, *args, **kwargs):
        f.write(b"\x80\x02" + b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        UserError,
        match=r"could not write .*ckpt.pt \(No space left on device\); free some disk space",
    ):
        save_checkpoint(path, {"step": 2})
    assert path.read_bytes() == before
    assert not path.with_name("ckpt.pt.tmp").exists()  # the space is given back


class FillsUp(io.RawIOBase):
    """A file on a disk with `room` bytes left: the write that passes it fails (ENOSPC)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)


def test_torchs_own_error_for_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """torch.save does not pass the disk's OSError on: its zip writer raises RuntimeError
    ("[enforce fail at inline_container.cc:...] unexpected pos ...") with the OSError as
    its context. The real torch.save, onto a file that fills after 4 KiB."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model_config": {}, "model": {}, "tokenizer": {}, "step": 1})
    before = path.read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, FillsUp(f, 4096)))
    with pytest.raises(RuntimeError, match="unexpected pos") as raised:
        torch.save({"w": torch.zeros(10_000)}, io.BytesIO())  # what torch itself raises
    assert isinstance(raised.value.__context__, OSError)
    with pytest.raises(
        UserError,
        match=r"could not write .*ckpt.pt \(No space left on device\); free some disk space",
    ):
        save_checkpoint(path, {"model": {"w": torch.zeros(10_000)}, "step": 2})
    assert path.read_bytes() == before
    assert not path.with_name("ckpt.pt.tmp").exists()


def test_a_bug_inside_a_save_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(obj, f):
        raise RuntimeError("a bug, not the disk")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="a bug, not the disk"):
        save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    assert not (tmp_path / "ckpt.pt.tmp").exists()


def export_onto(monkeypatch, out: Path, error: Exception) -> None:
    """train.export into `out` (which holds an earlier export), the model's weights failing
    with `error` half-way through their file."""
    import tokenizer
    import train.export as export
    from model import GPT, GPTConfig

    tok = tokenizer.train_tokenizer(["To be, or not to be. " * 50], vocab_size=280)
    config = GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=32, vocab_size=tok.vocab_size)
    state = {"stage": "sft", "model_config": config.to_dict(), "tokenizer": tok.state()}
    save_checkpoint(out.parent / "ckpt.pt", {**state, "model": GPT(config).state_dict()})

    def weights_fail(model, out_dir, **ids):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise error

    monkeypatch.setattr(export.hf, "export_pretrained", weights_fail)
    cfg = load("export", [f"checkpoint={out.parent / 'ckpt.pt'}", f"out={out}", "overwrite=true"])
    export.run(cfg)


def test_an_export_onto_a_full_disk_is_one_line_and_keeps_the_earlier_export(tmp_path, monkeypatch):
    """safetensors raises its own SafetensorError, the errno inside its text."""
    safetensors = pytest.importorskip("safetensors")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the earlier export")
    full = safetensors.SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
        'space left on device" })'
    )
    with pytest.raises(
        UserError, match=r"could not write .*hf \(No space left on device\); free some disk space"
    ):
        export_onto(monkeypatch, out, full)
    assert (out / "model.safetensors").read_bytes() == b"the earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "hf"]  # no staging left


def test_an_export_to_a_read_only_folder_says_it_is_not_writable(tmp_path, monkeypatch):
    out = tmp_path / "hf"
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out))
    with pytest.raises(
        UserError, match=r"could not write .*hf \(Permission denied\); make the folder writable "
        r"or choose another out\b"
    ):  # fmt: skip
        export_onto(monkeypatch, out, denied)


def test_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    real_open = open

    def read_only(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(
        UserError,
        match=r"could not write .*eval.json \(Permission denied\); make the folder writable",
    ):
        files.atomic_write_text(tmp_path / "eval.json", "{}")


def test_stray_temporaries_of_a_killed_save_are_removed_at_the_next_start(
    trained, corpus, tmp_path
):
    run = copy_run(trained, tmp_path / "run")
    (run / "ckpt.pt.tmp").write_bytes(b"half a checkpoint" * 1000)
    pretrain_in_process(overrides(corpus, run, max_iters=7, eval_interval=3, resume="true"))
    assert not (run / "ckpt.pt.tmp").exists()


# --- 6. divergence ----------------------------------------------------------------------


def test_a_diverging_run_never_replaces_its_checkpoint(trained, corpus, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    before = snapshot(run)["ckpt.pt"]
    args = overrides(corpus, run, max_iters=12, eval_interval=3, resume="true", lr=1e2)
    args = [a for a in args if not a.startswith("min_lr")] + ["min_lr=1"]
    with pytest.raises(UserError, match="diverged|loss became") as e:
        pretrain_in_process(args)
    assert "the checkpoint of step 6" in str(e.value)
    assert (run / "ckpt.pt").read_bytes() == before


def test_with_no_checkpoint_yet_the_message_says_so(corpus, tmp_path, monkeypatch):
    from train.core.trainer import StepResult

    def nan_step(model, batch):
        return StepResult(model(*batch)[1] * float("nan"), batch[0].numel())

    monkeypatch.setattr(pretrain, "next_token_step", nan_step)
    with pytest.raises(UserError, match=r"loss became nan at step 1; .*no checkpoint was saved"):
        pretrain_in_process(overrides(corpus, tmp_path / "run"))
    assert not (tmp_path / "run" / "ckpt.pt").exists()


# --- 7. data.prepare after a kill -----------------------------------------------------------


def test_prepare_recovers_from_a_kill_between_its_renames(corpus, tmp_path):
    run = tmp_path / "run"
    pretrain_in_process(overrides(corpus, run, max_iters=1, eval_interval=1))
    data = Path(corpus["root"]) / "text"
    hidden = data.parent / ".text.old-4242"  # killed after `out -> old`, before `stage -> out`
    os.replace(data, hidden)
    stale = data.parent / ".text.tmp-999999999"  # a killed run's staging folder (no such pid)
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 100)
    from data.prepare import prepare

    p = prepare(load("pretrain", overrides(corpus, run)).data)
    assert not p.rebuilt  # the old preparation came back, up to date
    assert data.is_dir() and not hidden.exists() and not stale.exists()


def test_pip_dies_with_its_parent():
    """The download child asks the kernel for SIGKILL when its parent dies."""
    code = (
        "import ctypes, sys, data.sources as s; s._die_with_parent(); "
        "libc = ctypes.CDLL(None); v = ctypes.c_int(); libc.prctl(2, ctypes.byref(v)); "
        "print(v.value)"
    )
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "9", out.stderr


# --- 8, 9. bad values, Ctrl-C ------------------------------------------------------------

BAD_TRAINING_VALUES = [
    ("batch_size=0", "batch_size=0 is not valid"),
    ("batch_size=-4", "batch_size=-4 is not valid"),
    ("lr=abc", "lr='abc' is not valid"),
    ("grad_clip=abc", "grad_clip='abc' is not valid"),
    ("seed=abc", "seed='abc' is not valid"),
    ("betas=[2,3]", "betas=\\[2, 3\\] is not valid"),
    ("weight_decay=-5", "weight_decay=-5 is not valid"),
    ("muon_lr=-1", "muon_lr=-1 is not valid"),
    ("resume=maybe", "resume='maybe' is not valid: it must be true or false"),
    ("compile=perhaps", "compile='perhaps' is not valid: it must be true or false"),
    ("grad_accum=0", "grad_accum=0 is not valid"),
    ("max_regression=0.5", "max_regression=0.5 is not valid"),
]


def run_entry_point(name: str, args: list[str], capsys) -> tuple[int, str]:
    """The entry point `name` run in-process as its command line would: (exit code, stderr)."""
    module = __import__(f"train.{name}", fromlist=["run"])
    with pytest.raises(SystemExit) as e:
        report_user_errors(lambda: module.run(load(name, args)))()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
@pytest.mark.parametrize("override, message", BAD_TRAINING_VALUES)
def test_bad_values_stop_at_once_with_one_line(stage, override, message, tmp_path, capsys):
    args = [f"out_dir='{tmp_path / 'run'}'", override, "init_from=/nonexistent"]
    if stage == "pretrain":
        args = args[:2]
    code, err = run_entry_point(stage, args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()  # nothing done, nothing written


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_betas_are_checked_for_either_optimizer(optimizer, tmp_path, capsys):
    args = [f"out_dir='{tmp_path}/run'", f"optimizer={optimizer}", "betas=[2,3]"]
    code, err = run_entry_point("pretrain", args, capsys)
    assert code == 2 and "betas=[2, 3] is not valid" in err


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_entry_point("pretrain", [f"out_dir='{tmp_path / 'file'}'"], capsys)
    assert code == 2 and "is a file, not a folder" in err


def test_ctrl_c_exits_130_after_saving(corpus, tmp_path, monkeypatch, capsys):
    import signal

    real_next = pretrain.TokenLoader.next_batch

    def next_batch(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self)

    monkeypatch.setattr(pretrain.TokenLoader, "next_batch", next_batch)
    code, err = run_entry_point("pretrain", overrides(corpus, tmp_path / "run"), capsys)
    assert code == 130 and "interrupted" in err
    assert load_checkpoint(tmp_path / "run")["step"] == 3


# --- checkpoints that cannot be used ------------------------------------------------------


def test_a_malicious_checkpoint_gets_one_short_line(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": 1, "x": Evil()}, f, protocol=2)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert (
        message
        == f"{path} is not a safe checkpoint (loading it would run code); it will not be loaded"
    )
    assert "weights_only" not in message and not (tmp_path / "pwned").exists()


def test_a_checkpoint_with_nan_weights_is_one_line(trained, tmp_path):
    from train.core.checkpoint import load_model

    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    name = "h.0.attn.c_attn.weight"
    ckpt["model"][name] = torch.full_like(ckpt["model"][name], float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(UserError, match="not finite .* diverged"):
        load_model(tmp_path / "nan.pt")


def test_an_invalid_model_config_is_one_line(trained, tmp_path):
    from train.core.checkpoint import load_model

    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    ckpt["model_config"]["n_head"] = 5  # does not divide n_embd
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="invalid model config"):
        load_model(tmp_path / "bad.pt")


def test_resuming_a_weights_only_checkpoint_is_one_line(trained, corpus, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    del ckpt["optimizer"]
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    (run / "ckpt.pt").write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="cannot be resumed: it has no optimizer .* init_from"):
        pretrain_in_process(overrides(corpus, run, max_iters=9, resume="true"))
