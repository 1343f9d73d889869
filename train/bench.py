"""python -m train.bench: how fast a model preset trains and samples on this machine.

    python -m train.bench                          # gpt2 preset, device/precision auto
    python -m train.bench model=small precision=float32 device=cuda

Weights are random (speed does not depend on their values); the vocabulary is the preset's.
Every figure is measured `repeats` times; the table shows the best and the median, the
JSON (out/bench/bench.json) keeps every run and the machine's load average, because on a
shared machine the spread matters as much as the figure.

Training: forward + backward + optimizer step (`optimizer`: adamw or muon, train/core/optim.py)
on random tokens, weights in float32 under autocast, as the training loop runs them.

    tokens/s = batch * seq_len / seconds per step
    MFU      = flops_per_token(seq_len) * tokens/s / peak FLOP/s
(flops_per_token: model/gpt.py; the peak: train/core/peak.py, measured once per machine and
cached, or a GPU's datasheet figure; the table says which). Muon's Newton-Schulz products
are not model FLOPs: their share of the peak is a line of its own, never part of MFU.

Sampling: batch 1, a random prompt, top-k sampling of a fixed number of new tokens (no
stop token), weights cast to the run's precision (no autocast), as python -m train.sample does:
  - cached:        model/generate.py with the KV cache
  - uncached:      the same, rerunning the model over the whole context for every token
  - transformers:  GPT2LMHeadModel.generate with the same weights and settings (model/hf.py)
    tokens/s = new tokens / wall time of the whole generation, prefill included.
A batch-1 token reads every weight once, so memory bandwidth bounds it:
    limit tokens/s = read bytes/s (a sum over 256 MiB) / bytes of weights
and the table gives each figure as a share of that limit.

Batched sampling: `complete` on batch_sizes prompts of mixed lengths at once (left padding),
batch_new_tokens each: tokens/s and the share of the peak FLOP/s (bench_batched).

Peak memory: on CUDA, torch.cuda.max_memory_allocated per phase; on the CPU the process's
peak resident set size so far (sampling runs first, so its figure is sampling alone).
"""

import copy
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig

from command import entry_point
from errors import UserError
from model import GPT, GPTConfig
from model.generate import complete, generate
from model.hf_llama import hf_family

from .core.decoding import prepare_for_decoding
from .core.optim import build_optimizer
from .core.peak import Peak, peak_flops, read_bandwidth
from .core.runtime import Runtime, precision_name, setup_runtime
from .core.trainer import LoopSettings, Trainer, next_token_step
from .settings import BenchSettings

# The loop of the timed training steps: one update at a fixed rate, clipped as in training.
LOOP = LoopSettings(
    max_iters=1,
    max_minutes=None,
    grad_accum=1,
    grad_clip=1.0,
    lr=1e-4,
    min_lr=0.0,
    warmup_iters=0,
    schedule="cosine",
    cooldown=0.4,
    log_interval=1,
    eval_interval=1,
    compile=False,
    best_metric=None,
    best_mode="min",
    max_regression=None,
    peak_tflops=None,
)


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summary(values: list[float]) -> dict:
    return {"best": max(values), "median": statistics.median(values), "runs": values}


def peak_memory_mb(rt: Runtime) -> float:
    if rt.device.type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_memory(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)


def timed(fn: Callable[[], None], rt: Runtime) -> float:
    """Wall seconds of fn(), waiting for queued device work on both sides."""
    rt.synchronize()
    start = time.perf_counter()
    fn()
    rt.synchronize()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- training


def bench_training(model: GPT, cfg: BenchSettings, rt: Runtime, peak: Peak) -> dict:
    """Training tokens/s and MFU of the training loop's own optimizer step (train/core/trainer.py:
    forward and backward under autocast, gradient clipping, optimizer step)."""
    B, steps = cfg.train_batch_size, cfg.train_steps
    T = min(cfg.train_seq_len or model.config.block_size, model.config.block_size)
    optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), rt.device.type, kind=cfg.optimizer)
    g = torch.Generator(device=rt.device).manual_seed(0)
    V = model.config.vocab_size
    x = torch.randint(0, V, (B, T), device=rt.device, generator=g)
    y = torch.randint(0, V, (B, T), device=rt.device, generator=g)
    trainer = Trainer(model, optimizer, rt, LOOP, cfg.out_dir, checkpoint_meta={})
    trainer.model.train()

    def step() -> None:
        trainer.update([(x, y)], next_token_step)

    reset_peak_memory(rt)
    note(f"training: batch {B} x {T} tokens, 1 warm-up + {cfg.repeats} x {steps} steps")
    step()  # warm-up: allocates optimizer state and gradients
    runs = []
    for _ in range(cfg.repeats):
        seconds = timed(lambda: [step() for _ in range(steps)], rt)
        runs.append(B * T * steps / seconds)
    flops = model.flops_per_token(T)
    result = {
        "batch_size": B,
        "seq_len": T,
        "tokens_per_sec": summary(runs),
        "mfu": summary([r * flops / peak.flops for r in runs]),
        "flops_per_token": flops,
        "peak_memory_mb": peak_memory_mb(rt),
    }
    ns = getattr(optimizer, "newton_schulz_flops", lambda: 0)()  # Muon: not model FLOPs
    if ns:
        result["newton_schulz_flops_per_step"] = ns
        result["optimizer_mfu"] = summary([r / (B * T) * ns / peak.flops for r in runs])
    return result


