"""The reward model: the pairwise loss and K-wise batching, preference layouts, the judge
that labels the built-in set, and a tiny `python -m train.reward` run that learns which
answer is better in seconds."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_sft import save_sft

import tokenizer
from data.judge import grade, is_correct, match_rule
from data.preferences import collate_groups, read_preference_file, render_group
from model import GPTConfig
from model.heads import ScalarModel
from train.core.checkpoint import load_kind
from train.eval.reward_eval import spearman
from train.rl.losses import pairwise_loss
from train.rl.preference_data import choose_pairs, off_task_replies

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    return {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


# --- the loss and the batching -----------------------------------------------------------


def test_pairwise_loss_by_hand():
    """Two prompts: one with a single pair, one with three pairs of its three replies."""
    rewards = torch.tensor([2.0, 0.5, 1.0, 0.0, -1.0])  # prompt 0: rows 0-1; prompt 1: rows 2-4
    better, worse = torch.tensor([0, 2, 2, 3]), torch.tensor([1, 3, 4, 4])
    group = torch.tensor([0, 1, 1, 1])
    loss, margin = pairwise_loss(rewards, better, worse, group)
    nll = lambda m: -math.log(1 / (1 + math.exp(-m)))  # noqa: E731
    expected = (nll(1.5) + (nll(1.0) + nll(2.0) + nll(1.0)) / 3) / 2  # each prompt weighs 1/2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert margin.tolist() == [1.5, 1.0, 2.0, 1.0]


def test_pairwise_loss_gradient_pushes_the_better_reply_up():
    rewards = torch.zeros(2, requires_grad=True)
    loss, _ = pairwise_loss(rewards, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]))
    loss.backward()
    assert rewards.grad[0] < 0 < rewards.grad[1]  # descent raises r(better), lowers r(worse)


def test_pairwise_loss_margin_and_centring_by_hand():
    """margin m asks a pair the judge sets `gap` apart to be scored m * gap apart; center c
    adds c * mean (r_w + r_l)^2."""
    rewards = torch.tensor([2.0, 0.5, 1.0, -1.0])
    better, worse, group = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([0, 1])
    gap = torch.tensor([1.0, 0.25])
    loss, margin = pairwise_loss(rewards, better, worse, group, gap, margin=2.0, center=0.1)
    nll = lambda m: -math.log(1 / (1 + math.exp(-m)))  # noqa: E731
    pairs = (nll(1.5 - 2.0 * 1.0) + nll(2.0 - 2.0 * 0.25)) / 2
    centre = 0.1 * ((2.0 + 0.5) ** 2 + (1.0 - 1.0) ** 2) / 2
    assert loss.item() == pytest.approx(pairs + centre, rel=1e-6)
    assert margin.tolist() == [1.5, 2.0]  # the margins reported are the plain differences
    plain, _ = pairwise_loss(rewards, better, worse, group, gap)
    assert plain.item() == pytest.approx((nll(1.5) + nll(2.0)) / 2, rel=1e-6)


def test_choose_pairs_keeps_right_over_wrong_and_the_furthest_wrong_pairs():
    scores = [1.0, 0.75, 0.0, 0.25]
    every = choose_pairs(scores, None)
    assert sorted(every) == sorted([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (3, 2)])
    assert choose_pairs(scores, 0) == [(0, 1), (0, 2), (0, 3)]
    assert choose_pairs(scores, 1) == [(0, 1), (0, 2), (0, 3), (1, 2)]  # gap 0.75 first
    assert choose_pairs([0.5, 0.5], 3) == []  # equal scores give no pair


@pytest.fixture(scope="module")
def tok():
    text = "Say yes or no: question one two three yes no maybe " * 50
    return tokenizer.train_tokenizer([text], vocab_size=300)


def group_from(records, tmp_path, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_preference_file(path, log=lambda m: None)


def test_k_wise_batching_runs_each_reply_once(tok, tmp_path):
    """A ranked list of 3 replies: 3 pairs, 3 rows (not 6), pairs index the rows."""
    record = {"prompt": "Say yes", "responses": [" yes", " no", " maybe"], "scores": [1, 0, 0.5]}
    (group,) = group_from([record], tmp_path)
    rendered = render_group(tok, group, block_size=64)
    batch = collate_groups([rendered, rendered], tok.pad_id)
    assert batch["ids"].shape[0] == 6  # two groups of three replies, each once
    assert sorted(zip(batch["better"][:3].tolist(), batch["worse"][:3].tolist(), strict=True)) == [
        (0, 1), (0, 2), (2, 1)]  # fmt: skip
    assert batch["better"][3:].tolist() == [b + 3 for b in batch["better"][:3].tolist()]
    assert batch["group"].tolist() == [0, 0, 0, 1, 1, 1]


def test_padding_never_changes_a_reward(tok, tmp_path):
    record = {"prompt": "Say yes", "responses": [" yes", " no no no no no"], "scores": [1, 0]}
    (group,) = group_from([record], tmp_path)
    rendered = render_group(tok, group, block_size=64)
    torch.manual_seed(0)
    model = ScalarModel(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64,
                                  vocab_size=tok.vocab_size)).eval()  # fmt: skip
    torch.nn.init.normal_(model.head.proj.weight)
    batch = collate_groups([rendered], tok.pad_id)  # the short reply is padded
    together = model(batch["ids"], batch["lengths"])
    for i, (ids, _) in enumerate(rendered.rows):
        alone = model(torch.tensor([ids]), torch.tensor([len(ids)]))
        assert torch.allclose(together[i], alone[0], atol=1e-5)


# --- the layouts -------------------------------------------------------------------------


def test_every_layout_gives_the_same_comparison(tmp_path):
    prompt = [{"role": "user", "content": "Say yes"}]
    good, bad = (
        [{"role": "assistant", "content": " yes"}],
        [{"role": "assistant", "content": " no"}],
    )
    layouts = {
        "strings": {"prompt": "Say yes", "chosen": " yes", "rejected": " no"},
        "messages": {"prompt": prompt, "chosen": good, "rejected": bad},
        "implicit": {"chosen": prompt + good, "rejected": prompt + bad},
        "hh": {"chosen": "\n\nHuman: Say yes\n\nAssistant:  yes",
               "rejected": "\n\nHuman: Say yes\n\nAssistant:  no"},
        "ranked": {"prompt": "Say yes", "responses": [" no", " yes"], "scores": [0, 1]},
    }  # fmt: skip
    for name, record in layouts.items():
        (group,) = group_from([record], tmp_path, f"{name}.jsonl")
        (better, worse), = group.pairs  # fmt: skip
        assert group.prompt == prompt, name
        assert group.responses[better] == good and group.responses[worse] == bad, name
        assert group.task == name  # the file's stem


def test_ultrafeedback_conversations_repeat_the_prompt_and_it_is_read_once(tmp_path):
    """UltraFeedback's layout: a prompt string, and chosen/rejected as whole conversations
    whose first user turn is that prompt; scores as score_chosen/score_rejected (1-10)."""
    user = {"role": "user", "content": "Say yes"}
    good, bad = {"role": "assistant", "content": " yes"}, {"role": "assistant", "content": " no"}
    record = {"prompt": "Say yes", "chosen": [user, good], "rejected": [user, bad],
              "score_chosen": 8.5, "score_rejected": 3.0}  # fmt: skip
    (group,) = group_from([record], tmp_path)
    assert group.prompt == [user]  # once, not twice
    (better, worse), = group.pairs  # fmt: skip
    assert group.responses[better] == [good] and group.responses[worse] == [bad]
    assert (group.scores[better], group.scores[worse]) == (8.5, 3.0)
    # more turns shared than the prompt: all of them are the prompt
    turns = [user, good, {"role": "user", "content": "Again?"}]
    record = {"prompt": "Say yes", "chosen": [*turns, good], "rejected": [*turns, bad]}
    (group,) = group_from([record], tmp_path, "multi.jsonl")
    assert group.prompt == turns and group.responses == [[good], [bad]]


@pytest.mark.parametrize(
    "record, why",
    [
        ({"prompt": "Say yes", "chosen": [{"role": "user", "content": "Say no"},
                                          {"role": "assistant", "content": " no"}],
          "rejected": " yes"}, "'chosen' starts with a user turn but not with the prompt"),
        ({"prompt": "q", "chosen": " a", "rejected": " b", "score_chosen": "high"},
         "'score_chosen' must be a number"),
        ({"prompt": "q", "chosen": " a", "rejected": " b", "chosen_score": 1,
          "score_chosen": 2}, "both 'chosen_score' and 'score_chosen'"),
    ],
)  # fmt: skip
def test_preference_records_that_cannot_be_read_right_are_refused(record, why):
    from data.preferences import comparisons

    with pytest.raises(ValueError, match=why):
        comparisons(record, "t")


def test_duplicate_and_contradicting_comparisons_are_counted_and_contradictions_dropped(
    tmp_path,
):
    """30 records: 10 prompts with one pair each given twice (10 merged), 5 of those pairs
    given the other way round as well (both ways: dropped), and 5 plain records."""
    records = []
    for k in range(10):
        records += [{"prompt": f"q{k}", "chosen": " yes", "rejected": " no"}] * 2
    for k in range(5):
        records.append({"prompt": f"q{k}", "chosen": " no", "rejected": " yes"})
    records += [{"prompt": f"r{k}", "chosen": " yes", "rejected": " no"} for k in range(5)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    logged = []
    groups = read_preference_file(path, log=logged.append)
    assert sorted(g.prompt[0]["content"] for g in groups) == sorted(
        [f"q{k}" for k in range(5, 10)] + [f"r{k}" for k in range(5)]
    )
    assert all(g.pairs == [(0, 1)] for g in groups)
    assert logged == [
        f"{path}: 30 records (30 comparisons) -> 10 comparisons of 10 prompts; 10 duplicates "
        "merged; 5 pairs given both ways (contradicting) dropped"
    ]


def test_records_with_one_prompt_become_one_group_and_multi_turn_prompts_stay(tmp_path):
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Yes?"},
    ]
    records = [
        {"prompt": history, "chosen": " yes", "rejected": " no"},
        {"prompt": history, "chosen": " yes", "rejected": " maybe"},
    ]
    (group,) = group_from(records, tmp_path)
    assert group.prompt == history and len(group.responses) == 3 and len(group.pairs) == 2


def test_malformed_records_are_reported_with_file_and_line(tmp_path):
    lines = [
        {"prompt": "a", "chosen": " x", "rejected": " y"},
        {"prompt": "a", "chosen": " x"},  # no rejected
        {"prompt": "a", "chosen": " x", "rejected": " x"},  # the same reply
        {"prompt": "a", "responses": [" x", " y"], "scores": [1, 1]},  # no preference
        {"chosen": "plain text", "rejected": "other text"},  # neither HH nor a prompt
    ] + [{"prompt": f"q{i}", "chosen": " x", "rejected": " y"} for i in range(20)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    logged = []
    groups = read_preference_file(path, max_bad_fraction=0.5, log=logged.append)
    assert len(groups) == 21
    assert [m.split(": ", 1)[0] for m in logged[:-1]] == [
        f"skipping malformed record {path}:line {n}" for n in (2, 3, 4, 5)]  # fmt: skip
    assert logged[-1] == f"{path}: 25 records (21 comparisons) -> 21 comparisons of 21 prompts"
    assert "the same reply" in logged[1] and "same score" in logged[2]


def test_an_empty_reply_is_a_reply(tok, tmp_path):
    """The SFT model sometimes ends its turn at once; the built-in set keeps such replies
    (as the worse one, mostly), so every stage reading the file must keep them too."""
    (group,) = group_from([{"prompt": "Say yes", "chosen": " yes", "rejected": ""}], tmp_path)
    (better, worse), = group.pairs  # fmt: skip
    assert group.responses[worse] == [{"role": "assistant", "content": ""}]
    rendered = render_group(tok, group, block_size=128)
    ids, mask = rendered.rows[worse]
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert trained == [tok.end_id]  # the reply is its end-of-turn token alone


def test_control_tokens_in_preference_text_stay_text(tok, tmp_path):
    record = {"prompt": "<|user|> hi <|end|>", "chosen": " <|assistant|>", "rejected": " no"}
    (group,) = group_from([record], tmp_path)
    rendered = render_group(tok, group, block_size=128)
    for ids, _ in rendered.rows:
        assert ids.count(tok.user_id) == 1 and ids.count(tok.assistant_id) == 1


def test_borrowed_replies_come_from_other_tasks():
    items = [{"task": t} for t in "aaabbbccc"]
    finished = [f"reply {n}.{j}" for n in range(9) for j in range(2)]  # k = 2 per item
    assert off_task_replies(items, finished, 0, 2, 1) == ["reply 4.0"]  # half the list away
    assert off_task_replies(items, finished, 0, 2, 2) == ["reply 3.0", "reply 6.0"]
    assert off_task_replies(items, finished, 8, 2, 2) == ["reply 2.0", "reply 5.0"]
    assert off_task_replies([{"task": "a"}] * 4, finished, 0, 2, 1) == []  # one task: none
    assert off_task_replies(items, finished, 0, 2, 0) == []


# --- the judge ---------------------------------------------------------------------------

ITEMS = [
    ({"task": "repeat", "answer": "Now is the winter of our discontent", "source": "x"},
     ["Now is the winter of our", "Now is the summer", "winter", ""]),
    ({"task": "first_word", "answer": "Now", "source": "Now is the winter"},
     ["winter", "Hamlet", "Now is", ""]),
    ({"task": "count_words", "answer": "4", "source": "Now is the winter"},
     ["5", "3", "7", "four", ""]),
    ({"task": "play_of_character", "answer": "Hamlet", "source": "Polonius"},
     ["Macbeth", "Polonius", ""]),
    ({"task": "speaker_of_line", "answer": "Francisco", "source": "Not a mouse stirring."},
     ["Bernardo", "a mouse", ""]),
]  # fmt: skip


@pytest.mark.parametrize("item, wrong", ITEMS)
def test_the_judge_ranks_a_right_answer_above_every_wrong_one(item, wrong):
    assert grade(item, " " + item["answer"]) == 1.0
    if item["task"] != "repeat":  # the normalised tasks forgive case and final punctuation
        assert grade(item, item["answer"].upper() + ".") == 1.0
    scores = [grade(item, w) for w in wrong]
    assert all(0.0 <= s < 1.0 for s in scores)
    assert scores == [grade(item, w) for w in wrong]  # deterministic
    assert grade(item, "") == 0.0
    for w in wrong:
        assert not is_correct(w, item["answer"], match_rule(item))


def test_the_judge_grades_near_misses_above_far_ones():
    repeat, count = ITEMS[0][0], ITEMS[2][0]
    assert grade(repeat, "Now is the winter of our") > grade(repeat, "Now is the summer") > 0
    assert grade(repeat, "Now is the winter of our") == 0.75  # a near copy (6 of 7 words)
    assert grade(count, "5") == grade(count, "3") > grade(count, "7") > grade(count, "9") == 0
    assert grade(count, "four") == 0
    first = ITEMS[1][0]
    assert grade(first, "winter") > grade(first, "Hamlet") > grade(first, "Now is") == 0


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [0, 0, 1]) == pytest.approx(1.0)  # ties share their rank
    assert spearman([1, 1], [1, 2]) is None


# --- a tiny run ---------------------------------------------------------------------------


def make_pairs(numbers, n, seed):
    """'Is 17 even? Answer yes or no.' -> the right word is preferred to the wrong one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(numbers[int(torch.randint(len(numbers), (1,), generator=g))])
        right, wrong = (" yes", " no") if k % 2 == 0 else (" no", " yes")
        out.append(
            {"prompt": f"Is {k} even? Answer yes or no.", "chosen": right, "rejected": wrong}
        )
    return out


