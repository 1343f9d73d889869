"""Every entry point, a table of wrong settings: each stops at once with one line and a
non-zero exit, never a traceback.

The entry points run in-process through their real `main()` (errors.entry_point around
hydra.main), with the command line in sys.argv, so Hydra's own refusals (an unknown
setting, a malformed override, an unknown preset) are tested as users meet them. Wrong
values are of four kinds: a wrong type, out of range, an unknown key, a wrong shape.
"""

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

import tokenizer
from model import GPT, GPTConfig
from model.heads import ScalarModel
from train.core.checkpoint import save_checkpoint

ENTRY_POINTS = {
    "pretrain": "train.pretrain",
    "sft": "train.sft",
    "reward": "train.reward",
    "ppo": "train.ppo",
    "dpo": "train.dpo",
    "sample": "train.sample",
    "evaluate": "train.evaluate",
    "bench": "train.bench",
    "align": "train.align",
    "prepare": "data.prepare",
    "grpo": "train.grpo",
    "export": "train.export",
    "ablate": "train.ablate",
    "serve": "train.serve",
    "serve_bench": "train.serve_bench",
}
FILES_SHAPE = r"it must be a list of files, each a path or \{path, weight: a number >= 0\}"
REWARD_AS_LM = r"holds a reward model \(reward\): its trunk was trained to score replies, not to"

