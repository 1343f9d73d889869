"""What a reader of the code has to follow, counted: the measures of the house's shape.

    python scripts/reading_cost.py            # every measure, printed as a table
    python scripts/reading_cost.py --json     # the same as JSON

- lines followed for one pretraining step and for one PPO update: the distinct lines of the
  project's own code (train/, data/, errors.py) that a run of that one step executes inside
  the functions it calls, set-up, evaluation and saving included (coverage.py), with the
  files they are in; module-level statements (imports, definitions) are not counted; model/
  and tokenizer/ are counted apart (read once, as "the model");
- functions taking a whole config: a parameter named `cfg` or typed DictConfig, outside tests;
- keys with a default in more than one place: a setting a command's config file gives the
  very value a shared file it includes (base, training, heldout) already gives, or a default
  written both in a Python dataclass and in a YAML file;
- values written in several top-level config files (same key, same value);
- entry point -> entry point imports (train/<command>.py importing another command);
- `# fmt: skip` markers, outside tests and in all;
- the longest function outside tests.
"""

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "tokenizer", "data", "train")
OWN = ("train", "data", "errors.py")  # what a reader of a stage follows
COMMON = ["device=cpu", "precision=float32", "max_minutes=null", "log_interval=1"]
TASKS = ["tasks.n_test=6", "tasks.n_test_turns=2"]


def python_files(with_tests: bool = False) -> list[Path]:
    roots = [*PACKAGES, "scripts", *(["tests"] if with_tests else [])]
    files = [p for r in roots for p in sorted((ROOT / r).rglob("*.py"))]
    return files + [ROOT / "errors.py"]


def entry_points() -> set[str]:
    """The commands: train/<name>.py files with a main (python -m train.<name>)."""
    return {p.stem for p in (ROOT / "train").glob("*.py") if "def main(" in p.read_text()}


# ---------------------------------------------------------------- lines followed (coverage)


