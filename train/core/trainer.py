"""The training loop: one for every stage (pretraining, SFT, reward model, PPO, DPO).

A stage says how to train on one batch with a step function:

    step(model, batch) -> StepResult(loss, tokens, metrics)

loss is the scalar to minimise on that batch, tokens the tokens the forward pass ran on
(padding excluded: what tokens/s and MFU count), metrics any named figures (accuracy,
margin, KL ...). The Trainer's one optimizer update (`update`) is then

    lr = schedule(step, fraction of the run done)                      (train/core/optim.py)
    for each of grad_accum micro-batches:
        result = step(model, batch)                   forward under autocast
        backward(result.loss / grad_accum)            DDP averages gradients across ranks
    clip the gradient norm to grad_clip, optimizer step, zero the gradients
    loss and metrics: averaged over the micro-batches and the ranks

and `run` repeats it until max_iters or max_minutes, whichever comes first:

    with trainer.session(batches):
        while trainer.going():
            trainer.record(trainer.update(batches, step))

`record` writes a line to metrics.jsonl every log_interval updates, and every
eval_interval updates an evaluation, a sample and a checkpoint (best.pt as well when
`best_metric` improved on every earlier evaluation). A stage that collects its data as it
learns writes its own loop over the same three calls (train/ppo.py: collect a rollout,
then update on its minibatches). What keeps a run safe (Ctrl-C, divergence, the output
folder, several processes) lives in train/core/guards.py.
"""

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checks import Settings, choice, flag, integer, number, setting, text
from errors import UserError

from . import guards
from .checkpoint import BEST_NAME, CHECKPOINT_NAME, save_checkpoint
from .files import atomic_write_text
from .metrics import MetricsLog
from .optim import fraction_done, lr_at, set_lr
from .progress import Progress
from .runtime import Runtime


@dataclass
class LoopSettings(Settings):
    """The loop's settings; their values and meaning are in conf/training.yaml."""

    max_iters: int | None = setting(integer(0), null=True)
    max_minutes: float | None = setting(number(above=0), null=True)
    grad_accum: int = setting(integer(1))
    grad_clip: float = setting(number(0))
    lr: float = setting(number(above=0))
    min_lr: float = setting(number(0))
    warmup_iters: int = setting(integer(0))
    schedule: str = setting(choice("cosine", "wsd"))
    cooldown: float = setting(number(above=0, high=1))
    log_interval: int = setting(integer(1))
    eval_interval: int = setting(integer(1))
    compile: bool = setting(flag())
    best_metric: str | None = setting(text(), null=True)
    best_mode: str = setting(choice("min", "max"))
    max_regression: float | None = setting(number(above=1), null=True)
    peak_tflops: float | None = setting(number(above=0), null=True)

    def check_relations(self) -> None:
        if self.min_lr > self.lr:
            raise UserError(f"min_lr={self.min_lr} is above lr={self.lr}; need min_lr <= lr")


def epochs_to_updates(epochs: float, examples: int, per_update: int) -> int:
    """The updates that `epochs` passes over `examples` take, `per_update` at a time (the
    length of a stage whose max_iters is null)."""
    return math.ceil(epochs * examples / per_update)


@dataclass
class StepResult:
    """What a stage's step function returns for one micro-batch."""

    loss: torch.Tensor  # scalar, the mean loss over this micro-batch; backward() runs on it
    tokens: int | torch.Tensor  # tokens the forward ran on, padding excluded
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


class Batches(Protocol):
    """A resumable source of batches: what the loop draws from and saves the position of."""

    def next_batch(self) -> Any: ...  # tensors, or tuples / dicts of tensors

    def state_dict(self) -> dict: ...  # plain values, safe for torch.load(weights_only=True)

    def load_state_dict(self, state: dict) -> None: ...


StepFn = Callable[[nn.Module, Any], StepResult]


def next_token_step(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], pad_id: int | None = None
) -> StepResult:
    """Next-token cross-entropy (pretraining and SFT).

    batch = (x, y), both (B, T); y[b, t] is the token after x[b, :t+1], or -100 where the
    position is not trained on (SFT: everything but the assistant's replies; padding).

        loss = mean over (b, t) with y[b, t] != -100 of  -log p(y[b, t] | x[b, :t+1])

    tokens: the positions the model ran on, padding (x == pad_id) excluded.
    """
    x, y = batch
    _, loss = model(x, y)
    tokens = x.numel() if pad_id is None else (x != pad_id).sum()
    return StepResult(loss, tokens)