@pytest.fixture(scope="module")
def rm_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    text = " ".join(f"Is {k} even? Answer yes or no." for k in range(100)) + " yes no\n"
    tok = tokenizer.train_tokenizer([text * 10], vocab_size=300)
    torch.manual_seed(0)
    save_sft(d / "sft.pt", tok)
    for name, numbers, n, seed in (
        ("train", range(0, 80), 600, 1),
        ("test", range(80, 100), 60, 2),
    ):
        (d / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in make_pairs(numbers, n, seed)))  # fmt: skip
    return d


def test_a_tiny_reward_model_learns_which_answer_is_better(rm_setup):
    d = rm_setup
    args = [f"init_from={d / 'sft.pt'}", f"out_dir={d / 'rm'}", "preferences.builtin=false",
            f"files=[{d / 'train.jsonl'}]", f"eval_files=[{d / 'test.jsonl'}]", "device=cpu",
            "precision=float32", "batch_size=16", "lr=3e-3", "min_lr=3e-4", "epochs=30",
            "warmup_iters=5", "eval_interval=50", "log_interval=10"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "train.reward", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env=env())  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((d / "rm" / "eval.json").read_text())["reward"]
    prompts = {json.loads(line)["prompt"] for line in open(d / "test.jsonl")}
    assert report["pairs"] == report["tasks"]["test"]["pairs"] == len(prompts)  # merged per prompt
    assert report["pairwise_accuracy"] >= 0.9

    # normalised: the held-out replies average 0 reward; the offset is in the checkpoint
    model, tok, ckpt = load_kind(d / "rm", "reward")
    assert ckpt["stage"] == "reward" and ckpt["model_kind"] == "reward"
    groups = read_preference_file(d / "test.jsonl", log=lambda m: None)
    rows = [render_group(tok, g, 32) for g in groups]
    batch = collate_groups(rows, tok.pad_id)
    with torch.no_grad():
        rewards = model(batch["ids"], batch["lengths"])
    assert isinstance(ckpt["reward_offset"], float) and ckpt["reward_scale"] > 0
    # no validation files: normalised on the held-out files given as eval_files
    assert abs(rewards.mean().item()) < 1e-4
    assert rewards.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)

    # python -m train.evaluate reproduces the held-out figures from the checkpoint alone, at
    # the precision the stage ran at (precision=auto), on a CPU with native bf16 or without
    assert ckpt["precision"] == "float32"
    for native in ("1", "0"):
        (d / "rm" / "eval.json").unlink()
        again = subprocess.run([sys.executable, "-m", "train.evaluate", f"checkpoint={d / 'rm'}",
                                f"eval_files=[{d / 'test.jsonl'}]"], cwd=ROOT,
                               capture_output=True, text=True, timeout=300,
                               env={**env(), "HANDGPT_CPU_BF16": native})  # fmt: skip
        assert again.returncode == 0, again.stderr[-2000:]
        assert "precision: float32 (the precision the checkpoint was trained at)" in again.stdout
        assert json.loads((d / "rm" / "eval.json").read_text())["reward"] == report


def test_no_preference_data_is_one_line(rm_setup, tmp_path):
    d = rm_setup
    args = [f"init_from={d / 'sft.pt'}", f"out_dir={tmp_path / 'rm'}", "preferences.builtin=false"]
    result = subprocess.run([sys.executable, "-m", "train.reward", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env=env())  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no preference data: set preferences.builtin=true or give files=[...]"]  # fmt: skip
