"""The machinery every stage builds on: the loop's step contract (StepResult, metrics,
tokens, best_metric), the progress bar's two bounds, the config rules, and checkpoints
that hold other kinds of model than a plain GPT."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_loop import TEST_LOOP, loop_settings

from checks import Settings, choice, integer, number, pair, setting
from errors import UserError
from model import GPT, GPTConfig
from model.heads import PolicyWithValue, ScalarModel
from train.core.checkpoint import (
    load_checkpoint,
    load_kind,
    load_model,
    load_policy,
    save_checkpoint,
)
from train.core.optim import build_optimizer
from train.core.progress import Progress
from train.core.runtime import Runtime
from train.core.trainer import StepResult, Trainer

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, bias=False)
CPU = torch.device("cpu")


class Counter:
    """Batches that are just their own number: 0, 1, 2, ... (resumable)."""

    def __init__(self):
        self.step = 0

    def next_batch(self):
        self.step += 1
        return {"n": torch.tensor(float(self.step - 1))}

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def trainer_for(tmp_path, step, evaluate=None, **loop):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    settings = {"max_iters": 4, "warmup_iters": 0, "log_interval": 1, "eval_interval": 2,
                "lr": 1e-3, "min_lr": 0.0, **loop}  # fmt: skip
    trainer = Trainer(
        model,
        build_optimizer(model, lr=1e-3, weight_decay=0.0),
        Runtime(CPU, torch.float32),
        loop_settings(**settings),
        tmp_path,
        checkpoint_meta={
            "stage": "test",
            "model_config": model.config.to_dict(),
            "tokenizer": {"kind": "none", "model": b"x"},
        },  # fmt: skip
        evaluate=evaluate,
    )
    trainer.test_run = (Counter(), step)  # what .run() trains on, for run(trainer)
    return trainer


def run(trainer) -> dict:
    return trainer.run(*trainer.test_run)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def toy_step(model, batch):
    """A loss that trains, and metrics that are a known function of the batch number."""
    n = batch["n"]
    loss = model.embed.wte.weight.square().mean()  # any differentiable scalar
    return StepResult(loss, tokens=10 + int(n), metrics={"double": 2 * n, "const": 1.0})


def test_step_metrics_are_averaged_over_micro_batches_and_logged(tmp_path):
    trainer = trainer_for(tmp_path, toy_step, grad_accum=2)
    run(trainer)
    logs = [r for r in records(tmp_path) if "train_loss" in r]
    # step s draws batches 2(s-1) and 2(s-1)+1: the mean of double is 2 * (2s - 1.5)
    assert [r["double"] for r in logs] == [2 * (2 * s - 1.5) for s in (1, 2, 3, 4)]
    assert all(r["const"] == 1.0 for r in logs)


def test_tokens_per_second_counts_the_tokens_the_step_reports(tmp_path, monkeypatch):
    clock = iter(range(10_000))  # each perf_counter() call: one second later
    monkeypatch.setattr("train.core.trainer.time.perf_counter", lambda: float(next(clock)))
    trainer = trainer_for(tmp_path, toy_step, grad_accum=1)
    run(trainer)
    rates = [r["tokens_per_sec"] for r in records(tmp_path) if "train_loss" in r]
    # every step takes the same number of clock ticks; step n+1 trains on 10 + n tokens
    assert [r / rates[0] for r in rates] == pytest.approx([1.0, 11 / 10, 12 / 10, 13 / 10])


def test_best_checkpoint_follows_best_metric_and_mode(tmp_path):
    accuracies = iter([0.5, 0.9, 0.7])

    def evaluate(m):
        return {"accuracy": next(accuracies)}

    trainer = trainer_for(tmp_path, toy_step, evaluate, max_iters=6, best_metric="accuracy",
                          best_mode="max")  # fmt: skip
    run(trainer)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == 4 and best["best"]["metric"] == "accuracy"
    assert best["best"]["value"] == 0.9 and best["best"]["first"] == 0.5


def test_without_a_best_metric_there_is_no_best_checkpoint(tmp_path):
    trainer = trainer_for(tmp_path, toy_step, lambda m: {"val_loss": 1.0})
    run(trainer)
    assert (tmp_path / "ckpt.pt").is_file() and not (tmp_path / "best.pt").exists()


def test_best_metric_absent_from_the_evaluation_writes_no_best(tmp_path):
    trainer = trainer_for(tmp_path, toy_step, lambda m: {"val_loss": 1.0}, best_metric="acc")
    run(trainer)
    assert not (tmp_path / "best.pt").exists()


def test_resume_keeps_the_best_value(tmp_path):
    values = iter([3.0, 2.0, 5.0, 4.0])
    trainer = trainer_for(tmp_path, toy_step, lambda m: {"val_loss": next(values)},
                          best_metric="val_loss")  # fmt: skip
    run(trainer)  # evaluations at steps 2 and 4: best 2.0 at step 4
    again = trainer_for(tmp_path, toy_step, lambda m: {"val_loss": next(values)},
                        best_metric="val_loss", max_iters=8)  # fmt: skip
    again.load_state(load_checkpoint(tmp_path / "ckpt.pt"), again.test_run[0])
    run(again)  # 5.0 and 4.0 are worse than the 2.0 of the first run
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 4


# --- the progress bar ---------------------------------------------------------------


def bar_text(progress: Progress) -> str:
    return str(progress.bar)


def test_progress_shows_steps_when_the_step_bound_is_ahead():
    p = Progress(max_iters=100, max_minutes=60)
    p.update(50, 30.0)  # half the steps, under 1% of the time
    assert not p.by_time and "50/100 steps" in bar_text(p)
    p.close()


def test_progress_shows_time_and_the_time_left_under_a_budget():
    p = Progress(max_iters=50000, max_minutes=8.25)
    p.update(4610, 468.0)  # 57% of the budget, 9% of the steps
    text = bar_text(p)
    assert p.by_time
    assert "07:48/08:15" in text and "step 4610" in text and "50000" not in text
    p.close()


# --- settings and their rules --------------------------------------------------------


@dataclass
class Toy(Settings):
    """A settings object with one field of each kind of rule."""

    batch_size: int = setting(integer(1))
    lr: float = setting(number(above=0))
    p: float = setting(number(0, 1))
    o: str = setting(choice("adamw", "muon"))
    b: list = setting(pair(number(0, below=1)))
    t: int | None = setting(integer(1), null=True)


GOOD = {"batch_size": 4, "lr": 1, "p": 0.5, "o": "muon", "b": [0.9, 0.95], "t": None}
BROKEN = [  # (the value changed, what the one line says)
    ({"batch_size": 0}, "batch_size=0 is not valid: it must be an integer >= 1"),
    ({"batch_size": True}, "batch_size=True is not valid"),
    ({"batch_size": "abc"}, "batch_size='abc' is not valid"),
    ({"lr": -1.0}, "lr=-1 is not valid: it must be a number > 0"),
    ({"lr": float("nan")}, "lr=nan is not valid"),
    ({"p": 5}, "p=5 is not valid: it must be a number >= 0 and <= 1"),
    ({"o": "lion"}, "o='lion' is not valid: it must be one of adamw, muon"),
    ({"b": [2, 3]}, "b=\\[2, 3\\] is not valid: it must be a list"),
    ({"t": 0}, "t=0 is not valid: it must be an integer >= 1, or null"),
]


@pytest.mark.parametrize("change, message", BROKEN)
def test_a_rule_broken_is_one_line_naming_setting_value_and_rule(change, message):
    with pytest.raises(UserError, match=message) as e:
        Toy(**{**GOOD, **change})
    assert "\n" not in str(e.value)


def test_values_that_keep_the_rules_pass():
    assert Toy(**GOOD).b == [0.9, 0.95]
    assert Toy(**{**GOOD, "t": 3}).t == 3


# --- checkpoints of other model kinds -----------------------------------------------


def saved(tmp_path, model, kind: str | None) -> Path:
    state = {"stage": "test", "model_config": model.config.to_dict(), "model": model.state_dict(),
             "tokenizer": FakeTokenizer.STATE}  # fmt: skip
    if kind is not None:
        state["model_kind"] = kind
    save_checkpoint(tmp_path / "ckpt.pt", state)
    return tmp_path / "ckpt.pt"


class FakeTokenizer:
    STATE = {"kind": "fake", "model": b"x"}


@pytest.fixture
def fake_tokenizer(monkeypatch):
    import tokenizer

    class Tok:
        vocab_size = TINY["vocab_size"]

    monkeypatch.setitem(
        tokenizer.KINDS, "fake", type("Fake", (), {"from_bytes": staticmethod(lambda b: Tok())})
    )


def test_the_language_model_of_a_reward_checkpoint_loads_as_its_trunk(tmp_path, fake_tokenizer):
    torch.manual_seed(0)
    rm = ScalarModel(GPTConfig(**TINY))
    path = saved(tmp_path, rm, "reward")
    gpt, tok, ckpt = load_model(path)
    assert isinstance(gpt, GPT) and ckpt["model_kind"] == "reward"
    x = torch.randint(0, TINY["vocab_size"], (2, 5))
    assert torch.equal(gpt(x)[0], rm.gpt(x)[0])
    whole, _, _ = load_kind(path, "reward")
    assert torch.equal(whole(x, torch.tensor([5, 3])), rm(x, torch.tensor([5, 3])))


def test_a_reward_model_is_no_policy_to_sample_from_or_fine_tune(tmp_path, fake_tokenizer):
    """Its trunk was trained to score replies: load_policy, what every stage that
    generates or fine-tunes reads its model with, refuses it; the other kinds load."""
    torch.manual_seed(0)
    path = saved(tmp_path, ScalarModel(GPTConfig(**TINY)), "reward")
    with pytest.raises(UserError, match=r"holds a reward model \(reward\): its trunk was "
                       r"trained to score replies, not to write them"):  # fmt: skip
        load_policy(path)
    for kind, model in (("gpt", GPT(GPTConfig(**TINY))),
                        ("policy_value", PolicyWithValue(GPTConfig(**TINY)))):  # fmt: skip
        gpt, _, ckpt = load_policy(saved(tmp_path, model, kind))
        assert isinstance(gpt, GPT) and ckpt["model_kind"] == kind


def test_a_kind_mismatch_is_one_line(tmp_path, fake_tokenizer):
    path = saved(tmp_path, GPT(GPTConfig(**TINY)), "gpt")
    with pytest.raises(UserError, match=r"holds a language model \(gpt\), not a reward model"):
        load_kind(path, "reward")


def test_checkpoints_without_a_kind_are_language_models(tmp_path, fake_tokenizer):
    path = saved(tmp_path, GPT(GPTConfig(**TINY)), None)  # written before model kinds existed
    gpt, _, ckpt = load_model(path)
    assert isinstance(gpt, GPT) and ckpt["model_kind"] == "gpt"


def test_an_unknown_kind_is_one_line(tmp_path, fake_tokenizer):
    path = saved(tmp_path, GPT(GPTConfig(**TINY)), "dragon")
    with pytest.raises(UserError, match="kind 'dragon', which this version does not know"):
        load_model(path)


def test_reward_ignores_padding_after_the_last_token():
    torch.manual_seed(0)
    rm = ScalarModel(GPTConfig(**TINY))
    torch.nn.init.normal_(rm.head.proj.weight)  # a head that is not all zeros
    x = torch.randint(0, TINY["vocab_size"], (1, 5))
    padded = torch.cat([x, torch.full((1, 3), 7)], dim=1)
    alone = rm(x, torch.tensor([5]))
    assert torch.allclose(rm(padded, torch.tensor([5])), alone, atol=1e-6)
    assert not torch.allclose(rm(padded, torch.tensor([8])), alone)


# --- the smallest stage, as docs/training.md shows it ---------------------------------


def doc_example() -> str:
    """The Python block of docs/training.md's 'Writing a new stage' section."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    section = text[text.index("## Writing a new stage") :]
    return section[section.index("```python\n") + 10 : section.index("```\n\nRun it")]


