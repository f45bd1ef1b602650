"""Router (pure logic): prefix keys, rendezvous ranking that every front agrees on, the load
bound, least-loaded and round-robin; --engine target parsing."""
from __future__ import annotations

import asyncio
import collections
import random

import pytest

from tokenizer_svc.config import FrontendConfig
from tokenizer_svc.engine_targets import format_address, parse_engine_targets, resolve
from tokenizer_svc.router import (LOAD_FACTOR, LOAD_SLACK, Router, RouterConfig, prefix_key,
                                  rendezvous_rank)

ENGINES = [f"10.0.0.{i}:50052" for i in range(1, 6)]


def _prompt(seed: int, length: int = 200) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 49000) for _ in range(length)]


def test_prefix_key_covers_the_first_k_whole_blocks() -> None:
    base = _prompt(1)
    assert prefix_key(base, 4) == prefix_key(base[:64] + _prompt(2), 4)  # same first 64 ids
    assert prefix_key(base, 4) != prefix_key(base[:63] + [7] + base[64:], 4)
    assert prefix_key(base, 2) == prefix_key(base[:32] + _prompt(3), 2)
    # shorter than K blocks: the whole blocks it has; shorter than a block: all of it
    assert prefix_key(base[:40], 4) == prefix_key(base[:32] + [1, 2, 3], 4)
    assert prefix_key(base[:5], 4) != prefix_key(base[:6], 4)


def test_rendezvous_ranking_is_the_same_whatever_the_order_fronts_list_engines_in() -> None:
    key = prefix_key(_prompt(4), 4)
    ranking = rendezvous_rank(key, ENGINES)
    assert sorted(ranking) == sorted(ENGINES)
    for _ in range(5):
        shuffled = random.sample(ENGINES, len(ENGINES))
        assert rendezvous_rank(key, shuffled) == ranking


def test_an_engine_leaving_moves_only_the_prefixes_it_had() -> None:
    keys = [prefix_key(_prompt(i, 64), 4) for i in range(600)]
    before = {k: rendezvous_rank(k, ENGINES)[0] for k in keys}
    gone = ENGINES[2]
    after = {k: rendezvous_rank(k, [e for e in ENGINES if e != gone])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone for k in moved)
    assert all(after[k] == rendezvous_rank(k, ENGINES)[1] for k in moved)  # to its 2nd choice
    counts = collections.Counter(before.values())   # and prefixes spread over every engine
    assert set(counts) == set(ENGINES) and min(counts.values()) > 600 / len(ENGINES) / 2


def test_two_fronts_route_a_prefix_to_the_same_engine() -> None:
    one, two = Router(), Router()
    for seed in range(50):
        prompt = _prompt(seed)
        idle = dict.fromkeys(ENGINES, 0)
        assert (one.choose(prompt, idle).engine
                == two.choose(prompt[:64] + _prompt(seed + 1000), dict(reversed(idle.items()))
                              ).engine)


def test_the_load_bound_sends_a_prefix_down_its_ranking() -> None:
    router = Router()
    prompt = _prompt(9)
    ranking = rendezvous_rank(prefix_key(prompt, 4), ENGINES)
    load = dict.fromkeys(ENGINES, 3)
    load[ranking[0]] = int(LOAD_FACTOR * 3 + LOAD_SLACK)   # at the bound: still chosen
    decision = router.choose(prompt, load)
    assert (decision.engine, decision.reason) == (ranking[0], "prefix")
    load[ranking[0]] += 1   # over it: the next-ranked engine, not just any
    decision = router.choose(prompt, load)
    assert (decision.engine, decision.reason) == (ranking[1], "prefix_overflow")
    load[ranking[1]] = 100
    assert router.choose(prompt, load).engine == ranking[2]
    busy = dict.fromkeys(ENGINES, 100)
    busy[ranking[-1]] = 0   # only the least loaded is within the bound
    assert router.choose(prompt, busy).engine == ranking[-1]


def test_least_loaded_and_round_robin() -> None:
    least = Router(RouterConfig(mode="least-loaded"))
    load = {"a:1": 3, "b:1": 1, "c:1": 2}
    assert least.choose([1], load).engine == "b:1"
    assert least.choose([1], load).reason == "least_loaded"
    ties = collections.Counter(least.choose([1], dict.fromkeys(ENGINES, 0)).engine
                               for _ in range(50))
    assert set(ties) == set(ENGINES)   # ties rotate
    turns = Router(RouterConfig(mode="round-robin"))
    picks = [turns.choose([1], dict.fromkeys(ENGINES, 0)) for _ in range(10)]
    assert [p.engine for p in picks] == sorted(ENGINES) * 2
    assert {p.reason for p in picks} == {"round_robin"}


def test_router_config_is_validated() -> None:
    with pytest.raises(ValueError, match="--routing must be one of prefix, least-loaded"):
        Router(RouterConfig(mode="random"))
    with pytest.raises(ValueError, match="--routing-prefix-blocks must be >= 1"):
        Router(RouterConfig(prefix_blocks=0))
    with pytest.raises(ValueError, match="no candidate engine"):
        Router().choose([1, 2], {})


def test_engine_targets() -> None:
    assert parse_engine_targets("127.0.0.1:50052").addresses == ("127.0.0.1:50052",)
    many = parse_engine_targets("127.0.0.1:50052, 127.0.0.1:50062,[::1]:7")
    assert many.addresses == ("127.0.0.1:50052", "127.0.0.1:50062", "[::1]:7")
    dns = parse_engine_targets("dns:///engine.llm.svc.cluster.local:50052")
    assert (dns.dns_name, dns.dns_port, dns.is_dns) == ("engine.llm.svc.cluster.local", 50052,
                                                        True)
    assert dns.describe() == "dns:///engine.llm.svc.cluster.local:50052"
    for bad, message in [("engine", "is not HOST:PORT"), ("a:1,b", "'b' in 'a:1,b'"),
                         ("a:99999", "is not HOST:PORT"), (",", "at least one"),
                         ("dns://8.8.8.8/x:1", "no DNS server authority"),
                         ("a:1,a:1", "twice")]:
        with pytest.raises(ValueError, match=message):
            parse_engine_targets(bad)
    with pytest.raises(ValueError, match="--engine"):
        FrontendConfig(model_dir="m", engine_address="nope").validate()
    with pytest.raises(ValueError, match="--max-engine-retries must be >= 0"):
        FrontendConfig(model_dir="m", max_engine_retries=-1).validate()
    assert format_address("::1", 5) == "[::1]:5"
    assert asyncio.run(resolve("localhost", 5))[0] in ("127.0.0.1:5", "[::1]:5")
