"""What every training stage does around its own part, written once.

    with Stage("sft", cfg, rules) as stage:     # checks the config, starts the runtime,
        ...                                      #   reads out_dir/ckpt.pt when resuming
        model, batches = the stage's own part
        result = stage.train(model, tok, batches, step, evaluate=..., sample=...)
        stage.save_eval({"sft": scores})

A stage script then holds only what makes the stage different: where its model and its
batches come from, its step function (train/rl/losses.py) and how it is evaluated.
`Stage.train` builds the optimizer (train/core/optim.py) and the Trainer
(train/core/trainer.py) from the config, with the checkpoint's metadata (stage, model kind,
model config, tokenizer,
resolved config), restores the run being resumed, and runs the loop.
"""

import json
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from errors import UserError

from ..eval.task_eval import save_eval
from .checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .files import atomic_write_text, remove_stale_temporaries
from .optim import optimizer_from_config
from .peak import peak_flops
from .runtime import Runtime, precision_name, setup_runtime, teardown_runtime
from .settings import LOOP, OPTIMIZER, RUNTIME, Rule, check, check_relations
from .trainer import Batches, LoopConfig, StepFn, Trainer

DONE_FILE = "done.json"  # written when a stage finished (train/align.py skips such stages)
# What a run writes into its out_dir (overwrite=true removes exactly these).
RUN_FILES = (CHECKPOINT_NAME, BEST_NAME, "metrics.jsonl", "config.yaml", "eval.json", DONE_FILE)


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


def check_stage(cfg: DictConfig, rules: dict[str, Rule] | None = None) -> None:
    """A stage's settings against the loop's, the optimizer's, the runtime's and its own
    rules (train/core/settings.py); train.align checks every stage this way before running any."""
    check(cfg, {**RUNTIME, **LOOP, **OPTIMIZER, **(rules or {})})
    check_relations(cfg)


class Stage:
    def __init__(self, name: str, cfg: DictConfig, rules: dict[str, Rule] | None = None) -> None:
        """name: the stage ("pretrain", "sft", ...), written into its checkpoints.
        rules: the stage's own settings (train/core/settings.py); the loop's, the optimizer's
        and the runtime's are always checked."""
        self.name = name
        self.cfg = cfg
        self.rules = rules or {}
        self.out_dir = Path(cfg.out_dir)
        self.runtime: Runtime | None = None
        self.resumed: dict | None = None  # the checkpoint being resumed

    def __enter__(self) -> "Stage":
        check_stage(self.cfg, self.rules)  # before any work
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserError(f"out_dir={self.out_dir} is a file, not a folder; choose another")
        self.runtime = setup_runtime(self.cfg.device, self.cfg.precision, self.cfg.seed)
        try:
            if self.runtime.is_main:
                remove_stale_temporaries(self.out_dir)  # a killed save's half-written file
            if self.cfg.get("resume"):
                self.resumed = resumable_checkpoint(self.out_dir)
            else:
                self._claim_out_dir()
        except BaseException:
            teardown_runtime(self.runtime)
            raise
        return self

    def _claim_out_dir(self) -> None:
        """A new run never touches a directory that holds another run's checkpoint, unless
        overwrite=true: then that run's files go first."""
        held = [self.out_dir / name for name in RUN_FILES if (self.out_dir / name).exists()]
        if not any(p.name in (CHECKPOINT_NAME, BEST_NAME) for p in held):
            return  # nothing trained there yet (at most the log of a run killed early)
        if not self.cfg.get("overwrite"):
            raise UserError(
                f"{self.out_dir} holds a run already ({CHECKPOINT_NAME}); continue it with "
                f"resume=true, or start a new one with out_dir=<another folder> or "
                "overwrite=true (which deletes that run)"
            )
        if self.runtime.is_main:
            for path in held:
                path.unlink()
        if self.runtime.distributed:
            dist.barrier()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.runtime.is_main:  # finished: make align may skip it
            atomic_write_text(self.out_dir / DONE_FILE, json.dumps({"stage": self.name}) + "\n")
        teardown_runtime(self.runtime)

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

    def train(
        self,
        model: nn.Module,
        tokenizer,
        batches: Batches,
        step: StepFn,
        *,
        evaluate: Callable[[nn.Module], dict] | None = None,
        sample: Callable[[nn.Module], str] | None = None,
        model_kind: str = "gpt",
        flops_per_token: float | None = None,
        loop: dict | None = None,
        show: tuple[str, ...] | None = None,
        **meta,
    ) -> dict:
        """Run the loop on `model`; returns the last evaluation's figures.

        loop: loop settings the stage decides itself (e.g. max_iters from a number of
        epochs), over the config's. show: the step metrics the progress bar shows (None:
        all). meta: more entries for every checkpoint (init_from=...).
        """
        rt, cfg = self.runtime, self.cfg
        model.to(rt.device)
        peak = None
        if rt.is_main and flops_per_token:  # MFU's denominator (train/core/peak.py)
            peak = peak_flops(rt.device, rt.dtype, cfg.get("peak_tflops"))
        trainer = Trainer(
            model,
            optimizer_from_config(model, cfg, rt.device.type),
            rt,
            batches,
            step,
            LoopConfig.from_cfg({**OmegaConf.to_container(cfg, resolve=True), **(loop or {})}),
            self.out_dir,
            checkpoint_meta={
                "stage": self.name,
                "model_kind": model_kind,
                "model_config": model.config.to_dict(),
                "tokenizer": tokenizer.state(),
                "precision": precision_name(rt.dtype),  # what train.evaluate replays
                "config": OmegaConf.to_container(cfg, resolve=True),
                **meta,
            },
            evaluate=evaluate,
            sample=sample,
            flops_per_token=flops_per_token,
            peak_flops=peak.flops if peak else None,
            show=show,
        )
        if self.resumed is not None:
            trainer.load_state(self.resumed)
        if rt.is_main:  # the run changes from here: not finished until the stage exits
            (self.out_dir / DONE_FILE).unlink(missing_ok=True)
        self.log(self.describe(model))
        if peak:
            self.log(peak.describe())
        return trainer.run()

    def describe(self, model: nn.Module) -> str:
        """One line: the model's size and how it is trained."""
        c, rt, cfg = model.config, self.runtime, self.cfg
        n_params = sum(p.numel() for p in model.parameters())  # a tied matrix counts once
        return (
            f"{self.name}: {n_params / 1e6:.2f}M parameters, {c.n_layer} layers x "
            f"{c.n_embd}, context {c.block_size}; {cfg.batch_size} x {cfg.grad_accum} x "
            f"{rt.world_size} per step on {rt.device} ({str(rt.dtype).replace('torch.', '')})"
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
