"""What keeps a run safe, kept apart from the loop it guards (train/core/trainer.py):

    Ctrl-C              the first finishes the update and saves, the second aborts at once
    divergence          a loss or an evaluation that is not finite, or (min mode) one worse
                        than the first evaluation and max_regression x the best: stop, save
                        nothing, so a good checkpoint is never overwritten
    the output folder   one run at a time holds it (an OS lock), a new run never replaces
                        another's checkpoint unless overwrite=true, done.json marks a finished
                        stage (train.align skips it)
    several processes   every rank takes rank 0's clock and stops when any rank was asked
                        to; each rank's data position and RNG state go into the checkpoint

Each is called from one place: the Trainer's session and update, and Stage's set-up.
"""

import contextlib
import json
import math
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from errors import UserError

from .checkpoint import BEST_NAME, CHECKPOINT_NAME, rng_state, set_rng_state
from .files import atomic_write_text
from .runtime import Runtime

DONE_FILE = "done.json"  # written when a stage finished (train/align.py skips such stages)
LOCK_FILE = ".lock"  # held (flock) by the run writing the folder
# What a run writes into its out_dir (overwrite=true removes exactly these).
RUN_FILES = (CHECKPOINT_NAME, BEST_NAME, "metrics.jsonl", "config.yaml", "eval.json", DONE_FILE)


# ------------------------------------------------------------------------------ Ctrl-C


class CtrlC:
    """`with CtrlC(is_main) as ctrl_c:` ... `if ctrl_c.requested:` stop at the next chance.

    The first Ctrl-C only sets `requested` (the loop finishes its update and saves); a
    second one raises KeyboardInterrupt at once, leaving the last checkpoint as it was."""

    def __init__(self, is_main: bool) -> None:
        self.is_main = is_main
        self.requested = False

    def __enter__(self) -> "CtrlC":
        self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.is_main:
            tqdm.write("Ctrl-C: finishing this update, then saving (Ctrl-C again to abort)")


# ------------------------------------------------------------------------- divergence


def kept(saved_step: int | None, out_dir: Path) -> str:
    """What stays on disk when a run stops without saving, said truthfully."""
    if saved_step is None:
        return "no checkpoint was saved yet"
    return f"the checkpoint of step {saved_step} in {out_dir} is kept"


def check_loss(loss: float, step: int, what_is_kept: str) -> None:
    """A training loss that is NaN or infinite stops the run before anything is saved."""
    if not math.isfinite(loss):
        raise UserError(
            f"training loss became {loss} at step {step}; stopped without saving "
            f"({what_is_kept}); lower lr or use float32"
        )


def check_evaluation(metrics: dict, step: int, loop, best, first, what_is_kept: str) -> None:
    """UserError if this evaluation shows the run diverged: a figure that is not finite,
    or in min mode, worse than the first evaluation and max_regression x the best."""
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value) and key != "val_ppl":
            raise UserError(
                f"evaluation at step {step} gave {key}={value}; the run diverged and "
                f"stopped without saving ({what_is_kept}); lower lr or use float32"
            )
    name, ratio = loop.best_metric, loop.max_regression
    value = metrics.get(name) if name else None
    if not ratio or value is None or best is None or loop.best_mode != "min":
        return
    if value > ratio * best and value > first:
        raise UserError(
            f"evaluation at step {step} gave {name}={value:.4g}, worse than the first "
            f"evaluation ({first:.4g}) and more than max_regression={ratio:g} times "
            f"the best ({best:.4g}): the run diverged and stopped without saving "
            f"({what_is_kept}); lower lr, or set max_regression=null"
        )


# ---------------------------------------------------------------- the output folder


@contextlib.contextmanager
def hold(out_dir: Path, runtime: Runtime):
    """Hold out_dir's lock for the run (rank 0): a second run into the same folder is refused
    in one line. The kernel releases the lock when the process dies, so a killed run never
    blocks the next one. A folder this run made and left empty (it failed at once) goes."""
    if not runtime.is_main:
        yield
        return
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(
            f"cannot write to out_dir={out_dir} ({e.strerror or e}); choose a folder you can "
            "write to"
        ) from None
    try:
        if not _try_lock(fd):
            raise UserError(
                f"another run is writing {out_dir} right now; wait for it to finish, or "
                "choose another out_dir"
            )
        yield
    finally:
        os.close(fd)  # closing releases the lock
        if created and [p.name for p in out_dir.iterdir()] == [LOCK_FILE]:
            (out_dir / LOCK_FILE).unlink()
            out_dir.rmdir()


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock, as before
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def claim(out_dir: Path, overwrite: bool, runtime: Runtime) -> None:
    """A new run never touches a folder that holds another run's checkpoint, unless
    overwrite=true: then that run's files go first."""
    held = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    if not any(p.name in (CHECKPOINT_NAME, BEST_NAME) for p in held):
        return  # nothing trained there yet (at most the log of a run killed early)
    if not overwrite:
        raise UserError(
            f"{out_dir} holds a run already ({CHECKPOINT_NAME}); continue it with "
            f"resume=true, or start a new one with out_dir=<another folder> or "
            "overwrite=true (which deletes that run)"
        )
    if runtime.is_main:
        for path in held:
            path.unlink()
    if runtime.distributed:
        dist.barrier()


def mark_done(out_dir: Path, stage: str) -> None:
    atomic_write_text(out_dir / DONE_FILE, json.dumps({"stage": stage}) + "\n")


def clear_done(out_dir: Path) -> None:
    """The run changes from here: not finished until the stage exits."""
    (out_dir / DONE_FILE).unlink(missing_ok=True)


# ------------------------------------------------------------------ several processes


def agree(runtime: Runtime, elapsed: float, stop: bool) -> tuple[float, bool]:
    """All ranks take rank 0's clock and stop if any rank was asked to. Without this,
    ranks could disagree on the learning rate or on when to stop, and a rank that stops
    alone would leave the others waiting forever."""
    if not runtime.distributed:
        return elapsed, stop
    t = torch.tensor([elapsed * float(runtime.is_main), float(stop)], device=runtime.device)
    dist.all_reduce(t)  # sum: rank 0's elapsed, the number of ranks asked to stop
    return t[0].item(), t[1].item() > 0


def rank_states(runtime: Runtime, batches) -> list[dict]:
    """Every rank's data position and RNG states (gathered on every rank)."""
    mine = {"data": batches.state_dict(), "rng": rng_state()}
    if not runtime.distributed:
        return [mine]
    states = [None] * runtime.world_size
    dist.all_gather_object(states, mine)
    return states


def restore_rank_state(runtime: Runtime, batches, states: list) -> None:
    """This rank's data position and RNG states, when the checkpoint has one per rank."""
    if len(states) == runtime.world_size:
        mine = states[runtime.rank]
        batches.load_state_dict(mine["data"])
        set_rng_state(mine["rng"])
    elif runtime.is_main:
        tqdm.write(
            f"resuming on {runtime.world_size} process(es) from a checkpoint of "
            f"{len(states)}: data streams and RNGs start afresh"
        )
