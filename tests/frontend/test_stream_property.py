"""Property test of the whole generation stream: engine ids -> detokenizer -> stop strings ->
flush, through GenerationStream, with the engine finishing after any number of tokens.

The streams end anywhere: inside a multi-byte character, while the text's tail is a partial
prefix of a stop string, on a token that completes a stop, in a chunk of several tokens or on
an empty last message, with EOS, LENGTH, STOP_TOKEN or ABORTED. Whatever the case, the client
must receive exactly the full decode cut before the first stop (or all of it), once.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from tests.fakes.tiny_tokenizer import DEFAULT_MODEL_DIR, byte_level_bpe, has_default_model
from tests.frontend.test_stops import reference_cut, reference_hold
from tokenizer_svc.detokenizer import REPLACEMENT_CHAR, DecodeFn
from tokenizer_svc.generation import GenerationStream
from tokenizer_svc.schema import (EngineChunk, EngineRequest, FinishReason, OutputDelta,
                                  SamplingSettings, UsageCounts)

PROMPT_LEN = 3
ENGINE_REASONS = [FinishReason.EOS, FinishReason.LENGTH, FinishReason.STOP_TOKEN,
                  FinishReason.ABORTED]
ALPHABET = "ab c\n.😀你"  # few characters, so stops and partial stops are frequent


def _tokenizers() -> dict[str, Tokenizer]:
    found = {"byte_level": byte_level_bpe()}
    if has_default_model():
        found["smollm2"] = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    return found


TOKENIZERS = _tokenizers()


def decode_with(tokenizer: Tokenizer, kind: str) -> DecodeFn:
    """The two ways the detokenizer decodes: a function (Python window) or the Tokenizer (Rust)."""
    if kind == "tokenizer":
        return tokenizer
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


class ScriptedSource:
    """In-memory TokenSource: streams the chunks; once aborted it ends with ABORTED + usage."""

    def __init__(self, chunks: list[EngineChunk]) -> None:
        self.chunks = chunks
        self.aborted: list[str] = []
        self.sent_chunks = 0

    async def generate(self, request: EngineRequest,
                       timeout_s: float | None = None) -> AsyncIterator[EngineChunk]:
        for chunk in self.chunks:
            if self.aborted:
                completion = sum(len(c.token_ids) for c in self.chunks[:self.sent_chunks])
                yield EngineChunk([], finish_reason=FinishReason.ABORTED,
                                  usage=UsageCounts(PROMPT_LEN, completion, 0))
                return
            self.sent_chunks += 1
            yield chunk

    async def abort(self, request_id: str, timeout_s: float = 1.0) -> bool:
        self.aborted.append(request_id)
        return True


@dataclass
class Scenario:
    """What the engine streams and which stop strings the request asked for."""

    token_ids: list[int]
    chunk_sizes: list[int]
    reason: FinishReason
    finish_on_empty_message: bool
    stops: list[str]

    def chunks(self) -> list[EngineChunk]:
        chunks, start, sizes = [], 0, iter(self.chunk_sizes)
        while start < len(self.token_ids):
            size = next(sizes, 1)
            chunks.append(EngineChunk(self.token_ids[start:start + size]))
            start += size
        if self.finish_on_empty_message or not chunks:
            chunks.append(EngineChunk([]))
        chunks[-1].finish_reason = self.reason
        chunks[-1].usage = UsageCounts(PROMPT_LEN, len(self.token_ids), 0)
        return chunks


@st.composite
def scenarios(draw: st.DrawFn, tokenizer: Tokenizer) -> Scenario:
    text = draw(st.text(alphabet=ALPHABET, max_size=24))
    all_ids = tokenizer.encode(text, add_special_tokens=False).ids
    token_ids = all_ids[:draw(st.integers(0, len(all_ids)))]  # the engine stops anywhere
    reason = draw(st.sampled_from(ENGINE_REASONS))
    if reason in (FinishReason.EOS, FinishReason.STOP_TOKEN) and draw(st.booleans()):
        token_ids.append(tokenizer.token_to_id("<|im_end|>"))  # the finishing special token
    full = tokenizer.decode(token_ids, skip_special_tokens=True)
    stops = draw(st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=2))
    # plus, mostly, a stop that begins with the text's tail (held back when the engine ends),
    # or one from inside the text (U+FFFD only stands for broken bytes: never in a stop)
    planted = draw(st.sampled_from(["tail", "tail", "inside", "none"]))
    if full and planted != "none":
        piece = full[draw(st.integers(0, len(full) - 1)):]
        stops.append(piece[:3] if planted == "inside" else
                     piece[-3:] + draw(st.text(alphabet=ALPHABET, min_size=1, max_size=2)))
    return Scenario(token_ids=token_ids,
                    chunk_sizes=draw(st.lists(st.integers(1, 4), max_size=len(token_ids))),
                    reason=reason, finish_on_empty_message=draw(st.booleans()),
                    stops=[stop for stop in stops if stop and REPLACEMENT_CHAR not in stop])


def run_stream(scenario: Scenario, decode: DecodeFn) -> tuple[list[OutputDelta], ScriptedSource]:
    source = ScriptedSource(scenario.chunks())
    request = EngineRequest("req-1", list(range(10, 10 + PROMPT_LEN)), SamplingSettings(), 64)
    stream = GenerationStream(request, scenario.stops, decode, source)

    async def collect() -> list[OutputDelta]:
        return [delta async for delta in stream.run()]
    return asyncio.run(collect()), source


def stop_token_count(decode: Callable[[list[int]], str], token_ids: list[int],
                     stops: list[str]) -> int:
    """How many ids the stream sends before it stops: up to the first id after which the text
    so far is out (it does not end inside a character) and holds a stop; all of them when only
    the final flush reveals the stop."""
    for count in range(1, len(token_ids) + 1):
        text = decode(token_ids[:count])
        if not text.endswith(REPLACEMENT_CHAR) and reference_cut(text, stops) is not None:
            return count
    return len(token_ids)


@pytest.mark.parametrize("decode_kind", ["function", "tokenizer"])
@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_stream_is_full_text_cut_at_first_stop(name: str, decode_kind: str,
                                               data: st.DataObject) -> None:
    tokenizer = TOKENIZERS[name]
    scenario = data.draw(scenarios(tokenizer))
    deltas, source = run_stream(scenario, decode_with(tokenizer, decode_kind))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    full = decode(scenario.token_ids)
    cut = reference_cut(full, scenario.stops)
    text = "".join(delta.text for delta in deltas)
    sent_ids = [token_id for delta in deltas for token_id in delta.token_ids]
    final = deltas[-1]
    event("stop string cut" if cut is not None else
          f"{scenario.reason.name} with a stop prefix held" if reference_hold(full, scenario.stops)
          else f"{scenario.reason.name}, nothing held")
    if full.endswith(REPLACEMENT_CHAR):
        event("ends inside a character")
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert sent_ids == scenario.token_ids[:len(sent_ids)]  # in order, none twice
    if cut is None:  # nothing held back may be lost, whatever ended the stream
        assert text == full
        assert final.finish_reason == scenario.reason
        assert sent_ids == scenario.token_ids and source.aborted == []
        assert final.usage.completion_tokens == len(scenario.token_ids)
        return
    assert text == full[:cut]
    assert final.finish_reason == FinishReason.STOP_SEQUENCE
    # the stream ends on the token that reveals the stop, not before, not after
    assert len(sent_ids) == stop_token_count(decode, scenario.token_ids, scenario.stops)
    assert final.usage.completion_tokens == len(sent_ids)
    stopped_in_last_message = source.sent_chunks == len(source.chunks)
    assert source.aborted == ([] if stopped_in_last_message else ["req-1"])


@pytest.mark.parametrize("reason", [FinishReason.EOS, FinishReason.LENGTH])
def test_partial_stop_prefix_is_released_when_the_engine_ends(reason: FinishReason) -> None:
    """The example the property test must keep covering: the text ends in '</an', a prefix of
    the stop '</answer>', when the engine finishes; '</an' is text and must reach the client."""
    tokenizer = TOKENIZERS["byte_level"]
    token_ids = tokenizer.encode("the answer </an", add_special_tokens=False).ids
    scenario = Scenario(token_ids=token_ids, chunk_sizes=[2] * len(token_ids), reason=reason,
                        finish_on_empty_message=False, stops=["</answer>"])
    for kind in ("function", "tokenizer"):
        deltas, _ = run_stream(scenario, decode_with(tokenizer, kind))
        assert "".join(delta.text for delta in deltas) == "the answer </an"
        assert deltas[-1].finish_reason == reason
