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
        ({"prompt": "x"}, "no 'completion'"),
        ({"question": "x", "answer": "y"}, "unknown format"),
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
    [("", "holds no records"), ("\n\n", "holds no records"), ("[]", "holds no records"),
     ('[{"a": 1', r"starts with '\[' but is not a valid JSON array \(line 1, column 9")],
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


# ---------------------------------------------------------------------------- more layouts

MESSAGES = [{"role": "user", "content": "Who's there?"},
            {"role": "assistant", "content": "Nay, answer me."}]  # fmt: skip


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"conversations": [{"from": "system", "value": "Be brief."},
                            {"from": "human", "value": "Who's there?"},
                            {"from": "gpt", "value": "Nay, answer me."}]},
         [{"role": "system", "content": "Be brief."}, *MESSAGES]),
        ({"conversations": MESSAGES}, MESSAGES),  # ShareGPT written with role/content
        ({"prompt": "Who's there?", "completion": "Nay, answer me."}, MESSAGES),
        ({"prompt": [{"role": "user", "content": "Who's there?"}],
          "completion": [{"role": "assistant", "content": "Nay, answer me."}]}, MESSAGES),
        ({"messages": [{"role": "developer", "content": "Be brief."}, *MESSAGES]},
         [{"role": "system", "content": "Be brief."}, *MESSAGES]),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Who's "},
                                                    {"type": "text", "text": "there?"}]},
                       {"role": "assistant", "content": [{"type": "text",
                                                          "text": "Nay, answer me."}]}]},
         MESSAGES),
        ({"instruction": "Who's there?", "input": None, "output": "Nay, answer me."}, MESSAGES),
    ],
)  # fmt: skip
def test_the_common_layouts_are_read(record, expected):
    assert to_conversation(record) == expected


@pytest.mark.parametrize(
    "record",
    [
        {"system": "Be brief.", "conversations": [{"from": "human", "value": "Who's there?"},
                                                  {"from": "gpt", "value": "Nay, answer me."}]},
        {"system": "Be brief.", "messages": MESSAGES},
        {"system": "Be brief.", "instruction": "Who's there?", "output": "Nay, answer me."},
        {"system": "Be brief.", "prompt": "Who's there?", "completion": "Nay, answer me."},
    ],
)  # fmt: skip
def test_a_top_level_system_prompt_is_kept(record):
    """LLaMA-Factory's layouts carry the system prompt beside the turns, as "system"."""
    assert to_conversation(record) == [{"role": "system", "content": "Be brief."}, *MESSAGES]
    assert to_conversation({**record, "system": ""}) == MESSAGES  # empty: no system turn


@pytest.mark.parametrize(
    "record, why",
    [
        ({"system": 3, "messages": MESSAGES}, "'system' must be a string"),
        ({"system": "Be brief.", "messages": [{"role": "system", "content": "Be long."},
                                              *MESSAGES]},
         "a system prompt both in 'system' and as the first message"),
    ],
)  # fmt: skip
def test_a_wrong_top_level_system_prompt_is_refused(record, why):
    with pytest.raises(ValueError, match=why):
        to_conversation(record)


def test_the_sharegpt_error_lists_exactly_the_roles_it_accepts():
    from data.instruct import SHAREGPT_ROLES

    with pytest.raises(ValueError) as e:
        to_conversation({"conversations": [{"from": "bot", "value": "x"}]})
    listed = str(e.value).split("use one of ", 1)[1]
    assert sorted(r.strip() for r in listed.replace(" or ", ", ").split(",")) == sorted(
        SHAREGPT_ROLES
    )


def test_a_directory_given_as_a_data_file_says_so(tmp_path):
    with pytest.raises(UserError, match=f"data file {tmp_path} is a directory, not a file"):
        load_instruction_data([tmp_path], log=lambda m: None)


def test_trl_conversational_prompts_train_only_the_completion(tok):
    record = {
        "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}],
        "completion": [{"role": "assistant", "content": "d"}],
    }  # fmt: skip
    conversation = to_conversation(record)
    assert [m.get("weight", 1) for m in conversation] == [1, 0, 1, 1]
    ids, mask = render_conversation(tok, conversation)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert trained == tok.encode("d") + [tok.end_id]


@pytest.mark.parametrize(
    "record, why",
    [
        ({"messages": [*MESSAGES[:1], {"role": "assistant", "content": None,
                       "tool_calls": [{"id": "1", "type": "function"}]}]}, "tool calls"),
        ({"messages": [*MESSAGES, {"role": "tool", "content": "42", "tool_call_id": "1"},
                       MESSAGES[1]]}, "tool calls"),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "defines tools.*tool calls"),
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call",
                            "value": "{}"}, {"from": "gpt", "value": "y"}]},
         "function_call turn.*tool calls"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                       MESSAGES[1]]}, "part of type 'image_url'.*only text"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "from 'bot'"),
        ({"instruction": "x", "input": 0, "output": "y"}, "'input' must be a string, got int 0"),
        ({"instruction": "x", "input": [], "output": "y"}, "'input' must be a string"),
        ({"instruction": "x", "input": False, "output": "y"}, "'input' must be a string"),
        ({"instruction": "x", "context": 0, "response": "y"}, "'context' must be a string"),
        ({"messages": [MESSAGES[0], {**MESSAGES[1], "weight": 0}]}, "weight 0: nothing"),
        ({"messages": [MESSAGES[0], {**MESSAGES[1], "weight": 2}]}, "weight 2"),
        ({"messages": [{**MESSAGES[0], "weight": 0}, MESSAGES[1]]}, "only on an assistant"),
    ],
)  # fmt: skip
def test_unsupported_and_wrong_records_are_refused_one_by_one(record, why):
    with pytest.raises(ValueError, match=why):
        to_conversation(record)