def executed_lines(module: str, args: list[str], work: Path) -> dict[str, int]:
    """{file: distinct lines executed} of `python -m module args` under coverage."""
    data = work / f".coverage.{module}"
    cmd = [
        sys.executable,
        "-m",
        "coverage",
        "run",
        f"--data-file={data}",
        f"--source={','.join(PACKAGES)},errors",
        "-m",
        module,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    import coverage

    cov = coverage.Coverage(data_file=str(data))
    cov.load()
    measured = cov.get_data()
    counts = {}
    for f in measured.measured_files():
        followed = lines_in_called_functions(Path(f), set(measured.lines(f) or []))
        if followed:
            counts[str(Path(f).relative_to(ROOT))] = followed
    return counts


def lines_in_called_functions(path: Path, executed: set[int]) -> int:
    """The executed lines inside the functions that ran (a function's own lines, not those
    of the functions nested in it, which count when they run): what a reader follows.
    Module-level statements (imports, definitions, constants) are not counted."""
    tree = ast.parse(path.read_text())
    total = 0
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        nested = {
            n
            for child in ast.walk(node)
            if child is not node and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in range(child.lineno, child.end_lineno + 1)
        }
        own = set(range(node.lineno, node.end_lineno + 1)) - nested
        ran = own & executed
        if ran - {node.lineno}:  # the body ran, not only the definition
            total += len(ran | {node.lineno})
    return total


def prepare_checkpoints(work: Path) -> None:
    """A pretrained, an SFT and a reward model to start the one-step runs from (not counted)."""
    runs = [
        ("train.pretrain", ["max_iters=30", "eval_interval=30"]),
        ("train.sft", [f"init_from={work}/pretrain", "max_iters=30", "eval_interval=30", *TASKS]),
        (
            "train.reward",
            [
                f"init_from={work}/sft",
                "max_iters=5",
                "eval_interval=5",
                *TASKS,
                "preferences.builtin=false",
                f"files=[{work}/prefs.jsonl]",
            ],
        ),
    ]
    pairs = [{"prompt": f"Say {w}.", "chosen": w, "rejected": "no"} for w in ("yes", "so", "up")]
    (work / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    for module, args in runs:
        name = {"train.reward": "rm"}.get(module, module.split(".")[1])
        subprocess.run(
            [sys.executable, "-m", module, *COMMON, *args, f"out_dir={work}/{name}"],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def split(counts: dict[str, int]) -> dict:
    own = {f: n for f, n in counts.items() if f.startswith(OWN)}
    other = {f: n for f, n in counts.items() if not f.startswith(OWN)}
    return {
        "lines": sum(own.values()),
        "files": len(own),
        "per_file": own,
        "model_and_tokenizer_lines": sum(other.values()),
    }


def lines_followed() -> dict:
    with tempfile.TemporaryDirectory(prefix="reading-cost-") as tmp:
        work = Path(tmp)
        prepare_checkpoints(work)
        pretrain = executed_lines(
            "train.pretrain",
            [*COMMON, "max_iters=1", "eval_tokens=4096", f"out_dir={work}/one_step"],
            work,
        )
        ppo = executed_lines(
            "train.ppo",
            [
                *COMMON,
                *TASKS,
                f"init_from={work}/sft",
                f"reward_model={work}/rm",
                "iterations=1",
                "rollout_prompts=8",
                "minibatch_size=4",
                f"out_dir={work}/one_ppo",
            ],
            work,
        )
    return {"pretraining step": split(pretrain), "PPO update": split(ppo)}


# ---------------------------------------------------------------- static measures


def settings_classes() -> set[str]:
    """The names of every command's settings class (train/settings.py and data/prepare.py)
    and of the shared wholes they are built from."""
    names = {"TrainingSettings", "CommandSettings"}
    for path in (ROOT / "train" / "settings.py", ROOT / "data" / "prepare.py"):
        if path.exists():
            tree = ast.parse(path.read_text())
            names |= {
                n.name
                for n in tree.body
                if isinstance(n, ast.ClassDef)
                and n.name.endswith("Settings")
                and n.name != "HeldOut"
            }
    return names


def whole_config_functions() -> list[str]:
    """Functions (outside tests) with a parameter named cfg, or typed DictConfig or as a
    whole command's settings; each marked (entry) when it is in an entry point's module."""
    wholes, commands, found = settings_classes(), entry_points(), []
    for path in python_files():
        entry = path.parent.name in ("train", "data") and path.stem in commands | {"prepare"}
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for arg in node.args.args + node.args.kwonlyargs:
                hint = ast.unparse(arg.annotation) if arg.annotation else ""
                if arg.arg == "cfg" or "DictConfig" in hint or hint in wholes:
                    where = " (entry)" if entry else ""
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}{where}")
                    break
    return found


def leaves(tree, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of a YAML mapping's leaves (lists are leaves)."""
    out = {}
    for key, value in (tree or {}).items():
        if key in ("defaults", "hydra"):
            continue
        name = f"{prefix}{key}"
        out.update(leaves(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def repeated_defaults() -> list[str]:
    """Settings whose value a command's config writes twice: a top-level file (or its
    group's file) giving a key the very value a shared file it includes already gives (a
    repeat that says nothing), and YAML settings that a Python dataclass also gives a
    default (two places to keep in step)."""
    found, yaml_keys = [], set()
    for path in sorted((ROOT / "conf").glob("*.yaml")):
        tree = yaml.safe_load(path.read_text()) or {}
        own = leaves(tree)
        yaml_keys |= {key.split(".")[-1] for key in own}
        shared: dict = {}
        for entry in tree.get("defaults", []):
            if isinstance(entry, str) and (ROOT / "conf" / f"{entry}.yaml").is_file():
                shared.update(leaves(yaml.safe_load((ROOT / "conf" / f"{entry}.yaml").read_text())))
        found += [
            f"{k}={own[k]!r} in {path.name} repeats {k} of a file it includes"
            for k in own.keys() & shared.keys()
            if own[k] == shared[k]
        ]
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ClassDef)
                and node.name.endswith(("Settings", "Config"))
                and any("dataclass" in ast.unparse(d) for d in node.decorator_list)
            ):
                where = f"{path.relative_to(ROOT)} ({node.name})"
                twice = [n for n in defaulted_fields(node) if n in yaml_keys]
                found += [f"{name}: a default in {where} and in conf/" for name in twice]
    return found


def copied_values() -> list[str]:
    """Settings written with the same value in several top-level config files: copies one
    shared file could hold (or two commands' own choices that happen to agree)."""
    seen: dict[tuple[str, str], list[str]] = {}
    for path in sorted((ROOT / "conf").glob("*.yaml")):
        for key, value in leaves(yaml.safe_load(path.read_text())).items():
            seen.setdefault((key, json.dumps(value)), []).append(path.name)
    return [f"{k}={v} in {', '.join(files)}" for (k, v), files in seen.items() if len(files) > 1]


def defaulted_fields(cls: ast.ClassDef) -> list[str]:
    """The fields of a dataclass that are given a default value in Python."""
    names = []
    for item in cls.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        value = item.value
        if value is None or "MISSING" in ast.unparse(value):
            continue
        is_field = isinstance(value, ast.Call) and ast.unparse(value.func).endswith(
            ("setting", "field")
        )
        if is_field and not any(k.arg in ("default", "default_factory") for k in value.keywords):
            continue  # a field with a rule or metadata, and no default
        names.append(item.target.id)
    return names


def entry_point_imports() -> list[str]:
    commands, found = entry_points(), []
    for name in sorted(commands):
        tree = ast.parse((ROOT / "train" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                target = module.split(".")[-1] if node.level or module.startswith("train.") else ""
                if target in commands and target != name:
                    found.append(f"train/{name}.py imports train/{target}.py")
    return found


def fmt_skips() -> dict[str, int]:
    count = lambda files: sum(p.read_text().count("# fmt: skip") for p in files)  # noqa: E731
    return {"outside tests": count(python_files()), "with tests": count(python_files(True))}


def longest_function() -> tuple[int, str]:
    best = (0, "")
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                best = max(best, (n, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--static", action="store_true", help="skip the coverage runs")
    args = parser.parse_args()
    result = {
        "functions taking a whole config": whole_config_functions(),
        "keys with a default in more than one place": repeated_defaults(),
        "values written in several top-level config files": copied_values(),
        "entry point -> entry point imports": entry_point_imports(),
        "fmt: skip markers": fmt_skips(),
        "longest function": longest_function(),
    }
    if not args.static:
        result["lines followed"] = lines_followed()
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for name, value in result.items():
        if isinstance(value, list):
            print(f"{name}: {len(value)}")
            for line in value[:80]:
                print(f"    {line}")
        elif name == "lines followed":
            for step, figures in value.items():
                print(
                    f"lines followed, one {step}: {figures['lines']} in {figures['files']} "
                    f"files (+ {figures['model_and_tokenizer_lines']} in model/ and "
                    f"tokenizer/)"
                )
                for f, n in sorted(figures["per_file"].items(), key=lambda kv: -kv[1]):
                    print(f"    {n:5d}  {f}")
        else:
            print(f"{name}: {value}")


if __name__ == "__main__":
    main()
