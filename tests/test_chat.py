"""The chat format: the loss mask covers exactly the assistant's tokens and end-of-turn
tokens, text cannot forge a turn, and fit_to_context keeps the final reply or drops."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenizer
from tokenizer.chat import ChatFormatError, fit_to_context, render_conversation, render_prompt
from tokenizer.special import SPECIAL_TOKENS

CORPUS = [
    "Who's there? Nay, answer me: stand, and unfold yourself.\n\nLong live the king!\n",
    "To be, or not to be, that is the question.\nWhich play has a character named Polonius?\n",
]


@pytest.fixture(scope="module")
def tok():
    return tokenizer.train_tokenizer(CORPUS * 10, vocab_size=300)


def chat(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def role_ids(tok):
    return {tok.system_id, tok.user_id, tok.assistant_id}


def specials(tok):
    return set(tok.special_ids.values())


message = st.tuples(st.sampled_from(["user", "assistant"]), st.text(max_size=30))
conversation = st.tuples(
    st.one_of(st.none(), st.text(max_size=20)), st.lists(message, min_size=1, max_size=5)
).map(lambda sc: ([("system", sc[0])] if sc[0] is not None else []) + sc[1])


@settings(max_examples=150, deadline=None)
@given(conversation)
def test_mask_is_exactly_the_assistant_tokens_and_their_end(tok, pairs):
    messages = chat(*pairs)
    ids, mask = render_conversation(tok, messages)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    assert ids[0] == tok.bos_id and mask[0] == 0

    # Walk the ids turn by turn: every role id opens a turn that its end id closes.
    turns, i = [], 1
    while i < len(ids):
        assert ids[i] in role_ids(tok) and mask[i] == 0
        j = ids.index(tok.end_id, i + 1)
        turns.append((ids[i], ids[i + 1 : j], mask[i + 1 : j + 1]))
        i = j + 1
    assert len(turns) == len(messages)
    for (role, body, body_mask), m in zip(turns, messages, strict=True):
        assert tok.decode(body) == m["content"]
        assert not set(body) & specials(tok)  # content never yields a control id
        want = 1 if m["role"] == "assistant" else 0
        assert body_mask == [want] * (len(body) + 1)  # content and its end id
        assert role == {"system": tok.system_id, "user": tok.user_id}.get(
            m["role"], tok.assistant_id
        )
    n_trained = sum(len(tok.encode(m["content"])) + 1 for m in messages if m["role"] == "assistant")
    assert sum(mask) == n_trained


@pytest.mark.parametrize("piece", list(SPECIAL_TOKENS.values()))
def test_content_cannot_forge_a_turn(tok, piece):
    messages = chat(("user", f"hi {piece} there{piece}"), ("assistant", f"{piece}ok {piece}"))
    ids, mask = render_conversation(tok, messages)
    structural = [tok.bos_id, tok.user_id, tok.end_id, tok.assistant_id, tok.end_id]
    assert [i for i in ids if i in specials(tok)] == structural
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == f"{piece}ok {piece}"


def test_prompt_is_the_prefix_the_reply_follows(tok):
    history = chat(("system", "Be brief."), ("user", "Who's there?"))
    prompt = render_prompt(tok, history)
    full, mask = render_conversation(tok, history + chat(("assistant", "Long live the king!")))
    assert prompt[-1] == tok.assistant_id
    assert full[: len(prompt)] == prompt
    assert sum(mask[: len(prompt)]) == 0 and all(mask[len(prompt) :])
    assert render_prompt(tok, []) == [tok.bos_id, tok.assistant_id]


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"role": "user"}],
        [{"role": "user", "content": 3}],
        [{"role": "robot", "content": "x"}],
        [{"content": "x"}],
        ["just a string"],
        chat(("user", "hi"), ("system", "late system message")),
    ],
)
def test_malformed_conversations_are_refused(tok, messages):
    with pytest.raises(ChatFormatError):
        render_conversation(tok, messages)
    assert issubclass(ChatFormatError, ValueError)


def test_render_prompt_validates_too(tok):
    with pytest.raises(ChatFormatError, match="message 1"):
        render_prompt(tok, chat(("user", "hi"), ("system", "no")))


LONG = chat(
    ("system", "Be brief."),
    ("user", "To be, or not to be, that is the question."),
    ("assistant", "Long live the king!"),
    ("user", "Who's there?"),
    ("assistant", "Nay, answer me."),
)


def test_fit_to_context_leaves_a_fitting_conversation_alone(tok):
    ids, mask = render_conversation(tok, LONG)
    assert fit_to_context(ids, mask, len(ids)) == (ids, mask)
    assert fit_to_context(ids, mask, len(ids) + 5) == (ids, mask)


def test_fit_to_context_keeps_bos_and_the_final_reply(tok):
    ids, mask = render_conversation(tok, LONG)
    reply_ids, reply_mask = render_conversation(tok, LONG[-1:])  # bos + the final turn
    reply_len = len(reply_ids) - 1
    for max_len in range(reply_len + 1, len(ids)):
        got = fit_to_context(ids, mask, max_len)
        assert got is not None, max_len
        new_ids, new_mask = got
        assert len(new_ids) == len(new_mask) == max_len
        assert new_ids[0] == tok.bos_id and new_mask[0] == 0
        assert new_ids[1:] == ids[len(ids) - max_len + 1 :]  # the most recent ids
        assert new_ids[-reply_len:] == reply_ids[1:]  # the final reply, whole
        assert new_mask[-reply_len:] == reply_mask[1:]
        assert sum(new_mask) <= sum(mask)


def test_fit_to_context_untrains_a_reply_whose_start_was_cut(tok):
    ids, mask = render_conversation(tok, LONG)
    first_reply = tok.encode("Long live the king!")
    assert len(first_reply) >= 3
    start = ids.index(tok.assistant_id)  # the first assistant turn
    # Keep bos and everything from the middle of the first reply's content.
    max_len = len(ids) - (start + 3) + 1
    new_ids, new_mask = fit_to_context(ids, mask, max_len)
    orphan = len(first_reply) - 2 + 1  # content left after the cut, and its end id
    assert new_ids[1 : 1 + orphan - 1] == first_reply[2:]
    assert new_mask[1 : 1 + orphan] == [0] * orphan
    assert sum(new_mask) == len(tok.encode("Nay, answer me.")) + 1


def test_fit_to_context_drops_when_the_final_reply_cannot_fit(tok):
    ids, mask = render_conversation(tok, LONG)
    reply_len = len(render_conversation(tok, LONG[-1:])[0]) - 1
    assert fit_to_context(ids, mask, reply_len) is None
    assert fit_to_context(ids, mask, 2) is None
    with pytest.raises(ValueError):
        fit_to_context(ids, mask[:-1], 10)
