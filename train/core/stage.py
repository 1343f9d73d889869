"""What every training stage does around its own part, written once.

    with Stage("sft", settings) as stage:        # starts the runtime, holds out_dir, reads
        ...                                       #   out_dir/ckpt.pt when resuming
        model, batches = the stage's own part
        result = stage.train(model, tok, batches, step, evaluate=..., sample=...)
        stage.save_eval({"sft": scores})

A stage script then holds only what makes the stage different: where its model and its
batches come from, its step function and how it is evaluated. `Stage.trainer` builds the
optimizer (train/core/optim.py) and the Trainer (train/core/trainer.py) with the
checkpoint's metadata (stage, model kind, model config, tokenizer, precision, settings) and
restores the run being resumed; `Stage.train` runs the Trainer's loop. A stage with a loop
of its own (PPO) takes the Trainer and writes its loop over the same update.
"""

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import yaml
from torch import nn

from errors import NothingToDo, UserError

from . import guards
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .files import remove_stale_temporaries, save_eval
from .optim import OptimizerSettings
from .peak import peak_flops
from .runtime import Runtime, precision_name, setup_runtime, teardown_runtime
from .trainer import Batches, LoopSettings, StepFn, Trainer

IGNORED = ("resume", "overwrite", "out_dir")  # how and where a run starts, not what it computes


