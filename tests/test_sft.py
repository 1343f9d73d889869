"""python -m train.sft end to end: a tiny SFT run raises held-out accuracy on an easy task.

The "pretrained" model is a freshly initialised tiny GPT with a tokenizer trained here.
The task is easy on purpose, so that it is learnt in seconds: acknowledge a numbered
request with exactly "OK" and end the turn ("Please confirm with OK: ticket 4711" -> "OK"),
in several phrasings. The held-out file uses ticket numbers the training file never does.
Before tuning, the random model never answers exactly "OK" and stops; after a few dozen
steps it does.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenizer
from model import GPT, GPTConfig
from train.core.checkpoint import load_checkpoint, save_checkpoint
from train.settings import load

ROOT = Path(__file__).resolve().parents[1]
PHRASINGS = ("Please confirm with OK: ticket {n}", "Ticket {n} is done. Reply OK.", "Ack {n}")


def items(numbers: range, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = numbers[int(torch.randint(len(numbers), (1,), generator=g))]
        p = PHRASINGS[int(torch.randint(len(PHRASINGS), (1,), generator=g))]
        out.append({"instruction": p.format(n=k), "input": "", "output": "OK"})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    text = " ".join(p.format(n=k) for k in range(200) for p in PHRASINGS) + " OK\n"
    tok = tokenizer.train_tokenizer([text * 20], vocab_size=360)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=tok.vocab_size)
    state = {
        "stage": "pretrain",
        "model_config": config.to_dict(),
        "model": GPT(config).state_dict(),
        "tokenizer": tok.state(),
        "step": 0,
    }
    save_checkpoint(d / "base.pt", state)
    train, test = d / "train.jsonl", d / "test.json"
    train.write_text("".join(json.dumps(r) + "\n" for r in items(range(0, 1000), 400, seed=1)))
    test.write_text(json.dumps(items(range(1000, 2000), 30, seed=2)))
    return d


def run_sft(d: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [
        f"init_from={d / 'base.pt'}",
        f"out_dir={d / 'run'}",
        "overwrite=true",  # each test's run replaces the one before
        "tasks.weight=0",
        f"files=[{d / 'train.jsonl'}]",
        f"eval_files=[{d / 'test.json'}]",
        "device=cpu",
        "precision=float32",
        "batch_size=16",
        "lr=3e-3",
        "min_lr=3e-4",
        "warmup_iters=5",
        "max_iters=40",
        "max_minutes=null",
        "eval_interval=20",
        "log_interval=10",
        *overrides,
    ]
    return subprocess.run(
        [sys.executable, "-m", "train.sft", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sft_raises_held_out_accuracy(setup):
    result = run_sft(setup)
    assert result.returncode == 0, result.stderr[-2000:]
    run = setup / "run"
    scores = json.loads((run / "eval.json").read_text())
    base, tuned = scores["base"]["overall"]["accuracy"], scores["sft"]["overall"]["accuracy"]
    assert tuned >= 0.9 and tuned > base, (base, tuned)
    assert "test" in scores["sft"]["tasks"]  # the eval file's stem names its task
    # The run directory follows the conventions: resolved config, metrics, a checkpoint
    # that knows it is an SFT model fine-tuned from the base checkpoint.
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in lines if "val_loss" in r]
    assert any("train_loss" in r for r in lines) and val[-1] < val[0]
    ckpt = load_checkpoint(run)
    assert ckpt["stage"] == "sft" and ckpt["init_from"].endswith("base.pt")
    assert "base" in result.stdout and "sft" in result.stdout  # the side-by-side table

    # train.evaluate scores the same checkpoint again and keeps the base model's scores
    again = subprocess.run(
        [sys.executable, "-m", "train.evaluate", f"checkpoint={run}", "tasks.weight=0",
         f"eval_files=[{setup / 'test.json'}]", "device=cpu", "precision=float32"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    rescored = json.loads((run / "eval.json").read_text())
    assert rescored["base"] == scores["base"]
    assert rescored["sft"]["tasks"] == scores["sft"]["tasks"]  # greedy fp32: the same answers
    assert scores["sft"]["tasks"]["test"]["match"] == "exact"  # a user's file: exact match
    assert scores["sft"]["item_set"] == scores["base"]["item_set"]

    # scored on other items, the sft entry must not sit beside the old items' base entry
    other = subprocess.run(
        [sys.executable, "-m", "train.evaluate", f"checkpoint={run}", "tasks.weight=0",
         f"eval_files=[{setup / 'test.json'},{{path:{setup / 'train.jsonl'},name:seen}}]",
         "device=cpu", "precision=float32"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert other.returncode == 0, other.stderr[-2000:]
    mixed = json.loads((run / "eval.json").read_text())
    assert "base" not in mixed and "'base' was scored on other items; dropped" in other.stderr
    assert set(mixed["sft"]["tasks"]) == {"test", "seen"}
    assert mixed["sft"]["item_set"] != scores["sft"]["item_set"]


def test_sft_refuses_to_train_on_nothing(setup):
    result = run_sft(setup, "files=[]")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: no instruction data")
    assert "Traceback" not in result.stderr


def test_sft_reports_a_missing_checkpoint(setup):
    result = run_sft(setup, f"init_from={setup / 'nope.pt'}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "nope.pt" in result.stderr and "does not exist" in result.stderr


# ---------------------------------------------------------------------------- eval files


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


ALPACA = [{"instruction": f"Say {k}.", "output": f"{k}"} for k in range(6)]


def test_eval_files_never_merge_with_a_built_in_task_or_each_other(tmp_path):
    from errors import UserError
    from train.eval.task_eval import eval_file_items

    (tmp_path / "b").mkdir()
    repeat = write(tmp_path / "repeat.jsonl", ALPACA[:2])
    a = write(tmp_path / "qa.jsonl", ALPACA[:3])
    b = write(tmp_path / "b" / "qa.jsonl", ALPACA[3:])
    notes = []
    items = eval_file_items([repeat, a, b, {"path": a, "name": "again", "match": "normalised"}],
                            taken=["repeat"], log=notes.append)  # fmt: skip
    tasks = [i["task"] for i in items]
    assert tasks == [repeat] * 2 + ["qa"] * 3 + [b] * 3 + ["again"] * 3
    assert [i["match"] for i in items] == ["exact"] * 8 + ["normalised"] * 3
    assert any(f"{repeat} is scored as task '{repeat}'" in n for n in notes)
    with pytest.raises(UserError, match="two files are scored as task 'qa'"):
        eval_file_items([a, {"path": b, "name": "qa"}], log=notes.append)
    with pytest.raises(UserError, match="match 'fuzzy'"):
        eval_file_items([{"path": a, "match": "fuzzy"}], log=notes.append)


def test_training_and_eval_data_that_overlap_are_warned_about(tmp_path):
    from train.sft import instruction_data

    train = write(tmp_path / "train.jsonl", ALPACA)
    held = write(tmp_path / "held.jsonl", ALPACA[:2] + [{"instruction": "Say x.", "output": "x"}])
    cfg = load("sft", ["tasks.weight=0", f"files=[{train}]",
                       f"eval_files=[{train},{{path:{held},name:held}}]"])  # fmt: skip
    logged = []
    conversations, val, items = instruction_data(cfg, logged.append)
    assert len(conversations) == 6 and len(items) == 9
    assert val == items  # no validation split: the held-out loss is the eval files'
    warnings = [line for line in logged if line.startswith("warning:")]
    assert warnings == [
        f"warning: {train} is both a training file and an eval file",
        "warning: 6 of the 6 items of eval file task 'train' are also in the training files",
        "warning: 2 of the 3 items of eval file task 'held' are also in the training files",
    ]


def test_an_answer_longer_than_the_reply_budget_is_warned_about():
    from train.eval.task_eval import check_budget, reply_budgets

    class Chars:  # one token per character
        def encode(self, text):
            return list(text)

    items = [
        {"task": "t", "answer": a,
         "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]}
        for a in ("ab", "abcdef", "abcdefgh")
    ]  # fmt: skip
    assert reply_budgets(Chars(), items, None) == [12, 20, 24]  # 2 n + 8: follows the answers
    assert reply_budgets(Chars(), items, 16) == [12, 16, 16]
    assert check_budget(Chars(), items, None) is None and check_budget(Chars(), items, 8) is None
    warning = check_budget(Chars(), items, 5)
    assert warning.startswith("2 of 3 held-out answers are longer than eval_max_new_tokens=5")
    assert "(the longest 8)" in warning
