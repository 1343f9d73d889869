"""GPT-2's byte-level BPE behind the `Tokenizer` interface: the tokenizer of a pretrained GPT-2.

A GPT-2 from Hugging Face comes with its own tokenizer (tokenizer.json, or vocab.json and
merges.txt): a byte-level BPE, which writes every UTF-8 byte as one of 256 base symbols and
merges them, so that any text encodes and decodes losslessly. This kind wraps that tokenizer
as the `tokenizers` library runs it (installed with transformers, the 'hf' extra); nothing
of BPE is re-implemented here.

Ids:
    0 .. base-1              the pretrained tokenizer's own (GPT-2: base = 50257, its
                             <|endoftext|> is 50256)
    base .. base+6           our control tokens, in SPECIAL_TOKENS order (tokenizer/special.py)
    base+7 .. vocab_size-1   unused: vocab_size is rounded up to a multiple of 64 (GPT-2:
                             50264 -> 50304), the shape GPU matrix multiplies prefer

The control tokens are not registered in the wrapped tokenizer at all: only code inserts
them, by id, so no text can produce them. The wrapped tokenizer's own special tokens are a
different matter: `tokenizers` finds them in the text by default (a typed "<|endoftext|>"
would become id 50256); `encode_special_tokens = True` turns that off, so they too are
ordinary text. Decoding drops every id that is not text: our control ids, the unused ids
and the wrapped tokenizer's special tokens.

The bytes stored in checkpoints (`to_bytes`) are the wrapped tokenizer's JSON, exactly what
tokenizer.json holds; the ids above follow from it.
"""

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from errors import UserError
from tokenizer.base import Tokenizer
from tokenizer.special import SPECIAL_TOKENS

HF_EXTRA = "pip install -e '.[hf]'"
VOCAB_MULTIPLE = 64  # vocab_size is rounded up to a multiple of this
# A local model directory holds its tokenizer as one of these sets of files.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
# Text that every lossless tokenizer gives back unchanged: leading, repeated and trailing
# spaces, tabs and newlines, upper case, accents, an emoji, a special token's spelling.
PROBE = "  Hello,\tWorld!\n\nCafé 😀 <|endoftext|> x  "


def padded_vocab_size(n: int) -> int:
    """n rounded up to a multiple of VOCAB_MULTIPLE: 50264 -> 50304."""
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _tokenizers() -> Any:
    """Import the `tokenizers` library, or explain which extra to install."""
    try:
        import tokenizers
    except ImportError:
        raise UserError(
            f"GPT-2's tokenizer needs the 'hf' extra (tokenizers, transformers); install it "
            f"with: {HF_EXTRA}"
        ) from None
    return tokenizers


class GPT2BPETokenizer(Tokenizer):
    """A Hugging Face byte-level BPE tokenizer (GPT-2's), with our control tokens after it."""

    kind = "gpt2"

    def __init__(self, model: bytes):
        tokenizers = _tokenizers()
        model = bytes(model)
        try:
            bpe = tokenizers.Tokenizer.from_str(model.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exceptions for bad JSON
            raise UserError(
                f"tokenizer model is not a valid Hugging Face tokenizer.json ({_first_line(e)}); "
                "use another checkpoint or model directory"
            ) from None
        _check_byte_level(json.loads(model))
        ours = sorted(set(SPECIAL_TOKENS.values()) & bpe.get_vocab(with_added_tokens=True).keys())
        if ours:  # a tokenizer.json that train.export wrote: its ids are ours already
            raise UserError(
                f"this tokenizer has {ours[0]} already: it was exported by this project; load "
                "the exported folder with the handgpt.json written beside it"
            )
        bpe.encode_special_tokens = True  # its own special tokens are text, like any other
        bpe.no_truncation()
        bpe.no_padding()
        self.bpe = bpe
        self._model = model
        self.base = max(bpe.get_vocab(with_added_tokens=True).values()) + 1
        self.special_ids = {name: self.base + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._vocab_size = padded_vocab_size(self.base + len(SPECIAL_TOKENS))
        if self.decode(self.encode(PROBE)) != PROBE:
            raise UserError(
                "this tokenizer does not give back the text it encodes (it normalises text, or "
                "adds a space in front); only a lossless byte-level BPE like GPT-2's can be used"
            )

    @classmethod
    def from_bytes(cls, model: bytes) -> "GPT2BPETokenizer":
        return cls(model)

    @classmethod
    def from_pretrained(cls, source: str) -> "GPT2BPETokenizer":
        """The tokenizer of a Hugging Face model directory or hub name ("gpt2"), loaded by
        transformers' AutoTokenizer (which also reads vocab.json + merges.txt)."""
        path = Path(source)
        if path.is_dir() and not any(all((path / f).is_file() for f in s) for s in TOKENIZER_FILES):
            raise UserError(
                f"{path} has no tokenizer (tokenizer.json, or vocab.json and merges.txt); a "
                "model is usable only with the tokenizer it was trained with: copy its files there"
            )
        try:
            import transformers
        except ImportError:
            raise UserError(
                f"loading a Hugging Face tokenizer needs the 'hf' extra (transformers); install it "
                f"with: {HF_EXTRA}"
            ) from None
        try:
            hf = transformers.AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"could not load the tokenizer of {source} ({_first_line(e)})"
            ) from None
        backend = getattr(hf, "backend_tokenizer", None)  # the `tokenizers` object it runs
        if backend is None:
            raise UserError(f"the tokenizer of {source} is not a byte-level BPE like GPT-2's")
        return cls(backend.to_str().encode("utf-8"))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self.bpe.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Encode many texts, in parallel (tokenizers' own threads)."""
        return [e.ids for e in self.bpe.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; control, unused and special ids give nothing, and an incomplete
        UTF-8 sequence gives U+FFFD."""
        ids = [int(i) for i in ids]  # also accepts numpy arrays and tensors
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self._vocab_size})")
        return self.bpe.decode([i for i in ids if i < self.base], skip_special_tokens=True)

    def id_to_piece(self, id: int) -> str:
        id = int(id)
        if id < self.base:
            return self.bpe.id_to_token(id) or ""
        k = id - self.base
        return list(SPECIAL_TOKENS.values())[k] if k < len(SPECIAL_TOKENS) else f"<|unused{k}|>"

    def to_bytes(self) -> bytes:
        return self._model


def _check_byte_level(spec: dict) -> None:
    """Refuse a tokenizer.json that is not a byte-level BPE (model BPE, ByteLevel decoder)."""
    model = (spec.get("model") or {}).get("type")
    decoder = spec.get("decoder") or {}
    parts = [decoder, *decoder.get("decoders", [])]  # a decoder or a Sequence of them
    if model != "BPE" or not any(p.get("type") == "ByteLevel" for p in parts):
        raise UserError(
            f"this tokenizer is not a byte-level BPE like GPT-2's (model {model}, decoder "
            f"{decoder.get('type')}); only GPT-2's kind of tokenizer can be used"
        )


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
