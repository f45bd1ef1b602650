"""Incremental detokenization: token ids in one at a time, text deltas out.

One method, the offset window: `context_start` opens a short window of ids before
`read_offset` (the end of what has been emitted). A step decodes ids[context_start:] and
emits what it adds beyond the decoded context ids[context_start:read_offset]; the context
makes leading-space and merge rules decode as they would in the full text. Text ending in
U+FFFD (a UTF-8 character split over byte tokens) is held back until it completes. After
every emit the window moves on (it keeps the last emit's ids as context), so a step decodes
O(1) ids, never the whole output.

Given a `tokenizers.Tokenizer`, the steps run in Rust through `decoders.DecodeStream` (the same
window); given a plain decode function, they run here. DecodeStream has no flush and raises
when a decode rewrites text it already produced (byte-fallback runs that turn invalid), so
both paths share `_pending_text`: the final flush and that recovery emit the window's text
as it decodes, U+FFFD included, and the DecodeStream restarts from the moved window.
Either way the stream starts empty (no prompt ids as context) and special tokens are skipped
unless skip_special_tokens=False (a decode function decides that itself), so both paths give
the same deltas as ModelTokenizer.decode_stream_piece through the window.

Speed (`bench/detokenize_bench.py`, bench/results/detokenize_cpu.json: SmolLM2 tokenizer,
3000-id English, CJK, emoji and code streams, one id per `add` as generation.py feeds them,
AMD EPYC family 25 model 17, 2 vCPUs shared with ~1.1 busy cores of other work): median
DecodeStream 0.54-0.82 M tokens/s against the Python window's 0.25-0.41 M, 1.65-2.15x per
stream (best runs 0.65-1.02 M against 0.33-0.50 M). The Rust steps win; the Python window
stays only for plain decode functions, the flush and the recovery.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

REPLACEMENT_CHAR = "\ufffd"

# What the detokenizer decodes with: a `tokenizers.Tokenizer` (steps in Rust, DecodeStream)
# or a function ids -> text (steps in Python). Special tokens: the function decides; with a
# Tokenizer, IncrementalDetokenizer's skip_special_tokens does.
DecodeFn = Callable[[Sequence[int]], str] | Tokenizer


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation is the full decode."""

    __slots__ = ("_decode", "_tokenizer", "_skip_special_tokens", "_stream", "_ids",
                 "_context_start", "_read_offset", "_context_text")

    def __init__(self, decode: DecodeFn, skip_special_tokens: bool = True) -> None:
        self._tokenizer = decode if isinstance(decode, Tokenizer) else None
        self._skip_special_tokens = skip_special_tokens
        self._decode: Callable[[Sequence[int]], str] = (
            self._tokenizer_decode if isinstance(decode, Tokenizer) else decode)
        self._stream = (DecodeStream(skip_special_tokens=skip_special_tokens)
                        if self._tokenizer is not None else None)
        self._ids: list[int] = []
        self._context_start = 0
        self._read_offset = 0
        self._context_text: str | None = ""  # decode(ids[context_start:read_offset]), lazily

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
        if self._stream is not None:
            if len(new_ids) == 1:  # the usual case; DecodeStream steps fastest on an int
                return self._stream_step(new_ids[0])
            return "".join([self._stream_step(token_id) for token_id in new_ids])
        self._ids.extend(new_ids)
        if len(self._ids) == self._read_offset:
            return ""
        text = self._pending_text()
        if not text or text.endswith(REPLACEMENT_CHAR):
            return ""
        self._advance()
        return text

    def flush(self) -> str:
        """Emit whatever is held back (even an incomplete character) at the end of the stream."""
        if len(self._ids) == self._read_offset:
            return ""
        return self._emit_pending()

    def _stream_step(self, token_id: int) -> str:
        assert self._stream is not None
        self._ids.append(token_id)
        try:
            text = self._stream.step(self._tokenizer, token_id)
        except Exception:  # a decode rewrote its prefix (tokenizers raises a bare Exception);
            # any other error recurs in the Python decode below
            return self._emit_pending()
        if text is None:
            return ""
        self._advance()
        return text

    def _pending_text(self) -> str:
        """What ids[read_offset:] add to the decoded context (U+FFFD included)."""
        window = self._ids[self._context_start:]
        if self._context_text is None:
            self._context_text = self._decode(window[:self._read_offset - self._context_start])
        return self._decode(window)[len(self._context_text):]

    def _emit_pending(self) -> str:
        text = self._pending_text()
        self._advance()
        if self._stream is not None:  # restart the Rust window where ours now stands
            self._stream = DecodeStream(self._ids[self._context_start:],
                                        skip_special_tokens=self._skip_special_tokens)
        return text

    def _advance(self) -> None:
        # The next window starts where the last emitted text started: one step of context.
        self._context_start = self._read_offset
        self._read_offset = len(self._ids)
        self._context_text = None

    def _tokenizer_decode(self, token_ids: Sequence[int]) -> str:
        assert self._tokenizer is not None
        return self._tokenizer.decode(list(token_ids),
                                      skip_special_tokens=self._skip_special_tokens)
