"""Token ids -> the text a client sees, incrementally, with stop strings: streamed text == non-streamed text.

`TextStream.push(token)` is fed every generated token in order. It decodes the whole output so far (tokenizers
decode a few hundred ids in microseconds, and a byte-level BPE can only be cut safely at character
boundaries), holds back a trailing incomplete UTF-8 character (the decoder shows it as U+FFFD) and any tail
that could still become a stop string, and returns the new text that is final. When a stop string appears the
text ends before it and `stopped` is set; the caller then cancels the request.
"""

from __future__ import annotations

from typing import Any, Sequence

_REPLACEMENT = "\ufffd"


class TextStream:
    """Incremental detokenization of one request's output, cut at the first stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""  # text already returned
        self.stopped = False
        #: Tokens consumed when the output became final (all of them, or up to the one completing a stop string).
        self.tokens_used = 0

    def push(self, token: int) -> str:
        """Add one generated token; returns the newly final text ('' when held back or already stopped)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        self.tokens_used = len(self.ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._advance(text[:cut])
        final = text.rstrip(_REPLACEMENT) if text.endswith(_REPLACEMENT) else text
        return self._advance(final[: len(final) - self._stop_prefix_len(final)])

    def finish(self) -> str:
        """The request ended (EOS, budget, context): whatever was held back for a stop string is final."""
        if self.stopped or not self.ids:
            return ""
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    @property
    def text(self) -> str:
        return self.sent

    def _advance(self, final: str) -> str:
        if not final.startswith(self.sent):  # a re-decoded prefix changed (never for byte-level BPE): resend none
            return ""
        new, self.sent = final[len(self.sent):], final
        return new

    def _first_stop(self, text: str) -> int | None:
        # a stop string can only be found where the text is not yet final: past what was sent, minus its length
        hits = [i for s in self.stop if (i := text.find(s, max(0, len(self.sent) - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string (held back)."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