# --------------------------------------------------------------------------- sampling


def has_hf_class(config: GPTConfig) -> bool:
    """Whether a transformers class computes this config (model/hf_llama.py: hf_family)."""
    try:
        hf_family(config)
    except UserError:
        return False
    return True


def hf_available(setting) -> bool:
    """Whether to run the transformers comparison (hf: auto | true | false)."""
    if str(setting).lower() in ("false", "0", "no"):
        return False
    try:
        import transformers  # noqa: F401  (only to see whether the hf extra is installed)
    except ImportError:
        if str(setting).lower() == "auto":
            note("transformers is not installed: no comparison (pip install -e '.[hf]')")
            return False
        raise UserError(
            "hf=true but transformers is not installed; pip install -e '.[hf]'"
        ) from None
    return True


def bench_sampling(model: GPT, cfg: BenchSettings, rt: Runtime) -> dict:
    """Batch-1 sampling tokens/s: cached, uncached and (optionally) transformers.

    The cached and transformers runs alternate, so that on a shared machine both see the
    same background load; the uncached run is slow and done once.
    """
    P, N = cfg.prompt_tokens, cfg.new_tokens
    N_uncached = cfg.uncached_new_tokens or N
    top_k, temperature = cfg.top_k, float(cfg.temperature)
    dtype = rt.dtype  # weights cast, as python -m train.sample does
    model = prepare_for_decoding(model.to(rt.device, dtype).eval())
    g = torch.Generator(device=rt.device).manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (1, P), device=rt.device, generator=g)

    def ours(use_cache: bool, n: int) -> None:
        gen = torch.Generator(device=rt.device).manual_seed(0)
        for _ in generate(model, idx, n, temperature, top_k, None, use_cache, gen):
            pass

    reset_peak_memory(rt)
    result: dict = {"prompt_tokens": P, "new_tokens": N, "top_k": top_k}
    result["dtype"] = str(dtype).removeprefix("torch.")
    note(f"sampling: {P} prompt tokens, {N} new, top_k {top_k}, {cfg.repeats} runs each")
    ours(True, N)  # warm-up, and the memory figure before any other model exists
    result["peak_memory_mb"] = peak_memory_mb(rt)

    theirs = None
    if hf_available(cfg.hf):
        if P + N > model.config.block_size:
            note("transformers: prompt + new tokens exceed the context; no comparison")
        elif not has_hf_class(model.config):
            note("transformers: no class computes this mix of GPT-2 and Llama parts; no comparison")
        else:
            theirs, result["transformers_version"] = transformers_runner(model, idx, cfg, rt)
            theirs(8)  # warm-up
    cached, hf = [], []
    for _ in range(cfg.repeats):
        cached.append(N / timed(lambda: ours(True, N), rt))
        if theirs is not None:
            hf.append(N / timed(lambda: theirs(N), rt))
    result["cached"] = summary(cached)
    if hf:
        result["transformers"] = summary(hf)
    note(f"sampling without the cache: {N_uncached} new tokens, once")
    result["uncached"] = summary([N_uncached / timed(lambda: ours(False, N_uncached), rt)])
    result["uncached"]["new_tokens"] = N_uncached

    best = {k: result[k]["best"] for k in ("cached", "uncached", "transformers") if k in result}
    result["cached_over_uncached"] = best["cached"] / best["uncached"]
    if "transformers" in best:
        result["cached_over_transformers"] = best["cached"] / best["transformers"]
    result.update(bandwidth_limit(model, rt))
    for k in ("cached", "transformers"):
        if k in result:
            result[k]["of_limit"] = result[k]["best"] / result["limit_tokens_per_sec"]
    return result


