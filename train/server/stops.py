"""Stop strings: end a reply where one appears in its text, and never send part of one.

The model writes tokens, a stop string is text ("\\n\\n", "Q:"): it may span several tokens
and begin inside one. So the reply's text is matched as it grows, and while streaming,
the end that might be the start of a stop string is held back until the next text says
whether it is one:

    pending = held text + new text
    a stop string s occurs in pending at i (the first i of all s):
        hand out pending[:i]; the reply ends there (s and what follows are dropped)
    else: hold back the longest end of pending that begins some stop string
          (pending[j:] == s[:len(pending) - j] for some s), hand out the rest

Only text that can no longer become part of a stop string is handed out, so what is
sent is exactly the final text cut before the first stop string.
"""

from collections.abc import Sequence


class StopStrings:
    """Feed text as it comes (push), then flush at the end of the reply."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]  # an empty stop string would stop at once
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """The text that is safe to send, and whether a stop string ended the reply."""
        pending = self.held + text
        found = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return pending[: min(found)], True
        keep = self._partial(pending)
        self.held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        """What was held back, once the reply has ended without a stop string."""
        rest, self.held = self.held, ""
        return rest

    def _partial(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper start of a stop string."""
        for n in range(min(len(text), max((len(s) for s in self.stops), default=0) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return n
        return 0
