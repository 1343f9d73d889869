"""DPO: the loss against a hand computation, log-probabilities of the reply tokens only, the
reference's log-probabilities computed once and equal to a fresh computation, a tiny
`python -m train.dpo` run that learns the preferences; and `make align`'s skipping."""

import contextlib
import dataclasses
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from tiny_sft import save_sft

import tokenizer
import train.align as align
from data.preferences import collate_groups, read_preference_file, render_group
from train.core.checkpoint import load_model
from train.dpo import attach_reference_logps
from train.rl.losses import dpo_loss, sequence_logprobs
from train.settings import load

ROOT = Path(__file__).resolve().parents[1]


def test_dpo_loss_by_hand():
    policy = torch.tensor([-1.0, -3.0, -2.0, -2.5])  # rows: (chosen, rejected) x 2 pairs
    ref = torch.tensor([-2.0, -2.0, -2.0, -2.0])
    better, worse = torch.tensor([0, 2]), torch.tensor([1, 3])
    beta = 0.5
    loss, chosen, rejected = dpo_loss(policy, ref, better, worse, beta)
    h = [beta * ((-1 + 2) - (-3 + 2)), beta * ((-2 + 2) - (-2.5 + 2))]  # 1.0, 0.25
    nll = lambda x: -math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    assert loss.item() == pytest.approx((nll(h[0]) + nll(h[1])) / 2, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.0])
    assert rejected.tolist() == pytest.approx([-0.5, -0.25])
    smooth, _, _ = dpo_loss(policy, ref, better, worse, beta, label_smoothing=0.1)
    expected = sum(0.9 * nll(x) + 0.1 * nll(-x) for x in h) / 2  # conservative DPO
    assert smooth.item() == pytest.approx(expected, rel=1e-6)


