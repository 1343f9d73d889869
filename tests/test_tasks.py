"""The built-in instruction set and its exact-match evaluation.

The plays here are fakes the test writes in the format of the real corpus files (title,
list of persons, acts, speech headings in capitals or abbreviated), so we know the truth
about every line: who speaks it and in which play.
"""

import hashlib
import json
import random

import pytest
import torch

import tokenizer
from data.judge import is_correct, normalize
from data.plays import find_persons, find_speeches, resolve_speaker, without_persons_list
from data.sources import Document
from data.tasks import (
    CORPUS_TASKS,
    FORM_TASKS,
    REPLY_PREFIX,
    TASKS,
    build_tasks,
    line_answer,
    longest_word,
    usable_line,
)
from model import GPT, GPTConfig
from model.generate import complete
from tokenizer.chat import render_prompt
from train import task_eval
from train.task_eval import evaluate_tasks, format_table, save_eval

WORDS = ("thou art the king of night and every golden river sings to morning light "
         "where shall we find a noble heart or quiet grave beneath cold stars my lord "
         "good sweet brother hence away come now tell me true").split()  # fmt: skip

GORBODUC_HEAD = """THE TRAGEDY OF GORBODUC

by A. Tester




PERSONS REPRESENTED.

Gorboduc, King of Britain.
Ferrex, Son to Gorboduc.
Porrex, Son to Gorboduc.
Videna, Queen of Britain, Wife to Gorboduc.
A Messenger.
Lords, Ladies, and Attendants.

SCENE. Britain.



ACT I.

Scene I. A hall in the palace.
"""

TIMOTHY_HEAD = """THE LIFE OF TIMOTHY

by A. Tester




Dramatis Personae

TIMOTHY, a merchant of Bristol.
MARIGOLD, his daughter.
LADY WREN, a widow.
OLD SHEPHERD.
Sailors.

SCENE: Bristol.



ACT 1.

SCENE I. A street.
"""

SHARED_LINE = "Good morrow to you all my lords."  # in both plays: ambiguous, never asked


def make_line(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(4, 8))
    return " ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ";", ""])


def write_play(head, speakers, rng, seen, n_speeches=60):
    """The play's text and {line: speaker} for every line spoken (all lines distinct)."""
    parts, truth = [head], {}
    for k in range(n_speeches):
        heading, person = speakers[k % len(speakers)]
        lines = []
        for _ in range(rng.randint(1, 3)):
            line = make_line(rng)
            while line in seen:
                line = make_line(rng)
            seen.add(line)
            lines.append(line)
            truth[line] = person
        if k % 10 == 3:
            parts.append("\n[Enter a Messenger.]\n")
        parts.append(f"\n{heading}\n" + "\n".join(lines) + "\n")
        if k == 7:
            parts.append(f"\n{heading}\n{SHARED_LINE}\n")
    return "".join(parts), truth


@pytest.fixture(scope="module")
def corpus():
    rng, seen = random.Random(7), set()
    g_text, g_truth = write_play(
        GORBODUC_HEAD,
        [("Gor.", "Gorboduc"), ("Fer.", "Ferrex"), ("Por.", "Porrex"), ("Vid.", "Videna")],
        rng,
        seen,
    )
    t_text, t_truth = write_play(
        TIMOTHY_HEAD,
        [("TIMOTHY.", "Timothy"), ("MARIGOLD.", "Marigold"), ("LADY WREN.", "Lady Wren")],
        rng,
        seen,
    )
    poem_lines = [make_line(rng) for _ in range(40)]
    poem = "SONNETS\n\n" + "\n".join(poem_lines) + "\n"
    docs = [
        Document("gorboduc", g_text),
        Document("life_of_timothy", t_text),
        Document("sonnets", poem),
    ]
    truth = {"Gorboduc": g_truth, "Life of Timothy": t_truth}
    return docs, truth, set(poem_lines)


@pytest.fixture(scope="module")
def taskset(corpus):
    return build_tasks(corpus[0], seed=3, n_train=40, n_test=8)