# (entry point, overrides, what the one line must say); {ckpt} is a tiny checkpoint, {rm}
# a tiny reward model and {tmp} a scratch folder, so that a file that must exist is the
# one thing missing.
CASES = [
    ("pretrain", ["batch_size=0"], r"batch_size=0 is not valid: it must be an integer >= 1"),
    ("pretrain", ["lr=abc"], r"lr='abc' is not valid: it must be a number > 0"),
    ("pretrain", ["betas=[0.9]"], r"betas=\[0.9\] is not valid: it must be a list of two"),
    ("pretrain", ["nosuch=1"], r"unknown setting 'nosuch': conf/pretrain.yaml has no such key"),
    ("pretrain", ["model=huge"], r"Could not find 'model/huge'; available: gpt2, .*tiny"),
    ("pretrain", ["lr=[1"], r"cannot read the override 'lr=\[1'"),
    ("pretrain", ["data.vocab_size=abc"], r"data.vocab_size='abc' is not valid: it must be an int"),
    ("sft", ["files=a.jsonl"], rf"files='a.jsonl' is not valid: {FILES_SHAPE}; write a list"),
    ("sft", ["files=[{path:a,weight:abc}]"],
     rf"files=\[{{'path': 'a', 'weight': 'abc'}}\] is not valid: {FILES_SHAPE}"),
    ("sft", ["files=[{path:a,weight:null}]"], r"'weight': None}\] is not valid"),
    ("sft", ["files=[{file:a}]"], r"files=\[{'file': 'a'}\] is not valid"),
    ("sft", ["max_bad_fraction=-1"],
     r"max_bad_fraction=-1 is not valid: it must be a number >= 0 and <= 1"),
    ("sft", ["max_bad_fraction=abc"], r"max_bad_fraction='abc' is not valid"),
    ("sft", ["max_bad_fraction=5"], r"max_bad_fraction=5 is not valid"),
    ("sft", ["eval_files=[{path:a,match:fuzzy}]"],
     r"eval_files=.* is not valid: .*match: one of exact, normalised"),
    ("sft", ["tasks.weight=-1"], r"tasks.weight=-1 is not valid: it must be a number >= 0"),
    ("sft", ["tasks.n_train=many"], r"tasks.n_train='many' is not valid"),
    ("sft", ["eval_max_new_tokens=0"],
     r"eval_max_new_tokens=0 is not valid: it must be an integer >= 1, or null"),
    ("sft", ["tasks.nosuch=1"], r"unknown setting 'tasks.nosuch'"),
    ("sft", ["init_from={ckpt}", "tasks.weight=0", "files=[{tmp}/train.jsonl]",
             "eval_files=[{path:{tmp}/missing.jsonl}]"],
     r"data file .*missing.jsonl does not exist"),
    ("reward", ["epochs=0"], r"epochs=0 is not valid: it must be a number > 0"),
    ("reward", ["preferences.samples=1"],
     r"preferences.samples=1 is not valid: it must be an integer >= 2"),
    ("reward", ["eval_files=x.jsonl"],
     r"eval_files='x.jsonl' is not valid: it must be a list of files"),
    ("reward", ["nosuch=1"], r"unknown setting 'nosuch': conf/reward.yaml"),
    ("dpo", ["beta=0"], r"beta=0 is not valid: it must be a number > 0"),
    ("dpo", ["label_smoothing=0.5"], r"label_smoothing=0.5 is not valid"),
    ("dpo", ["files=[{path:a,weight:-1}]"], r"files=.* is not valid"),
    ("ppo", ["max_bad_fraction=5"], r"max_bad_fraction=5 is not valid"),
    ("ppo", ["advantage=ppo"], r"advantage='ppo' is not valid: it must be one of gae, group"),
    ("ppo", ["prompt_files=p.jsonl"],
     r"prompt_files='p.jsonl' is not valid: it must be a list of files"),
    ("ppo", ["clip=1"], r"clip=1 is not valid: it must be a number > 0 and < 1"),
    ("sample", ["temperature=1e-9"], r"temperature=1e-09 is not valid"),
    ("sample", ["top_p=2"], r"top_p=2 is not valid"),
    ("sample", ["mode=talk"], r"mode='talk' is not valid: it must be one of generate, chat"),
    ("sample", ["nosuch=1"], r"unknown setting 'nosuch': conf/sample.yaml"),
    ("evaluate", ["max_bad_fraction=5"], r"max_bad_fraction=5 is not valid"),
    ("evaluate", ["eval_files=a.jsonl"],
     r"eval_files='a.jsonl' is not valid: it must be a list of files"),
    ("evaluate", ["eval_max_new_tokens=0"], r"eval_max_new_tokens=0 is not valid"),
    ("evaluate", ["task_eval=maybe"],
     r"task_eval='maybe' is not valid: it must be true or false, or null"),
    ("evaluate", ["checkpoint={ckpt}", "tasks.weight=0", "eval_files=[{path:{tmp}/missing.jsonl}]"],
     r"data file .*missing.jsonl does not exist"),
    ("bench", ["repeats=0"], r"repeats=0 is not valid: it must be an integer >= 1"),
    ("bench", ["hf=maybe"], r"hf='maybe' is not valid: it must be auto, true or false"),
    ("bench", ["nosuch=1"], r"unknown setting 'nosuch': conf/bench.yaml"),
    ("align", ["stages=[pretrain,rlhf]"],
     r"stages=\['pretrain', 'rlhf'\] is not valid: it must be a list, each one of pretrain"),
    ("align", ["overrides=3"], r"overrides=3 is not valid: it must be a mapping"),
    ("align", ["overrides.sft=['nosuch=1']"],
     r"overrides for sft: unknown setting 'nosuch': conf/sft.yaml"),
    ("align", ["overrides.ppo=['beta=-1']"], r"beta=-1 is not valid: it must be a number >= 0"),
    ("align", ["eval_max_new_tokens=abc"], r"eval_max_new_tokens='abc' is not valid"),
    ("prepare", ["data.vocab_size=abc"], r"data.vocab_size='abc' is not valid: it must be an int"),
    ("prepare", ["data.vocab_size=true"], r"data.vocab_size=True is not valid: it must be an int"),
    ("prepare", ["data.val_fraction=5"], r"data.val_fraction=5 is not valid: it must be a num"),
    ("prepare", ["data.nosuch=1"], r"unknown setting 'data.nosuch': conf/prepare.yaml"),
    ("prepare", ["data.source=ftp"], r"data.source='ftp' is not valid: it must be one of shakes"),
    # a directory where a file is expected says so (issue 26)
    ("sft", ["init_from={ckpt}", "tasks.weight=0", "files=[{tmp}]"],
     r"data file .*tiny\d* is a directory, not a file; give the path of a file in it"),
    ("sft", ["init_from={ckpt}", "tasks.weight=0", "files=[{tmp}/train.jsonl]",
             "eval_files=[{tmp}]"], r"data file .*tiny\d* is a directory, not a file"),
    ("ppo", ["init_from={ckpt}", "reward=tasks", "advantage=group", "group_size=2",
             "tasks.weight=0", "prompt_files=[{tmp}]"],
     r"data file .*tiny\d* is a directory, not a file"),
    ("ppo", ["advantage=group", "group_size=1"],
     r"advantage=group compares replies to the same prompt, so it needs group_size >= 2"),
    ("sample", ["checkpoint={ckpt}", "prompt_file={tmp}"],
     r"prompt_file .*tiny\d* is a directory, not a file"),
    ("evaluate", ["checkpoint={ckpt}", "text_file={tmp}"],
     r"text_file .*tiny\d* is a directory, not a file"),
    ("sft", ["init_from={ckpt}", "tasks.weight=0", "files=[{tmp}/bot.jsonl]"],
     r"bot.jsonl:line 1: conversations\[0\] is from 'bot'; use one of system, human, user, "
     r"gpt, assistant, chatgpt"),
    # a name that is no checkpoint here and no GPT-2 the project knows: no network tried
    ("sample", ["checkpoint=gpt3", "prompt=hi"],
     r"checkpoint gpt3 does not exist, and gpt3 is not one of the GPT-2 names known here "
     r"\(gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2\); .*hf:owner/name"),
    ("sft", ["init_from=gpt3"], r"checkpoint gpt3 does not exist, and gpt3 is not one"),
    # an unquoted comma: Hydra reads several values
    ("sample", ["prompt=Hello, world"],
     r"prompt=Hello, world: Hydra reads the comma as a list of values; quote the value: "
     r"'prompt=\"Hello, world\"'"),
    # a reward model is no language model to fine-tune or sample from (issue 26)
    ("sft", ["init_from={rm}", "tasks.weight=0", "files=[{tmp}/train.jsonl]"], REWARD_AS_LM),
    ("dpo", ["init_from={rm}"], REWARD_AS_LM),
    ("ppo", ["init_from={rm}"], REWARD_AS_LM),
    ("sample", ["checkpoint={rm}", "prompt=hi"], REWARD_AS_LM),
    ("sample", ["checkpoint={rm}", "mode=chat"], REWARD_AS_LM),
    ("evaluate", ["checkpoints=[{ckpt},{rm}]", "reference={ckpt}", "tasks.weight=0"],
     REWARD_AS_LM),
    ("evaluate", ["checkpoint={ckpt}", "tasks.weight=0"],
     r"nothing to score: tasks.weight=0 and no eval_files; give eval_files=\[...\]"),
    ("evaluate", ["checkpoints=[{ckpt},{ckpt}]", "reference={ckpt}", "tasks.weight=0"],
     r"nothing to score: tasks.weight=0 and no eval_files; give eval_files=\[...\]"),
    ("evaluate", ["checkpoints=[{ckpt},{tmp}/missing.pt]", "reference={ckpt}", "tasks.weight=0",
                  "eval_files=[{tmp}/train.jsonl]"], r"checkpoint .*missing.pt does not exist"),
    ("evaluate", ["checkpoints=[{ckpt},{ckpt}]", "reference={tmp}/missing.pt", "tasks.weight=0",
                  "eval_files=[{tmp}/train.jsonl]"], r"checkpoint .*missing.pt does not exist"),
    # the settings of this wave's stages and commands
    ("reward", ["margin=-1"], r"margin=-1 is not valid: it must be a number >= 0"),
    ("reward", ["center=abc"], r"center='abc' is not valid: it must be a number >= 0"),
    ("reward", ["preferences.wrong_pairs=-1"], r"preferences.wrong_pairs=-1 is not valid"),
    ("grpo", ["group_size=1"], r"advantage=group compares replies to the same prompt"),
    ("grpo", ["scale_rewards=maybe"], r"scale_rewards='maybe' is not valid: it must be true or"),
    ("grpo", ["kl_target=0"], r"kl_target=0 is not valid: it must be a number > 0, or null"),
    ("grpo", ["sampled_k=-1"], r"sampled_k=-1 is not valid: it must be an integer >= 0"),
    ("align", ["best_of=-1"], r"best_of=-1 is not valid: it must be an integer >= 0"),
    ("align", ["stages=[sft,bestofn]"], r"stages=\['sft', 'bestofn'\] is not valid"),
    ("export", ["dtype=int8"], r"dtype='int8' is not valid: it must be one of float32, bfloat16"),
    ("export", ["checkpoint={tmp}/missing.pt", "out={tmp}/hf"],
     r"checkpoint .*missing.pt does not exist"),
    ("ablate", ["seeds=[1,1]"], r"seeds=\[1, 1\] is not valid: it must be a list of different"),
    ("ablate", ["max_minutes=0"], r"max_minutes=0 is not valid: it must be a number > 0"),
    ("serve", ["port=70000"], r"port=70000 is not valid: it must be an integer from 0 to 65535"),
    ("serve", ["max_batch=0"], r"max_batch=0 is not valid: it must be an integer >= 1"),
    ("serve", ["checkpoint={rm}"], r"rm.pt holds a reward model: it scores replies and writes"),
    ("serve_bench", ["clients=[0]"], r"clients=\[0\] is not valid"),
    ("serve_bench", ["temperature=-1"], r"temperature=-1 is not valid"),
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny checkpoint and a valid instruction file."""
    d = tmp_path_factory.mktemp("tiny")
    tok = tokenizer.train_tokenizer(["Who is there? Nay, answer me. " * 40] * 4, vocab_size=300)
    config = GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=32, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    state = {"stage": "sft", "model_config": config.to_dict(), "model": GPT(config).state_dict(),
             "tokenizer": tok.state(), "step": 0}  # fmt: skip
    save_checkpoint(d / "ckpt.pt", state)
    rm = ScalarModel(config).state_dict()
    save_checkpoint(d / "rm.pt", {**state, "stage": "reward", "model_kind": "reward", "model": rm})
    (d / "train.jsonl").write_text('{"instruction": "Who is there?", "output": "Nay."}\n')
    (d / "bot.jsonl").write_text('{"conversations": [{"from": "bot", "value": "Nay."}]}\n')
    return {"ckpt": str(d / "ckpt.pt"), "rm": str(d / "rm.pt"), "tmp": str(d)}


def run_main(entry: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """python -m <entry> <args>, in-process: (exit status, stderr)."""
    module = importlib.import_module(ENTRY_POINTS[entry])
    monkeypatch.setattr(sys, "argv", [f"{entry}.py", *args])
    with pytest.raises(SystemExit) as e:
        module.main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "entry, overrides, message", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES]
)
def test_a_wrong_setting_is_one_line_and_a_non_zero_exit(
    entry, overrides, message, tiny, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # whatever Hydra or a stage might create lands here
    args = list(overrides)
    for name, value in tiny.items():  # {ckpt}, {rm}, {tmp}
        args = [a.replace("{" + name + "}", value) for a in args]
    if entry in ("pretrain", "sft", "reward", "ppo", "grpo", "dpo", "bench", "align", "ablate"):
        args.append(f"out_dir={tmp_path / 'out'}")
    stage = entry in ("sft", "reward", "ppo", "grpo", "dpo")
    if stage and not any("init_from" in a for a in args):
        args.append("init_from=/nonexistent")  # a wrong setting must stop before loading it
    args += ["device=cpu", "precision=float32"]
    code, err = run_main(entry, args, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "HYDRA_FULL_ERROR" not in err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()  # a run that failed leaves no empty out_dir


def test_side_by_side_checks_every_checkpoint_before_scoring_any(
    tiny, tmp_path, monkeypatch, capsys
):
    import train.eval.compare

    scored = []
    monkeypatch.setattr(train.eval.compare, "score", lambda *a, **k: scored.append(a) or {})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()  # a folder without a checkpoint
    for second in (f"{tiny['tmp']}/missing.pt", tiny["rm"], tmp_path / "empty"):
        args = [f"checkpoints=[{tiny['ckpt']},{second}]", f"reference={tiny['ckpt']}",
                "tasks.weight=0", f"eval_files=[{tiny['tmp']}/train.jsonl]"]  # fmt: skip
        code, err = run_main("evaluate", [*args, "device=cpu"], monkeypatch, capsys)
        assert code == 2 and err.startswith("error: ") and scored == [], err


def test_every_entry_point_is_in_the_table():
    assert {entry for entry, _, _ in CASES} == set(ENTRY_POINTS)
    for module in ENTRY_POINTS.values():  # each main goes through errors.entry_point
        main = importlib.import_module(module).main
        assert main.__wrapped__.__module__ == module, module


def test_hydra_command_line_is_kept(monkeypatch, capsys):
    """--cfg job still prints the composed config (and +key=value still adds a key)."""
    import train.sample as sample

    monkeypatch.setattr(sys, "argv", ["sample.py", "--cfg", "job", "+extra=1", "top_k=7"])
    sample.main()
    out = capsys.readouterr().out
    assert "top_k: 7" in out and "extra: 1" in out
    assert Path(sample.__file__).name == "sample.py"
