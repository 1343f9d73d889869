"""Text to token ids and back: SentencePiece training and loading, GPT-2's BPE, special tokens,
the chat format, and the Hugging Face form of our tokenizers (tokenizer/hf.py).

    tok = train_tokenizer(texts, vocab_size=4096)     # or load_tokenizer(path)
    ids = tok.encode("To be, or not to be")
    tok.decode(ids)                                   # the same text, exactly
    ckpt["tokenizer"] = tok.state()                   # {"kind": ..., "model": bytes}
    tok = from_state(ckpt["tokenizer"])

Callers depend only on `Tokenizer` (tokenizer/base.py). A new kind is a `Tokenizer`
subclass added to KINDS (and to TRAINERS if this project trains it); nothing else changes.
"""

from collections.abc import Callable, Iterable
from pathlib import Path

from errors import UserError
from tokenizer.base import Tokenizer
from tokenizer.gpt2 import GPT2BPETokenizer
from tokenizer.sentencepiece import SentencePieceTokenizer, train_sentencepiece
from tokenizer.special import SPECIAL_TOKENS

# kind -> class; from_state and load_tokenizer dispatch on it.
KINDS: dict[str, type[Tokenizer]] = {
    SentencePieceTokenizer.kind: SentencePieceTokenizer,
    GPT2BPETokenizer.kind: GPT2BPETokenizer,  # a pretrained GPT-2's (loaded, never trained here)
}

# kind -> function(texts, vocab_size) training a new tokenizer of that kind.
TRAINERS: dict[str, Callable[..., Tokenizer]] = {
    SentencePieceTokenizer.kind: train_sentencepiece,
}

__all__ = [
    "KINDS",
    "GPT2BPETokenizer",
    "SPECIAL_TOKENS",
    "SentencePieceTokenizer",
    "Tokenizer",
    "from_state",
    "load_tokenizer",
    "train_tokenizer",
]


def _kind(kind: str, table: dict) -> object:
    if kind not in table:
        raise UserError(f"unknown tokenizer kind '{kind}'; known kinds: {', '.join(table)}")
    return table[kind]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, kind: str = "sentencepiece"
) -> Tokenizer:
    """Train a tokenizer of `kind` with `vocab_size` ids on an iterable of documents."""
    return _kind(kind, TRAINERS)(texts, vocab_size)


def from_state(state: dict) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint stored with `Tokenizer.state()`."""
    if not isinstance(state, dict) or "kind" not in state or "model" not in state:
        raise UserError("checkpoint has no usable tokenizer state; the file is damaged, retrain")
    return _kind(state["kind"], KINDS).from_bytes(state["model"])


def load_tokenizer(path: str | Path, kind: str = "sentencepiece") -> Tokenizer:
    """Load a tokenizer model file written by `Tokenizer.save`."""
    path = Path(path)
    cls = _kind(kind, KINDS)
    if not path.is_file():
        raise UserError(f"tokenizer model {path} does not exist; run `python -m data.prepare`")
    return cls.from_bytes(path.read_bytes())
