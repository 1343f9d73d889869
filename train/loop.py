"""The training loop: one for every stage (pretraining, SFT, later the reward model and RL).

A stage builds a model, an optimizer and a batch source, and hands them over with two
optional callbacks (evaluate, sample). Each optimizer step is

    lr = schedule(step, fraction of the run done)                      (train/optim.py)
    for each of grad_accum micro-batches:
        loss = loss_fn(model, batch) / grad_accum     forward under autocast
        backward                                      DDP averages gradients across ranks
    clip the gradient norm to grad_clip, AdamW step, zero the gradients

then logging every log_interval steps, and every eval_interval steps an evaluation,
a sample and a checkpoint (best.pt as well when the validation loss improved).

The run ends at max_iters or after max_minutes of wall time, whichever comes first.
Ctrl-C finishes the current step, saves a checkpoint and returns; a second Ctrl-C
aborts at once, leaving the last checkpoint on disk as it was. A NaN or infinite loss
stops the run with a UserError before anything is saved, so the last good checkpoint
stays as it was.
"""

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from errors import UserError

from .checkpoint import BEST_NAME, CHECKPOINT_NAME, rng_state, save_checkpoint, set_rng_state
from .metrics import MetricsLog
from .optim import SCHEDULES, fraction_done, lr_at, set_lr
from .runtime import Runtime