def bandwidth_limit(model: GPT, rt: Runtime) -> dict:
    """The batch-1 decoding limit: a token reads every weight once (the position table
    but one row; an untied token table too), so tokens/s <= read bytes/s / bytes of weights."""
    w = model.embed.wte.weight
    n = model.num_params(include_position_embedding=False)
    if not model.config.tie_embeddings:  # the LM head is read whole, the token table one row
        n -= w.numel()
    weight_bytes = n * w.element_size()
    bandwidth = read_bandwidth(rt.device)
    return {
        "read_bytes_per_sec": bandwidth,
        "weight_bytes_per_token": weight_bytes,
        "limit_tokens_per_sec": bandwidth / weight_bytes,
    }


def mixed_prompts(n: int, length: int, vocab: int, longest: int, seed: int) -> list[list[int]]:
    """n random prompts of mixed lengths, from length // 2 to 2 * length (at most longest)."""
    g = torch.Generator().manual_seed(seed)
    low, high = max(1, length // 2), max(1, min(2 * length, longest))
    lengths = torch.randint(low, max(low, high) + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (t,), generator=g).tolist() for t in lengths]


def bench_batched(model: GPT, cfg: BenchSettings, rt: Runtime, peak: Peak) -> dict:
    """Generation throughput with `complete` at each batch size: prompts of mixed lengths,
    left-padded together, batch_new_tokens each, top-k sampling (no stop token), as
    reward-model data, PPO rollouts and evaluation decode.

        tokens/s        = batch * new tokens / wall time, prefill included
        share of peak   = forward FLOPs per token * tokens/s / peak FLOP/s
    forward FLOPs per token = a third of the training figure (2 N + 4 L T C, T the mean
    context while decoding); padding slots are computed but not counted.
    """
    N, c = cfg.batch_new_tokens, model.config
    dtype = rt.dtype
    model = prepare_for_decoding(model.to(rt.device, dtype).eval())
    longest = c.block_size - N
    results = {}
    for B in cfg.batch_sizes:
        prompts = mixed_prompts(B, cfg.prompt_tokens, c.vocab_size, longest, cfg.seed)
        mean_context = sum(len(p) for p in prompts) / B + N / 2
        flops = model.flops_per_token(round(mean_context)) / 3

        def run(prompts=prompts) -> None:
            gen = torch.Generator(device=rt.device).manual_seed(0)
            complete(model, prompts, N, float(cfg.temperature), cfg.top_k, generator=gen)

        note(
            f"batched sampling: {B} prompts of {min(map(len, prompts))}-"
            f"{max(map(len, prompts))} tokens, {N} new each, {cfg.repeats} runs"
        )
        run()  # warm-up
        runs = [B * N / timed(run, rt) for _ in range(cfg.repeats)]
        results[str(B)] = {
            "tokens_per_sec": summary(runs),
            "of_peak": summary([r * flops / peak.flops for r in runs]),
        }
    out = {"new_tokens": N, "dtype": str(dtype).removeprefix("torch."), "batches": results}
    if "1" in results and len(results) > 1:
        top = results[str(max(cfg.batch_sizes))]["tokens_per_sec"]["best"]
        out["largest_over_batch_1"] = top / results["1"]["tokens_per_sec"]["best"]
    return out


def transformers_runner(
    model: GPT, idx: torch.Tensor, cfg: BenchSettings, rt: Runtime
) -> tuple[Callable[[int], None], str]:
    """transformers' generate (GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM) on the
    same weights, dtype and sampling settings."""
    import transformers

    from model import hf, hf_llama

    transformers.logging.set_verbosity_error()
    convert = hf if hf_llama.hf_family(model.config) == "gpt2" else hf_llama
    hf_model = convert.to_hf_model(model).to(rt.device)
    mask = torch.ones_like(idx)

    def theirs(n: int) -> None:
        torch.manual_seed(0)
        out = hf_model.generate(
            idx,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=True,
            top_k=cfg.top_k,
            top_p=1.0,
            temperature=float(cfg.temperature),
            pad_token_id=0,
        )
        assert out.shape[1] == idx.size(1) + n  # the same amount of work as ours

    name = type(hf_model).__name__
    note(f"transformers {transformers.__version__}: {name}.generate, same settings")
    return theirs, transformers.__version__


# --------------------------------------------------------------------------- report


def row(name: str, s: dict, fmt: str = "{:10.1f}", times: float = 1.0) -> str:
    """One line of the table: a figure's best and median run (times `times`)."""
    return f"{name:38}" + fmt.format(times * s["best"]) + fmt.format(times * s["median"])


