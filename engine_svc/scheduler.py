"""Iteration-level continuous batching: decides which tokens each step computes.

The scheduler owns the waiting queue and the running set, gives out pool rows and
request->token table slots, preempts the newest request when the pool runs dry and
returns every row when a request ends. It never touches tensors (no torch import).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from engine_svc.config import EngineConfig
from engine_svc.kv_pool import KVPool
from engine_svc.params import FinishReason
from engine_svc.prefix_cache import PrefixCache
from engine_svc.sequence import Sequence, SeqStatus

if TYPE_CHECKING:   # the allocator's module holds the device table too: no torch import here
    from engine_svc.req_to_token import SlotAllocator


@dataclass(slots=True)
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of one sequence, computed this step."""

    seq: Sequence
    start: int
    num_tokens: int
    new_rows: np.ndarray        # [num_tokens] int64 pool rows for these tokens
    samples: bool               # the chunk reaches the last known token: sample the next one
    # samples of the same request forked here (num_tokens 0): they share this sequence's prompt
    # rows and sample their first token from this chunk's last logits
    forks: list[ScheduledChunk] = field(default_factory=list)


@dataclass(slots=True)
class StepPlan:
    """One step's work: decode chunks (one token each) first, then prefill chunks."""

    decode: list[ScheduledChunk] = field(default_factory=list)
    prefill: list[ScheduledChunk] = field(default_factory=list)
    preempted: int = 0
    expired: list[Sequence] = field(default_factory=list)  # ended ABORTED: deadline passed

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decode + self.prefill

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.num_tokens for c in self.prefill)

    @property
    def sampled(self) -> list[ScheduledChunk]:
        """Chunks that sample a token, in the runner's order: each one, then its forks."""
        return [c for chunk in self.chunks if chunk.samples for c in (chunk, *chunk.forks)]


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit (admission control)."""


class Scheduler:
    """FCFS continuous batching over a KVPool, with optional prefix cache."""

    def __init__(self, config: EngineConfig, pool: KVPool, slots: SlotAllocator,
                 prefix_cache: PrefixCache | None = None) -> None:
        """config: resolved (`EngineConfig.resolved`); the scheduler reads max_num_seqs,
        max_num_batched_tokens, max_model_len and max_queue. slots: the request->token
        table's allocator (`ReqToTokenTable.slots`), one slot per running request."""
        if config.max_num_batched_tokens < config.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs "
                             f"({config.max_num_batched_tokens} < {config.max_num_seqs})")
        if pool.capacity < config.model_len:
            raise ValueError(f"KV pool capacity ({pool.capacity} tokens) must hold at least one "
                             f"full-length request (max_model_len={config.model_len})")
        self.config = config
        self.pool = pool
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.slots = slots
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- requests in and out -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new request (the only way in); raises QueueFullError at max_queue waiting.

        The n samples of one request come in as one sequence whose `forks` (make_samples) start
        when its prompt is prefilled, sharing its rows; admission keeps a slot for each.

        Preempted requests go back to the queue's head without this check: a request already
        accepted is never refused later, nor pushes a newer accepted one out.
        """
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"waiting queue is full ({self.config.max_queue} requests); "
                                 "retry later")
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence (any state): rows go back to the pool (or the prefix cache).

        A sequence that ends before its forks took its prompt hands its place in the queue or
        the running set, its slot and its prompt rows so far to the first of them.
        """
        if seq.status is SeqStatus.FINISHED:
            return
        pending = seq.pending_forks
        if pending:
            self._hand_over(seq, pending[0], pending[1:])
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        self._release(seq, cache_it=reason is not FinishReason.ABORTED)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.forks = []

    def _hand_over(self, seq: Sequence, heir: Sequence, forks: list[Sequence]) -> None:
        """heir (a fork of seq: the same prompt, nothing generated yet) takes seq's place."""
        queue = self.waiting if seq.status is SeqStatus.WAITING else self.running
        queue[queue.index(seq)] = heir
        heir.status, heir.slot, seq.slot = seq.status, seq.slot, -1
        heir.append_rows(seq.drop_rows())
        heir.forks = forks
        heir.cached_tokens, heir.num_preemptions = seq.cached_tokens, seq.num_preemptions

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Pick this step's tokens: running decodes, running prefill chunks, then admissions."""
        plan = StepPlan()
        self._drop_expired(plan)
        budget = self.config.max_num_batched_tokens
        budget -= self._schedule_decodes(plan)
        budget = self._schedule_running_prefills(plan, budget)
        self._admit(plan, budget)
        return plan

    def _drop_expired(self, plan: StepPlan) -> None:
        """End (ABORTED) every queued or running request whose deadline has passed, before any
        prefill or decode is spent on it; a leader takes its not-yet-forked samples along."""
        now = time.monotonic()
        for seq in [s for s in (*self.waiting, *self.running) if s.expired(now)]:
            for fork in seq.pending_forks:
                self.finish(fork, FinishReason.ABORTED)
                plan.expired.append(fork)
            self.finish(seq, FinishReason.ABORTED)
            plan.expired.append(seq)

    def _schedule_decodes(self, plan: StepPlan) -> int:
        # (a sequence with forks computes its last prompt token as a prefill chunk, which forks)
        decoding = [s for s in self.running if s.num_uncomputed == 1 and not s.forks]
        while decoding:
            rows = self._alloc(len(decoding))
            if rows is not None:
                break
            victim = self._preempt_newest()
            plan.preempted += 1
            if victim in decoding:
                decoding.remove(victim)
        else:
            return 0
        for seq, row in zip(decoding, rows):
            plan.decode.append(ScheduledChunk(seq, seq.num_computed, 1, row.reshape(1), True))
        return len(decoding)

    def _schedule_running_prefills(self, plan: StepPlan, budget: int) -> int:
        for seq in [s for s in self.running if s.num_uncomputed > 1
                    or (s.forks and s.num_uncomputed)]:
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted below, to make room for an older one
            count = min(seq.num_uncomputed, budget)
            rows = self._alloc(count)
            # Only preempt while nothing is planned: a planned chunk must not lose its sequence.
            # The oldest request alone always fits (capacity >= max_model_len), so this progresses.
            while rows is None and not plan.chunks and self.running[-1] is not seq:
                self._preempt_newest()
                plan.preempted += 1
                rows = self._alloc(count)
            if rows is None:
                continue
            plan.prefill.append(self._chunk(seq, count, rows))
            budget -= count
        return budget

    def _admit(self, plan: StepPlan, budget: int) -> None:
        # slots promised to forks of running sequences are not given to anyone else
        promised = sum(len(s.pending_forks) for s in self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            forks = len(seq.pending_forks)
            if self.slots.num_free - promised < 1 + forks:
                break
            cached = self._match_prefix(seq)
            count = min(seq.num_uncomputed, budget)
            # keep one free row per running sample (and per fork) so the next decode step need
            # not preempt; alone, a request is never held back by its own reserve
            reserve = len(self.running) + promised + 1 + forks
            if not self.running:
                reserve = min(reserve, self.pool.capacity - count)
            rows = self._alloc(count, reserve=reserve)
            if rows is None:
                if cached:
                    self.pool.free(seq.drop_rows())
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            seq.slot = self.slots.alloc()
            self.running.append(seq)
            plan.prefill.append(self._chunk(seq, count, rows))
            promised += len(seq.pending_forks)   # 0 when this chunk already forked them
            budget -= count

    def _chunk(self, seq: Sequence, count: int, rows: np.ndarray) -> ScheduledChunk:
        chunk = ScheduledChunk(seq, seq.num_computed, count, rows,
                               seq.num_computed + count == seq.num_tokens)
        if chunk.samples and seq.forks:
            self._fork(chunk)
        return chunk

    def _fork(self, chunk: ScheduledChunk) -> None:
        """Start the pending forks of chunk.seq, whose prompt this chunk completes: each takes
        one more reference on the prompt's rows (no copy), a slot (promised at admission) and a
        place right after its siblings in the running set (arrival order)."""
        seq = chunk.seq
        pending, seq.forks = seq.pending_forks, []
        rows = np.concatenate([seq.rows, chunk.new_rows])    # [prompt] the whole prompt's rows
        at = self.running.index(seq) + 1
        for fork in pending:
            self.pool.share(rows)
            fork.append_rows(rows)
            fork.slot = self.slots.alloc()
            fork.status = SeqStatus.RUNNING
            fork.cached_tokens = seq.cached_tokens
            chunk.forks.append(ScheduledChunk(fork, len(rows), 0, rows[:0], True))
        self.running[at:at] = pending

    def _match_prefix(self, seq: Sequence) -> int:
        """Reuse cached rows for the longest known prefix (at least one token left to compute)."""
        if self.prefix_cache is None or seq.num_computed:
            return 0
        tokens = seq.all_token_ids()[:-1]
        rows = self.prefix_cache.match(tokens)
        self.prefix_queried_tokens += len(tokens)
        self.prefix_hit_tokens += len(rows)
        if len(rows):
            seq.append_rows(rows)
        if seq.num_preemptions == 0:
            seq.cached_tokens = min(len(rows), len(seq.prompt_ids))
        return len(rows)

    # ---- after the forward pass -----------------------------------------------------------
    def commit(self, plan: StepPlan) -> None:
        """Record that the plan's K/V are now in their rows."""
        for index, chunk in enumerate(plan.chunks):
            seq = chunk.seq
            if seq.status is not SeqStatus.RUNNING:  # aborted while the step ran
                self.pool.free(chunk.new_rows)
                continue
            seq.append_rows(chunk.new_rows)
            if chunk.samples and index >= len(plan.decode) and self.prefix_cache is not None:
                # prompt fully prefilled: share it now, not only when the request ends, so
                # requests arriving meanwhile with the same prefix skip its prefill
                self.prefix_cache.insert(seq.token_ids(0, seq.num_computed), seq.rows)

    # ---- rows -------------------------------------------------------------------------------
    def _alloc(self, count: int, reserve: int = 0) -> np.ndarray | None:
        need = count + reserve
        if self.pool.num_free < need and self.prefix_cache is not None:
            self.prefix_cache.evict(need - self.pool.num_free)
        if self.pool.num_free < need:
            return None
        return self.pool.alloc(count)

    def _preempt_newest(self) -> Sequence:
        victim = self.running.pop()
        self._release(victim, cache_it=False)
        victim.status = SeqStatus.WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def _release(self, seq: Sequence, cache_it: bool) -> None:
        if seq.slot >= 0:
            self.slots.free(seq.slot)
            seq.slot = -1
        rows = seq.drop_rows()
        if cache_it and self.prefix_cache is not None and len(rows):
            self.prefix_cache.insert(seq.token_ids(0, len(rows)), rows)
        if len(rows):
            self.pool.free(rows)
