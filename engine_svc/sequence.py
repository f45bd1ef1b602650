"""A request as the scheduler sees it: token ids, pool rows, progress. No torch here."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from engine_svc.params import MAX_SEED, FinishReason, SamplingParams, StoppingParams


class SeqStatus(Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    FORK_PENDING = "fork_pending"   # sample i > 0 of an n request, before its prompt is prefilled
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One sample of a request: prompt + generated ids, and the pool rows holding their K/V."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    index: int = 0                      # which of the request's n samples this is
    forks: list[Sequence] = field(default_factory=list)  # samples that fork off this one's prompt
    abort_requested: bool = False       # set by LLMEngine.abort; the engine thread ends it
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    slot: int = -1                      # row of the request->token table while running
    num_computed: int = 0               # tokens whose K/V sit in the pool
    cached_tokens: int = 0              # prompt tokens served by the prefix cache (first admission)
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    sampler_state: object = None        # the model runner's per-request state (seeded generator)
    stop_ids_banned: tuple[int, ...] = ()  # ids masked until min_tokens exist (eos + stop ids)
    grammar: object = None              # the runner's GrammarState (response_format), own per seq
    first_token_time: float | None = None
    last_token_time: float | None = None
    # a request resumed after failover: the last N prompt ids were generated (penalties count
    # them as output); deadline: time.monotonic() after which it is not worth computing
    num_generated_prompt_tokens: int = 0
    deadline: float | None = None
    _rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def pending_forks(self) -> list[Sequence]:
        """The forks still waiting for this sequence's prompt (not ended meanwhile)."""
        return [f for f in self.forks if f.status is SeqStatus.FORK_PENDING]

    @property
    def rows(self) -> np.ndarray:
        """Pool rows of tokens [0, num_computed), a view (do not keep across steps)."""
        return self._rows[:self.num_computed]

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Token ids at positions [start, stop) of prompt + output."""
        prompt_len = len(self.prompt_ids)
        if stop <= prompt_len:
            return self.prompt_ids[start:stop]
        if start >= prompt_len:
            return self.output_ids[start - prompt_len:stop - prompt_len]
        return self.prompt_ids[start:] + self.output_ids[:stop - prompt_len]

    def step_logit_bias(self) -> dict[int, float] | None:
        """What the sampler adds to this row's logits now: the request's logit_bias, and -inf on
        `stop_ids_banned` while fewer than min_tokens tokens were generated (None: nothing)."""
        bias = self.sampling.logit_bias
        if not self.stop_ids_banned or len(self.output_ids) >= self.stopping.min_tokens:
            return bias or None
        return {**bias, **dict.fromkeys(self.stop_ids_banned, float("-inf"))}

    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def generated_ids(self) -> list[int]:
        """Every generated id: output_ids, after the prompt's generated tail when resumed."""
        n = self.num_generated_prompt_tokens
        if not n:
            return self.output_ids
        return self.prompt_ids[len(self.prompt_ids) - n:] + self.output_ids

    def expired(self, now: float) -> bool:
        """True once the request's deadline has passed."""
        return self.deadline is not None and now >= self.deadline

    def append_rows(self, new_rows: np.ndarray) -> None:
        """Record that the next len(new_rows) tokens now have K/V in these rows."""
        end = self.num_computed + len(new_rows)
        if end > len(self._rows):
            grown = np.empty(max(end, 2 * len(self._rows), 16), dtype=np.int64)
            grown[:self.num_computed] = self._rows[:self.num_computed]
            self._rows = grown
        self._rows[self.num_computed:end] = new_rows
        self.num_computed = end

    def drop_rows(self) -> np.ndarray:
        """Forget every row (preemption / end); returns them for the caller to free."""
        rows = self._rows[:self.num_computed].copy()
        self.num_computed = 0
        return rows


def make_samples(leader: Sequence, n: int) -> list[Sequence]:
    """The n samples of one request: `leader` (index 0) and n - 1 forks that will share its
    prompt's pool rows once it is prefilled; with a seed, sample i draws with seed + i."""
    seed = leader.sampling.seed
    for index in range(1, n):
        sampling = (leader.sampling if seed is None
                    else dataclasses.replace(leader.sampling, seed=(seed + index) % MAX_SEED))
        leader.forks.append(Sequence(
            leader.request_id, leader.prompt_ids, sampling, leader.stopping, index=index,
            arrival_time=leader.arrival_time, status=SeqStatus.FORK_PENDING,
            stop_ids_banned=leader.stop_ids_banned, deadline=leader.deadline,
            num_generated_prompt_tokens=leader.num_generated_prompt_tokens))
    return [leader, *leader.forks]