def table(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"{results['preset']} ({results['params'] / 1e6:.1f}M parameters) on {m['device']}, "
        f"{m['dtype']}, {m['threads']} threads, load average {m['load_before']:.1f} -> "
        f"{m['load_after']:.1f}",
        f"peak {m['peak_flops'] / 1e9:,.0f} GFLOP/s ({m['peak_source']})",
        f"{'':38}{'best':>10}{'median':>10}",
    ]
    if "train" in results:
        t = results["train"]
        lines.append(
            row(f"train tokens/s (batch {t['batch_size']}x{t['seq_len']})", t["tokens_per_sec"])
        )
        lines.append(row("train MFU %", t["mfu"], "{:10.2f}", 100))
        if "optimizer_mfu" in t:
            gflop = t["newton_schulz_flops_per_step"] / 1e9
            name = f"Newton-Schulz % ({gflop:.1f} GFLOP/step)"
            lines.append(row(name, t["optimizer_mfu"], "{:10.2f}", 100))
    if "sample" in results:
        lines += sampling_lines(results["sample"])
    if "batched" in results:
        lines += batched_lines(results["batched"])
    memory = [
        f"{k} {results[k]['peak_memory_mb']:.0f} MiB" for k in ("sample", "train") if k in results
    ]
    if memory:
        lines.append("peak memory: " + ", ".join(memory))
    return "\n".join(lines)


def sampling_lines(s: dict) -> list[str]:
    """The batch-1 decoding part of the table, with the bandwidth limit."""
    lines = [
        f"sampling in {s['dtype']}, batch 1, {s['prompt_tokens']} + {s['new_tokens']} tokens",
        row("sample tokens/s, KV cache", s["cached"]),
        row(f"sample tokens/s, no cache ({s['uncached']['new_tokens']} tok)", s["uncached"]),
    ]
    if "transformers" in s:
        lines.append(row("sample tokens/s, transformers", s["transformers"]))
    ratio = f"cached / uncached {s['cached_over_uncached']:.1f}x"
    if "cached_over_transformers" in s:
        ratio += f", cached / transformers {s['cached_over_transformers']:.2f}x"
    limit = (
        f"read bandwidth {s['read_bytes_per_sec'] / 1e9:.1f} GB/s, "
        f"{s['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token: limit "
        f"{s['limit_tokens_per_sec']:.1f} tokens/s; cached {100 * s['cached']['of_limit']:.0f}%"
    )
    if "transformers" in s:
        limit += f", transformers {100 * s['transformers']['of_limit']:.0f}%"
    return lines + [ratio + " (best runs)", limit + " of it (best runs)"]


def batched_lines(b: dict) -> list[str]:
    lines = [
        f"batched sampling in {b['dtype']} (complete, mixed-length prompts, "
        f"{b['new_tokens']} new tokens each)"
    ]
    for size, r in b["batches"].items():
        lines.append(row(f"batch {size} tokens/s", r["tokens_per_sec"]))
        lines.append(row(f"batch {size} % of peak FLOP/s", r["of_peak"], "{:10.2f}", 100))
    if "largest_over_batch_1" in b:
        lines.append(f"largest batch / batch 1: {b['largest_over_batch_1']:.1f}x (best runs)")
    return lines


def preset_name() -> str:
    """The model config group chosen on the command line (gpt2, small, ...)."""
    try:
        return HydraConfig.get().runtime.choices.get("model") or "custom"
    except ValueError:  # not started by @hydra.main (tests compose the config)
        return "custom"


def run(cfg: BenchSettings) -> dict:
    rt = setup_runtime(cfg.device, cfg.precision, cfg.seed)
    try:
        config = GPTConfig(**cfg.model)
    except (TypeError, ValueError) as e:
        raise UserError(f"model config: {e}") from None
    model = GPT(config).to(rt.device)  # float32 master weights
    peak = peak_flops(rt.device, rt.dtype, cfg.peak_tflops)
    note(peak.describe())
    preset = preset_name()
    results: dict = {
        "preset": preset,
        "model_config": config.to_dict(),
        "params": model.num_params(),
        "machine": {
            "device": str(rt.device),
            "dtype": precision_name(rt.dtype),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_before": os.getloadavg()[0],
            "peak_flops": peak.flops,
            "peak_source": peak.source,
        },
    }
    if cfg.sample:  # first: on the CPU its peak RSS is then sampling's alone
        results["sample"] = bench_sampling(copy.deepcopy(model), cfg, rt)
    if cfg.batch_sizes:
        results["batched"] = bench_batched(copy.deepcopy(model), cfg, rt, peak)
    if cfg.train:
        results["train"] = bench_training(model, cfg, rt, peak)
    results["machine"]["load_after"] = os.getloadavg()[0]

    print(table(results))
    out = Path(cfg.out_dir) / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    note(f"wrote {out}")
    return results


@entry_point("bench", BenchSettings)
def main(settings: BenchSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
