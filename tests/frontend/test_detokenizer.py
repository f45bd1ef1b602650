"""Property tests of the incremental detokenizer: deltas concatenate to the full decode and
never show a broken character the full decode does not have."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from tests.fakes.tiny_tokenizer import (DEFAULT_MODEL_DIR, byte_fallback_bpe, byte_level_bpe,
                                        has_default_model)
from tokenizer_svc.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer


def _tokenizers() -> dict[str, Tokenizer]:
    found = {"byte_level": byte_level_bpe(), "byte_fallback": byte_fallback_bpe()}
    if has_default_model():  # the real SmolLM2 tokenizer (raw `tokenizers`, no transformers)
        found["smollm2"] = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    return found


TOKENIZERS = _tokenizers()
SPECIAL_TEXT = ["😀", "🎉", "👍🏽", "👨‍👩‍👧", "你好", "世界", "日本語", "é", "ü", "ñ", " ", "  ",
                "\n", "\t", "the", " the", "hello", " world", ".", "!", "123", "\u200b", "ß"]
texts = st.lists(st.one_of(st.sampled_from(SPECIAL_TEXT), st.text(min_size=1, max_size=6)),
                 max_size=24).map("".join)


def stream(tokenizer: Tokenizer, token_ids: list[int]) -> tuple[list[str], str]:
    """Feed ids one at a time; return (deltas incl. the final flush, full decode)."""
    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    detokenizer = IncrementalDetokenizer(decode)
    deltas = [detokenizer.add([token_id]) for token_id in token_ids]
    deltas.append(detokenizer.flush())
    return deltas, decode(token_ids)


def check(deltas: list[str], full: str, exact: bool = True) -> None:
    if exact or REPLACEMENT_CHAR not in full:
        assert "".join(deltas) == full
    if REPLACEMENT_CHAR not in full:
        assert all(REPLACEMENT_CHAR not in delta for delta in deltas), deltas


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_streamed_text_round_trips(name: str, text: str) -> None:
    tokenizer = TOKENIZERS[name]
    deltas, full = stream(tokenizer, tokenizer.encode(text, add_special_tokens=False).ids)
    check(deltas, full)
    if name == "byte_level":  # holds every byte: lossless, so the stream rebuilds the input
        assert "".join(deltas) == text


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_token_ids_match_full_decode(name: str, data: st.DataObject) -> None:
    tokenizer = TOKENIZERS[name]
    vocab = tokenizer.get_vocab_size()
    token_ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40))
    deltas, full = stream(tokenizer, token_ids)
    # HF's ByteFallback decoder turns a whole run of byte tokens into U+FFFDs when the run is
    # invalid UTF-8, retroactively replacing bytes that were valid on their own (e.g. <0x00>
    # then <0x80>). No streaming decoder can match that without holding every byte token, so
    # for such invalid runs only the no-broken-character property is required.
    check(deltas, full, exact=name != "byte_fallback")


def test_multibyte_character_is_held_until_complete() -> None:
    tokenizer = TOKENIZERS["byte_level"]
    token_ids = tokenizer.encode("ab 🦜", add_special_tokens=False).ids
    deltas, _ = stream(tokenizer, token_ids)
    parrot_parts = [d for d in deltas if "🦜" in d]
    assert len(token_ids) >= 4  # the parrot is split over several byte tokens
    assert parrot_parts in ([" 🦜"], ["🦜"])
    assert "".join(deltas) == "ab 🦜"
    assert all(REPLACEMENT_CHAR not in d for d in deltas)


def test_decode_work_per_token_is_bounded() -> None:
    """The offset window decodes a few ids per step, never the whole output."""
    tokenizer = TOKENIZERS["byte_level"]
    longest = 0

    def decode(ids):
        nonlocal longest
        longest = max(longest, len(ids))
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    token_ids = tokenizer.encode("the quick brown fox 你好 " * 50, add_special_tokens=False).ids
    detokenizer = IncrementalDetokenizer(decode)
    text = "".join(detokenizer.add([t]) for t in token_ids) + detokenizer.flush()
    assert text == "the quick brown fox 你好 " * 50
    assert len(token_ids) > 300 and longest <= 8


# ---- the same properties with a `tokenizers.Tokenizer`: steps run in Rust (DecodeStream) ----
def stream_rust(tokenizer: Tokenizer, token_ids: list[int],
                skip_special_tokens: bool = True) -> list[str]:
    """Like stream(), but the detokenizer gets the Tokenizer itself; deltas incl. the flush."""
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [detokenizer.add([token_id]) for token_id in token_ids]
    deltas.append(detokenizer.flush())
    return deltas


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_decode_stream_text_round_trips(name: str, text: str) -> None:
    tokenizer = TOKENIZERS[name]
    token_ids = tokenizer.encode(text, add_special_tokens=False).ids
    deltas = stream_rust(tokenizer, token_ids)
    window_deltas, full = stream(tokenizer, token_ids)
    check(deltas, full)
    assert deltas == window_deltas  # same window, same pieces: Rust and Python paths agree
    if name == "byte_level":
        assert "".join(deltas) == text


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decode_stream_random_ids_match_the_window(name: str, data: st.DataObject) -> None:
    """Random ids hit DecodeStream's prefix-rewrite error (byte fallback): it must recover."""
    tokenizer = TOKENIZERS[name]
    token_ids = data.draw(st.lists(st.integers(0, tokenizer.get_vocab_size() - 1), max_size=40))
    deltas = stream_rust(tokenizer, token_ids)
    window_deltas, full = stream(tokenizer, token_ids)
    check(deltas, full, exact=name != "byte_fallback")
    assert deltas == window_deltas


