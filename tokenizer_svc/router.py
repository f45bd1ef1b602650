"""Which engine gets a request: pure logic, no I/O (engine_pool.py feeds it the healthy set).

`prefix` (the default): the first K blocks of the prompt's token ids are hashed, and the engines
are ranked by rendezvous (highest-random-weight) hashing of that key with each engine's address.
Every front ranks the same set the same way without sharing any state, so requests that share
a prefix land on the same engine and hit its prefix cache. Load bounds it: the walk down the
ranking skips an engine whose outstanding requests (as this front sees them) exceed
LOAD_FACTOR x the least loaded engine's + LOAD_SLACK. The least loaded engine is never skipped,
so the walk always ends; a skipped prefix lands on its next-ranked engine (the same one on every
front), keeping its cache hits on at most a few engines.
`least-loaded`: fewest outstanding requests (ties rotate). `round-robin`: in turn.
"""
from __future__ import annotations

import hashlib
import itertools
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ROUTING_MODES = ("prefix", "least-loaded", "round-robin")
PREFIX_BLOCK_TOKENS = 16
LOAD_FACTOR = 2.0
LOAD_SLACK = 4
# reasons a decision carries (the llmserve_frontend_routing_decisions_total{reason} label)
REASONS = ("prefix", "prefix_overflow", "least_loaded", "round_robin")


@dataclass(slots=True)
class RouterConfig:
    """How to route: mode, prefix length and the load bound."""

    mode: str = "prefix"
    prefix_blocks: int = 4  # K: blocks of PREFIX_BLOCK_TOKENS ids hashed into the prefix key
    load_factor: float = LOAD_FACTOR
    load_slack: int = LOAD_SLACK

    def validate(self) -> None:
        """Raise ValueError naming the first setting that is out of range."""
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"--routing must be one of {', '.join(ROUTING_MODES)}, "
                             f"got {self.mode!r}")
        if self.prefix_blocks < 1:
            raise ValueError(f"--routing-prefix-blocks must be >= 1, got {self.prefix_blocks}")
        if self.load_factor < 1.0 or self.load_slack < 0:
            raise ValueError("the load bound needs factor >= 1 and slack >= 0")


@dataclass(slots=True)
class Decision:
    """The chosen engine and why."""

    engine: str
    reason: str


def prefix_key(prompt_ids: Sequence[int], blocks: int,
               block_tokens: int = PREFIX_BLOCK_TOKENS) -> bytes:
    """Hash of the prompt's first `blocks` whole blocks (all of it when shorter than a block)."""
    whole = len(prompt_ids) - len(prompt_ids) % block_tokens
    count = min(blocks * block_tokens, whole) or len(prompt_ids)
    ids = array("I", prompt_ids[:count])
    if ids.itemsize == 4 and sys.byteorder == "little":
        raw = ids.tobytes()
    else:   # the same bytes on every front: 4-byte little-endian ids
        raw = b"".join(int(t).to_bytes(4, "little") for t in ids)
    return hashlib.blake2b(raw, digest_size=16).digest()


def rendezvous_rank(key: bytes, engines: Sequence[str]) -> list[str]:
    """The engines by descending rendezvous weight for `key` (the same order on every front)."""
    def weight(engine: str) -> bytes:
        return hashlib.blake2b(key + engine.encode(), digest_size=8).digest()
    return sorted(engines, key=weight, reverse=True)


class Router:
    """Chooses an engine among candidates (address -> outstanding requests) for one request."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self.config.validate()
        self._turn = itertools.count()

    def choose(self, prompt_ids: Sequence[int], candidates: Mapping[str, int]) -> Decision:
        """Pick one of `candidates` (must not be empty) for a request with this prompt."""
        if not candidates:
            raise ValueError("no candidate engine")
        mode = self.config.mode
        if mode == "round-robin":
            engines = sorted(candidates)
            return Decision(engines[next(self._turn) % len(engines)], "round_robin")
        if mode == "least-loaded" or len(candidates) == 1:
            return Decision(self._least_loaded(candidates), "least_loaded" if mode != "prefix"
                            else "prefix")
        return self._prefix(prompt_ids, candidates)

    def _least_loaded(self, candidates: Mapping[str, int]) -> str:
        engines = sorted(candidates)
        start = next(self._turn) % len(engines)   # ties rotate instead of piling on the first
        rotated = engines[start:] + engines[:start]
        return min(rotated, key=candidates.__getitem__)

    def _prefix(self, prompt_ids: Sequence[int], candidates: Mapping[str, int]) -> Decision:
        ranking = rendezvous_rank(prefix_key(prompt_ids, self.config.prefix_blocks),
                                  list(candidates))
        bound = self.config.load_factor * min(candidates.values()) + self.config.load_slack
        for rank, engine in enumerate(ranking):
            if candidates[engine] <= bound:
                return Decision(engine, "prefix" if rank == 0 else "prefix_overflow")
        raise AssertionError("the least loaded engine is always within the bound")
