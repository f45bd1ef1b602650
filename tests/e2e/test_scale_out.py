"""Three real engines on loopback behind tokenizer services: routing spreads load, shared
prefixes hit one engine's cache (two fronts agree), kill -9 of an engine during 32 greedy + 4
seeded streams loses nothing (text equal to the uninterrupted run), the restarted engine
joins again, and a burst of requests with a 300 ms deadline leaves every engine idle within
1 s of the last deadline."""
from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest

from llmserve.v1 import generate_pb2_grpc
from tests.e2e.cluster import (Cluster, Streamed, engine_proc, engines_idle, metric,
                               prompts_routed_to, start_cluster, stream, text_request)
from tests.e2e.cluster import ENGINE_EXTRA
from tokenizer_svc.tokenizer import ModelTokenizer

pytestmark = pytest.mark.timeout(400)

STREAMS, SEEDED, NEW_TOKENS = 32, 4, 32
SYSTEM_TOPICS = ["lighthouses", "glaciers", "bees", "violins", "tides", "comets", "ferns",
                 "harbours", "deserts", "owls", "bridges", "orchards", "volcanoes", "canals",
                 "lanterns", "reefs"]


@pytest.fixture(scope="module")
def cluster(default_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("scale-out-logs")
    cluster = start_cluster(default_model_dir, logs, 3, {
        "prefix": (), "peer": (), "round_robin": ("--routing", "round-robin")})
    cluster.log_dir, cluster.model_dir = logs, default_model_dir
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def tokenizer(default_model_dir) -> ModelTokenizer:
    return ModelTokenizer.from_pretrained(default_model_dir)


async def _run(front, requests, kill=None, kill_after: int | None = None) -> list[Streamed]:
    """All requests at once through `front`; kill() once each of the first `kill_after`
    streams (default: every stream) has 2 messages."""
    async with grpc.aio.insecure_channel(front.address) as channel:
        stub = generate_pb2_grpc.TextGenerationStub(channel)
        events = [asyncio.Event() for _ in requests]
        tasks = [asyncio.create_task(stream(stub, r, 120, e)) for r, e in zip(requests, events)]
        if kill is not None:
            await asyncio.gather(*(e.wait() for e in events[:kill_after]))
            kill()
        return list(await asyncio.gather(*tasks))


def test_kill_9_during_streams_loses_nothing_and_the_engine_joins_again(cluster: Cluster,
                                                                        tokenizer) -> None:
    front, victim = cluster.fronts["prefix"], cluster.engines[0]
    addresses = [e.address for e in cluster.engines]
    greedy = [text_request(f"Note {i}: write about the sea, the wind and the old boats.",
                           NEW_TOKENS) for i in range(STREAMS)]
    seeded_prompts = prompts_routed_to(tokenizer, addresses, victim.address, SEEDED,
                                       "Tale {}: a fox, a river and a lantern.")
    seeded = [text_request(p, NEW_TOKENS, seed=1000 + i, temperature=0.9)
              for i, p in enumerate(seeded_prompts)]
    requests = seeded + greedy   # seeded first: routed to the victim while it is not busy yet
    reference = asyncio.run(_run(front, requests))   # uninterrupted, one engine each
    assert all(r.code == grpc.StatusCode.OK for r in reference), [r.details for r in reference]
    served = [metric(front, f'llmserve_frontend_engine_requests_total{{engine="{a}"}}')
              for a in addresses]
    assert sum(served) == STREAMS + SEEDED and min(served) >= 3, served   # spread over all

    killed_at: list[float] = []
    on_victim = f'llmserve_frontend_engine_inflight_requests{{engine="{victim.address}"}}'

    def kill() -> None:
        killed_at.append(metric(front, on_victim))
        victim.kill()
        killed_at.append(time.monotonic())

    # killed as soon as the first seeded stream (all are routed to the victim) is under way:
    # waiting for more let the victim finish its own first on a loaded machine (CI once saw 1
    # of 4 still in flight), leaving little to move
    survived = asyncio.run(_run(front, requests, kill, kill_after=1))
    held, recovery_s = killed_at[0], time.monotonic() - killed_at[1]
    assert held >= 1   # streams in flight on the victim when it died (each must move once)
    assert [r.code for r in survived] == [grpc.StatusCode.OK] * (STREAMS + SEEDED), \
        [r.details for r in survived if r.details]
    for index, (before, after) in enumerate(zip(reference, survived)):
        assert after.token_ids == before.token_ids, f"stream {index} differs after failover"
        assert after.text == before.text
        assert after.usage.prompt_tokens == before.usage.prompt_tokens
        assert after.usage.completion_tokens == NEW_TOKENS
    moved = metric(front, f'llmserve_frontend_failovers_total{{engine="{victim.address}"}}')
    # each stream cut off moved once; the gauge read just before the kill may count a stream
    # whose last message was already on its way (CI: 16 moved of 17 counted)
    assert 1 <= moved <= held, (moved, held)
    print(f"\nkill -9 of 1 of 3 engines: {STREAMS + SEEDED}/{STREAMS + SEEDED} streams complete "
          f"and equal, {moved:.0f} failed over, all done {recovery_s:.2f} s after the kill")

    restarted = engine_proc(cluster.model_dir, cluster.log_dir, *ENGINE_EXTRA,
                            port=victim.port).spawn()
    cluster.engines[0] = restarted
    restarted.wait_serving(timeout=180)
    serving = f'llmserve_frontend_engine_serving{{engine="{victim.address}"}}'
    deadline = time.monotonic() + 20
    while metric(front, serving) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(front, serving) == 1
    back = prompts_routed_to(tokenizer, addresses, victim.address, 3, "Again {}: hello there.")
    results = asyncio.run(_run(front, [text_request(p, 4) for p in back]))
    assert all(r.code == grpc.StatusCode.OK for r in results)
    assert metric(restarted, "llmserve_requests_finished_total") >= 3   # it got them again


def _system_workload(topics: list[str], rng: random.Random) -> list[list[tuple[str, str]]]:
    """8 requests per topic: a ~230-token system prompt of its own, then one question."""
    chats = []
    for topic in topics:
        system = (f"You are the {topic} expert of the museum. " + " ".join(
            f"Rule {k}: answer questions about {topic} briefly, kindly and with one concrete "
            f"fact." for k in range(11)))
        chats += [[("system", system), ("user", f"Question {q} about {topic}?")]
                  for q in range(8)]
    first = [chats[8 * t] for t in range(len(topics))]   # each system prompt's first request
    rest = [c for c in chats if c not in first]
    rng.shuffle(rest)
    return first + rest


def _hit_ratio(tokenizer, chats, results) -> tuple[float, int, int]:
    """Measured cached prompt tokens / the ideal (every request but the first of its system
    prompt reuses the longest prefix it shares with an earlier one)."""
    ideal, seen = 0, []
    for chat in chats:
        ids = tokenizer.chat_ids([_turn(r, c) for r, c in chat])
        ideal += max((_common(ids, other) for other in seen), default=0)
        seen.append(ids)
    measured = sum(r.usage.cached_prompt_tokens for r in results)
    return measured / ideal, measured, ideal


def _turn(role: str, content: str):
    from tokenizer_svc.schema import ChatTurn
    return ChatTurn(role, content)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


async def _workload(front, chats, concurrency: int) -> list[Streamed]:
    """The first request of each system prompt together, then the rest `concurrency` at once."""
    async with grpc.aio.insecure_channel(front.address) as channel:
        stub = generate_pb2_grpc.TextGenerationStub(channel)
        topics = len(chats) // 8
        results = list(await asyncio.gather(*(stream(stub, text_request(chat=c, max_new_tokens=2))
                                              for c in chats[:topics])))
        gate = asyncio.Semaphore(concurrency)

        async def one(chat) -> Streamed:
            async with gate:
                return await stream(stub, text_request(chat=chat, max_new_tokens=2))
        return results + list(await asyncio.gather(*(one(c) for c in chats[topics:])))


def test_prefix_routing_hits_the_cache_and_two_fronts_agree(cluster: Cluster, tokenizer) -> None:
    rng = random.Random(7)
    chats = _system_workload(SYSTEM_TOPICS[:8], rng)
    prefix = asyncio.run(_workload(cluster.fronts["prefix"], chats, concurrency=4))
    assert all(r.code == grpc.StatusCode.OK for r in prefix)
    prefix_ratio, measured, ideal = _hit_ratio(tokenizer, chats, prefix)
    # another front (no shared state) sends each system prompt to the same engine: cached
    firsts = chats[:8]
    again = [[first[0], ("user", "One more question?")] for first in firsts]
    peer = asyncio.run(_workload(cluster.fronts["peer"], again, concurrency=8))
    system_tokens = [_common(tokenizer.chat_ids([_turn(*t) for t in chat]),
                             tokenizer.chat_ids([_turn(*t) for t in first]))
                     for chat, first in zip(again, firsts)]
    cached = [r.usage.cached_prompt_tokens for r in peer]
    assert all(got >= want for got, want in zip(cached, system_tokens)), (cached, system_tokens)

    other = _system_workload(SYSTEM_TOPICS[8:], rng)   # fresh prompts: nothing cached yet
    spread = asyncio.run(_workload(cluster.fronts["round_robin"], other, concurrency=4))
    assert all(r.code == grpc.StatusCode.OK for r in spread)
    rr_ratio, rr_measured, rr_ideal = _hit_ratio(tokenizer, other, spread)
    print(f"\ncache hit ratio vs ideal, 64 requests / 8 system prompts / 3 engines: prefix "
          f"{prefix_ratio:.2f} ({measured}/{ideal} tokens), round-robin {rr_ratio:.2f} "
          f"({rr_measured}/{rr_ideal})")
    assert prefix_ratio >= 0.8
    assert prefix_ratio > rr_ratio


def test_a_deadline_burst_leaves_the_engines_idle_within_a_second(cluster: Cluster) -> None:
    async def burst() -> float:
        front = cluster.fronts["prefix"]
        async with grpc.aio.insecure_channel(front.address) as channel:
            stub = generate_pb2_grpc.TextGenerationStub(channel)
            requests = [text_request(f"Burst {i}: tell me everything about the ocean.", 200)
                        for i in range(200)]
            calls, last_deadline = [], 0.0
            for request in requests:
                calls.append(asyncio.create_task(stream(stub, request, timeout=0.3)))
                last_deadline = time.monotonic() + 0.3
            results = await asyncio.gather(*calls)
        assert all(r.code == grpc.StatusCode.DEADLINE_EXCEEDED or r.code == grpc.StatusCode.OK
                   for r in results), {r.code for r in results}
        return last_deadline

    last_deadline = asyncio.run(burst())
    while not engines_idle(cluster.engines) and time.monotonic() < last_deadline + 10:
        time.sleep(0.02)
    idle_after = time.monotonic() - last_deadline
    print(f"\n200 requests with a 300 ms deadline: every engine idle {idle_after:.2f} s after "
          f"the last deadline")
    assert idle_after <= 1.0
