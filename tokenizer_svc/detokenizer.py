"""Incremental detokenization: token ids in one at a time, text deltas out.

Offset-window method: keep two offsets into the ids, `prefix_offset` (start of a short
context window) and `read_offset` (end of what has been emitted). Each step decodes only
ids[prefix_offset:] and emits what it adds beyond the decoded window ids[prefix_offset:read_offset].
The window context makes leading-space and merge rules decode as they would in the full
text; text ending in U+FFFD (an incomplete UTF-8 character split over byte tokens) is held
back until the character completes. The window is re-anchored after every emit, so each step
decodes O(1) tokens amortised, never the whole output.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"

DecodeFn = Callable[[Sequence[int]], str]


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation is the full decode."""

    __slots__ = ("_decode", "_ids", "_prefix_offset", "_read_offset", "_prefix_text")

    def __init__(self, decode: DecodeFn) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset]), cached

    @property
    def token_ids(self) -> list[int]:
        """All ids seen so far."""
        return self._ids

    @property
    def pending_tokens(self) -> int:
        """Ids whose text has not been emitted yet (held back)."""
        return len(self._ids) - self._read_offset

    def add(self, new_ids: Sequence[int]) -> str:
        """Append ids; return the text they complete ('' while a character is still partial)."""
        self._ids.extend(new_ids)
        if len(self._ids) == self._read_offset:
            return ""
        window_text = self._decode(self._ids[self._prefix_offset:])
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = window_text[len(self._prefix_text):]
        self._advance()
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (even an incomplete character) at the end of the stream."""
        if len(self._ids) == self._read_offset:
            return ""
        window_text = self._decode(self._ids[self._prefix_offset:])
        delta = window_text[len(self._prefix_text):]
        self._advance()
        return delta

    def _advance(self) -> None:
        # The next window starts where the emitted text's last step started, so it keeps
        # one step of left context (enough for leading-space / merge decoding rules).
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
