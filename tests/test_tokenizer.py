"""The tokenizer: lossless round trip, special tokens that text cannot forge, serialisation."""

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenizer
from errors import UserError
from tokenizer import SPECIAL_TOKENS, SentencePieceTokenizer, Tokenizer

CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n",
    "HAMLET:\n    To be, or not to be, that is the question:\n"
    "    Whether 'tis nobler in the mind to suffer\n\tThe slings and arrows.\n\n",
    "Numbers 1234 and 5678, tabs\tand  double  spaces, café, naïve, 東京, 😀.\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tokenizer.train_tokenizer(CORPUS * 20, vocab_size=400)


# Text built to hit the hard cases: whitespace runs, newlines, SentencePiece's own "▁",
# the special token strings, CJK, emoji, and any other character Hypothesis can think of.
FRAGMENTS = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "▁", "▁▁", " ▁", "<|user|>", "<|end|>",
             "<|", "|>", "<unk>", "<s>", "</s>", "<0x0A>", "東京", "😀", "👩‍💻", "\x00", "e\u0301",
             "ﬁ", "Ⅻ", "the", "The", "speak", "."]  # fmt: skip
tricky_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5))).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), tricky_text))
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert not set(ids) & set(tok.special_ids.values())


@pytest.mark.parametrize(
    "text",
    ["", " ", "  leading and trailing  ", "\n", "a\n\n\nb", "\t\tx", "▁", "a▁b", "NFKC: ﬁ Ⅻ ①",
     "never seen: ǅ ꙮ 𓀀", "café vs cafe\u0301"],
)  # fmt: skip
def test_round_trip_examples(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_newline_is_one_piece(tok):
    assert tok.encode("\n") == [tok.sp.piece_to_id("\n")]


@pytest.mark.parametrize("piece", list(SPECIAL_TOKENS.values()))
def test_special_tokens_cannot_be_injected(tok, piece):
    text = f"hello {piece} world {piece}"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == text


def test_special_ids_are_distinct_and_named(tok):
    ids = tok.special_ids
    assert list(ids) == list(SPECIAL_TOKENS)
    assert len(set(ids.values())) == len(ids)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ids["bos"], ids["eos"], ids["pad"])
    assert (tok.system_id, tok.user_id) == (ids["system"], ids["user"])
    assert (tok.assistant_id, tok.end_id) == (ids["assistant"], ids["end"])
    for name, id in ids.items():
        assert tok.id_to_piece(id) == SPECIAL_TOKENS[name]


def test_special_ids_decode_to_nothing(tok):
    hello = tok.encode("hello")
    ids = [tok.bos_id, *hello, tok.end_id, tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "hello"


def test_decode_never_crashes_on_any_id(tok):
    for id in range(tok.vocab_size):
        assert isinstance(tok.decode([id]), str)
    assert isinstance(tok.decode(list(range(tok.vocab_size))), str)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError):
        tok.decode([-100])


def test_encode_batch_matches_encode(tok):
    texts = ["one", "two ▁ three", "", "four\n"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_state_round_trip(tok, tmp_path):
    state = tok.state()
    assert state["kind"] == "sentencepiece" and isinstance(state["model"], bytes)
    assert state["model"] == tok.to_bytes()
    again = tokenizer.from_state(pickle.loads(pickle.dumps(state)))
    assert isinstance(again, SentencePieceTokenizer)
    assert again.vocab_size == tok.vocab_size and again.special_ids == tok.special_ids
    text = "To be, or not ▁ to be\n"
    assert again.encode(text) == tok.encode(text)
    tok.save(tmp_path / "tok.model")
    loaded = tokenizer.load_tokenizer(tmp_path / "tok.model")
    assert loaded.to_bytes() == tok.to_bytes()
    assert SentencePieceTokenizer.load(tmp_path / "tok.model").to_bytes() == tok.to_bytes()


def test_state_survives_torch_safe_load(tok, tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"tokenizer": tok.state()}, tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)["tokenizer"]
    assert tokenizer.from_state(state).to_bytes() == tok.to_bytes()


def test_training_is_deterministic(tok):
    assert tokenizer.train_tokenizer(CORPUS * 20, vocab_size=400).to_bytes() == tok.to_bytes()


def test_bad_models_and_kinds(tmp_path):
    with pytest.raises(UserError, match="not a valid SentencePiece model"):
        tokenizer.from_state({"kind": "sentencepiece", "model": b"garbage"})
    with pytest.raises(UserError, match="unknown tokenizer kind 'gpt3'"):
        tokenizer.from_state({"kind": "gpt3", "model": b""})
    with pytest.raises(UserError, match="no usable tokenizer state"):
        tokenizer.from_state({"model": b""})
    with pytest.raises(UserError, match="does not exist"):
        tokenizer.load_tokenizer(tmp_path / "missing.model")


def test_vocab_size_the_corpus_cannot_support():
    with pytest.raises(UserError, match="too large for this corpus: it supports at most"):
        tokenizer.train_tokenizer(["tiny corpus\n"], vocab_size=5000)
    with pytest.raises(UserError, match="too small"):
        tokenizer.train_tokenizer(["tiny corpus\n"], vocab_size=100)
    with pytest.raises(UserError, match="empty corpus"):
        tokenizer.train_tokenizer(["", ""], vocab_size=300)