def test_persons_and_speakers_are_read_from_the_play(corpus):
    docs = corpus[0]
    persons = find_persons(docs[0].text)
    assert persons[:5] == ["Gorboduc", "Ferrex", "Porrex", "Videna", "A Messenger"]
    assert find_persons(docs[1].text)[:3] == ["Timothy", "Marigold", "Lady Wren"]
    assert find_persons(docs[2].text) is None
    assert resolve_speaker("Gor.", persons) == "Gorboduc"
    assert resolve_speaker("VIDENA.", persons) == "Videna"
    assert resolve_speaker("Ham.", persons) is None  # names nobody
    assert resolve_speaker("V.", ["Videna", "Vortiger"]) is None  # names two
    assert resolve_speaker("Lord.", persons) == "Lords"
    speeches = find_speeches(docs[0].text + "\nLord.\nA lord speaks this line.\n", persons)
    assert "Lords" not in {speaker for speaker, _ in speeches}  # a group is no speaker
    assert speeches and all(
        corpus[1]["Gorboduc"].get(line, speaker) == speaker for speaker, line in speeches
    )
    assert not any(line.startswith("[") for _, line in speeches)
    cut = without_persons_list(docs[0].text)
    assert "Ferrex, Son to Gorboduc." not in cut and "PERSONS REPRESENTED." not in cut
    assert cut.startswith("THE TRAGEDY OF GORBODUC") and "SCENE. Britain." in cut
    assert without_persons_list(docs[2].text) is docs[2].text  # no list: the text as it is


def test_every_task_has_train_and_test_items(taskset):
    assert {i["task"] for i in taskset.train} == set(TASKS)
    assert taskset.tasks() == list(TASKS)
    for task in TASKS:
        test = [i for i in taskset.test if i["task"] == task]
        assert 1 <= len(test) <= 8
        assert len({i["source"] for i in test}) == len(test)  # distinct held-out sources
        assert sum(i["task"] == task for i in taskset.train) == 40


def test_train_and_test_are_disjoint_by_source(taskset):
    test_sources = {i["source"] for i in taskset.test}
    train_sources = {i["source"] for i in taskset.train}
    assert not test_sources & train_sources
    train_text = "\n".join(i["messages"][0]["content"] for i in taskset.train)
    test_lines = {i["source"] for i in taskset.test if i["task"] != "play_of_character"}
    for line in test_lines:  # a held-out line is in no train prompt, under any phrasing
        assert line not in train_text


def test_items_are_deterministic_and_depend_on_the_seed(corpus, taskset):
    again = build_tasks(corpus[0], seed=3, n_train=40, n_test=8)
    assert again.train == taskset.train and again.test == taskset.test
    other = build_tasks(corpus[0], seed=4, n_train=40, n_test=8)
    assert other.test != taskset.test


# sha256 of json.dumps([train, test]) for this module's corpus, seed=3, n_train=40, n_test=8,
# as build_tasks made them before it was cut into gather / split / draw (commit 75c4378):
# the same seed must keep giving the same items. Update it only for an intended change.
PINNED_ITEMS = "70563a6e7a20b3248a772d34cc2a85bd125edaa18b113bff3b195ca32102133e"


def test_items_are_those_pinned(taskset):
    digest = hashlib.sha256(json.dumps([taskset.train, taskset.test]).encode()).hexdigest()
    assert digest == PINNED_ITEMS


def test_training_sizes_per_task_leave_the_test_items_alone(corpus, taskset):
    sizes = dict.fromkeys(TASKS, 40) | {"repeat": 90, "play_of_line": 3}
    sized = build_tasks(corpus[0], seed=3, n_train=sizes, n_test=8)
    counts = {t: sum(i["task"] == t for i in sized.train) for t in TASKS}
    assert counts == sizes
    assert sized.test == taskset.test  # held-out items do not depend on the training sizes
    with pytest.raises(ValueError, match="give a size for each of"):
        build_tasks(corpus[0], n_train={"repeat": 5})


