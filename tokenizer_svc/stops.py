"""Stop-string matching over a stream of text deltas.

A stop matches as soon as it is complete, across any delta boundaries. When several stops
complete, the one ending first wins (ties: the longest, i.e. the one starting first), and
the output is cut right before it; the stop text itself is never emitted. Between feeds
the matcher holds back only the longest suffix of the text that is a proper prefix of some
stop (the minimum that could still turn into a match); everything before it is emitted.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class StopResult:
    """Text safe to emit now, and whether a stop string matched (stream ends here)."""

    text: str
    stopped: bool = False
    matched: str | None = None


class StopStringMatcher:
    """Finds stop strings in streamed text; emits only text that cannot be part of a stop."""

    __slots__ = ("_stops", "_first_chars", "_max_hold", "_held")

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(dict.fromkeys(stops))
        self._first_chars = frozenset(stop[0] for stop in self._stops)
        self._max_hold = max((len(stop) - 1 for stop in self._stops), default=0)
        self._held = ""

    @property
    def held_text(self) -> str:
        """Text received but not emitted yet (a possible beginning of a stop)."""
        return self._held

    def feed(self, text: str) -> StopResult:
        """Add text; return what can be emitted, cut before a stop if one completed."""
        if not self._stops:
            return StopResult(text)
        buffer = self._held + text
        match = self._earliest_match(buffer)
        if match is not None:
            start, stop = match
            self._held = ""
            return StopResult(buffer[:start], stopped=True, matched=stop)
        hold = self._partial_suffix_length(buffer)
        self._held = buffer[len(buffer) - hold:] if hold else ""
        return StopResult(buffer[:len(buffer) - hold])

    def flush(self) -> str:
        """End of stream: the held text cannot become a stop any more; emit it."""
        held, self._held = self._held, ""
        return held

    def _earliest_match(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = buffer.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_suffix_length(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of some stop."""
        first = max(0, len(buffer) - self._max_hold)
        for start in range(first, len(buffer)):
            if buffer[start] not in self._first_chars:
                continue
            suffix = buffer[start:]
            if any(len(stop) > len(suffix) and stop.startswith(suffix) for stop in self._stops):
                return len(buffer) - start
        return 0