def test_the_documented_example_stage_trains_and_resumes(tmp_path):
    import tokenizer

    text = "To be, or not to be, that is the question. " * 40
    tok = tokenizer.train_tokenizer([text], vocab_size=300)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=tok.vocab_size)
    state = {"stage": "pretrain", "model_config": config.to_dict(),
             "model": GPT(config).state_dict(), "tokenizer": tok.state()}  # fmt: skip
    save_checkpoint(tmp_path / "base.pt", state)
    (tmp_path / "text.txt").write_text(text)
    namespace: dict = {}
    exec(compile(doc_example(), "docs/training.md", "exec"), namespace)
    values = {
        **TEST_LOOP, "device": "cpu", "precision": "float32", "seed": 1, "resume": False,
        "overwrite": False, "out_dir": str(tmp_path / "run"), "batch_size": 4,
        "init_from": str(tmp_path / "base.pt"), "text_file": str(tmp_path / "text.txt"),
        "optimizer": "adamw", "lr": 3e-3, "min_lr": 0.0, "weight_decay": 0.0,
        "betas": [0.9, 0.95], "muon_lr": 0.02, "muon_momentum": 0.95, "max_iters": 30,
        "warmup_iters": 0, "eval_interval": 15, "log_interval": 5, "peak_tflops": 1.0,
    }  # fmt: skip
    namespace["run"](namespace["TextFitSettings"](**values))
    logs = [r for r in records(tmp_path / "run") if "ppl" in r]
    assert logs[-1]["ppl"] < logs[0]["ppl"] / 2  # it learnt the text
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["stage"] == "textfit" and ckpt["step"] == 30
    assert ckpt["init_from"] == str(tmp_path / "base.pt")
    namespace["run"](namespace["TextFitSettings"](**{**values, "max_iters": 40, "resume": True}))
    assert load_checkpoint(tmp_path / "run")["step"] == 40
