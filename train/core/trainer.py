"""The training loop: one for every stage (pretraining, SFT, reward model, PPO, DPO).

A stage hands the Trainer its model, optimizer and a batch source, and says how to train
on one batch with a step function:

    step(model, batch) -> StepResult(loss, tokens, metrics)

loss is the scalar to minimise on that batch, tokens the tokens the forward pass ran on
(padding excluded: what tokens/s and MFU count), metrics any named figures (accuracy,
margin, KL ...). Each optimizer step is then

    lr = schedule(step, fraction of the run done)                      (train/core/optim.py)
    for each of grad_accum micro-batches:
        result = step(model, batches.next_batch())    forward under autocast
        backward(result.loss / grad_accum)            DDP averages gradients across ranks
    clip the gradient norm to grad_clip, optimizer step, zero the gradients
    loss and metrics: averaged over the micro-batches and the ranks

then a line in metrics.jsonl every log_interval steps, and every eval_interval steps an
evaluation, a sample and a checkpoint; best.pt as well when `best_metric` (say
"val_loss", with best_mode "min") improved on every earlier evaluation. Without a
best_metric there is no best.pt.

Stages that collect data before they learn from it (PPO: sample replies, score them,
then several passes of minibatch updates over them) use the same loop: their batch source
does the collecting. Its next_batch() hands out the next minibatch of the current rollout
and, when the rollout is used up, first generates a new one with the current policy. One
loop step is one minibatch update; the rollout's figures (reward, KL) travel with its
minibatches and the step function reports them as metrics.

The run ends at max_iters or after max_minutes of wall time, whichever comes first.
Ctrl-C finishes the current step, saves a checkpoint and raises KeyboardInterrupt (the
entry point exits with 130, so `make pretrain && make sft` stops there); a second Ctrl-C
aborts at once, leaving the last checkpoint on disk as it was.

Divergence never overwrites a good checkpoint: a NaN or infinite training loss, an
evaluation that is not finite, or (min mode) one worse than the first evaluation and more
than max_regression times the best so far, stops the run with a UserError before anything
is saved.
"""

import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from errors import UserError

from .checkpoint import BEST_NAME, CHECKPOINT_NAME, rng_state, save_checkpoint, set_rng_state
from .files import atomic_write_text
from .metrics import MetricsLog
from .optim import fraction_done, lr_at, set_lr
from .progress import Progress
from .runtime import Runtime
from .settings import LOOP, check, check_relations


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


