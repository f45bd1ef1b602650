"""bench/cold_ttft.py's pure parts: prompt windows of the target length that share no prefix,
the medians and ratios of the summary, and the profile's prefill steps."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.cold_ttft import (DEFAULT_TEXT, build_windows, engine_configs, parse_env_variant,
                             summarize, window_starts, window_text)
from bench.cold_ttft_profile import chunks_of


def test_window_starts_are_distinct_spread_and_inside_the_text() -> None:
    starts = window_starts(7639, 2670, 4)
    assert starts == [0, 1656, 3312, 4968]
    assert starts[-1] + 2670 <= 7639
    assert window_starts(100, 100, 1) == [0]
    assert window_starts(12, 10, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="distinct windows"):
        window_starts(11, 10, 3)
    with pytest.raises(ValueError, match=">= 1"):
        window_starts(100, 0, 2)


def test_window_text_cuts_at_token_boundaries() -> None:
    text = "alpha beta gamma delta"
    offsets = [(0, 5), (5, 10), (10, 16), (16, 22)]   # "alpha", " beta", " gamma", " delta"
    assert window_text(text, offsets, 1, 2) == " beta gamma"
    assert window_text(text, offsets, 0, 4) == text
    with pytest.raises(ValueError, match="outside"):
        window_text(text, offsets, 3, 2)


def test_windows_of_a_long_text_encode_to_the_target_and_share_no_prefix(
        default_model_dir: Path) -> None:
    from tokenizers import Tokenizer

    if not DEFAULT_TEXT.is_file():
        pytest.skip(f"{DEFAULT_TEXT} is not on this machine")
    tokenizer = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))

    def encode(text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = tokenizer.encode(text)
        return encoding.ids, encoding.offsets

    windows = build_windows(DEFAULT_TEXT.read_text(encoding="utf-8"), encode, 2670, 4)
    encoded = [tokenizer.encode(window).ids for window in windows]
    assert all(abs(len(ids) - 2670) <= 2 for ids in encoded), [len(ids) for ids in encoded]
    # the prefix cache hashes blocks of 16 ids from the start: no two windows share the first
    assert len({tuple(ids[:16]) for ids in encoded}) == len(windows)


def test_summarize_medians_ratios_and_target() -> None:
    seconds = {"cold": [1.0, 3.0, 2.0], "cached": [0.05, 0.04, 0.06],
               "hf_forward": [4.0, 4.0, 2.0]}
    summary = summarize(seconds, "hf_forward", target_ratio=0.7)
    assert summary["median_ms"] == pytest.approx({"cold": 2000.0, "cached": 50.0,
                                                  "hf_forward": 4000.0})
    cold = summary["x_vs_hf_forward"]["cold"]
    assert cold["of_medians"] == pytest.approx(0.5)
    assert cold["paired_median"] == pytest.approx(0.75)   # of 0.25, 0.75, 1.0
    assert "hf_forward" not in summary["x_vs_hf_forward"]
    assert summary["target_met"] == {"cold": True}
    slow = summarize({"cold_chunk512": [3.0], "hf_forward": [4.0]}, target_ratio=0.7)
    assert slow["target_met"] == {"cold_chunk512": False}


def test_chunks_of_a_prompt() -> None:
    assert chunks_of(2670, 2048) == [(0, 2048), (2048, 622)]
    assert chunks_of(2670, 4096) == [(0, 2670)]
    assert chunks_of(1024, 512) == [(0, 512), (512, 512)]


def test_engine_configs_one_per_chunk_size_and_variant() -> None:
    assert parse_env_variant("LLMSERVE_CPU_PREFILL_BLOCKS=0") == ("LLMSERVE_CPU_PREFILL_BLOCKS",
                                                                  "0")
    assert parse_env_variant("A=") == ("A", "")
    for bad in ("A", "=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_env_variant(bad)
    assert engine_configs([2048], []) == [("_chunk2048", 2048, None)]
    assert engine_configs([512, 2048], [("X", "0")]) == [
        ("_chunk512", 512, None), ("_chunk512_X=0", 512, ("X", "0")),
        ("_chunk2048", 2048, None), ("_chunk2048_X=0", 2048, ("X", "0"))]


def test_vs_hf_table_shows_ttft_p50_beside_tokens_per_s(capsys: pytest.CaptureFixture) -> None:
    """Issue 17's other TTFT figure (p50 at 32 concurrent) comes from bench/vs_hf.py's table."""
    from bench.vs_hf import print_table

    row = {"scenario": "concurrent_32", "method": "service", "dtype": "bfloat16",
           "tokens_per_s": 498.3, "x_vs_hf_sequential": 18.5, "x_vs_hf_batched": 2.03,
           "x_vs_engine": 0.91, "exact_counts": True, "agree_with_hf": 0.9, "others_cores": 0.1,
           "note": "", "extra": {"ttft_ms": {"p50": 1241.47}}}
    print_table([row, {**row, "method": "hf_batched", "extra": {}}])
    lines = capsys.readouterr().out.splitlines()
    assert "TTFT p50" in lines[1]
    assert "498.3" in lines[3] and "1241 ms" in lines[3]
    assert lines[4].split()[4] == "-"   # transformers rows have no TTFT
