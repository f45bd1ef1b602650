"""The engine pool over fake engines: routing spreads requests and keeps a prefix on one engine,
health follows the engines (Watch), engines serving another model are refused, dns:/// targets
are re-resolved."""
from __future__ import annotations

import asyncio
import logging

import pytest

from tests.frontend.harness import REPLY_TEXT, wait_until
from tests.frontend.pool_harness import (NOT_SERVING, SERVING, pool_stack, request, resuming,
                                         text_of)


def test_round_robin_spreads_and_prefix_routing_keeps_a_prefix_on_one_engine() -> None:
    async def body() -> None:
        async with pool_stack([resuming()] * 3, routing="round-robin") as s:
            for i in range(6):
                assert text_of(await s.generate(request(f"question {i}"))) == REPLY_TEXT
            assert [len(s.sent(i)) for i in range(3)] == [2, 2, 2]
            assert s.metric("llmserve_frontend_routing_decisions_total",
                            reason="round_robin") == 6
            assert sum(s.metric("llmserve_frontend_engine_requests_total", engine=a)
                       for a in s.addresses) == 6
        async with pool_stack([resuming()] * 3) as s:   # prefix (the default)
            system = "You are a terse assistant for the lighthouse keepers' guild. " * 8
            for i in range(6):
                await s.generate(request(system + f"Question {i}?"))
            assert sorted(len(s.sent(i)) for i in range(3)) == [0, 0, 6]
            for i in range(12):   # distinct beginnings: spread over the engines
                await s.generate(request(f"{i} " * 40))
            assert sum(1 for i in range(3) if len(s.sent(i)) > 0) >= 2
            assert s.metric("llmserve_frontend_routing_decisions_total", reason="prefix") == 18
    asyncio.run(body())


def test_front_health_is_serving_while_one_engine_is() -> None:
    async def body() -> None:
        async with pool_stack([resuming()] * 2) as s:
            await s.servers[0].set_serving(False)
            await s.wait_usable(0, False)
            assert await s.health() == SERVING
            assert s.metric("llmserve_frontend_engine_serving", engine=s.addresses[0]) == 0
            for i in range(4):   # only the serving engine gets requests
                await s.generate(request(f"{i} " * 40))
            assert (len(s.sent(0)), len(s.sent(1))) == (0, 4)
            await s.servers[1].stop()
            await s.wait_health(NOT_SERVING)
            await s.servers[0].set_serving(True)
            await s.wait_health(SERVING)
            await s.servers[1].start(s.servers[1].port)   # back: used again
            await s.wait_usable(1)
            for i in range(4):
                await s.generate(request(f"{i} " * 40))
            assert len(s.sent(1)) > 4
    asyncio.run(body())


def test_engines_serving_different_models_are_refused(caplog) -> None:
    async def body() -> None:
        with pytest.raises(ValueError, match="the engines serve different models") as error:
            async with pool_stack([resuming()] * 2, models=["fake-model", "other-model"]):
                pass
        assert "'other-model'" in str(error.value) and "'fake-model'" in str(error.value)
        # one that shows up later serving something else: a log line, and never used
        async with pool_stack([resuming()] * 2, started=[True, False],
                              models=["fake-model", "other-model"]) as s:
            with caplog.at_level(logging.ERROR, logger="tokenizer_svc"):
                await s.servers[1].start(s.servers[1].port)
                await wait_until(lambda: "serves model 'other-model'" in caplog.text, 5.0,
                                 "no log line about the other model")
            assert s.addresses[1] in caplog.text and "not used" in caplog.text
            for i in range(6):
                assert text_of(await s.generate(request(f"{i} " * 40))) == REPLY_TEXT
            assert not s.sent(1)
            assert s.metric("llmserve_frontend_engine_serving", engine=s.addresses[1]) == 0
    asyncio.run(body())


def test_a_dns_target_is_resolved_again_and_followed(monkeypatch) -> None:
    answer: list[str] = []

    async def fake_resolve(name: str, port: int) -> list[str]:
        assert (name, port) == ("engines.test", 50052)
        return list(answer)

    monkeypatch.setattr("tokenizer_svc.engine_pool.resolve", fake_resolve)

    async def body() -> None:
        async with pool_stack([resuming()] * 2, routing="round-robin",
                              on_addresses=lambda addresses: answer.append(addresses[0]),
                              engine_address="dns:///engines.test:50052",
                              dns_refresh_interval_s=0.05) as s:
            for i in range(2):
                await s.generate(request(f"a{i}"))
            assert (len(s.sent(0)), len(s.sent(1))) == (2, 0)
            answer.append(s.addresses[1])   # a pod joins
            await s.wait_usable(1)
            for i in range(4):
                await s.generate(request(f"b{i}"))
            assert (len(s.sent(0)), len(s.sent(1))) == (4, 2)
            answer.remove(s.addresses[0])   # a pod leaves
            await wait_until(lambda: s.addresses[0] not in s.frontend.engines.endpoints, 5.0,
                             "engine 0 never left")
            for i in range(3):
                await s.generate(request(f"c{i}"))
            assert (len(s.sent(0)), len(s.sent(1))) == (4, 5)
            assert s.metric("llmserve_frontend_engine_requests_total",
                            engine=s.addresses[0]) == 0   # its series are gone
    asyncio.run(body())


def test_a_real_name_resolves() -> None:
    async def body() -> None:
        async with pool_stack([resuming()], engine_address=lambda addresses: (
                "dns:///localhost:" + addresses[0].rsplit(":", 1)[1])) as s:
            assert text_of(await s.generate(request())) == REPLY_TEXT
            assert f"127.0.0.1:{s.servers[0].port}" in s.frontend.engines.endpoints
    asyncio.run(body())
