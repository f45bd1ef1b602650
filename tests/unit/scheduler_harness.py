"""Scheduler tests without a model: one place that builds a scheduler, and a fake runner.

Every scheduler test builds its Scheduler, KVPool and PrefixCache through `make_scheduler` and
its requests through `make_sequence`, so a change of constructor touches only this file. The
fake runner mirrors what `LLMEngine.step` does around the forward pass (schedule, commit, append
each sampling chunk's token, forks included, finish on length) with plain ints: the next token
is a fixed function of the tokens before it and of the sample's index (so the n samples of one
prompt part ways), like a greedy model, and the runner records which token prefix each pool row
holds, so a test can check that every request reads the rows it wrote.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine_svc.config import EngineConfig
from engine_svc.kv_pool import KVPool
from engine_svc.params import FinishReason, SamplingParams, StoppingParams
from engine_svc.prefix_cache import PrefixCache
from engine_svc.req_to_token import SlotAllocator
from engine_svc.scheduler import Scheduler, StepPlan
from engine_svc.sequence import Sequence, SeqStatus, make_samples

FAKE_VOCAB = 7  # a small alphabet: generated tails repeat, so outputs share prefixes too


def make_scheduler(capacity: int, *, max_num_seqs: int = 4, max_num_batched_tokens: int = 64,
                   max_model_len: int | None = None, max_queue: int = 1024,
                   prefix_caching: bool = False) -> tuple[Scheduler, KVPool, PrefixCache | None]:
    """A scheduler over a fresh pool of `capacity` rows (max_model_len defaults to capacity)."""
    pool = KVPool(capacity, block_rows=16)
    prefix_cache = PrefixCache(pool) if prefix_caching else None
    config = EngineConfig(model="unused: no model", max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=max_model_len or capacity, max_queue=max_queue)
    return Scheduler(config, pool, SlotAllocator(max_num_seqs), prefix_cache), pool, prefix_cache


def make_sequence(request_id: str, prompt: list[int], max_new_tokens: int,
                  n: int = 1) -> Sequence:
    """A greedy request that ends after max_new_tokens (no EOS); n > 1: its `forks` are the
    other samples (sequence.make_samples)."""
    seq = Sequence(request_id, list(prompt), SamplingParams(temperature=0.0),
                   StoppingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
    make_samples(seq, n)
    return seq


def fake_next_token(tokens: list[int], sample_index: int = 0) -> int:
    """The fake model: a deterministic function of the whole prefix and the sample's index,
    in [0, FAKE_VOCAB)."""
    return (sum(tokens) * 5 + len(tokens) * 3 + tokens[-1] + 2 * sample_index) % FAKE_VOCAB


def expected_output(prompt: list[int], max_new_tokens: int, max_model_len: int,
                    sample_index: int = 0) -> list[int]:
    """What the fake model generates for a prompt run alone (as sample `sample_index`)."""
    tokens = list(prompt)
    while len(tokens) - len(prompt) < max_new_tokens and len(tokens) < max_model_len:
        tokens.append(fake_next_token(tokens, sample_index))
    return tokens[len(prompt):]


def tree_rows(prefix_cache: PrefixCache | None) -> list[tuple[tuple[int, ...], int]]:
    """Every (token prefix, pool row) the prefix tree holds, one entry per cached token."""
    if prefix_cache is None:
        return []
    entries: list[tuple[tuple[int, ...], int]] = []
    stack = [(child, ()) for child in prefix_cache._root.children.values()]
    while stack:
        node, above = stack.pop()
        path = above
        for token, row in zip(node.tokens.tolist(), node.rows.tolist()):
            path = path + (token,)
            entries.append((path, row))
        stack.extend((child, path) for child in node.children.values())
    return entries


@dataclass(slots=True)
class StepRecord:
    """What one fake step did."""

    plan: StepPlan
    running_before: list[Sequence]      # running set when schedule() was called, in its order
    preempted: list[Sequence]           # sequences preempted by this schedule() call
    finished: list[Sequence] = field(default_factory=list)


class FakeRunner:
    """Drives a scheduler as LLMEngine.step does, a fake model in place of the forward pass."""

    def __init__(self, scheduler: Scheduler, max_model_len: int) -> None:
        self.scheduler = scheduler
        self.max_model_len = max_model_len
        self.row_content: dict[int, tuple[int, ...]] = {}  # row -> token prefix it holds the K/V of
        self.steps = 0

    def step(self, during: Callable[[StepPlan], None] | None = None) -> StepRecord:
        """One engine step; `during(plan)` runs between schedule and commit (e.g. an abort)."""
        scheduler = self.scheduler
        running_before = list(scheduler.running)
        preemptions_before = {id(s): s.num_preemptions for s in running_before}
        plan = scheduler.schedule()
        preempted = [s for s in running_before if s.num_preemptions > preemptions_before[id(s)]]
        record = StepRecord(plan, running_before, preempted)
        if not plan.chunks:
            return record
        self.steps += 1
        if during is not None:
            during(plan)
        self._compute(plan)
        scheduler.commit(plan)
        for chunk in plan.sampled:
            seq = chunk.seq
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the step ran
            seq.output_ids.append(fake_next_token(seq.all_token_ids(), seq.index))
            if (len(seq.output_ids) >= seq.stopping.max_new_tokens
                    or seq.num_tokens >= self.max_model_len):
                scheduler.finish(seq, FinishReason.LENGTH)
                record.finished.append(seq)
        return record

    def _compute(self, plan: StepPlan) -> None:
        """The fake forward pass: write each chunk's token prefixes into its new rows (also for
        a chunk whose sequence ended while the step ran: forks may share those rows)."""
        for chunk in plan.chunks:  # every planned chunk, as the real forward pass computes it
            tokens = tuple(chunk.seq.all_token_ids())
            for offset, row in enumerate(np.asarray(chunk.new_rows).tolist()):
                self.row_content[row] = tokens[:chunk.start + offset + 1]

    def run_until_idle(self, max_steps: int) -> list[Sequence]:
        """Step until the scheduler has no work; the sequences that finished, in finishing order."""
        finished: list[Sequence] = []
        for _ in range(max_steps):
            if not self.scheduler.has_work():
                return finished
            finished.extend(self.step().finished)
        assert not self.scheduler.has_work(), f"still busy after {max_steps} steps"
        return finished
