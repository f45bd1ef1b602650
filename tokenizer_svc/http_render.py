"""OpenAI response bodies and SSE chunks of the HTTP edge, built from OutputDelta.

Plain dicts (serialized once with json.dumps) rather than pydantic models: a stream sends one
chunk per token, and building a model per chunk would cost more than the detokenizer does.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenizer_svc.http_openai import LogprobRequest
from tokenizer_svc.schema import FinishReason, OutputDelta, TokenLogprobInfo, UsageCounts

FINISH_REASONS = {FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop",
                  FinishReason.STOP_TOKEN: "stop", FinishReason.LENGTH: "length",
                  FinishReason.ABORTED: "abort"}


def token_string(raw: bytes) -> str:
    """A token's text, or OpenAI's `bytes:\\xNN...` spelling when it is not whole UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)


def usage_json(usage: UsageCounts | None) -> dict:
    usage = usage or UsageCounts()
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens}}


def sse(payload: dict | str) -> bytes:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


@dataclass(slots=True)
class ChoiceState:
    """One choice of a non-streamed response, accumulated from its deltas."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobInfo] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(slots=True)
class Renderer:
    """Builds the bodies of one chat or text completion (n choices, maybe logprobs)."""

    chat: bool
    response_id: str
    model: str
    created: int
    logprobs: LogprobRequest
    token_bytes: Callable[[int], bytes]
    include_usage: bool = False
    _text_offsets: dict[int, int] = field(default_factory=dict)

    @property
    def _object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = self._object + (".chunk" if chunk and self.chat else "")
        body = {"id": self.response_id, "object": kind, "created": self.created,
                "model": self.model, "choices": choices}
        if chunk and self.include_usage:
            body["usage"] = None
        return body

    # ---- logprobs ----
    def _top(self, info: TokenLogprobInfo) -> list[tuple[str, bytes, float]]:
        top = info.top[:self.logprobs.top]
        return [(token_string(raw), raw, logprob)
                for raw, logprob in ((self.token_bytes(t), p) for t, p in top)]

    def _chat_logprobs(self, infos: list[TokenLogprobInfo]) -> dict | None:
        if not self.logprobs.wanted:
            return None
        content = []
        for info in infos:
            raw = self.token_bytes(info.token_id)
            content.append({"token": token_string(raw), "logprob": info.logprob,
                            "bytes": list(raw),
                            "top_logprobs": [{"token": text, "logprob": logprob,
                                              "bytes": list(top_raw)}
                                             for text, top_raw, logprob in self._top(info)]})
        return {"content": content}

    def _completion_logprobs(self, index: int, infos: list[TokenLogprobInfo]) -> dict | None:
        if not self.logprobs.wanted:
            return None
        tokens, offsets = [], []
        offset = self._text_offsets.get(index, 0)
        for info in infos:
            tokens.append(token_string(self.token_bytes(info.token_id)))
            offsets.append(offset)
            offset += len(tokens[-1])
        self._text_offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": [info.logprob for info in infos],
                "top_logprobs": [{text: logprob for text, _, logprob in self._top(info)}
                                 for info in infos],
                "text_offset": offsets}

    def _logprobs(self, index: int, infos: list[TokenLogprobInfo]) -> dict | None:
        return (self._chat_logprobs(infos) if self.chat
                else self._completion_logprobs(index, infos))

    # ---- streaming ----
    def role_chunk(self, index: int) -> bytes:
        """A chat stream's first chunk per choice: the assistant role."""
        return sse(self._envelope([{"index": index, "logprobs": None, "finish_reason": None,
                                    "delta": {"role": "assistant", "content": ""}}], True))

    def delta_chunk(self, index: int, delta: OutputDelta) -> bytes | None:
        """The chunk for one delta of choice `index`; None when it carries nothing to send."""
        finish = None if delta.finish_reason is None else FINISH_REASONS[delta.finish_reason]
        if not delta.text and finish is None and not (self.logprobs.wanted and delta.logprobs):
            return None
        choice: dict = {"index": index, "logprobs": self._logprobs(index, delta.logprobs),
                        "finish_reason": finish}
        if self.chat:
            choice["delta"] = {"content": delta.text} if delta.text else {}
        else:
            choice["text"] = delta.text
        return sse(self._envelope([choice], True))

    def usage_chunk(self, usage: UsageCounts | None) -> bytes:
        """The extra last chunk of stream_options.include_usage: no choices, the usage."""
        body = self._envelope([], True)
        body["usage"] = usage_json(usage)
        return sse(body)

    # ---- whole response ----
    def response(self, choices: list[ChoiceState], usage: UsageCounts | None) -> dict:
        """The non-streamed body of all choices."""
        rendered = []
        for index, state in enumerate(choices):
            choice: dict = {"index": index, "finish_reason": state.finish_reason,
                            "logprobs": self._logprobs(index, state.logprobs)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": "".join(state.text)}
            else:
                choice["text"] = "".join(state.text)
            rendered.append(choice)
        body = self._envelope(rendered, False)
        body["usage"] = usage_json(usage)
        return body
