"""Property tests of the stop-string matcher against a brute-force reference."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer_svc.stops import StopStringMatcher


def reference_cut(text: str, stops: list[str]) -> int | None:
    """Where the output ends: before the stop that completes first (ties: the longest)."""
    for end in range(1, len(text) + 1):
        ending_here = [s for s in stops if text[:end].endswith(s)]
        if ending_here:
            return end - max(len(s) for s in ending_here)
    return None


def reference_hold(fed: str, stops: list[str]) -> str:
    """The longest suffix of fed that is a proper prefix of some stop."""
    for start in range(len(fed) + 1):
        suffix = fed[start:]
        if suffix and any(len(s) > len(suffix) and s.startswith(suffix) for s in stops):
            return suffix
    return ""


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


alphabet = st.sampled_from("ab c\n😀你")
small_text = st.text(alphabet=alphabet, max_size=40)
stop_lists = st.lists(st.text(alphabet=alphabet, min_size=1, max_size=5), min_size=0, max_size=4)


@settings(max_examples=400, deadline=None)
@given(text=small_text, stops=stop_lists, cuts=st.lists(st.integers(0, 40), max_size=12))
def test_stream_output_is_text_cut_before_first_stop(text: str, stops: list[str],
                                                     cuts: list[int]) -> None:
    matcher = StopStringMatcher(stops)
    emitted, fed, stopped = [], "", False
    for piece in split(text, cuts):
        result = matcher.feed(piece)
        fed += piece
        emitted.append(result.text)
        if result.stopped:
            stopped = True
            assert result.matched in stops
            break
        # holds back exactly the minimal suffix that could still begin a stop
        assert matcher.held_text == reference_hold(fed, stops)
        assert "".join(emitted) + matcher.held_text == fed
    if not stopped:
        emitted.append(matcher.flush())
    output = "".join(emitted)
    cut = reference_cut(text, stops)
    assert stopped == (cut is not None)
    assert output == (text if cut is None else text[:cut])
    assert not any(stop in output for stop in stops)


def test_stop_split_across_deltas_is_cut_and_not_emitted() -> None:
    matcher = StopStringMatcher(["</answer>"])
    first = matcher.feed("The result is 42</ans")
    assert first.text == "The result is 42" and not first.stopped
    assert matcher.held_text == "</ans"
    second = matcher.feed("wer> and more")
    assert second.stopped and second.text == "" and second.matched == "</answer>"


def test_held_prefix_is_released_when_it_cannot_match() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("go ST").text == "go "
    result = matcher.feed("ART")
    assert result.text == "START" and not result.stopped
    assert matcher.flush() == ""


def test_no_stops_passes_text_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("abc").text == "abc"
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        StopStringMatcher(["ok", ""])