def test_a_turn_with_weight_0_is_context_not_training(tok):
    messages = [MESSAGES[0], {**MESSAGES[1], "weight": 0}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "weight": 1}]  # fmt: skip
    conversation = to_conversation({"messages": messages})
    ids, mask = render_conversation(tok, conversation)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert trained == tok.encode("b") + [tok.end_id]  # "Nay, answer me." is not trained
    unweighted = render_conversation(tok, to_conversation({"messages": MESSAGES}))
    assert sum(unweighted[1]) == len(tok.encode(MESSAGES[1]["content"])) + 1


BOM = "\ufeff"


@pytest.mark.parametrize("name", ["data.json", "data.jsonl", "data.txt"])
@pytest.mark.parametrize("layout", ["array", "lines", "one object"])
def test_layouts_are_recognised_by_content_with_or_without_a_bom(tmp_path, name, layout):
    if layout == "array":
        text = json.dumps([ALPACA, DOLLY], indent=1)
    elif layout == "lines":  # what datasets.Dataset.to_json writes, even into a .json file
        text = json.dumps(ALPACA) + "\n" + json.dumps(DOLLY) + "\n"
    else:
        text = json.dumps(CHAT, indent=2)
    expected = [to_conversation(CHAT)] if layout == "one object" else [
        to_conversation(ALPACA), to_conversation(DOLLY)]  # fmt: skip
    for prefix in ("", BOM):
        path = tmp_path / name
        path.write_text(prefix + text, encoding="utf-8")
        report = read_instruction_file(path, max_bad_fraction=0, log=lambda m: None)
        assert report.conversations == expected and not report.malformed


def test_files_joined_with_their_byte_order_marks_lose_no_record(tmp_path):
    path = tmp_path / "joined.jsonl"
    path.write_text(f"{BOM}{json.dumps(ALPACA)}\n{BOM}{json.dumps(DOLLY)}\n", encoding="utf-8")
    report = read_instruction_file(path, max_bad_fraction=0, log=lambda m: None)
    assert len(report.conversations) == 2


def test_a_json_error_names_the_real_line_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    bad = '{"instruction": "Dites «bonjour»", "output" "x"}'
    column = bad.index('"x"') + 1  # where the colon is missing, as an editor counts
    path.write_text(BOM + json.dumps(ALPACA) + "\n" + bad + "\n" + BOM + bad + "\n")
    report = read_instruction_file(path, max_bad_fraction=1, log=lambda m: None)
    assert report.malformed == [
        f"{path}:line 2: not valid JSON (column {column}: Expecting ':' delimiter)",
        f"{path}:line 3: not valid JSON (column {column + 1}: Expecting ':' delimiter)",
    ]
    array = tmp_path / "bad.json"
    array.write_text(BOM + "[\n" + json.dumps(ALPACA) + ",\n" + bad + "\n]")
    with pytest.raises(UserError, match=rf"line 3, column {column}: Expecting ':' delimiter"):
        read_instruction_file(array, log=lambda m: None)


def test_conversations_cut_or_dropped_for_length_are_reported_by_file_and_line(tok, tmp_path):
    long = {"messages": [{"role": "user", "content": "abcdefghijklm " * 20}, MESSAGES[1]]}
    huge = {"messages": [MESSAGES[0], {"role": "assistant", "content": "abcdefghijklm " * 20}]}
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA, long, ALPACA, huge])
    conversations = load_instruction_data([path], seed=0, log=lambda m: None)
    block = len(render_conversation(tok, to_conversation(ALPACA))[0]) + 4
    _, report = render_examples(tok, conversations, block)
    assert (report.truncated, report.dropped) == (1, 1)
    assert report.details(block) == [
        f"{path}:line 2: cut on the left to fit the context ({block} tokens)",
        f"{path}:line 4: dropped: its last reply alone exceeds {block} tokens",
    ]


@pytest.mark.parametrize(
    "entry, why",
    [
        ({"path": "a.jsonl", "weight": "abc"}, "weight 'abc' of a.jsonl must be a number >= 0"),
        ({"path": "a.jsonl", "weight": None}, "weight None"),
        ({"file": "a.jsonl"}, "is not a file entry; give a path"),
        ({"path": "a.jsonl", "wieght": 2}, r"unknown keys \['wieght'\]"),
        (3, "is not a file entry"),
    ],
)
def test_bad_file_entries_are_one_line(entry, why):
    with pytest.raises(UserError, match=why):
        load_instruction_data([entry], log=lambda m: None)


def test_file_entries_of_a_hydra_config_are_read(tmp_path):
    from omegaconf import OmegaConf

    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA] * 4)
    sources = OmegaConf.create([{"path": str(path), "weight": 0.5}, str(path)])
    assert len(load_instruction_data(sources, log=lambda m: None)) == 2 + 4