def finished_with(settings) -> bool:
    """True when settings.out_dir holds a finished run (done.json) of these very settings
    (its config.yaml; `resume`, `overwrite` and `out_dir` aside, so a moved run is the
    same run): train.align and train.ablate skip it."""
    out = Path(settings.out_dir)
    try:
        before = yaml.safe_load((out / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    now = dataclasses.asdict(settings)
    same = {k: v for k, v in before.items() if k not in IGNORED} == {
        k: v for k, v in now.items() if k not in IGNORED
    }
    return (out / guards.DONE_FILE).is_file() and same


def refuse_finished(settings) -> None:
    """Resuming a run that reached its end with these very settings has nothing to do: say so,
    change nothing. With other settings (a larger max_iters, say) the run goes on."""
    if finished_with(settings):
        raise NothingToDo(
            f"{settings.out_dir} holds a finished run of these settings: nothing to resume, "
            "nothing changed (to train further, resume with a larger max_iters or max_minutes, "
            f"or start a new run from it: init_from={settings.out_dir} out_dir=...)"
        )


def resumable_checkpoint(out_dir: Path) -> dict:
    """out_dir/ckpt.pt, checked to hold what resuming needs."""
    ckpt = load_checkpoint(out_dir / CHECKPOINT_NAME)
    missing = [k for k in ("step", "optimizer", "per_rank") if ckpt.get(k) is None]
    if missing:
        raise UserError(
            f"{ckpt['path']} cannot be resumed: it has no {', '.join(missing)} (a weights-only "
            "checkpoint); start a new run from it with init_from=... instead"
        )
    return ckpt


class Stage:
    def __init__(self, name: str, settings) -> None:
        """name: the stage ("pretrain", "sft", ...), written into its checkpoints.
        settings: the stage's typed settings (train/settings.py), already checked; they hold
        the loop's (LoopSettings) and the optimizer's (OptimizerSettings)."""
        self.name = name
        self.settings = settings
        self.out_dir = Path(settings.out_dir)
        self.runtime: Runtime | None = None
        self.resumed: dict | None = None  # the checkpoint being resumed

    def __enter__(self) -> "Stage":
        s = self.settings
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserError(f"out_dir={self.out_dir} is a file, not a folder; choose another")
        self.runtime = setup_runtime(s.device, s.precision, s.seed)
        self.stack = contextlib.ExitStack()  # what __exit__ undoes, last first
        self.stack.callback(teardown_runtime, self.runtime)
        try:
            self.stack.enter_context(guards.hold(self.out_dir, self.runtime))
            if self.runtime.is_main:
                remove_stale_temporaries(self.out_dir)  # a killed save's half-written file
            if s.resume:
                refuse_finished(s)
                self.resumed = resumable_checkpoint(self.out_dir)
            else:
                guards.claim(self.out_dir, s.overwrite, self.runtime)
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.runtime.is_main:  # finished: make align may skip it
            guards.mark_done(self.out_dir, self.name)
        self.stack.__exit__(exc_type, exc, tb)

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main

    def log(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.runtime.is_main:
            print(message, flush=True)

    def main_first(self, fn: Callable[[], object]) -> object:
        """fn() on rank 0 first, then on the others (e.g. preparing data the others read)."""
        result = fn() if self.runtime.is_main else None
        if self.runtime.distributed:
            dist.barrier()
        return result if self.runtime.is_main else fn()

    def trainer(
        self,
        model: nn.Module,
        tokenizer,
        batches: Batches,
        *,
        evaluate: Callable[[nn.Module], dict] | None = None,
        sample: Callable[[nn.Module], str] | None = None,
        model_kind: str = "gpt",
        flops_per_token: float | None = None,
        max_iters: int | None = None,
        show: tuple[str, ...] | None = None,
        **meta,
    ) -> Trainer:
        """The Trainer for `model` (its state restored when resuming).

        max_iters: the run's length when the stage works it out (from epochs, rollouts);
        show: the step metrics the progress bar shows (None: all); meta: more entries for
        every checkpoint (init_from=...)."""
        rt, s = self.runtime, self.settings
        loop: LoopSettings = s if max_iters is None else dataclasses.replace(s, max_iters=max_iters)
        optimizer_settings: OptimizerSettings = s
        model.to(rt.device)
        peak = None
        if rt.is_main and flops_per_token:  # MFU's denominator (train/core/peak.py)
            peak = peak_flops(rt.device, rt.dtype, s.peak_tflops)
        meta = {
            "stage": self.name,
            "model_kind": model_kind,
            "model_config": model.config.to_dict(),
            "tokenizer": tokenizer.state(),
            "precision": precision_name(rt.dtype),  # what train.evaluate replays
            "config": dataclasses.asdict(s),
            **meta,
        }
        optimizer = optimizer_settings.build(model, s.lr, rt.device.type)
        flops = peak.flops if peak else None
        trainer = Trainer(
            model,
            optimizer,
            rt,
            loop,
            self.out_dir,
            meta,
            evaluate,
            sample,
            flops_per_token,
            flops,
            show,
        )
        if self.resumed is not None:
            trainer.load_state(self.resumed, batches)
        if rt.is_main:
            guards.clear_done(self.out_dir)
        self.log(self.describe(model))
        if peak:
            self.log(peak.describe())
        return trainer

    def train(self, model: nn.Module, tokenizer, batches: Batches, step: StepFn, **kw) -> dict:
        """The Trainer's loop on `model` (Stage.trainer's keywords); returns the last
        evaluation's figures."""
        return self.trainer(model, tokenizer, batches, **kw).run(batches, step)

    def describe(self, model: nn.Module) -> str:
        """One line: the model's size and how it is trained."""
        c, rt, s = model.config, self.runtime, self.settings
        n_params = sum(p.numel() for p in model.parameters())  # a tied matrix counts once
        return (
            f"{self.name}: {n_params / 1e6:.2f}M parameters, {c.n_layer} layers x "
            f"{c.n_embd}, context {c.block_size}; {s.batch_size} x {s.grad_accum} x "
            f"{rt.world_size} per step on {rt.device} ({precision_name(rt.dtype)})"
        )

    def update_checkpoint(self, model: nn.Module, **meta) -> None:
        """Rewrite out_dir/ckpt.pt with the model's current weights (and more metadata):
        for a change made after training, like the reward model's normalisation."""
        if not self.runtime.is_main:
            return
        ckpt = load_checkpoint(self.out_dir / CHECKPOINT_NAME)
        ckpt.pop("path", None)
        ckpt.pop("format", None)
        save_checkpoint(
            self.out_dir / CHECKPOINT_NAME, {**ckpt, **meta, "model": model.state_dict()}
        )

    def save_eval(self, results: dict) -> Path | None:
        """Write results to out_dir/eval.json (rank 0) and say where."""
        if not self.runtime.is_main:
            return None
        path = save_eval(results, self.out_dir)
        self.log(f"written to {path}")
        return path