def to_device(batch, device: torch.device):
    """The batch with every tensor in it moved to `device` (tuples, lists, dicts kept)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@dataclass
class Update:
    """One optimizer update's figures: averaged over its micro-batches and the ranks."""

    loss: float
    lr: float
    tokens: int | torch.Tensor  # this process's, padding excluded
    seconds: float  # wall time of the update (what tokens/s and MFU divide by)
    metrics: dict[str, float]


def clip_gradients(model: nn.Module, max_norm: float) -> None:
    """Scale the gradients down so that their norm is at most max_norm. A model made of
    separately trained networks (PPO's policy and value function) names them in
    `clip_groups()`, and each is clipped on its own: a large value-loss gradient then never
    shrinks the policy's step."""
    groups = getattr(model, "clip_groups", None)
    for params in groups() if groups else [model.parameters()]:
        nn.utils.clip_grad_norm_(params, max_norm)


class Trainer:
    """Runs one stage's updates and its session. Only rank 0 logs, prints and writes."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        runtime: Runtime,
        loop: LoopSettings,
        out_dir: str | Path,
        checkpoint_meta: dict,  # stage, model_kind, model_config, tokenizer, config, ...
        evaluate: Callable[[nn.Module], dict] | None = None,  # -> {"val_loss": ..., ...}
        sample: Callable[[nn.Module], str] | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        show: tuple[str, ...] | None = None,  # the metrics the progress bar shows; None: all
    ) -> None:
        self.raw_model, self.optimizer, self.runtime, self.loop = model, optimizer, runtime, loop
        self.out_dir, self.meta = Path(out_dir), checkpoint_meta
        self.evaluate_fn, self.sample_fn, self.show = evaluate, sample, show
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        # the optimizer's own matrix products per step (Muon's Newton-Schulz), kept out of MFU
        self.optimizer_flops = getattr(optimizer, "newton_schulz_flops", lambda: 0)()
        self.scaler = runtime.grad_scaler()
        self.step = 0  # optimizer updates completed
        self.elapsed_s = 0.0  # wall time of earlier runs (resume), then of this one too
        self.fraction = 0.0  # of the run done, by the bound that is ahead (train/core/optim.py)
        self.best: float | None = None  # the best value of loop.best_metric so far
        self.first: float | None = None  # its value at the first evaluation
        self.last_eval: dict = {}
        self.saved_step: int | None = None  # the step of the checkpoint on disk
        self.update_seconds = 0.0  # wall time spent in updates (this run)
        model = model.to(runtime.device)
        if loop.compile:
            model = torch.compile(model)
        if runtime.distributed:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        self.model = model  # what the training step calls

    # ------------------------------------------------------------------ the update
    def update(self, micro_batches: Iterable, step_fn: StepFn) -> Update:
        """One optimizer update over grad_accum micro-batches (the module docstring)."""
        rt, n, start = self.runtime, self.loop.grad_accum, time.perf_counter()
        loop = self.loop
        lr = lr_at(
            self.step,
            self.fraction,
            loop.lr,
            loop.min_lr,
            loop.warmup_iters,
            loop.schedule,
            loop.cooldown,
        )
        set_lr(self.optimizer, lr)
        loss_sum, sums, tokens = torch.zeros((), device=rt.device), {}, 0
        # One autocast context for all the micro-batches: it casts each weight to the compute
        # dtype once and reuses the copy until the optimizer step changes the weights.
        with rt.autocast():
            for i, batch in enumerate(micro_batches):
                if isinstance(self.model, DDP):  # all-reduce gradients on the last micro-batch
                    self.model.require_backward_grad_sync = i == n - 1
                result = step_fn(self.model, to_device(batch, rt.device))
                loss = result.loss / n
                with rt.no_autocast():  # backward runs in the dtypes the forward chose
                    self.scaler.scale(loss).backward()
                loss_sum += loss.detach()
                tokens = tokens + result.tokens  # an int, or a tensor (no device sync here)
                for name, value in result.metrics.items():
                    value = torch.as_tensor(value, dtype=torch.float32, device=rt.device)
                    sums[name] = sums.get(name, 0.0) + value.detach() / n
        self._optimizer_step()
        loss, metrics = self._mean_over_ranks(loss_sum, sums)
        guards.check_loss(loss, self.step + 1, guards.kept(self.saved_step, self.out_dir))
        self.step += 1
        seconds = time.perf_counter() - start
        self.update_seconds += seconds
        return Update(loss, lr, tokens, seconds, metrics)

    def _optimizer_step(self) -> None:
        """Clip the gradient norm to grad_clip, step, zero the gradients."""
        if self.loop.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.raw_model, self.loop.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _mean_over_ranks(self, loss_sum, sums: dict) -> tuple[float, dict[str, float]]:
        """Every rank reports, and checks, the means over all ranks (one all-reduce)."""
        values = torch.stack([loss_sum, *sums.values()])  # (1 + metrics,)
        if self.runtime.distributed:
            dist.all_reduce(values)
            values /= self.runtime.world_size
        loss, *rest = values.tolist()
        return loss, dict(zip(sums, rest, strict=True))

    # ------------------------------------------------------------------ the loop
    def run(self, batches: Batches, step_fn: StepFn) -> dict:
        """Train until max_iters or max_minutes; returns the last evaluation's figures."""
        with self.session(batches):
            while self.going():
                micro_batches = (batches.next_batch() for _ in range(self.loop.grad_accum))
                self.record(self.update(micro_batches, step_fn))
        return self.last_eval

    @contextlib.contextmanager
    def session(self, batches: Batches):
        """The run around the updates: the log, the progress bar, the clock, Ctrl-C; at the
        end an evaluation and a checkpoint (unless the last update had them), or, after a
        Ctrl-C, a checkpoint and KeyboardInterrupt (the entry point exits 130)."""
        self.batches, self.log = batches, self._open_log()
        self.progress = Progress(self.loop.max_iters, self.loop.max_minutes, self.runtime.is_main)
        self.started = time.perf_counter() - self.elapsed_s
        self.interval = {"tokens": 0, "updates": 0, "seconds": 0.0}
        with guards.CtrlC(self.runtime.is_main) as self.ctrl_c:
            try:
                yield self
            finally:
                self.progress.close()
        if self.ctrl_c.requested:
            self._save(CHECKPOINT_NAME)
            if self.runtime.is_main:
                print(f"stopped at step {self.step} (Ctrl-C); checkpoint saved")
            raise KeyboardInterrupt
        if self.last_eval.get("step") != self.step:  # not evaluated at this step yet
            self.evaluate_and_save()

    def going(self) -> bool:
        """Whether to make another update: no bound reached, no Ctrl-C on any rank. Every
        rank takes rank 0's clock, which sets the schedule's fraction of the run done."""
        elapsed, stop = guards.agree(self.runtime, self.now(), self.ctrl_c.requested)
        self.ctrl_c.requested = stop
        loop = self.loop
        self.fraction = fraction_done(self.step, loop.max_iters, elapsed, loop.max_minutes)
        return not (self.step >= loop.max_iters or self.fraction >= 1.0 or stop)

    def now(self) -> float:
        """Seconds of the run so far, earlier runs (resume) included."""
        return time.perf_counter() - self.started

    def record(self, update: Update) -> None:
        """After an update: the progress bar, a log line every log_interval updates, an
        evaluation and a checkpoint every eval_interval updates."""
        for key, value in (("tokens", update.tokens), ("updates", 1), ("seconds", update.seconds)):
            self.interval[key] = self.interval[key] + value
        self.progress.update(self.step, self.now())
        if self.step % self.loop.log_interval == 0 or self.step == self.loop.max_iters:
            self.write(self._log_record(update))
            self.interval = {"tokens": 0, "updates": 0, "seconds": 0.0}
        if self.step % self.loop.eval_interval == 0:
            self.evaluate_and_save()

    def write(self, record: dict) -> None:
        """A line in metrics.jsonl (rank 0), shown on the progress bar too."""
        if self.runtime.is_main:
            self.log.write(record)
            self.progress.set_postfix(_postfix(record, self.show))

    def _log_record(self, update: Update) -> dict:
        """The log line: tokens/s over all ranks and over the updates' own time (not data
        collection, evaluation or saving); MFU, model FLOPs of one rank over one device's
        peak; optimizer_mfu, the optimizer's own products (Muon's Newton-Schulz) over the
        same peak: device time spent, but not model FLOPs, so never in MFU."""
        rt, seconds = self.runtime, max(self.interval["seconds"], 1e-9)
        tok_s = float(self.interval["tokens"]) * rt.world_size / seconds
        record = {"step": self.step, "train_loss": update.loss, "lr": update.lr}
        record["tokens_per_sec"] = tok_s
        if self.flops_per_token and self.peak_flops:
            record["mfu"] = tok_s / rt.world_size * self.flops_per_token / self.peak_flops
        if self.peak_flops and self.optimizer_flops:
            updates = self.interval["updates"]
            record["optimizer_mfu"] = self.optimizer_flops * updates / seconds / self.peak_flops
        return {**record, **update.metrics}

    def _open_log(self) -> MetricsLog | None:
        """Rank 0's metrics.jsonl (kept up to the resumed step) and config.yaml."""
        if not self.runtime.is_main:
            return None
        resumed = self.step if self.saved_step is not None else None
        log = MetricsLog(self.out_dir / "metrics.jsonl", resumed)
        if "config" in self.meta:
            text = yaml.safe_dump(self.meta["config"], sort_keys=False)
            atomic_write_text(self.out_dir / "config.yaml", text)
        return log

    # ------------------------------------------------------- evaluation, checkpoints
    def in_eval_mode(self, fn: Callable[[nn.Module], Any]) -> Any:
        """fn(raw model) in eval mode, without gradients, under the run's autocast."""
        self.raw_model.eval()
        with torch.no_grad(), self.runtime.autocast():
            result = fn(self.raw_model)
        self.raw_model.train()
        return result

    def evaluate_and_save(self) -> None:
        """Evaluate (guarding against divergence), log, sample, and save ckpt.pt (and best.pt
        when the best_metric improved on every earlier evaluation)."""
        metrics = self.in_eval_mode(self.evaluate_fn) if self.evaluate_fn else {}
        kept = guards.kept(self.saved_step, self.out_dir)
        guards.check_evaluation(metrics, self.step, self.loop, self.best, self.first, kept)
        self.last_eval = {"step": self.step, **metrics}
        improved = self._improves_best(metrics)
        if improved:
            self.best = metrics[self.loop.best_metric]
            self.first = self.best if self.first is None else self.first
        if self.runtime.is_main:
            self.log.write(self.last_eval)
            if metrics:
                tqdm.write(f"step {self.step}: " + _postfix(metrics))
            if self.sample_fn is not None:
                text = self.in_eval_mode(self.sample_fn)
                tqdm.write("--- sample ---\n" + text + "\n---")
        self._save(CHECKPOINT_NAME)
        if improved:
            self._save(BEST_NAME)

    def _improves_best(self, metrics: dict) -> bool:
        """True when this evaluation's best_metric beats every earlier one."""
        value = metrics.get(self.loop.best_metric) if self.loop.best_metric else None
        if value is None or not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.loop.best_mode == "min" else value > self.best

    def _save(self, name: str) -> None:
        """Write a checkpoint (rank 0), with every rank's data position and RNG state."""
        per_rank = guards.rank_states(self.runtime, self.batches)
        if not self.runtime.is_main:
            return
        best = None
        if self.loop.best_metric:
            best = {"metric": self.loop.best_metric, "value": self.best, "first": self.first}
        state = {
            **self.meta,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "elapsed_s": self.now(),
            "best": best,
            "per_rank": per_rank,
            "metrics": self.last_eval,
        }
        save_checkpoint(self.out_dir / name, state)
        if name == CHECKPOINT_NAME:
            self.saved_step = self.step

    def load_state(self, ckpt: dict, batches: Batches) -> None:
        """Continue from a checkpoint written by this loop."""
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
        self.step = self.saved_step = ckpt["step"]
        self.elapsed_s = ckpt.get("elapsed_s", 0.0)
        best = ckpt.get("best") or {}
        self.best = best.get("value", ckpt.get("best_val_loss"))
        self.first = best.get("first", self.best)
        guards.restore_rank_state(self.runtime, batches, ckpt.get("per_rank", []))


_FORMATS = {
    "train_loss": "loss={:.4f}",
    "val_loss": "val_loss={:.4f}",
    "val_bpb": "val_bpb={:.4f}",
    "lr": "lr={:.2e}",
    "tokens_per_sec": "tok/s={:.0f}",
    "mfu": "mfu={:.1%}",
}
_QUIET = {"step", "val_ppl", "optimizer_mfu"}  # in metrics.jsonl, not in the progress bar


def _postfix(record: dict, show: tuple[str, ...] | None = None) -> str:
    """Short 'key=value' text for the progress bar: the usual figures, then the stage's
    (those in `show`, or all)."""
    parts = [fmt.format(record[k]) for k, fmt in _FORMATS.items() if record.get(k) is not None]
    parts += [
        f"{k}={v:.4g}"
        for k, v in record.items()
        if k not in _FORMATS
        and k not in _QUIET
        and isinstance(v, (int, float))
        and (show is None or k in show)
    ]
    return " ".join(parts)
