"""The interface every tokenizer kind implements, and all the rest of the code relies on.

A tokenizer turns text into a list of integer ids and back. Callers use only what is
defined here, so a kind plugs in by subclassing `Tokenizer` and registering itself in
tokenizer/__init__.py, without touching them: SentencePiece (tokenizer/sentencepiece.py,
trained by this project) and GPT-2's byte-level BPE (tokenizer/gpt2.py, from a pretrained
model) are the two kinds.

Contract:
- lossless: decode(encode(s)) == s for every Unicode string s;
- encode never produces a special (control) id, see tokenizer/special.py;
- decode accepts any id in [0, vocab_size); special ids decode to the empty string;
- the whole tokenizer is one blob of bytes (`to_bytes`), which a checkpoint embeds as
  `state()` = {"kind": ..., "model": bytes} and `tokenizer.from_state` rebuilds.
"""

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses set `kind` and `special_ids` and fill in the methods."""

    kind: str  # the registry key, stored in checkpoints: "sentencepiece", ...
    special_ids: dict[str, int]  # "bos", "eos", "pad", "system", "user", "assistant", "end"

    @classmethod
    @abstractmethod
    def from_bytes(cls, model: bytes) -> "Tokenizer":
        """Rebuild a tokenizer from what `to_bytes` returned."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; every id is in [0, vocab_size)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text to ids (never a special id)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; special ids contribute nothing."""

    @abstractmethod
    def id_to_piece(self, id: int) -> str:
        """The vocabulary entry of one id, for display and debugging."""

    @abstractmethod
    def to_bytes(self) -> bytes:
        """The complete tokenizer model as bytes (what `save` writes to disk)."""

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Encode many texts; subclasses may do it in parallel."""
        return [self.encode(text) for text in texts]

    def state(self) -> dict:
        """What a checkpoint stores: plain values only, loadable with weights_only=True."""
        return {"kind": self.kind, "model": self.to_bytes()}

    def save(self, path: str | Path) -> None:
        """Write the model file (`to_bytes`). A plain write, not atomic: its caller,
        data/prepare.py, writes into a staging folder that replaces the old one only when
        complete, so a half-written file is never used."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.to_bytes())

    # The special ids by name: tok.bos_id, tok.eos_id, ...
    @property
    def bos_id(self) -> int:
        return self.special_ids["bos"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["eos"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["pad"]

    @property
    def system_id(self) -> int:
        return self.special_ids["system"]

    @property
    def user_id(self) -> int:
        return self.special_ids["user"]

    @property
    def assistant_id(self) -> int:
        return self.special_ids["assistant"]

    @property
    def end_id(self) -> int:
        return self.special_ids["end"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"