def test_decode_stream_recovers_when_a_byte_run_turns_invalid(monkeypatch) -> None:
    """<0x47> decodes to 'G' alone; <0x80> after it makes ByteFallback rewrite both as U+FFFD,
    which DecodeStream reports as an error. The 'G' already went out; the rest must follow,
    stepped in Rust again (the Python window decodes only for the recovery, not per token)."""
    python_window_calls = 0
    pending_text = IncrementalDetokenizer._pending_text

    def counted(self: IncrementalDetokenizer) -> str:
        nonlocal python_window_calls
        python_window_calls += 1
        return pending_text(self)

    monkeypatch.setattr(IncrementalDetokenizer, "_pending_text", counted)
    tokenizer = TOKENIZERS["byte_fallback"]
    tail = tokenizer.encode("a the dog", add_special_tokens=False).ids
    token_ids = [tokenizer.token_to_id("<0x47>"), tokenizer.token_to_id("<0x80>"), *tail]
    deltas = stream_rust(tokenizer, token_ids)
    full = tokenizer.decode(token_ids, skip_special_tokens=True)
    assert full.startswith(REPLACEMENT_CHAR * 2)
    assert deltas[0] == "G" and "".join(deltas) == "G" + full[1:]
    assert deltas[-4:] == ["d", "o", "g", ""]  # streaming again token by token
    assert python_window_calls == 1  # the recovery; the flush had nothing left to emit


@pytest.mark.parametrize("skip", [True, False])
def test_decode_stream_special_tokens_follow_skip_special_tokens(skip: bool) -> None:
    tokenizer = TOKENIZERS["byte_level"]
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    token_ids = [im_start, *tokenizer.encode("hello 你好 😀", add_special_tokens=False).ids,
                 im_end]
    text = "".join(stream_rust(tokenizer, token_ids, skip_special_tokens=skip))
    assert text == tokenizer.decode(token_ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is not skip


def test_decode_stream_flush_emits_an_incomplete_character() -> None:
    tokenizer = TOKENIZERS["byte_level"]
    token_ids = tokenizer.encode("ab 🦜", add_special_tokens=False).ids[:-1]  # parrot cut short
    deltas = stream_rust(tokenizer, token_ids)
    assert "".join(deltas[:-1]) == "ab "  # the partial parrot is held until the flush
    assert "".join(deltas) == tokenizer.decode(token_ids) and deltas[-1].endswith(REPLACEMENT_CHAR)
