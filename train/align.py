"""python -m train.align (make align): every InstructGPT stage, then one table.

    pretrain -> sft -> rm -> ppo -> dpo        each skipped when it finished before (its
                                               out_dir has done.json) with the same config
    base, SFT, PPO and DPO on the same held-out items (train/eval/compare.py): accuracy per
    task and overall, each model's KL to SFT, the reward model's mean score and the judge's
    -> out/align/report.json and out/align/accuracy.png

A stage runs again when its resolved config differs from the one in its out_dir (its
config.yaml; `resume` and `overwrite` aside), or when a stage before it ran again (it
starts from that stage's checkpoint). Running again replaces its earlier run
(overwrite=true): asking for `make align` after changing a setting is asking for that.

    make align ARGS="overrides.all=['device=cuda'] overrides.ppo=['beta=0.01']"   (quoted: Hydra)
"""

import importlib
import time
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from errors import UserError, entry_point, hydra_error

from .core.runtime import runtime_session
from .core.settings import RUNTIME, check, choice, integer, list_of, mapping_of, text
from .core.stage import DONE_FILE, check_stage
from .eval.compare import compare, format_comparison, write_report
from .eval.task_eval import builtin_tasks, save_eval

STAGES = {"pretrain": "pretrain", "sft": "sft", "rm": "reward", "ppo": "ppo", "dpo": "dpo"}
CONF = Path(__file__).resolve().parents[1] / "conf"
IGNORED = ("resume", "overwrite")  # settings that say how to start, not what to compute


RULES = {
    "stages": list_of(choice(*STAGES)),
    "overrides": mapping_of(list_of(text()), ("all", *STAGES)),
    "eval_max_new_tokens": integer(1),
}


def stage_config(name: str, overrides: list[str]) -> DictConfig:
    """The resolved config `python -m train.<name> <overrides>` would run with; UserError
    (one line) for an override Hydra refuses."""
    GlobalHydra.instance().clear()  # this entry point's own Hydra has done its work
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            return compose(config_name=STAGES[name], overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"overrides for {name}: {hydra_error(e, STAGES[name])}") from None


def stage_overrides(cfg: DictConfig, name: str) -> list[str]:
    return list(cfg.overrides.get("all", [])) + list(cfg.overrides.get(name, []))


def check_settings(cfg: DictConfig) -> None:
    """align's own settings, then every stage's config with its overrides, before any runs
    (a typo in the last stage's overrides must not wait for the first stages to finish)."""
    check(cfg, {**RUNTIME, **RULES})
    for name in cfg.stages:
        module = importlib.import_module(f"train.{STAGES[name]}")
        check_stage(stage_config(name, stage_overrides(cfg, name)), module.RULES)


def comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in IGNORED}


def is_done(cfg: DictConfig) -> bool:
    """True when cfg's out_dir holds a finished run of this very config."""
    out = Path(cfg.out_dir)
    try:
        before = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    now = OmegaConf.to_container(cfg, resolve=True)
    return (out / DONE_FILE).is_file() and comparable(before or {}) == comparable(now)


def run_stages(cfg: DictConfig, log=print) -> dict[str, str]:
    """Run what is missing; {stage: what happened ("skipped" or "ran")}."""
    done, upstream_ran = {}, False
    for name in cfg.stages:
        overrides = stage_overrides(cfg, name)
        stage_cfg = stage_config(name, overrides)
        if not upstream_ran and is_done(stage_cfg):
            log(f"== {name}: done before with the same config, skipped ({stage_cfg.out_dir})")
            done[name] = "skipped"
            continue
        log(f"== {name}: running (python -m train.{STAGES[name]})")
        stage_cfg = stage_config(name, overrides + ["overwrite=true"])
        start = time.perf_counter()
        importlib.import_module(f"train.{STAGES[name]}").run(stage_cfg)
        minutes, seconds = divmod(round(time.perf_counter() - start), 60)
        log(f"== {name}: done in {minutes} min {seconds:02d} s")
        done[name], upstream_ran = "ran", True
    return done


def report(cfg: DictConfig) -> dict:
    """The side-by-side table of the models the stages wrote."""
    paths = {
        name: stage_config(name, []).out_dir for name in ("pretrain", "sft", "rm", "ppo", "dpo")
    }
    models = {
        "base": paths["pretrain"],
        "sft": paths["sft"],
        "ppo": paths["ppo"],
        "dpo": paths["dpo"],
    }
    models = {k: v for k, v in models.items() if k == "base" or Path(v, "ckpt.pt").is_file()}
    sft_cfg = stage_config("sft", [])
    with runtime_session(cfg.device, cfg.precision, cfg.seed) as rt:
        items = builtin_tasks(sft_cfg).test
        results = compare(
            models, paths["sft"], paths["rm"], items, rt, cfg.eval_max_new_tokens, cfg.seed
        )
    print(format_comparison(results))
    path = write_report(results, cfg.out_dir, save_eval)
    print(f"written to {path} and {Path(cfg.out_dir) / 'accuracy.png'}")
    return results


def run(cfg: DictConfig) -> dict:
    check_settings(cfg)
    run_stages(cfg)
    return report(cfg)


@entry_point("align")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