def test_sequence_logprobs_sum_the_reply_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 0, 1, 1]])  # the reply: ids 4 and 5
    logp = torch.log_softmax(logits, -1)
    expected = logp[0, 2, 4] + logp[0, 3, 5]  # position t predicts ids[t + 1]
    assert sequence_logprobs(logits, ids, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    mask_all = torch.ones(1, 5, dtype=torch.long)
    assert sequence_logprobs(logits, ids, mask_all).item() < expected.item()  # the prompt adds


def make_pairs(numbers, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in numbers:
        word = "yes" if torch.rand(1, generator=g).item() < 0.5 else "no"
        other = "no" if word == "yes" else "yes"
        out.append({"prompt": f"Say {word} {k}", "chosen": f" {word}", "rejected": f" {other}"})
    return out


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    text = " ".join(f"Say yes {k} Say no {k}" for k in range(100)) + " yes no\n"
    tok = tokenizer.train_tokenizer([text * 5], vocab_size=290)
    torch.manual_seed(0)
    save_sft(d / "sft.pt", tok)
    for name, numbers, seed in (("train", range(0, 80), 1), ("test", range(80, 100), 2)):
        rows = make_pairs(numbers, seed)
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_cached_reference_logprobs_equal_a_fresh_computation(dpo_setup):
    model, tok, _ = load_model(dpo_setup / "sft.pt")
    read = read_preference_file(dpo_setup / "test.jsonl", log=print)
    groups = [render_group(tok, g, 32) for g in read]
    attach_reference_logps(model, groups, tok.pad_id, torch.device("cpu"), contextlib.nullcontext)
    for g in groups[:5]:
        for (ids, mask), cached in zip(g.rows, g.ref_logps, strict=True):
            fresh = sequence_logprobs(model(torch.tensor([ids]))[0], torch.tensor([ids]),
                                      torch.tensor([mask]).float())  # fmt: skip
            assert cached == pytest.approx(fresh.item(), abs=1e-5)
    batch = collate_groups(groups[:3], tok.pad_id)
    assert batch["ref_logps"].shape == (batch["ids"].size(0),)


def test_a_tiny_dpo_run_learns_the_preferences(dpo_setup):
    d = dpo_setup
    args = [f"init_from={d / 'sft.pt'}", f"out_dir={d / 'dpo'}", "preferences.builtin=false",
            "tasks.weight=0", f"files=[{d / 'train.jsonl'}]", f"eval_files=[{d / 'test.jsonl'}]",
            "device=cpu", "precision=float32", "batch_size=16", "lr=3e-3", "min_lr=3e-4",
            "epochs=20", "warmup_iters=5", "eval_interval=25", "log_interval=5", "beta=0.5",
            "max_minutes=null"]  # fmt: skip
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "train.dpo", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(d / "dpo" / "metrics.jsonl")]
    evals = [r for r in records if "val_pref_accuracy" in r]
    # at the start the policy is the reference: every implicit reward is 0, no pair is won
    assert evals[-1]["val_pref_accuracy"] >= 0.9
    logs = [r for r in records if "chosen_reward" in r]
    assert logs[-1]["chosen_reward"] > 0 > logs[-1]["rejected_reward"]  # chosen made likelier
    assert logs[-1]["margin"] > logs[0]["margin"]

    # the side-by-side table for any checkpoints (make align's), on the held-out file
    held_out = d / "test_items.jsonl"
    records = [{"instruction": f"Say yes {k}", "output": "yes"} for k in range(80, 90)]
    held_out.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = [
        "tasks.weight=0",
        f"checkpoints=[{d / 'sft.pt'},{d / 'dpo'}]",
        f"reference={d / 'sft.pt'}",
        f"eval_files=[{held_out}]",
        f"report_dir={d / 'report'}",
    ]
    table = subprocess.run([sys.executable, "-m", "train.evaluate", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert table.returncode == 0, table.stderr[-3000:]
    report = json.loads((d / "report" / "report.json").read_text())
    assert set(report) == {"sft", "dpo", "paired"} and "KL to SFT" in table.stdout
    assert set(report["paired"]) == {"dpo"}  # against the first checkpoint, item by item
    assert "dpo against sft (greedy, paired: McNemar's exact test)" in table.stdout
    assert report["sft"]["sampled"]["kl"] == pytest.approx(0.0, abs=1e-3)  # itself
    assert (d / "report" / "accuracy.png").is_file()


# --- make align's skipping ----------------------------------------------------------------


def finished_run(out: Path, cfg: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    (out / "done.json").write_text("{}")


@dataclass
class FakeSettings:
    out_dir: str
    lr: float
    overwrite: bool = False


def test_a_stage_with_an_unchanged_config_is_not_run_again(tmp_path, monkeypatch):
    calls = []

    def fake_settings(plan, name):
        lr = [float(o.split("=")[1]) for o in align.stage_overrides(plan, name) if "lr=" in o]
        return FakeSettings(str(tmp_path / name), lr[-1] if lr else 1.0)

    def fake_run(name, overrides):
        calls.append(name)
        settings = fake_settings(plan, name)
        finished_run(Path(settings.out_dir), dataclasses.asdict(settings))

    monkeypatch.setattr(align, "stage_settings", fake_settings)
    monkeypatch.setattr(align, "run_stage", fake_run)
    plan = load("align", ["overrides.all=[]"])
    assert set(align.run_stages(plan, log=lambda m: None).values()) == {"ran"}
    assert calls == ["pretrain", "sft", "rm", "ppo", "dpo", "grpo"]

    calls.clear()  # nothing changed: everything is skipped
    assert set(align.run_stages(plan, log=lambda m: None).values()) == {"skipped"}
    assert calls == []

    plan.overrides["rm"] = ["lr=2.0"]  # the reward model changed: it and what follows run
    done = align.run_stages(plan, log=lambda m: None)
    assert done == {
        "pretrain": "skipped",
        "sft": "skipped",
        "rm": "ran",
        "ppo": "ran",
        "dpo": "ran",
        "grpo": "ran",
    }

    (tmp_path / "sft" / "done.json").unlink()  # an unfinished stage runs again
    assert align.run_stages(plan, log=lambda m: None)["sft"] == "ran"


def test_min_chosen_score_keeps_right_over_wrong_and_unscored_pairs():
    from data.preferences import PreferenceGroup
    from train.dpo import keep_pairs

    prompt = [{"role": "user", "content": "q"}]
    scored = PreferenceGroup(prompt, task="t")
    for text, score in ((" right", 1.0), (" near", 0.5), (" far", 0.0)):
        scored.add([{"role": "assistant", "content": text}], score)
    scored.pairs = [(0, 1), (0, 2), (1, 2)]  # the last: two mistakes
    unscored = PreferenceGroup(prompt, task="u", responses=scored.responses[:2],
                               pairs=[(0, 1)], scores=[None, None])  # fmt: skip
    kept = keep_pairs([scored, unscored], 1.0)
    assert kept[0].pairs == [(0, 1), (0, 2)] and kept[1].pairs == [(0, 1)]
    assert keep_pairs([scored], None)[0].pairs == scored.pairs


def test_min_chosen_score_names_itself_when_it_drops_pairs_and_when_it_drops_all():
    from data.preferences import PreferenceGroup
    from errors import UserError
    from train.dpo import keep_pairs

    group = PreferenceGroup([{"role": "user", "content": "q"}], task="t")
    for text, score in ((" near", 0.5), (" far", 0.0)):
        group.add([{"role": "assistant", "content": text}], score)
    group.pairs = [(0, 1)]  # two mistakes
    logged = []
    assert keep_pairs([group], 0.5, log=logged.append)[0].pairs == [(0, 1)] and logged == []
    with pytest.raises(UserError, match=r"min_chosen_score=1 leaves none of the built-in "
                       r"set's 1 pairs.*min_chosen_score=null"):  # fmt: skip
        keep_pairs([group], 1.0, log=logged.append)
    twice = [group, PreferenceGroup(group.prompt, group.responses, [(0, 1)], "t", [1.0, 0.0])]
    assert len(keep_pairs(twice, 1.0, log=logged.append)) == 1
    assert logged == ["min_chosen_score=1: kept 1 of the built-in set's 2 pairs (those whose "
                      "chosen reply the judge scored at least 1)"]  # fmt: skip


def test_users_scores_on_their_own_scale_are_not_filtered(dpo_setup, tmp_path, capsys):
    """min_chosen_score is the built-in judge's scale (0..1): a user's file keeps every
    pair, whatever its scores (here 0.5 over 0.1, and UltraFeedback's 1-10)."""
    from train import dpo

    rows = [{**r, "chosen_score": 0.5, "rejected_score": 0.1} for r in make_pairs(range(6), 1)]
    rows += [{**r, "score_chosen": 8, "score_rejected": 3} for r in make_pairs(range(6, 9), 2)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load("dpo", [
        f"init_from={dpo_setup / 'sft.pt'}", f"out_dir={tmp_path / 'dpo'}", "tasks.weight=0",
        "preferences.builtin=false", f"files=[{tmp_path / 'p.jsonl'}]", "device=cpu",
        "precision=float32", "max_iters=1", "max_minutes=null", "batch_size=4"])  # fmt: skip
    assert cfg.min_chosen_score == 1.0  # the default
    dpo.run(cfg)
    assert "training comparisons: 9 prompts, 18 replies, 9 pairs" in capsys.readouterr().out


# --- online DPO ---------------------------------------------------------------------------


def test_online_pairs_are_sampled_from_the_current_policy_and_resume_exactly(
    dpo_setup, monkeypatch
):
    """Each round samples with the policy as it is then (here: its weights after an update),
    from prompts spread over the tasks, keeping right-over-wrong pairs only; the state
    (the round and its pairs) continues a round with the same batches."""
    from types import SimpleNamespace

    import train.rl.online_pairs as online
    from data.preferences import PreferenceGroup
    from train.rl.preference_data import PreferencesConfig

    policy, tok, _ = load_model(dpo_setup / "sft.pt")
    seen = []

    def sample_groups(model, tok, items, p, device, borrowed, log, wrong_pairs):
        assert model is policy and wrong_pairs == 0 and borrowed == 0 and p.samples == 3
        seen.append(
            (float(next(model.parameters()).detach().sum()), p.seed, [i["task"] for i in items])
        )
        groups = []
        for item in items:
            g = PreferenceGroup(item["messages"], task=item["task"])
            g.add([{"role": "assistant", "content": " yes"}], 1.0)
            g.add([{"role": "assistant", "content": " no"}], 0.0)
            g.pairs = [(0, 1)]
            groups.append(g)
        return groups

    monkeypatch.setattr(online, "sample_groups", sample_groups)
    items = [
        {"task": t, "messages": [{"role": "user", "content": f"Say yes {k}"}], "answer": "yes"}
        for t in ("a", "b")
        for k in range(10)
    ]
    tasks = SimpleNamespace(train=items, test=items)
    p = PreferencesConfig(
        builtin=True,
        dir="x",
        samples=2,
        train_samples=3,
        prompts=1,
        temperature=1.0,
        borrowed=0,
        wrong_pairs=1,
        max_new_tokens=4,
        batch_size=8,
        seed=5,
    )
    rt = SimpleNamespace(
        device=torch.device("cpu"), rank=0, world_size=1, autocast=contextlib.nullcontext
    )
    s = SimpleNamespace(seed=0, round_prompts=4, batch_size=2)

    def ref_logps(groups):
        attach_reference_logps(policy, groups, tok.pad_id, rt.device, rt.autocast)

    source = online.OnlinePairs(policy, ref_logps, tok, tasks, p, s, rt, log=lambda m: None)
    first = source.next_batch()  # round 0: 4 prompts, 2 a batch
    torch.save(source.state_dict(), dpo_setup / "state.pt")  # in the middle of round 0
    second = source.next_batch()
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)  # the policy moves
    source.next_batch()  # round 1, sampled from the moved policy
    assert len(seen) == 2 and seen[1][0] != seen[0][0] and seen[1][1] != seen[0][1]
    assert sorted(seen[0][2]) == ["a", "a", "b", "b"]  # spread over the tasks
    assert first["better"].numel() == 2 and "ref_logps" in first

    again = online.OnlinePairs(policy, ref_logps, tok, tasks, p, s, rt, log=lambda m: None)
    again.load_state_dict(torch.load(dpo_setup / "state.pt", weights_only=True))
    resumed = again.next_batch()  # the rest of round 0, from the checkpoint: no sampling
    assert len(seen) == 2
    assert all(torch.equal(resumed[k], second[k]) for k in second)