@dataclass
class LoopConfig:
    """The loop's settings; each stage's config has these keys at its top level.
    Their rules are train/core/settings.py's LOOP table."""

    max_iters: int = 1000
    max_minutes: float | None = None  # wall-clock budget; None = no limit
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the run
    warmup_iters: int = 100
    schedule: str = "cosine"  # "cosine" or "wsd" (train/core/optim.py)
    cooldown: float = 0.4  # wsd: the fraction of the run that decays to min_lr
    log_interval: int = 10
    eval_interval: int = 250  # evaluate, sample and checkpoint every this many steps
    compile: bool = False  # torch.compile the model
    best_metric: str | None = None  # an evaluation figure that picks best.pt; None = no best.pt
    best_mode: str = "min"  # "min": lower is better, "max": higher is better
    max_regression: float | None = 4.0  # min mode: an evaluation worse than the first one and
    # this many times the best so far means the run diverged: nothing is saved, the run stops

    def __post_init__(self) -> None:
        check(asdict(self), LOOP)
        check_relations(asdict(self))

    @classmethod
    def from_cfg(cls, cfg) -> "LoopConfig":
        """Pick this dataclass's fields out of a (Hydra) config mapping."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})


def to_device(batch, device: torch.device):
    """The batch with every tensor in it moved to `device` (tuples, lists, dicts kept)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Trainer:
    """Runs the loop for one stage. Only rank 0 logs, prints and writes files."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        runtime: Runtime,
        batches: Batches,
        step: StepFn,
        loop: LoopConfig,
        out_dir: str | Path,
        checkpoint_meta: dict,  # stage, model_kind, model_config, tokenizer, config, ...:
        # in every checkpoint; config (the run's resolved config) also goes to config.yaml
        evaluate: Callable[[nn.Module], dict] | None = None,  # -> {"val_loss": ..., ...}
        sample: Callable[[nn.Module], str] | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        show: tuple[str, ...] | None = None,  # the metrics the progress bar shows; None: all
    ) -> None:
        self.raw_model = model  # what checkpoints and evaluation see
        self.show = show
        self.optimizer = optimizer
        self.runtime = runtime
        self.batches = batches
        self.step_fn = step
        self.loop = loop
        self.out_dir = Path(out_dir)
        self.meta = checkpoint_meta
        self.evaluate_fn = evaluate
        self.sample_fn = sample
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        # the optimizer's own matrix products per step (Muon's Newton-Schulz), kept out of MFU
        self.optimizer_flops = getattr(optimizer, "newton_schulz_flops", lambda: 0)()
        self.scaler = runtime.grad_scaler()
        self.step = 0  # optimizer steps completed
        self.elapsed_s = 0.0  # wall time spent in earlier runs (resume)
        self.best: float | None = None  # the best value of loop.best_metric so far
        self.first: float | None = None  # its value at the first evaluation
        self.last_eval: dict = {}
        self.saved_step: int | None = None  # the step of the checkpoint on disk
        self.stop_requested = False

        model = model.to(runtime.device)
        if loop.compile:
            model = torch.compile(model)
        if runtime.distributed:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        self.model = model  # what the training step calls

    # ----------------------------------------------------------------- resume
    def load_state(self, ckpt: dict) -> None:
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
        log = self._open_log()
        start_time = time.perf_counter()
        progress = Progress(self.loop.max_iters, self.loop.max_minutes, self.runtime.is_main)
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            stopped = self._train(log, progress, start_time)
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            progress.close()
        if stopped:
            self._save(CHECKPOINT_NAME, start_time)
            if self.runtime.is_main:
                print(f"stopped at step {self.step} (Ctrl-C); checkpoint saved")
            raise KeyboardInterrupt
        if self.last_eval.get("step") != self.step:  # not evaluated at this step yet
            self._evaluate_and_save(log, start_time)
        return self.last_eval

    def _train(self, log: MetricsLog | None, progress: Progress, start_time: float) -> bool:
        """Optimizer steps until a bound is reached; True when stopped by Ctrl-C."""
        loop = self.loop
        schedule = (loop.lr, loop.min_lr, loop.warmup_iters, loop.schedule, loop.cooldown)
        interval_tokens, interval_steps, interval_start = 0, 0, time.perf_counter()
        self.model.train()
        while True:
            elapsed = self.elapsed_s + time.perf_counter() - start_time
            elapsed, stop = self._agree(elapsed, self.stop_requested)
            frac = fraction_done(self.step, loop.max_iters, elapsed, loop.max_minutes)
            if self.step >= loop.max_iters or frac >= 1.0 or stop:
                return stop
            lr = lr_at(self.step, frac, *schedule)
            set_lr(self.optimizer, lr)
            loss, tokens, metrics = self.train_step()
            self.step += 1
            interval_tokens += tokens
            interval_steps += 1
            progress.update(self.step, self.elapsed_s + time.perf_counter() - start_time)

            if self.step % loop.log_interval == 0 or self.step == loop.max_iters:
                seconds = time.perf_counter() - interval_start
                record = self._log_record(loss, lr, metrics, interval_tokens, interval_steps,
                                          seconds)  # fmt: skip
                if self.runtime.is_main:
                    log.write(record)
                    progress.set_postfix(_postfix(record, self.show))
                interval_tokens, interval_steps, interval_start = 0, 0, time.perf_counter()

            if self.step % loop.eval_interval == 0:
                self._evaluate_and_save(log, start_time)
                interval_tokens, interval_steps, interval_start = 0, 0, time.perf_counter()

    # ----------------------------------------------------------------- pieces
    def train_step(self) -> tuple[float, int | torch.Tensor, dict[str, float]]:
        """One optimizer step over grad_accum micro-batches.

        Returns the loss and metrics averaged over micro-batches and ranks, and the tokens
        this process trained on.
        """
        loop, rt = self.loop, self.runtime
        loss_sum = torch.zeros((), device=rt.device)
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        # One autocast context for all the micro-batches: it casts each weight to the compute
        # dtype once and reuses the copy, as the weights do not change until the optimizer
        # step (a context per micro-batch would cast them all again every time).
        with rt.autocast():
            for micro in range(loop.grad_accum):
                batch = to_device(self.batches.next_batch(), rt.device)
                if isinstance(self.model, DDP):  # all-reduce gradients on the last micro-step
                    self.model.require_backward_grad_sync = micro == loop.grad_accum - 1
                result = self.step_fn(self.model, batch)
                loss = result.loss / loop.grad_accum
                with rt.no_autocast():  # backward runs in the dtypes the forward chose
                    self.scaler.scale(loss).backward()
                loss_sum += loss.detach()
                tokens = tokens + result.tokens  # an int, or a tensor (no device sync here)
                for name, value in result.metrics.items():
                    value = torch.as_tensor(value, dtype=torch.float32, device=rt.device).detach()
                    sums[name] = sums.get(name, 0.0) + value / loop.grad_accum
        if loop.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), loop.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

        loss, metrics = self._mean_over_ranks(loss_sum, sums)
        if not math.isfinite(loss):
            raise UserError(
                f"training loss became {loss} at step {self.step + 1}; stopped without saving "
                f"({self._kept()}); lower lr or use float32"
            )
        return loss, tokens, metrics

    def _mean_over_ranks(
        self, loss_sum: torch.Tensor, sums: dict[str, torch.Tensor]
    ) -> tuple[float, dict[str, float]]:
        """Every rank reports, and checks, the means over all ranks (one all-reduce)."""
        values = torch.stack([loss_sum, *sums.values()])  # (1 + metrics,)
        if self.runtime.distributed:
            dist.all_reduce(values)
            values /= self.runtime.world_size
        loss, *rest = values.tolist()
        return loss, dict(zip(sums, rest, strict=True))

    def _log_record(self, loss, lr, metrics: dict, tokens: int, steps: int, seconds: float):
        """The log line: tokens/s over all ranks; MFU (model FLOPs of one rank over one
        device's peak); optimizer_mfu, the optimizer's own products (Muon's Newton-Schulz)
        over the same peak: device time spent, but not model FLOPs, so never in MFU."""
        rt = self.runtime
        tok_s = float(tokens) * rt.world_size / seconds
        record = {"step": self.step, "train_loss": loss, "lr": lr, "tokens_per_sec": tok_s}
        if self.flops_per_token and self.peak_flops:
            record["mfu"] = tok_s / rt.world_size * self.flops_per_token / self.peak_flops
        if self.peak_flops and self.optimizer_flops:
            record["optimizer_mfu"] = self.optimizer_flops * steps / seconds / self.peak_flops
        return {**record, **metrics}

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

    def _in_eval_mode(self, fn: Callable[[nn.Module], Any]) -> Any:
        """fn(raw model) in eval mode, without gradients, under the run's autocast."""
        self.raw_model.eval()
        with torch.no_grad(), self.runtime.autocast():
            result = fn(self.raw_model)
        self.raw_model.train()
        return result

    def _improves_best(self, metrics: dict) -> bool:
        """True when this evaluation's best_metric beats every earlier one."""
        value = metrics.get(self.loop.best_metric) if self.loop.best_metric else None
        if value is None or not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.loop.best_mode == "min" else value > self.best

    def _kept(self) -> str:
        """What stays on disk when a run stops without saving, said truthfully."""
        if self.saved_step is None:
            return "no checkpoint was saved yet"
        return f"the checkpoint of step {self.saved_step} in {self.out_dir} is kept"

    def _check_divergence(self, metrics: dict) -> None:
        """UserError if this evaluation shows the run diverged (see the module docstring)."""
        name = self.loop.best_metric
        for key, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value) and key != "val_ppl":
                raise UserError(
                    f"evaluation at step {self.step} gave {key}={value}; the run diverged and "
                    f"stopped without saving ({self._kept()}); lower lr or use float32"
                )
        ratio, value = self.loop.max_regression, metrics.get(name) if name else None
        if not ratio or value is None or self.best is None or self.loop.best_mode != "min":
            return
        if value > ratio * self.best and value > self.first:
            raise UserError(
                f"evaluation at step {self.step} gave {name}={value:.4g}, worse than the first "
                f"evaluation ({self.first:.4g}) and more than max_regression={ratio:g} times "
                f"the best ({self.best:.4g}): the run diverged and stopped without saving "
                f"({self._kept()}); lower lr, or set max_regression=null"
            )

    def _evaluate_and_save(self, log: MetricsLog | None, start_time: float) -> None:
        metrics = self._in_eval_mode(self.evaluate_fn) if self.evaluate_fn else {}
        self._check_divergence(metrics)
        self.last_eval = {"step": self.step, **metrics}
        improved = self._improves_best(metrics)
        if improved:
            self.best = metrics[self.loop.best_metric]
            self.first = self.best if self.first is None else self.first
        if self.runtime.is_main:
            log.write(self.last_eval)
            if metrics:
                tqdm.write(f"step {self.step}: " + _postfix(metrics))
            if self.sample_fn is not None:
                text = self._in_eval_mode(self.sample_fn)
                tqdm.write("--- sample ---\n" + text + "\n---")
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
        best = None
        if self.loop.best_metric:
            best = {"metric": self.loop.best_metric, "value": self.best, "first": self.first}
        state = {
            **self.meta,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "elapsed_s": self.elapsed_s + time.perf_counter() - start_time,
            "best": best,
            "per_rank": per_rank,
            "metrics": self.last_eval,
        }
        save_checkpoint(self.out_dir / name, state)
        if name == CHECKPOINT_NAME:
            self.saved_step = self.step

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:  # second Ctrl-C: abort; the last checkpoint stays as it was
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.runtime.is_main:
            tqdm.write("Ctrl-C: finishing this step, then saving (Ctrl-C again to abort)")


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
