"""Evaluation: how well a model predicts text, in units that compare across tokenizers.

For a text of N_bytes UTF-8 bytes that the tokenizer turns into N_tok tokens, with
nats = sum over tokens of -ln p(token | the tokens before it):

    loss            = nats / N_tok                  (nats per token)
    perplexity      = exp(loss)
    bits per byte   = nats / (ln 2 * N_bytes)  =  loss / ln 2 * (N_tok / N_bytes)

Bits per byte does not depend on how the text was cut into tokens, so a character-level
model and a 4096-piece model, or two runs with different validation splits, can be
compared on the same text file:

    python -m train.evaluate checkpoint=out/pretrain text_file=some.txt

The same entry point scores instruction following: exact-match accuracy on the held-out
built-in task items (train/task_eval.py), the same items for any checkpoint, so a base
model and its SFT model compare; results go to eval.json beside the checkpoint.

    python -m train.evaluate checkpoint=out/sft
"""

import math
from collections.abc import Iterable
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from data.sources import read_utf8_file
from errors import UserError, report_user_errors
from model import GPT, IGNORE_INDEX
from model.generate import generate

from .checkpoint import load_model
from .runtime import Runtime, runtime_session
from .task_eval import (
    builtin_tasks,
    eval_file_items,
    format_table,
    load_eval,
    save_eval,
    score,
)


def language_model_metrics(
    model: GPT,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    tokens_per_byte: float | None,
    runtime: Runtime,
) -> dict:
    """Validation loss, perplexity and bits per byte over (x, y) batches.

    Bits per byte needs the text's tokens per byte; without it (None) it is left out.

    Under DDP each rank scores every world_size-th batch and the sums are all-reduced.
    The caller sets eval mode, no_grad and autocast (the training loop does).
    """
    nats = torch.zeros((), dtype=torch.float64, device=runtime.device)
    count = torch.zeros((), dtype=torch.float64, device=runtime.device)
    for i, (x, y) in enumerate(batches):
        if i % runtime.world_size != runtime.rank:
            continue
        x, y = x.to(runtime.device), y.to(runtime.device)
        _, loss = model(x, y)  # mean over the targets that count
        n = (y != IGNORE_INDEX).sum()
        nats += loss.double() * n
        count += n
    if runtime.distributed:
        dist.all_reduce(nats)
        dist.all_reduce(count)
    if count.item() == 0:
        raise UserError("evaluation saw no tokens; the validation split is empty")
    loss = (nats / count).item()
    metrics = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
    if tokens_per_byte is not None:
        metrics["val_bpb"] = loss / math.log(2) * tokens_per_byte
    return metrics


def text_windows(
    ids: np.ndarray, block_size: int, batch_size: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows that predict every token of ids[1:] exactly once.

    Window i reads ids[i*T : i*T+T] and predicts ids[i*T+1 : i*T+T+1]; the last window
    is padded, its padding targets set to -100. Yields (x, y), each (b, T), b <= batch_size.
    """
    T = block_size
    n_windows = math.ceil((len(ids) - 1) / T)
    x = np.zeros((n_windows, T), dtype=np.int64)
    y = np.full((n_windows, T), IGNORE_INDEX, dtype=np.int64)
    for w in range(n_windows):
        chunk = ids[w * T : w * T + T + 1]
        x[w, : len(chunk) - 1] = chunk[:-1]
        y[w, : len(chunk) - 1] = chunk[1:]
    for start in range(0, n_windows, batch_size):
        yield (
            torch.from_numpy(x[start : start + batch_size]),
            torch.from_numpy(y[start : start + batch_size]),
        )


def text_bits_per_byte(model: GPT, tok, text: str, runtime: Runtime, batch_size: int = 16) -> dict:
    """Bits per byte of `text` under the model; the text starts after an end-of-text token."""
    ids = np.array([tok.eos_id] + tok.encode(text), dtype=np.int64)
    n_bytes = len(text.encode("utf-8"))
    if len(ids) < 2 or n_bytes == 0:
        raise UserError("the text to evaluate is empty; give a file with some text in it")
    model.eval()
    with torch.no_grad(), runtime.autocast():
        windows = text_windows(ids, model.config.block_size, batch_size)
        metrics = language_model_metrics(model, windows, (len(ids) - 1) / n_bytes, runtime)
    return {"bytes": n_bytes, "tokens": len(ids) - 1, **metrics}


def sample_text(
    model: GPT,
    tok,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> str:
    """A short sample for progress reports; its own RNG, so training's RNG is untouched."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    stop = [tok.eos_id, tok.end_id]
    new = [
        int(t[0])
        for t in generate(
            model, idx, max_new_tokens, temperature, top_k, None, stop, generator=generator
        )
    ]
    return tok.decode(new)


def run(cfg: DictConfig) -> dict:
    with runtime_session(cfg.device, cfg.precision, cfg.seed) as rt:
        model, tok, ckpt = load_model(cfg.checkpoint)
        model.to(rt.device)
        results: dict = {"checkpoint": ckpt["path"]}
        if cfg.text_file:
            results["text"] = {
                "file": str(cfg.text_file),
                **file_bits_per_byte(model, tok, rt, cfg),
            }
        task_eval = cfg.task_eval if cfg.task_eval is not None else not cfg.text_file
        if task_eval:
            items = builtin_tasks(cfg).test if cfg.tasks.weight > 0 else []
            items += eval_file_items(cfg.eval_files)
            stage = ckpt.get("stage", "model")
            results[stage] = score(model, tok, items, rt, cfg.eval_max_new_tokens)
            if results[stage]:
                print(f"{ckpt['path']}: held-out exact match (greedy, chat format)")
                print(format_table({stage: results[stage]}))
                # keep what is there (SFT writes the base model's scores beside its own)
                run_dir = Path(ckpt["path"]).parent
                path = save_eval({**load_eval(run_dir), **results}, run_dir)
                print(f"written to {path}")
        return results


def file_bits_per_byte(model: GPT, tok, rt: Runtime, cfg: DictConfig) -> dict:
    """Read cfg.text_file (UTF-8) and measure its bits per byte under the model."""
    path = Path(cfg.text_file)
    text = read_utf8_file(path, "text_file")
    r = text_bits_per_byte(model, tok, text, rt)
    print(
        f"{path}: {r['bytes']} bytes, {r['tokens']} tokens, loss {r['val_loss']:.4f} "
        f"nats/token, {r['val_bpb']:.4f} bits/byte"
    )
    return r


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
