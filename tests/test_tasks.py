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
from data.judge import BUILTIN_MATCH, grade, is_correct, match_rule, normalize
from data.multiturn import HELD_OUT_SYSTEM_LINES, MAX_CHARS, TRAIN_SYSTEM_LINES
from data.plays import (
    bare_name,
    find_persons,
    find_speeches,
    resolve_speaker,
    speech_headings,
    without_persons_list,
)
from data.sources import Document
from data.tasks import (
    CORPUS_TASKS,
    FORM_TASKS,
    REPLY_PREFIX,
    TASKS,
    build_tasks,
    gather_sources,
    held_out_sources,
    line_answer,
    longest_word,
    mentions,
    usable_line,
)
from model import GPT, GPTConfig
from model.generate import complete
from tokenizer.chat import render_prompt
from train.core.files import save_eval
from train.eval import task_eval
from train.eval.task_eval import evaluate_tasks, format_table

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
# as build_tasks made them once names were held out from every task (issue 17): the same
# seed must keep giving the same items. Update it only for an intended change.
PINNED_ITEMS = "3d61b846f956217dfd461e12af02bb4d05ef2f4c91628a1f58ea23a359c8fa1a"


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
    from data.sources import DataConfig
    from data.tasks import TasksConfig, builtin_tasks
    from errors import UserError

    (tmp_path / "poem.txt").write_text(
        "\n".join(f"The river sings {w} tonight." for w in WORDS), encoding="utf-8"
    )
    data = DataConfig(name="poem", source="text", paths=[str(tmp_path / "poem.txt")], url=None,
                      sha256=None, tokenizer="sentencepiece", vocab_size=400, val_fraction=0.1,
                      seed=0, root=str(tmp_path), cache_dir=str(tmp_path))  # fmt: skip
    sizes = dict.fromkeys(TASKS, 4) | {"repeat": 9}

    def tasks(n_train) -> TasksConfig:
        return TasksConfig(weight=1.0, seed=1, n_train=n_train, n_test=2, n_val=0, multi_turn=0.0,
                           system_share=0.0, n_test_turns=0)  # fmt: skip

    counts = dict.fromkeys(FORM_TASKS, 0)  # a poem has no plays: form tasks only
    for item in builtin_tasks(tasks(sizes), data).train:
        counts[item["task"]] += 1
    assert counts == dict.fromkeys(FORM_TASKS, 4) | {"repeat": 9}
    assert len(builtin_tasks(tasks(3), data).train) == 3 * len(FORM_TASKS)  # one for every task
    with pytest.raises(UserError, match="tasks.n_train: give a size for each of"):
        tasks({"repeat": 9})
    with pytest.raises(UserError, match="tasks.n_train='many' is not valid: it must be an int"):
        tasks("many")  # as a mistyped command-line override gives it
    with pytest.raises(UserError, match="whole numbers >= 0.*one_word"):
        tasks(sizes | {"one_word": -1})


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
    assert is_correct(reply, answer, match_rule({"task": task})) is ok


def test_normalize_is_documented_exactly():
    assert normalize(' "Polonius." ', "normalised") == "polonius"
    assert normalize("A  B?!", "normalised") == "a b"
    assert normalize("  Keep. Case!  ", "exact") == "Keep. Case!"
    with pytest.raises(ValueError, match="unknown match rule"):
        normalize("x", "lenient")


