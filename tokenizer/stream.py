"""Token ids to text as they come, for streaming a reply: never half a character.

The terminal chat (train/sample.py) and the server (train/server/) print or send a reply
while the model writes it, one token at a time; both use TextStream.
"""


class TextStream:
    """Token ids in, printable text out, never splitting a multi-byte character.

    A character outside the vocabulary arrives as its UTF-8 bytes, one token each, and
    decoding only some of them gives U+FFFD. So we decode everything so far, hold back a
    trailing run of U+FFFD (bytes that may still complete a character) and hand out only
    what was not printed yet. What comes out in total is exactly decode(all ids).
    Decoding the whole reply per token is O(n) each, negligible next to the model.

    With lstrip, whitespace at the very start is not handed out (a chat reply's leading
    space); the ids keep it.
    """

    def __init__(self, tok, lstrip: bool = False) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.printed = 0  # characters of decode(ids) already handed out (or skipped)
        self.lstrip = lstrip  # whitespace is still to be skipped

    def _new(self, text: str) -> str:
        if self.lstrip:  # skip the leading whitespace, however many tokens it spans
            self.printed = max(self.printed, len(text) - len(text.lstrip()))
            self.lstrip = not text.strip()
        new = text[self.printed :]
        self.printed = max(self.printed, len(text))
        return new

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._new(self.tok.decode(self.ids).rstrip("\ufffd"))

    def flush(self) -> str:
        """The rest, held-back bytes included (as U+FFFD if they never completed)."""
        return self._new(self.tok.decode(self.ids))
