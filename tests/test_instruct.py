"""Instruction data: formats, malformed records, thresholds, mixing, rendered examples."""

import json

import pytest

import tokenizer
from data.instruct import (
    load_instruction_data,
    mix,
    read_instruction_file,
    render_examples,
    to_conversation,
)
from errors import UserError
from tokenizer.chat import render_conversation

ALPACA = {"instruction": "Name a play.", "input": "By Shakespeare.", "output": "Hamlet"}
ALPACA_NO_INPUT = {"instruction": "Say hi.", "input": "", "output": "Hi."}
DOLLY = {"instruction": "Summarise.", "context": "To be or not.", "response": "A doubt.",
         "category": "summarization"}  # fmt: skip
CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Who's there?"},
                     {"role": "assistant", "content": "Nay, answer me."},
                     {"role": "user", "content": "Long live the king!"},
                     {"role": "assistant", "content": "Bernardo?"}]}  # fmt: skip


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_each_format_becomes_a_conversation():
    assert to_conversation(ALPACA) == [
        {"role": "user", "content": "Name a play.\n\nBy Shakespeare."},
        {"role": "assistant", "content": "Hamlet"},
    ]
    assert to_conversation(ALPACA_NO_INPUT)[0] == {"role": "user", "content": "Say hi."}
    assert to_conversation(DOLLY) == [
        {"role": "user", "content": "Summarise.\n\nTo be or not."},
        {"role": "assistant", "content": "A doubt."},
    ]
    assert to_conversation(CHAT) == CHAT["messages"]


@pytest.mark.parametrize(
    "record, why",
    [
        ({"prompt": "x", "completion": "y"}, "unknown format"),
        ({"instruction": "x"}, "no 'output'"),
        ({"instruction": "", "output": "y"}, "must not be empty"),
        ({"instruction": "x", "output": 3}, "must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "last message"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
         "role"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                       {"role": "assistant", "content": "c"}]}, "system"),
        ([1, 2], "JSON object"),
    ],
)  # fmt: skip
def test_malformed_records_say_why(record, why):
    with pytest.raises(ValueError, match=why):
        to_conversation(record)


def test_jsonl_malformed_records_are_reported_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA, DOLLY, "{not json", CHAT] * 10 +
                       [{"oops": 1}])  # fmt: skip
    logged = []
    report = read_instruction_file(path, max_bad_fraction=0.5, log=logged.append)
    assert report.records == 41 and len(report.conversations) == 30
    assert report.malformed[0].startswith(f"{path}:line 3: not valid JSON")
    assert report.malformed[-1].startswith(f"{path}:line 41: unknown format")
    assert f"{path}:line 7:" in logged[1]  # each malformed record is logged, up to ten
    assert "and 1 more" in logged[-1]


def test_json_array_records_are_reported_by_index(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ALPACA, {"instruction": "x"}, CHAT] * 2))
    report = read_instruction_file(path, max_bad_fraction=0.5, log=lambda m: None)
    assert len(report.conversations) == 4
    assert report.malformed == [
        f"{path}:index 1: has 'instruction' but no 'output' (Alpaca) or 'response' (Dolly)",
        f"{path}:index 4: has 'instruction' but no 'output' (Alpaca) or 'response' (Dolly)",
    ]


def test_too_many_malformed_records_refuse_to_start(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ALPACA] * 8 + [{"x": 1}] * 2)
    read_instruction_file(path, max_bad_fraction=0.2, log=lambda m: None)  # 20%: allowed
    with pytest.raises(UserError, match=r"2 of 10 records \(20%\) are malformed"):
        read_instruction_file(path, max_bad_fraction=0.1, log=lambda m: None)


@pytest.mark.parametrize(
    "content, why",
    [("", "holds no records"), ("\n\n", "holds no records"), ('[{"a": 1', "not valid JSON"),
     ('{"instruction": "x", "output": "y"}', "JSON array")],
)  # fmt: skip
def test_unusable_files_are_user_errors(tmp_path, content, why):
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(UserError, match=why):
        read_instruction_file(path, log=lambda m: None)


def test_missing_file_and_nothing_to_train_on(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_instruction_data([tmp_path / "nope.jsonl"], log=lambda m: None)
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA])
    with pytest.raises(UserError, match="nothing to train on|no instruction data"):
        load_instruction_data([{"path": path, "weight": 0}], log=lambda m: None)


def test_mixture_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [ALPACA] * 10)
    d = write_jsonl(tmp_path / "d.jsonl", [DOLLY] * 10)
    c = tmp_path / "c.json"
    c.write_text(json.dumps([CHAT] * 4))
    sources = [{"path": str(a), "weight": 2}, {"path": str(d), "weight": 0.3}, str(c)]
    mixed = load_instruction_data(sources, seed=1, log=lambda m: None)
    assert len(mixed) == 20 + 3 + 4
    assert sum(m == to_conversation(DOLLY) for m in mixed) == 3
    items = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}]
             for i in range(10)]  # fmt: skip
    assert mix([(items, 0.5)], seed=1) == mix([(items, 0.5)], seed=1)
    assert mix([(items, 0.5)], seed=1) != mix([(items, 0.5)], seed=2)
    with pytest.raises(UserError):
        mix([(items, -1)])


# ---------------------------------------------------------------------------- examples


@pytest.fixture(scope="module")
def tok():
    text = json.dumps([ALPACA, DOLLY, CHAT]) + " numbers 0123456789 and letters abcdefghijklm"
    return tokenizer.train_tokenizer([text] * 20, vocab_size=320)


def test_render_examples_counts_truncated_and_dropped(tok):
    convs = [to_conversation(CHAT), to_conversation(ALPACA)]
    full = [len(render_conversation(tok, c)[0]) for c in convs]
    reply_len = len(render_conversation(tok, CHAT["messages"][-1:])[0])  # bos + final turn
    block = max(full[1], reply_len) + 1  # ALPACA fits; CHAT must be cut
    assert full[0] > block + 1
    examples, report = render_examples(tok, convs, block_size=block)
    assert (report.examples, report.truncated, report.dropped) == (2, 1, 0)
    assert all(len(ids) <= block + 1 for ids, _ in examples)
    _, report = render_examples(tok, convs + [to_conversation(CHAT)], block_size=reply_len - 2)
    assert report.dropped >= 2
    with pytest.raises(UserError, match="nothing to train on"):
        render_examples(tok, [to_conversation(CHAT)], block_size=3)