@pytest.mark.parametrize(
    "item, reply, ok",
    [({"task": "first_word", "answer": "Now", "source": "Now is"}, "NOW!!", True),
     ({"task": "first_word", "answer": "Now", "source": "Now is", "match": "exact"}, "NOW!!",
      False),
     ({"task": "my_file", "answer": "Now"}, '"NOW!!"', False),  # a user's file: exact
     ({"task": "my_file", "answer": "Now"}, " Now\n", True),
     ({"task": "my_file", "answer": "Now", "match": "normalised"}, '"NOW!!"', True),
     ({"task": "repeat", "answer": "Now is", "source": "x"}, "now is", False)],
)  # fmt: skip
def test_each_item_is_judged_by_its_rule_and_grade_agrees(item, reply, ok):
    assert is_correct(reply, item["answer"], match_rule(item)) is ok
    assert (grade(item, reply) == 1.0) is ok  # the labeller's 1.0 is exactly "right"
    assert BUILTIN_MATCH["repeat"] == "exact" and set(BUILTIN_MATCH) == set(TASKS)


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
    assert res["tasks"]["repeat"] == {"accuracy": 0.5, "correct": 1, "total": 2, "match": "exact"}
    assert res["tasks"]["first_word"]["match"] == "normalised"
    assert res["tasks"]["first_word"]["accuracy"] == 1.0
    assert res["tasks"]["last_word"]["accuracy"] == 0.0
    assert res["overall"] == {"accuracy": 3 / 5, "correct": 3, "total": 5}
    assert res["form_average"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert [r["correct"] for r in res["items"]] == [True, False, True, False, True]
    path = save_eval(res, tmp_path)
    assert path.name == "eval.json" and '"form_average"' in path.read_text()
    table = format_table({"base": res, "sft": res})
    assert "repeat" in table and "50.0%" in table
    assert [line.split()[:2] for line in table.splitlines()[1:4]] == [
        ["repeat", "exact"], ["first_word", "normalised"], ["last_word", "normalised"]]  # fmt: skip
    assert res["item_set"]["count"] == 5 and len(res["item_set"]["fingerprint"]) == 16


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


# ---------------------------------------------------------------------------- the name split

PLAY_HEAD = """{title}

by A. Tester




PERSONS REPRESENTED.

{persons}

SCENE. Somewhere.



ACT I.

Scene I. A room.
"""


def named_play(title: str, persons: list[str], headings: list[str], others: list[str], rng):
    """A play whose lines often name a person of its own or of another play."""
    listed = "\n".join(f"{p}, a person." for p in persons)
    text = PLAY_HEAD.format(title=title.upper(), persons=listed)
    for k in range(160):
        line = make_line(rng)
        if k % 3 == 0:  # "Ferrex, thou art the king"
            line = f"{rng.choice(persons + others)} {line[0].lower()}{line[1:]}"
        text += f"\n{headings[k % len(headings)]}\n{' '.join(line.split()[:9])}\n"
    return text


@pytest.fixture(scope="module")
def named():
    rng = random.Random(5)
    a = ["Ferrex", "Porrex", "Videna", "Eubulus", "Arostus", "Dordan", "Queen Margaret",
         "King Henry", "Cloten"]  # fmt: skip
    b = ["Marigold", "Bartholomew", "Cicely", "Jasper", "Rowena", "Tobias", "Margaret",
         "Osric"]  # fmt: skip
    a_heads = [f"{p.upper()}." for p in a]
    b_heads = [f"{p.upper()}." for p in b] + ["KING HENRY."]  # speaks here, listed there
    docs = [Document("tragedy_of_ferrex", named_play("Ferrex", a, a_heads, b, rng)),
            Document("life_of_rowan", named_play("Life of Rowan", b, b_heads, a, rng))]  # fmt: skip
    return docs, build_tasks(docs, seed=2, n_train=60, n_test=10, test_fraction=0.3)


def test_a_held_out_name_is_in_no_training_item_of_any_task(named):
    docs, taskset = named
    sources = gather_sources(docs)
    held = sorted(held_out_sources(sources, 2, 0.3) & set(sources.names))
    assert len(held) >= 3
    training_text = [m["content"] for item in taskset.train for m in item["messages"]]
    for name in held:
        assert not any(mentions([name], text) for text in training_text), name
    assert any(mentions(held, m["content"]) for i in taskset.test for m in i["messages"])
    asked = {i["source"] for i in taskset.test if i["task"] == "play_of_character"}
    assert asked and asked <= set(held)
    speakers = {i["answer"] for i in taskset.train if i["task"] == "speaker_of_line"}
    assert speakers and not speakers & set(held)


def test_a_name_in_several_plays_is_not_asked_and_title_names_are_never_held_out(named):
    docs, taskset = named
    sources = gather_sources(docs)
    # "Queen Margaret" is listed in one play, but a Margaret is in the other; "King Henry"
    # is listed in one and speaks in the other: which play "has" them is ambiguous.
    assert "Queen Margaret" not in sources.characters and "King Henry" not in sources.characters
    assert sources.characters["Cloten"] == "Tragedy of Ferrex"
    assert sources.characters["Osric"] == "Life of Rowan"
    assert "Ferrex" not in sources.names  # the title of a play: an answer everywhere
    asked = {i["source"] for i in taskset.train + taskset.test if i["task"] == "play_of_character"}
    assert not asked & {"Queen Margaret", "King Henry", "Margaret", "Ferrex"}


def test_the_name_split_on_a_play_with_role_headings():
    assert bare_name("Queen Margaret") == "Margaret" and bare_name("King Henry V") == "Henry V"
    assert bare_name("Sir Toby Belch") == "Toby Belch" and bare_name("Queen") == "Queen"
    assert speech_headings("\n\nKING HENRY.\nWe are no tyrant.\n\nHam.\nA line.\n") == {
        "King Henry", "Ham"}  # fmt: skip
    assert mentions(["Ros"], "Ros is here") and not mentions(["Ros"], "Rosalind is here")


# ---------------------------------------------------------------------------- conversations


@pytest.fixture(scope="module")
def conversations(corpus):
    return build_tasks(corpus[0], seed=3, n_train=40, n_test=8, multi_turn=0.5,
                       system_share=0.3, n_test_turns=6)  # fmt: skip


def questions(item: dict) -> list[str]:
    return [m["content"] for m in item["messages"] if m["role"] == "user"]


def test_training_conversations_ask_several_questions_and_some_have_a_system_line(
    conversations, taskset
):
    train = conversations.train
    sizes = [len(questions(item)) for item in train]
    assert set(sizes) == {1, 2, 3} and sum(sizes) == len(taskset.train)  # every item asked
    assert sorted(q for item in train for q in questions(item)) == sorted(
        q for item in taskset.train for q in questions(item))  # fmt: skip
    systems = [item["messages"][0]["content"] for item in train
               if item["messages"][0]["role"] == "system"]  # fmt: skip
    assert 0.15 < len(systems) / len(train) < 0.45 and set(systems) <= set(TRAIN_SYSTEM_LINES)
    for item in train:  # each answer follows its own question; every answer is trained
        roles = [m["role"] for m in item["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(m.get("weight", 1) == 1 for m in item["messages"])
        assert item["messages"][-1]["content"] == REPLY_PREFIX + item["answer"]
        assert sum(len(m["content"]) for m in item["messages"]) <= MAX_CHARS or len(
            questions(item)) <= 2  # fmt: skip
    assert conversations.test == taskset.test  # the items asked alone are the same


def test_held_out_conversations_ask_held_out_items_later_with_held_out_system_lines(
    conversations,
):
    test, turns = conversations.test, conversations.test_turns
    asked_alone = {q for item in test for q in questions(item)}
    trained = {q for item in conversations.train for q in questions(item)}
    per_task = {t: sum(i["task"] == t for i in turns) for t in TASKS}
    assert all(n == min(6, sum(i["task"] == t for i in test)) for t, n in per_task.items())
    assert {i["turn"] for i in turns} == {2, 3}
    for item in turns:
        qs = questions(item)
        assert len(qs) == item["turn"] and set(qs) <= asked_alone and not set(qs) & trained
        twin = [i for i in test if i["task"] == item["task"] and i["source"] == item["source"]]
        assert len(twin) == 1 and qs[-1] == questions(twin[0])[0]  # the same item, asked later
        answers = [m for m in item["messages"] if m["role"] == "assistant"]
        assert [m.get("weight", 1) for m in answers] == [0] * (len(answers) - 1) + [1]
        if item["system"]:
            assert item["messages"][0]["content"] in HELD_OUT_SYSTEM_LINES
    assert any(i["system"] for i in turns)
    assert not set(HELD_OUT_SYSTEM_LINES) & set(TRAIN_SYSTEM_LINES)


def test_answers_are_scored_per_turn_beside_the_same_items_asked_alone(monkeypatch, conversations):
    items = conversations.test + conversations.test_turns
    right = {id(i) for i in items[::2]}
    replies = [" " + i["answer"] if id(i) in right else " nothing" for i in items]
    monkeypatch.setattr(task_eval, "greedy_replies", lambda *args, **kw: replies)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=32))
    res = evaluate_tasks(model, FakeTok(), items, progress=False)
    assert res["overall"]["total"] == len(conversations.test)  # the items asked alone
    turns = res["turns"]
    assert turns["1"]["total"] == len(conversations.test)
    assert turns["2"]["total"] + turns["3"]["total"] == len(conversations.test_turns)
    for k in ("2", "3"):
        later = [i for i in items if i.get("turn") == int(k)]
        twins = [t for i in later for t in conversations.test
                 if (t["task"], t["source"]) == (i["task"], i["source"])]  # fmt: skip
        assert turns[k]["accuracy"] == sum(id(i) in right for i in later) / len(later)
        assert turns[k]["single_turn"] == sum(id(t) in right for t in twins) / len(twins)
    assert turns["system"]["total"] == sum(bool(i.get("system")) for i in conversations.test_turns)
    table = format_table({"sft": res})
    assert "answer 2" in table and "answer 3" in table and "after a system line" in table
