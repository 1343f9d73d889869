"""make gpu-check: run every CUDA path once, in under 8 minutes on one GPU, and report.

    1. the tests marked `cuda` (tests/test_cuda.py: cuda:N, bf16, fp16 with the grad
       scaler, torch.compile, SDPA's flash kernel, nccl DDP in one process);
    2. a short pretraining of the gpt2 preset with torch.compile on the prepared corpus;
    3. python -m train.bench model=gpt2 device=cuda;
then one summary: tokens/s, MFU against the datasheet peak, decoding against the
bandwidth limit, batched sampling (also written to out/gpu-check/summary.json).

A GPU machine may have no network: torch must be installed there; every other package
the steps import (hydra-core, omegaconf, sentencepiece, tqdm, PyYAML, pytest, numpy) is
installed, when missing, from the wheels in .gpu-deps/ into .gpu-deps/site, and the
corpus is read from .gpu-deps/data. `make gpu-deps` makes that folder on a machine with
network (wheels for CPython 3.10-3.13, about 15 MB with the corpus); carry it with the
working tree. `--device cpu` runs the same steps on a CPU (tests/test_gpu_check.py).
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPS = ROOT / ".gpu-deps"
SITE = DEPS / "site"
# import name -> the distribution pip installs it from
NEEDED = {
    "numpy": "numpy",
    "sentencepiece": "sentencepiece",
    "tqdm": "tqdm",
    "yaml": "PyYAML",
    "omegaconf": "omegaconf",
    "hydra": "hydra-core",
    "pytest": "pytest",
}


def say(message: str) -> None:
    print(f"[gpu-check] {message}", flush=True)


def ensure_packages() -> None:
    """Install the missing packages from .gpu-deps/ (no network), or say what to carry."""
    if SITE.is_dir():
        sys.path.insert(0, str(SITE))
    missing = [dist for name, dist in NEEDED.items() if importlib.util.find_spec(name) is None]
    if importlib.util.find_spec("torch") is None:
        sys.exit("[gpu-check] error: torch is not installed; install a CUDA build of torch first")
    if not missing:
        return
    if not DEPS.is_dir():
        sys.exit(
            f"[gpu-check] error: {', '.join(missing)} missing and no .gpu-deps/ folder: "
            "run `make gpu-deps` on a machine with network and carry .gpu-deps"
        )
    say(f"installing {', '.join(missing)} from {DEPS} (offline)")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-index",
        "--find-links",
        str(DEPS / "wheels"),
        "--target",
        str(SITE),
        *missing,
    ]
    if subprocess.run(cmd).returncode != 0:
        sys.exit(
            f"[gpu-check] error: could not install {', '.join(missing)} from {DEPS}/wheels "
            "(no wheel for this Python? `make gpu-deps` fetches 3.10-3.13)"
        )
    sys.path.insert(0, str(SITE))
    importlib.invalidate_caches()


def run_step(name: str, args: list[str], timeout: float, log_dir: Path) -> tuple[bool, str]:
    """Run one step as a subprocess (its output shown and kept); True when it succeeded."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SITE)])}
    say(f"{name}: {' '.join(args)}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            env=env,
            timeout=timeout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ok, output = proc.returncode == 0, proc.stdout
    except subprocess.TimeoutExpired as e:
        ok, output = False, (e.stdout or b"").decode(errors="replace") + f"\ntimed out ({timeout}s)"
    (log_dir / f"{name}.log").write_text(output)
    tail = "\n".join(output.strip().splitlines()[-25:])
    print(tail, flush=True)
    say(f"{name}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s")
    return ok, output


def corpus_root() -> Path:
    for root in (DEPS / "data", ROOT / "out" / "data"):
        if (root / "shakespeare" / "meta.json").is_file():
            return root
    sys.exit(
        "[gpu-check] error: no prepared corpus in .gpu-deps/data or out/data: run "
        "`make gpu-deps` (or make pretrain) on a machine with network and carry .gpu-deps"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--steps", type=int, default=150, help="pretraining steps (3 minutes at most)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--pretrain", nargs="*", default=[], help="more pretraining overrides")
    p.add_argument("--bench", nargs="*", default=[], help="more bench overrides")
    p.add_argument("--out", default="out/gpu-check")
    return p.parse_args()


def main() -> int:
    a = parse_args()
    ensure_packages()
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": a.device, "model": a.model, "compile": a.compile, "steps": {}}
    say(describe_device(a.device))
    if not a.skip_tests:
        tests = ["tests/test_cuda.py", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
        results["steps"]["tests"] = run_step("tests", ["-m", "pytest", *tests], 180, out)[0]
    check_pretraining(a, out, results)
    check_bench(a, out, results)
    (out / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    print(summary(results), flush=True)
    return 0 if all(results["steps"].values()) else 1


def check_pretraining(a: argparse.Namespace, out: Path, results: dict) -> None:
    """A short pretraining of the preset on the device (compiled unless --no-compile)."""
    data = [] if any(x.startswith("data") for x in a.pretrain) else [f"data.root={corpus_root()}"]
    run = out / "pretrain"
    overrides = [
        f"model={a.model}",
        f"device={a.device}",
        f"compile={str(a.compile).lower()}",
        f"max_iters={a.steps}",
        "max_minutes=3",
        f"eval_interval={a.steps}",
        "eval_tokens=65536",
        "log_interval=10",
        "sample_tokens=32",
        f"out_dir={run}",
        "overwrite=true",
    ]
    ok, _ = run_step("pretrain", ["-m", "train.pretrain", *overrides, *data, *a.pretrain], 300, out)
    results["steps"]["pretrain"] = ok
    if ok:
        results["pretrain"] = pretrain_figures(run)


def check_bench(a: argparse.Namespace, out: Path, results: dict) -> None:
    """`make bench` on the device: training and sampling speed, MFU, bandwidth share."""
    overrides = [f"model={a.model}", f"device={a.device}", f"out_dir={out / 'bench'}"]
    ok, _ = run_step("bench", ["-m", "train.bench", *overrides, *a.bench], 240, out)
    results["steps"]["bench"] = ok
    if ok:
        results["bench"] = json.loads((out / "bench" / "bench.json").read_text())


def describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return f"torch {torch.__version__}, CUDA {torch.version.cuda}, {name}"
    return f"torch {torch.__version__}, device {device}"


def pretrain_figures(run: Path) -> dict:
    """The last logged step's throughput and MFU, and the final evaluation."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    logged = [r for r in lines if "tokens_per_sec" in r]
    evals = [r for r in lines if "val_bpb" in r]
    last = logged[-1] if logged else {}
    return {
        k: v
        for k, v in {
            "step": last.get("step"),
            "tokens_per_sec": last.get("tokens_per_sec"),
            "mfu": last.get("mfu"),
            "val_bpb": evals[-1]["val_bpb"] if evals else None,
        }.items()
        if v is not None
    }


def summary(r: dict) -> str:
    lines = ["", "=== gpu-check summary ===", f"device {r['device']}, model {r['model']}"]
    lines += [f"{name}: {'ok' if ok else 'FAILED'}" for name, ok in r["steps"].items()]
    if "pretrain" in r:
        t = r["pretrain"]
        how = "compiled" if r["compile"] else "eager"
        lines.append(
            f"pretraining ({how}): {t.get('tokens_per_sec', 0):,.0f} tokens/s, MFU "
            f"{100 * t.get('mfu', 0):.1f}% at step {t.get('step')}, "
            f"val {t.get('val_bpb', float('nan')):.3f} bits/byte"
        )
    if "bench" in r:
        b = r["bench"]
        lines.append(
            f"peak {b['machine']['peak_flops'] / 1e9:,.0f} GFLOP/s ({b['machine']['peak_source']})"
        )
        if "train" in b:
            t = b["train"]
            lines.append(
                f"bench training: {t['tokens_per_sec']['best']:,.0f} tokens/s, "
                f"MFU {100 * t['mfu']['best']:.1f}%"
            )
        if "sample" in b:
            s = b["sample"]
            lines.append(
                f"batch-1 decoding ({s['dtype']}): {s['cached']['best']:.0f} tokens/s, "
                f"{100 * s['cached']['of_limit']:.0f}% of the bandwidth limit "
                f"{s['limit_tokens_per_sec']:.0f}"
            )
        for size, x in b.get("batched", {}).get("batches", {}).items():
            lines.append(
                f"batched sampling, batch {size}: {x['tokens_per_sec']['best']:,.0f} tokens/s"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