def test_config_sizes_per_task(tmp_path):
    from omegaconf import OmegaConf

    from errors import UserError

    (tmp_path / "poem.txt").write_text(
        "\n".join(f"The river sings {w} tonight." for w in WORDS), encoding="utf-8"
    )
    sizes = dict.fromkeys(TASKS, 4) | {"repeat": 9}
    cfg = OmegaConf.create({
        "data": {"source": "text", "paths": [str(tmp_path / "poem.txt")]},
        "tasks": {"seed": 1, "n_train": sizes, "n_test": 2},
    })  # fmt: skip
    counts = dict.fromkeys(FORM_TASKS, 0)  # a poem has no plays: form tasks only
    for item in task_eval.builtin_tasks(cfg).train:
        counts[item["task"]] += 1
    assert counts == dict.fromkeys(FORM_TASKS, 4) | {"repeat": 9}
    cfg.tasks.n_train = 3  # one number for every task
    assert len(task_eval.builtin_tasks(cfg).train) == 3 * len(FORM_TASKS)
    cfg.tasks.n_train = {"repeat": 9}
    with pytest.raises(UserError, match="tasks.n_train: give a size for each of"):
        task_eval.builtin_tasks(cfg)
    cfg.tasks.n_train = "many"  # as a mistyped command-line override gives it
    with pytest.raises(UserError, match="whole numbers >= 0"):
        task_eval.builtin_tasks(cfg)
    cfg.tasks.n_train = sizes | {"one_word": -1}
    with pytest.raises(UserError, match="whole numbers >= 0.*one_word"):
        task_eval.builtin_tasks(cfg)


def test_answers_are_true_of_the_corpus(corpus, taskset):
    _, truth, poem_lines = corpus
    plays = {line: play for play, lines in truth.items() for line in lines}
    speakers = {line: who for lines in truth.values() for line, who in lines.items()}
    characters = {"Gorboduc": "Gorboduc", "Ferrex": "Gorboduc", "Porrex": "Gorboduc",
                  "Videna": "Gorboduc", "Timothy": "Life of Timothy",
                  "Marigold": "Life of Timothy", "Lady Wren": "Life of Timothy"}  # fmt: skip
    phrasings = {i["task"]: set() for i in taskset.train}
    for item in taskset.train + taskset.test:
        task, source, answer = item["task"], item["source"], item["answer"]
        user, assistant = item["messages"]
        assert user["role"] == "user"
        assert assistant == {"role": "assistant", "content": REPLY_PREFIX + answer}
        assert source in user["content"]
        if task != "play_of_character":  # the line comes last, after a space: copyable
            assert user["content"].endswith(" " + source)
        phrasings[task].add(user["content"].replace(source, "{}"))
        if task == "play_of_character":
            assert characters[source] == answer
        elif task == "play_of_line":
            assert plays[source] == answer and source not in poem_lines
        elif task == "speaker_of_line":
            assert speakers[source] == answer
        else:
            assert line_answer(task, source) == answer
        assert SHARED_LINE not in source or task in FORM_TASKS
    assert all(len(p) >= 3 for p in phrasings.values())  # several phrasings per task


def test_repeat_replies_are_token_copies_of_the_prompt(corpus, taskset):
    tok = tokenizer.train_tokenizer([d.text for d in corpus[0]], vocab_size=400)

    def occurs(part, whole):
        return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))

    for item in taskset.train + taskset.test:
        if item["task"] == "repeat":
            user, assistant = item["messages"]
            assert occurs(tok.encode(assistant["content"]), tok.encode(user["content"]))


@pytest.mark.parametrize(
    "task, answer",
    [("repeat", "Who's there? Stand, and unfold yourself."), ("first_word", "Who's"),
     ("last_word", "yourself"), ("count_words", "6"), ("one_word", "yourself")],
)  # fmt: skip
def test_form_answers_on_an_example(task, answer):
    assert line_answer(task, "Who's there? Stand, and unfold yourself.") == answer


def test_which_lines_are_usable():
    assert usable_line("'Tis now struck twelve; get thee to bed.")
    assert not usable_line("Two words")
    assert not usable_line("I think I hear them.--Stand, ho! Who is there?")  # "them.--Stand"
    assert not usable_line("LONG LIVE THE KING")
    assert not usable_line("[Enter Horatio and Marcellus.]")
    assert not usable_line("one two three four five six seven eight nine ten eleven")
    assert longest_word("a bb cc") is None and longest_word("a bbb cc!") == "bbb"


def test_corpus_tasks_need_plays():
    poem = Document("poems", "\n".join(f"The river sings {w} tonight." for w in WORDS))
    items = build_tasks([poem], n_train=5, n_test=2)
    assert {i["task"] for i in items.train} == set(FORM_TASKS)
    assert not {i["task"] for i in items.test} & set(CORPUS_TASKS)


