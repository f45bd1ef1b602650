"""StreamCoalescer: a request's tokens N per message; first token and last message never held."""
from __future__ import annotations

import pytest

from engine_svc.engine import RequestOutput
from engine_svc.params import FinishReason
from engine_svc.stream_interval import StreamCoalescer


def token(request_id: str, token_id: int, logprob: float = -1.0, top: bool = False) -> RequestOutput:
    out = RequestOutput(request_id, [token_id], [logprob])
    if top:
        out.top_logprobs = [[(token_id, logprob), (token_id + 1, logprob - 1.0)]]
    return out


def last(request_id: str, token_ids: list[int], reason: FinishReason = FinishReason.LENGTH,
         completion_tokens: int = 0) -> RequestOutput:
    return RequestOutput(request_id, list(token_ids), [-1.0] * len(token_ids), finish_reason=reason,
                         prompt_tokens=5, completion_tokens=completion_tokens,
                         cached_prompt_tokens=2)


def sent_ids(batches: list[list[RequestOutput]], request_id: str) -> list[list[int]]:
    return [out.token_ids for batch in batches for out in batch if out.request_id == request_id]


def test_interval_one_passes_every_step_through_unchanged() -> None:
    coalescer = StreamCoalescer(1)
    step = [token("a", 1), token("b", 2)]
    assert coalescer.push(step) is step
    assert coalescer.held_tokens == 0


def test_first_token_at_once_then_n_per_message_and_the_rest_with_the_finish() -> None:
    coalescer = StreamCoalescer(3)
    batches = [coalescer.push([token("a", t)]) for t in range(1, 7)]
    batches.append(coalescer.push([last("a", [7], completion_tokens=7)]))
    assert sent_ids(batches, "a") == [[1], [2, 3, 4], [5, 6, 7]]
    assert [len(b) for b in batches] == [1, 0, 0, 1, 0, 0, 1]   # nothing to send: no message
    final = batches[-1][0]
    assert final.finish_reason is FinishReason.LENGTH
    assert (final.prompt_tokens, final.completion_tokens, final.cached_prompt_tokens) == (5, 7, 2)
    assert final.logprobs == [-1.0, -1.0, -1.0]
    assert coalescer.held_tokens == 0


def test_requests_are_held_independently_and_nothing_is_lost() -> None:
    coalescer = StreamCoalescer(2)
    batches = [coalescer.push([token("a", 10)])]                       # a: first token
    batches.append(coalescer.push([token("a", 11), token("b", 20)]))   # b: first token
    batches.append(coalescer.push([token("a", 12), token("b", 21)]))
    assert coalescer.held_tokens == 1                                   # b's 21
    batches.append(coalescer.push([last("a", [13]), last("b", [22])]))
    assert sent_ids(batches, "a") == [[10], [11, 12], [13]]
    assert sent_ids(batches, "b") == [[20], [21, 22]]
    assert coalescer.held_tokens == 0


def test_abort_sends_the_held_tokens_with_the_finish() -> None:
    coalescer = StreamCoalescer(4)
    coalescer.push([token("a", 1)])
    coalescer.push([token("a", 2)])
    coalescer.push([token("a", 3)])
    (final,) = coalescer.push([last("a", [], FinishReason.ABORTED)])
    assert final.token_ids == [2, 3] and final.finish_reason is FinishReason.ABORTED


def test_logprobs_and_top_logprobs_stay_aligned_with_their_tokens() -> None:
    coalescer = StreamCoalescer(2)
    coalescer.push([token("a", 1, -0.1, top=True)])
    assert coalescer.push([token("a", 2, -0.2, top=True)]) == []
    (out,) = coalescer.push([token("a", 3, -0.3, top=True)])
    assert out.token_ids == [2, 3] and out.logprobs == [-0.2, -0.3]
    assert out.top_logprobs == [[(2, -0.2), (3, -1.2)], [(3, -0.3), (4, -1.3)]]


def test_a_request_id_used_again_after_it_finished_gets_its_first_token_at_once() -> None:
    coalescer = StreamCoalescer(3)
    coalescer.push([token("a", 1)])
    coalescer.push([last("a", [2])])
    assert sent_ids([coalescer.push([token("a", 5)])], "a") == [[5]]


def test_flush_hands_out_everything_held() -> None:
    coalescer = StreamCoalescer(5)
    coalescer.push([token("a", 1), token("b", 1)])
    coalescer.push([token("a", 2), token("b", 2)])
    coalescer.push([token("a", 3)])
    assert sorted((o.request_id, o.token_ids) for o in coalescer.flush()) == [
        ("a", [2, 3]), ("b", [2])]
    assert coalescer.held_tokens == 0 and coalescer.flush() == []


def test_interval_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="stream interval must be >= 1, got 0"):
        StreamCoalescer(0)
