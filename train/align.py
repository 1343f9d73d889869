"""python -m train.align (make align): every InstructGPT stage, then one table.

    pretrain -> sft -> rm -> ppo -> dpo -> grpo      each skipped when it finished before
                                                     (its out_dir has done.json) with the
                                                     same settings
    base, SFT, best-of-n from SFT (picked by the reward model, and by the judge: the
    ceiling), PPO, DPO and GRPO (the checkpoint each kept on its validation split) on the
    same held-out items (train/eval/compare.py): accuracy per task and overall, each model
    against SFT with McNemar's paired test, one sample's accuracy and pass@k, its KL to
    SFT, the reward model's mean score and the judge's -> out/align/report.json and
    out/align/accuracy.png (each bar with its p-value against SFT)

Every stage's settings are checked before any stage runs (a typo in the last stage's
overrides must not wait for the first stages to finish). A stage runs again when its
settings differ from those in its out_dir (its config.yaml; `resume` and `overwrite`
aside), or when a stage before it ran again (it starts from that stage's checkpoint).
Running again replaces its earlier run (overwrite=true): asking for `make align` after
changing a setting is asking for that. Each stage runs as its own command,
`python -m train.<stage> <overrides>`, exactly as a user would type it.

    make align ARGS="overrides.all=['device=cuda'] overrides.ppo=['beta=0.01']"   (quoted: Hydra)
"""

import subprocess
import sys
import time
from pathlib import Path

from command import entry_point
from data.tasks import builtin_tasks
from errors import UserError

from .core.files import save_eval
from .core.runtime import runtime_session
from .core.stage import finished_with
from .eval.compare import compare, format_comparison, format_paired, write_report
from .settings import STAGES, AlignSettings, load

COMMANDS = {
    "pretrain": "pretrain",
    "sft": "sft",
    "rm": "reward",
    "ppo": "ppo",
    "dpo": "dpo",
    "grpo": "grpo",
}


def stage_overrides(s: AlignSettings, name: str) -> list[str]:
    return list(s.overrides.get("all", [])) + list(s.overrides.get(name, []))


def stage_settings(s: AlignSettings, name: str):
    """The typed settings the stage will run with; one line naming the stage if refused."""
    try:
        return load(COMMANDS[name], stage_overrides(s, name))
    except UserError as e:
        raise UserError(f"overrides for {name}: {e}") from None


def run_stage(name: str, overrides: list[str]) -> None:
    """python -m train.<stage> <overrides> overwrite=true; its errors are its own lines."""
    command = [sys.executable, "-m", f"train.{COMMANDS[name]}", *overrides, "overwrite=true"]
    code = subprocess.run(command).returncode
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        raise UserError(
            f"{name} stopped (exit status {code}; its message is above); the stages before "
            "it are kept: fix it and run make align again"
        )


def run_stages(s: AlignSettings, log=print) -> dict[str, str]:
    """Run what is missing; {stage: what happened ("skipped" or "ran")}."""
    planned = {name: stage_settings(s, name) for name in s.stages}  # all checked first
    done, upstream_ran = {}, False
    for name, settings in planned.items():
        if not upstream_ran and finished_with(settings):
            log(f"== {name}: done before with the same settings, skipped ({settings.out_dir})")
            done[name] = "skipped"
            continue
        log(f"== {name}: running (python -m train.{COMMANDS[name]})")
        start = time.perf_counter()
        run_stage(name, stage_overrides(s, name))
        minutes, seconds = divmod(round(time.perf_counter() - start), 60)
        log(f"== {name}: done in {minutes} min {seconds:02d} s")
        done[name], upstream_ran = "ran", True
    return done


def report(s: AlignSettings) -> dict:
    """The side-by-side table of the models the stages wrote."""
    out = {name: Path(stage_settings(s, name).out_dir) for name in STAGES}
    models = {"base": out["pretrain"], "sft": out["sft"]}
    for name in ("ppo", "dpo", "grpo"):  # the checkpoint each kept (best.pt), else its last
        kept = [out[name] / f for f in ("best.pt", "ckpt.pt") if (out[name] / f).is_file()]
        if kept:
            models[name] = kept[0]
    sft = stage_settings(s, "sft")
    with runtime_session(s.device, s.precision, s.seed) as rt:
        items = builtin_tasks(sft.tasks, sft.data).test
        rm = out["rm"] if (out["rm"] / "ckpt.pt").is_file() else None
        results = compare(
            models,
            out["sft"],
            rm,
            items,
            rt,
            s.eval_max_new_tokens,
            s.seed,
            s.sampled_k,
            s.sampled_per_task,
            s.best_of,
        )
    print(format_comparison(results))
    print(format_paired(results, "sft"))
    path = write_report(results, s.out_dir, save_eval)
    print(f"written to {path} and {Path(s.out_dir) / 'accuracy.png'}")
    return results


def run(settings: AlignSettings) -> dict:
    run_stages(settings)
    return report(settings)


@entry_point("align", AlignSettings)
def main(settings: AlignSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
