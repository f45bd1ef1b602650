"""One engine as the pool sees it: its client, health, model info and the calls open on it."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from tokenizer_svc.engine_client import EngineClient, EngineStream
from tokenizer_svc.schema import EngineLimits


@dataclass(slots=True, frozen=True)
class ModelIdentity:
    """What must agree between engines for one front to serve them all."""

    model: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def of(cls, limits: EngineLimits) -> ModelIdentity:
        return cls(limits.model, limits.vocab_size, tuple(sorted(limits.eos_token_ids)))

    def __str__(self) -> str:
        return f"model {self.model!r} (vocab {self.vocab_size}, eos {list(self.eos_token_ids)})"


class Lease:
    """One open Generate call on an endpoint: progress time, and lose() to move it off."""

    __slots__ = ("stream", "last_progress", "lost")

    def __init__(self, stream: EngineStream) -> None:
        self.stream = stream
        self.last_progress = time.monotonic()
        self.lost: str | None = None

    def lose(self, reason: str) -> None:
        self.lost = reason
        self.stream.cancel()


class Endpoint:
    """One engine: its client (channel), health, model info and this front's calls on it."""

    def __init__(self, address: str, client: EngineClient) -> None:
        self.address = address
        self.client = client
        self.healthy = False
        self.limits: EngineLimits | None = None
        self.mismatch: ModelIdentity | None = None   # serves another model: never used
        self.removed = False
        self.leases: set[Lease] = set()
        self.watch_task: asyncio.Task[None] | None = None
        self.stall_task: asyncio.Task[None] | None = None

    @property
    def usable(self) -> bool:
        return (self.healthy and self.limits is not None and self.mismatch is None
                and not self.removed)

    @property
    def outstanding(self) -> int:
        return len(self.leases)
