"""Overload: 200 concurrent streams against a small engine (8 slots, 16 queued, 160 KV rows).

Short prompts and long outputs: the requests admitted together outgrow the pool while they
decode, so the engine must preempt (llmserve_preemptions_total rises) and recompute. Every
stream either completes with the greedy text of its prompt or is refused quickly with
RESOURCE_EXHAUSTED; none hangs; afterwards the pool is idle.
"""
from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest

from tests.e2e.services import metric_value, scrape
from tests.reliability.harness import start_stack, wait_pool_idle
from tests.reliability.messages import PROMPTS, Outcome, collect, collect_async, text_request, \
    text_stub

pytestmark = pytest.mark.timeout(240)

STREAMS = 200
MAX_NEW_TOKENS = 24
KV_ROWS = 160  # 7 admitted prompts of 15-35 tokens + 24 new tokens each need ~2x this
CALL_TIMEOUT_S = 90.0
REJECT_WITHIN_S = 2.0
ARRIVAL_SPREAD_S = 3.0
# Distinct prompts of 15-35 tokens: 7 of them fit in the pool at once, their outputs do not
# (even when they share prompts through the prefix cache: the outputs alone need 8 * 24 rows).
LOAD_PROMPTS = [f"{prompt} " + " ".join(f"{prompt.split()[0]}{i}" for i in range(6))
                for prompt in PROMPTS]


@pytest.fixture(scope="module")
def small_stack(default_model_dir, log_dir):
    engine, tokenizer = start_stack(
        default_model_dir, log_dir,
        engine_extra=("--max-queue", "16", "--max-num-seqs", "8", "--max-model-len", "128",
                      "--kv-capacity-tokens", str(KV_ROWS)))
    try:
        yield engine, tokenizer
    finally:
        tokenizer.stop()
        engine.stop()


def reference_texts(tokenizer) -> dict[str, Outcome]:
    """Each prompt's greedy output, one request at a time."""
    with tokenizer.channel() as channel:
        return {prompt: collect(text_stub(channel).Generate(
                    text_request(prompt, MAX_NEW_TOKENS, ignore_eos=True), timeout=60))
                for prompt in LOAD_PROMPTS}


async def storm(address: str) -> list[tuple[str, Outcome, float]]:
    """STREAMS streams arriving over ARRIVAL_SPREAD_S; (prompt, outcome, seconds) for each."""
    rng = random.Random(8)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = text_stub(channel)

        async def one(index: int) -> tuple[str, Outcome, float]:
            await asyncio.sleep(rng.uniform(0, ARRIVAL_SPREAD_S))
            prompt = LOAD_PROMPTS[index % len(LOAD_PROMPTS)]
            started = time.monotonic()
            call = stub.Generate(text_request(prompt, MAX_NEW_TOKENS, ignore_eos=True),
                                 timeout=CALL_TIMEOUT_S)
            outcome = await collect_async(call)
            return prompt, outcome, time.monotonic() - started

        return await asyncio.gather(*(one(i) for i in range(STREAMS)))


def test_overload_completes_or_refuses_fast_and_leaves_the_pool_idle(small_stack) -> None:
    engine, tokenizer = small_stack
    references = reference_texts(tokenizer)
    assert all(ref.code == grpc.StatusCode.OK for ref in references.values())
    assert all(len(ref.token_ids) == MAX_NEW_TOKENS for ref in references.values())
    preempted_before = metric_value(scrape(engine.metrics_port), "llmserve_preemptions_total")
    results = asyncio.run(storm(tokenizer.address))

    completed = [r for r in results if r[1].code == grpc.StatusCode.OK]
    refused = [r for r in results if r[1].code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    other = [(r[1].code, r[1].details) for r in results if r not in completed + refused]
    assert other == []  # no hang (DEADLINE_EXCEEDED), no INTERNAL/UNAVAILABLE
    assert len(completed) + len(refused) == STREAMS
    assert completed and refused, (len(completed), len(refused))  # it really was overloaded
    for prompt, outcome, _ in completed:  # preempted and recomputed or not: the same output
        assert outcome.text == references[prompt].text
        assert outcome.token_ids == references[prompt].token_ids
        assert outcome.finish_reason == references[prompt].finish_reason
    slow_refusals = [seconds for _, _, seconds in refused if seconds >= REJECT_WITHIN_S]
    assert slow_refusals == []
    for _, outcome, _ in refused:
        assert "queue is full" in outcome.details
    state = wait_pool_idle(engine)
    assert not any(state.values()), state
    for service in (engine, tokenizer):
        assert service.crash_lines() == [], service.name
    preemptions = metric_value(scrape(engine.metrics_port), "llmserve_preemptions_total")
    print(f"\noverload: {len(completed)} completed, {len(refused)} refused "
          f"(slowest refusal {max(s for _, _, s in refused):.2f} s), "
          f"{preemptions - preempted_before:.0f} preemptions")
    assert preemptions > preempted_before  # the pool really ran dry and the engine preempted