@dataclass
class LoopConfig:
    """The loop's settings; each stage's config has these keys at its top level."""

    max_iters: int = 1000
    max_minutes: float | None = None  # wall-clock budget; None = no limit
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the run
    warmup_iters: int = 100
    schedule: str = "cosine"  # "cosine" or "wsd" (train/optim.py)
    cooldown: float = 0.4  # wsd: the fraction of the run that decays to min_lr
    log_interval: int = 10
    eval_interval: int = 250  # evaluate, sample and checkpoint every this many steps
    compile: bool = False  # torch.compile the model

    def __post_init__(self) -> None:
        for name in ("max_iters", "grad_accum", "log_interval", "eval_interval", "warmup_iters"):
            value = getattr(self, name)
            smallest = 0 if name in ("max_iters", "warmup_iters") else 1
            if not isinstance(value, int) or value < smallest:
                raise UserError(f"{name} must be an integer >= {smallest}, got {value!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise UserError(f"max_minutes must be positive or null, got {self.max_minutes!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if not 0 < self.cooldown <= 1:
            raise UserError(f"cooldown must be in (0, 1], got {self.cooldown!r}")

    @classmethod
    def from_cfg(cls, cfg) -> "LoopConfig":
        """Pick this dataclass's fields out of a (Hydra) config mapping."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy: batch is (x, y), both (B, T); y = -100 where not trained."""
    x, y = batch
    _, loss = model(x, y)
    return loss


class Trainer:
    """Runs the loop for one stage. Only rank 0 logs, prints and writes files."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        runtime: Runtime,
        batches,  # .next_batch() -> tuple of tensors; .state_dict() / .load_state_dict()
        out_dir: str | Path,
        config: LoopConfig,
        checkpoint_meta: dict,  # stage, model_config, tokenizer, config: in every checkpoint;
        # config (the run's resolved config) is also written to out_dir/config.yaml
        evaluate: Callable[[nn.Module], dict] | None = None,  # -> {"val_loss": ..., ...}
        sample: Callable[[nn.Module], str] | None = None,
        loss_fn: Callable[[nn.Module, tuple], torch.Tensor] = lm_loss,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> None:
        self.raw_model = model  # what checkpoints and evaluation see
        self.optimizer = optimizer
        self.runtime = runtime
        self.batches = batches
        self.out_dir = Path(out_dir)
        self.cfg = config
        self.meta = checkpoint_meta
        self.evaluate_fn = evaluate
        self.sample_fn = sample
        self.loss_fn = loss_fn
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.scaler = runtime.grad_scaler()
        self.step = 0  # optimizer steps completed
        self.elapsed_s = 0.0  # wall time spent in earlier runs (resume)
        self.best_val_loss = math.inf
        self.last_eval: dict = {}
        self.stop_requested = False

        model = model.to(runtime.device)
        if config.compile:
            model = torch.compile(model)
        if runtime.distributed:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        self.model = model  # what the training step calls

    # ----------------------------------------------------------------- resume
    def load_state(self, ckpt: dict) -> None:
        """Continue from a checkpoint written by this loop (weights already loaded or not)."""
        self.raw_model.load_state_dict(ckpt["model"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # another optimizer kind, or another model's parameters
            raise UserError(
                f"the checkpoint's optimizer state does not fit this run's optimizer ({e}); "
                "resume with the optimizer and model the run was started with"
            ) from None
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = ckpt["step"]
        self.elapsed_s = ckpt.get("elapsed_s", 0.0)
        self.best_val_loss = ckpt.get("best_val_loss", math.inf)
        per_rank = ckpt.get("per_rank", [])
        if len(per_rank) == self.runtime.world_size:
            mine = per_rank[self.runtime.rank]
            self.batches.load_state_dict(mine["data"])
            set_rng_state(mine["rng"])
        elif self.runtime.is_main:
            tqdm.write(
                f"resuming on {self.runtime.world_size} process(es) from a checkpoint of "
                f"{len(per_rank)}: data streams and RNGs start afresh"
            )

    # ------------------------------------------------------------------- run
    def run(self) -> dict:
        """Train until max_iters or max_minutes; returns the last evaluation's figures."""
        cfg, rt = self.cfg, self.runtime
        log = None  # only rank 0 touches the metrics file
        if rt.is_main:
            log = MetricsLog(self.out_dir / "metrics.jsonl", self.step if self.step else None)
        if rt.is_main and "config" in self.meta:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(self.meta["config"], sort_keys=False)
            (self.out_dir / "config.yaml").write_text(text)
        start_time = time.perf_counter()
        previous_handler = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_sigint)
        bar = tqdm(
            total=cfg.max_iters, initial=self.step, disable=not rt.is_main, dynamic_ncols=True
        )
        interval_tokens, interval_start = 0, time.perf_counter()
        stop = False  # agreed by all ranks: every rank takes the same way out below
        schedule = (cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.schedule, cfg.cooldown)
        try:
            self.model.train()
            while True:
                elapsed = self.elapsed_s + time.perf_counter() - start_time
                elapsed, stop = self._agree(elapsed, self.stop_requested)
                frac = fraction_done(self.step, cfg.max_iters, elapsed, cfg.max_minutes)
                if self.step >= cfg.max_iters or frac >= 1.0 or stop:
                    break
                lr = lr_at(self.step, frac, *schedule)
                set_lr(self.optimizer, lr)
                loss, tokens = self._train_step()
                self.step += 1
                interval_tokens += tokens
                bar.update(1)

                if self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                    now = time.perf_counter()
                    tok_s = interval_tokens * rt.world_size / (now - interval_start)
                    record = {"step": self.step, "train_loss": loss, "lr": lr}
                    record["tokens_per_sec"] = tok_s
                    if self.flops_per_token and self.peak_flops:
                        per_device = tok_s / rt.world_size
                        record["mfu"] = per_device * self.flops_per_token / self.peak_flops
                    if rt.is_main:
                        log.write(record)
                        bar.set_postfix_str(_postfix(record))
                    interval_tokens, interval_start = 0, time.perf_counter()

                if self.step % cfg.eval_interval == 0:
                    self._evaluate_and_save(log, start_time)
                    interval_tokens, interval_start = 0, time.perf_counter()
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            bar.close()

        if stop:
            if rt.is_main:
                print(f"stopped at step {self.step} (Ctrl-C); checkpoint saved")
            self._save(CHECKPOINT_NAME, start_time)
        elif self.last_eval.get("step") != self.step:  # not evaluated at this step yet
            self._evaluate_and_save(log, start_time)
        return self.last_eval

    # ----------------------------------------------------------------- pieces
    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss, tokens)."""
        cfg, rt = self.cfg, self.runtime
        loss_sum = torch.zeros((), device=rt.device)
        tokens = 0
        for micro in range(cfg.grad_accum):
            batch = tuple(t.to(rt.device, non_blocking=True) for t in self.batches.next_batch())
            tokens += batch[0].numel()
            last = micro == cfg.grad_accum - 1
            if isinstance(self.model, DDP):  # all-reduce gradients only on the last micro-step
                self.model.require_backward_grad_sync = last
            with rt.autocast():
                loss = self.loss_fn(self.model, batch) / cfg.grad_accum
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

        if rt.distributed:  # every rank reports, and checks, the global mean loss
            dist.all_reduce(loss_sum)
            loss_sum /= rt.world_size
        loss = loss_sum.item()
        if not math.isfinite(loss):
            raise UserError(
                f"training loss became {loss} at step {self.step + 1}; stopped without saving, "
                f"so the last good checkpoint in {self.out_dir} is kept; lower lr or use float32"
            )
        return loss, tokens

    def _agree(self, elapsed: float, stop: bool) -> tuple[float, bool]:
        """All ranks take rank 0's clock and stop if any rank was asked to.

        Without this, ranks could disagree on the learning rate or on when to stop, and
        a rank that stops alone would leave the others waiting forever.
        """
        if not self.runtime.distributed:
            return elapsed, stop
        is_main = float(self.runtime.is_main)
        t = torch.tensor([elapsed * is_main, float(stop)], device=self.runtime.device)
        dist.all_reduce(t)  # sum: rank 0's elapsed, number of ranks asked to stop
        return t[0].item(), t[1].item() > 0

    def _evaluate_and_save(self, log: MetricsLog | None, start_time: float) -> None:
        rt = self.runtime
        metrics = {}
        if self.evaluate_fn is not None:
            self.raw_model.eval()
            with torch.no_grad(), rt.autocast():
                metrics = self.evaluate_fn(self.raw_model)
            self.raw_model.train()
        self.last_eval = {"step": self.step, **metrics}
        improved = metrics.get("val_loss", -math.inf) < self.best_val_loss
        if improved and "val_loss" in metrics:
            self.best_val_loss = metrics["val_loss"]
        if rt.is_main:
            log.write(self.last_eval)
            if metrics:
                tqdm.write(f"step {self.step}: " + _postfix(metrics))
            if self.sample_fn is not None:
                self.raw_model.eval()
                with torch.no_grad(), rt.autocast():
                    tqdm.write("--- sample ---\n" + self.sample_fn(self.raw_model) + "\n---")
                self.raw_model.train()
        self._save(CHECKPOINT_NAME, start_time)
        if improved:
            self._save(BEST_NAME, start_time)

    def _save(self, name: str, start_time: float) -> None:
        """Write a checkpoint (rank 0), with every rank's data position and RNG state."""
        mine = {"data": self.batches.state_dict(), "rng": rng_state()}
        per_rank = [mine]
        if self.runtime.distributed:
            per_rank = [None] * self.runtime.world_size
            dist.all_gather_object(per_rank, mine)
        if not self.runtime.is_main:
            return
        state = {
            **self.meta,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "elapsed_s": self.elapsed_s + time.perf_counter() - start_time,
            "best_val_loss": self.best_val_loss,
            "per_rank": per_rank,
            "metrics": self.last_eval,
        }
        save_checkpoint(self.out_dir / name, state)

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:  # second Ctrl-C: abort; the last checkpoint stays as it was
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.runtime.is_main:
            tqdm.write("Ctrl-C: finishing this step, then saving (Ctrl-C again to abort)")


def _postfix(record: dict) -> str:
    """Short 'key=value' text for the progress bar."""
    formats = {
        "train_loss": "loss={:.4f}",
        "val_loss": "val_loss={:.4f}",
        "val_bpb": "val_bpb={:.4f}",
        "lr": "lr={:.2e}",
        "tokens_per_sec": "tok/s={:.0f}",
        "mfu": "mfu={:.1%}",
    }
    return " ".join(
        fmt.format(record[k]) for k, fmt in formats.items() if record.get(k) is not None
    )
