"""Language-model evaluation: how well a model predicts text, and a short sample of it.

For a text of N_bytes UTF-8 bytes that the tokenizer turns into N_tok tokens, with
nats = sum over tokens of -ln p(token | the tokens before it):

    loss            = nats / N_tok                  (nats per token)
    perplexity      = exp(loss)
    bits per byte   = nats / (ln 2 * N_bytes)  =  loss / ln 2 * (N_tok / N_bytes)

Bits per byte does not depend on how the text was cut into tokens, so a character-level
model and a 4096-piece model, or two runs with different validation splits, can be
compared on the same text file. Used by pretraining and SFT (validation loss, progress
samples) and by python -m train.evaluate.
"""

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.loader import sequential_windows
from data.sources import read_utf8_file
from errors import UserError
from model import GPT, IGNORE_INDEX
from model.generate import complete

from ..core.runtime import Runtime


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


def text_bits_per_byte(model: GPT, tok, text: str, runtime: Runtime, batch_size: int = 16) -> dict:
    """Bits per byte of `text` under the model; the text starts after an end-of-text token.

    Consecutive windows of block_size tokens predict every token of the text once
    (data/loader.py sequential_windows; the last window is padded).
    """
    ids = np.array([tok.eos_id] + tok.encode(text), dtype=np.int64)
    n_bytes = len(text.encode("utf-8"))
    if len(ids) < 2 or n_bytes == 0:
        raise UserError("the text to evaluate is empty; give a file with some text in it")
    model.eval()
    with torch.no_grad(), runtime.autocast():
        windows = sequential_windows(ids, model.config.block_size, batch_size)
        metrics = language_model_metrics(model, windows, (len(ids) - 1) / n_bytes, runtime)
    return {"bytes": n_bytes, "tokens": len(ids) - 1, **metrics}


def file_bits_per_byte(model: GPT, tok, runtime: Runtime, path: str | Path) -> dict:
    """Read a UTF-8 text file and measure its bits per byte under the model (printed too)."""
    path = Path(path)
    text = read_utf8_file(path, "text_file")
    r = text_bits_per_byte(model, tok, text, runtime)
    print(
        f"{path}: {r['bytes']} bytes, {r['tokens']} tokens, loss {r['val_loss']:.4f} "
        f"nats/token, {r['val_bpb']:.4f} bits/byte"
    )
    return r


def sample_text(
    model: GPT,
    tok,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> str:
    """A short sample for progress reports, up to an end-of-text or end-of-turn token.

    Its own RNG, so training's RNG is untouched.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    stops = (tok.eos_id, tok.end_id)
    [reply] = complete(
        model, [prompt_ids], max_new_tokens, temperature, top_k, None, stops, generator=generator
    )
    return tok.decode(reply.text_tokens)