# ---------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize(
    "reply, answer, task, ok",
    [("  Hamlet.\n", "Hamlet", "play_of_character", True),
     ("hamlet", "Hamlet", "play_of_character", True),
     ('"King Lear"', "King Lear", "play_of_line", True),
     ("King  Lear!", "King Lear", "play_of_line", True),
     ("Lear", "King Lear", "play_of_line", False),
     ("7.", "7", "count_words", True),
     ("seven", "7", "count_words", False),
     ("yourself", "yourself", "last_word", True),
     ("yourself and more", "yourself", "last_word", False),
     ("Who's there?", "Who's there?", "repeat", True),
     (" Who's there? \n", "Who's there?", "repeat", True),
     ("who's there?", "Who's there?", "repeat", False),
     ("Who's there", "Who's there?", "repeat", False)],
)  # fmt: skip
def test_answer_normalisation(reply, answer, task, ok):
    assert is_correct(reply, answer, task) is ok


def test_normalize_is_documented_exactly():
    assert normalize(' "Polonius." ', "speaker_of_line") == "polonius"
    assert normalize("A  B?!", "one_word") == "a b"
    assert normalize("  Keep. Case!  ", "repeat") == "Keep. Case!"


class FakeTok:
    """Just enough of a tokenizer for the scoring arithmetic."""

    bos_id, eos_id, pad_id, system_id, user_id, assistant_id, end_id = range(7)

    def encode(self, text):
        return [ord(c) for c in text]


def test_scores_per_task_overall_and_form_average(monkeypatch, tmp_path):
    items = [
        {"task": t, "messages": [{"role": "user", "content": q}], "answer": a}
        for t, q, a in [("repeat", "r1", "A b"), ("repeat", "r2", "C d"),
                        ("first_word", "f1", "A"), ("last_word", "l1", "b"),
                        ("play_of_line", "p1", "Hamlet")]
    ]  # fmt: skip
    replies = [" A b", "c d", "a.", "x", " hamlet"]
    monkeypatch.setattr(task_eval, "greedy_replies", lambda *args, **kw: replies)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=32))
    res = evaluate_tasks(model, FakeTok(), items, progress=False)
    assert res["tasks"]["repeat"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert res["tasks"]["first_word"]["accuracy"] == 1.0
    assert res["tasks"]["last_word"]["accuracy"] == 0.0
    assert res["overall"] == {"accuracy": 3 / 5, "correct": 3, "total": 5}
    assert res["form_average"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert [r["correct"] for r in res["items"]] == [True, False, True, False, True]
    path = save_eval(res, tmp_path)
    assert path.name == "eval.json" and '"form_average"' in path.read_text()
    table = format_table({"base": res, "sft": res})
    assert "repeat" in table and "50.0%" in table


def test_greedy_chat_replies_from_a_real_model(corpus, taskset, monkeypatch):
    tok = tokenizer.train_tokenizer([d.text for d in corpus[0]], vocab_size=400)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=128, vocab_size=400))
    items = taskset.test[::3]
    prompts = [render_prompt(tok, item["messages"][:1]) for item in items]  # the chat format
    calls = []

    def recording_complete(model, prompts, max_new_tokens, **kw):
        calls.append((list(prompts), list(max_new_tokens), kw["temperature"]))
        return complete(model, prompts, max_new_tokens, **kw)

    monkeypatch.setattr(task_eval, "complete", recording_complete)
    res = evaluate_tasks(model, tok, items, max_new_tokens=5, progress=False, batch_size=8)
    assert res["overall"]["total"] == len(items)
    assert [row for rows, _, _ in calls for row in rows] == prompts
    assert all(set(budgets) == {5} and temperature == 0.0 for _, budgets, temperature in calls)
    assert [len(rows) for rows, _, _ in calls][0] == 8  # batch_size prompts per batch,
    assert any(len({len(r) for r in rows}) > 1 for rows, _, _ in calls)  # of mixed lengths

    # Batched decoding gives what decoding each prompt alone gives.
    budgets = [1 + i % 6 for i in range(len(items))]
    batched = task_eval.greedy_replies(model, tok, prompts, budgets, batch_size=4)
    alone = [task_eval.greedy_replies(model, tok, [p], [b])[0]
             for p, b in zip(prompts, budgets, strict=True)]  # fmt: skip
    assert batched == alone
    assert [r["reply"] for r in res["items"]] == task_eval.greedy_replies(
        model, tok, prompts, [5] * len(items), batch_size=1
    )
