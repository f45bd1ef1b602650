"""The service streams text through the Rust incremental decoder (decoders.DecodeStream)."""
from __future__ import annotations

import asyncio

from tokenizers import Tokenizer

from llmserve.v1 import generate_pb2
from tests.frontend.harness import REPLY_TEXT, running_stack, text_reply
from tokenizer_svc import generation
from tokenizer_svc.detokenizer import IncrementalDetokenizer


def test_generate_detokenizes_through_the_rust_stream_decoder(monkeypatch) -> None:
    built: list[IncrementalDetokenizer] = []

    class Recording(IncrementalDetokenizer):
        __slots__ = ()

        def __init__(self, decode, skip_special_tokens: bool = True) -> None:
            super().__init__(decode, skip_special_tokens)
            built.append(self)

    monkeypatch.setattr(generation, "IncrementalDetokenizer", Recording)

    async def body() -> None:
        async with running_stack(text_reply()) as stack:
            request = generate_pb2.GenerateRequest(prompt="Hello", stopping=generate_pb2.
                                                   StoppingCriteria(max_new_tokens=100))
            messages = await stack.generate(request)
            assert "".join(m.text for m in messages) == REPLY_TEXT

    asyncio.run(body())
    assert built, "the service built no detokenizer"
    assert all(isinstance(d._tokenizer, Tokenizer) and d._stream is not None for d in built)
