"""GenerationStream on internal types with an in-memory token source (no gRPC)."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.fakes.tiny_tokenizer import byte_level_bpe
from tokenizer_svc.generation import GenerationStream
from tokenizer_svc.schema import (EngineChunk, EngineRequest, FinishReason, SamplingSettings,
                                  ServiceError, TokenLogprobInfo, UsageCounts)

TOKENIZER = byte_level_bpe()


def decode(ids) -> str:
    return TOKENIZER.decode(list(ids), skip_special_tokens=True)


class ListSource:
    """Streams prepared chunks; after abort() it ends with ABORTED + usage (like the engine)."""

    def __init__(self, chunks: list[EngineChunk], cached: int = 0) -> None:
        self.chunks = chunks
        self.cached = cached
        self.aborted: list[str] = []
        self.closed = False

    async def generate(self, request, timeout_s=None):
        try:
            for chunk in self.chunks:
                if self.aborted:
                    yield EngineChunk([], finish_reason=FinishReason.ABORTED,
                                      usage=UsageCounts(7, 99, self.cached))
                    return
                yield chunk
        finally:
            self.closed = True

    async def abort(self, request_id: str, timeout_s: float = 1.0) -> bool:
        self.aborted.append(request_id)
        return True


def request(prompt_len: int = 3) -> EngineRequest:
    return EngineRequest("req-1", list(range(10, 10 + prompt_len)), SamplingSettings(), 64)


def run(stream: GenerationStream):
    async def collect():
        return [delta async for delta in stream.run()]
    return asyncio.run(collect())


def token_chunks(text: str, size: int, finish: FinishReason = FinishReason.EOS,
                 cached: int = 0) -> list[EngineChunk]:
    ids = TOKENIZER.encode(text, add_special_tokens=False).ids
    chunks = [EngineChunk(ids[i:i + size]) for i in range(0, len(ids), size)]
    chunks[-1].finish_reason = finish
    chunks[-1].usage = UsageCounts(3, len(ids), cached)
    return chunks


def test_stop_inside_a_multi_token_chunk_cuts_ids_and_aborts() -> None:
    text = "the quick brown fox jumps over the lazy dog"
    all_ids = TOKENIZER.encode(text, add_special_tokens=False).ids
    source = ListSource(token_chunks(text, size=4), cached=2)
    deltas = run(GenerationStream(request(), [" fox"], decode, source))
    assert "".join(d.text for d in deltas) == "the quick brown"
    final = deltas[-1]
    assert final.finish_reason == FinishReason.STOP_SEQUENCE
    assert source.aborted == ["req-1"] and source.closed
    sent_ids = [t for d in deltas for t in d.token_ids]
    assert sent_ids == all_ids[:len(sent_ids)]
    assert decode(sent_ids).endswith(" fox") and not decode(sent_ids[:-1]).endswith(" fox")
    assert final.usage == UsageCounts(prompt_tokens=3, completion_tokens=len(sent_ids),
                                      cached_prompt_tokens=2)


def test_stop_in_the_engines_last_chunk_needs_no_abort() -> None:
    text = "hello world"
    source = ListSource(token_chunks(text, size=100, cached=5))
    deltas = run(GenerationStream(request(), ["world"], decode, source))
    assert "".join(d.text for d in deltas) == "hello "
    assert deltas[-1].finish_reason == FinishReason.STOP_SEQUENCE
    assert deltas[-1].usage.cached_prompt_tokens == 5  # taken from the engine's last message
    assert source.aborted == []


def test_engine_finish_passes_reason_and_usage() -> None:
    text = "hello world 😀 你好"
    source = ListSource(token_chunks(text, size=1, finish=FinishReason.LENGTH, cached=1))
    deltas = run(GenerationStream(request(prompt_len=5), [], decode, source))
    assert "".join(d.text for d in deltas) == text
    assert all(d.finish_reason is None for d in deltas[:-1])
    n_ids = len(TOKENIZER.encode(text, add_special_tokens=False).ids)
    assert deltas[-1].finish_reason == FinishReason.LENGTH
    assert deltas[-1].usage == UsageCounts(5, n_ids, 1)
    assert source.aborted == []


def test_logprobs_follow_their_tokens() -> None:
    chunks = [EngineChunk([40, 41], [TokenLogprobInfo(40, -0.1, [(40, -0.1)]),
                                     TokenLogprobInfo(41, -0.2)]),
              EngineChunk([42], [TokenLogprobInfo(42, -0.3)], FinishReason.EOS,
                          UsageCounts(3, 3, 0))]
    deltas = run(GenerationStream(request(), [], decode, ListSource(chunks)))
    assert [lp.token_id for d in deltas for lp in d.logprobs] == [40, 41, 42]
    assert deltas[0].logprobs[0].top == [(40, -0.1)]


def test_stream_without_finish_reason_is_an_error() -> None:
    source = ListSource([EngineChunk([40])])
    with pytest.raises(ServiceError) as error:
        run(GenerationStream(request(), [], decode, source))
    assert error.value.code == grpc.StatusCode.INTERNAL
