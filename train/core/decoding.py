"""The CPU layout of a model's weights for decoding: measured per machine, not assumed.

Decoding one token at batch 1 reads every weight once (a row vector times each matrix), so
its speed is the speed at which the CPU's kernels read the weights, and that depends on how
they are laid out in memory. python -m train.sample, the server and the benchmark call
`prepare_for_decoding` once, after loading; the model computes the same function either way.
"""

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model import GPT


def prepare_for_decoding(
    model: GPT, choose: Callable[[list[torch.Tensor]], bool] | None = None
) -> GPT:
    """Store each set of same-shaped Linear weights in the layout this CPU reads fastest.

    A batch-1 decode step is a row vector times every weight matrix, y = x W^T (W: out x
    in), so it is bound by reading the weights: all of them, once per token. nn.Linear
    keeps W row-major (out, in); `w.t().contiguous().t()` keeps its shape and values and
    stores it column-major, (in, out) row-major as GPT-2's Conv1D does. Which of the two a
    CPU's kernels read faster depends on the kernel, hence on the dtype and the CPU (one
    CPU read float32 weights 1.3x faster transposed and emulated-bf16 ones 7-10x slower:
    the table is in docs/training.md), so the choice is measured, not assumed:
    `choose(weights)` says whether to transpose one set (default transposed_reads_faster,
    which times both layouts on this machine). The
    model computes the same function either way (up to the order of the sums inside a
    matmul; tests/test_generate.py); the tied LM head / token embedding stays one tensor.
    CPU only (GPU kernels read either layout at full speed); returns the model, changed
    in place.
    """
    if model.embed.wte.weight.device.type != "cpu":
        return model
    choose = choose or transposed_reads_faster
    by_shape: dict[tuple[int, ...], list[nn.Parameter]] = {}
    for module in model.modules():  # the LM head is a Linear; the embedding it shares is not
        if isinstance(module, nn.Linear):
            by_shape.setdefault(tuple(module.weight.shape), []).append(module.weight)
    with torch.no_grad():
        for weights in by_shape.values():
            if choose([w.data for w in weights]):
                for w in weights:
                    w.data = w.data.t().contiguous().t()
    return model


def transposed_reads_faster(weights: list[torch.Tensor], budget_mib: int = 64) -> bool:
    """Whether x W^T with a batch-1 x runs faster on these (out, in) weights stored
    transposed: the best of 3 passes of each layout, alternately, over as many of them as
    fill budget_mib (more than a CPU's caches hold, so that they are read from memory, as
    in decoding)."""
    plain, total = [], 0
    for w in weights:
        plain.append(w)
        total += w.numel() * w.element_size()
        if total >= budget_mib << 20:
            break
    flipped = [w.t().contiguous().t() for w in plain]
    x = torch.randn(1, plain[0].size(1), dtype=plain[0].dtype)  # (1, in)

    def seconds(ws: list[torch.Tensor]) -> float:
        start = time.perf_counter()
        for w in ws:
            F.linear(x, w)
        return time.perf_counter() - start

    best = {"plain": float("inf"), "flipped": float("inf")}
    for _ in range(4):  # the first pass of each is a warm-up
        best["plain"] = min(best["plain"], seconds(plain))
        best["flipped"] = min(best["flipped"], seconds(flipped))
    return best["flipped"] < best["plain"]
