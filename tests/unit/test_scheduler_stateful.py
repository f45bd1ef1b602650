"""Scheduler + KV pool + prefix cache as a hypothesis state machine, driven by the fake runner.

Rules add requests (prompts from a few shared stems; some ask for n = 2 or 3 samples, which
fork off the prompt's rows), step, abort a sample (between steps or while a step runs, before
or after its forks started), finish a sample the way EOS would, and drain everything. After
every rule the pool's reference counts must equal the rows held by live samples plus the tree's
rows, every row a sample or the tree holds must hold the K/V of that exact token prefix, and
the queue and running set must stay in arrival order (samples of one request by index). Each
step must keep to the token budget and preempt only the newest running requests; a drain must
finish within a bounded number of steps and, once the cache is cleared, leave the pool idle.
"""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine_svc.params import FinishReason
from engine_svc.sequence import Sequence, SeqStatus
from tests.unit.scheduler_harness import FAKE_VOCAB, FakeRunner, StepRecord, expected_output, \
    make_scheduler, make_sequence, tree_rows

MAX_MODEL_LEN = 32
STEMS = ([1, 2, 3, 4, 5, 6, 0, 1], [1, 2, 3, 6, 6], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4])
prompts = st.tuples(st.sampled_from(STEMS), st.integers(0, 12),
                    st.lists(st.integers(0, FAKE_VOCAB - 1), max_size=10)
                    ).map(lambda t: (t[0][:t[1]] + t[2]) or [3])


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, steps, aborts and finishes against a model of who holds which row."""

    @initialize(capacity=st.integers(MAX_MODEL_LEN, 56), max_num_seqs=st.integers(1, 5),
                extra_budget=st.integers(0, 24), prefix_caching=st.booleans())
    def setup(self, capacity: int, max_num_seqs: int, extra_budget: int,
              prefix_caching: bool) -> None:
        self.budget = max_num_seqs + extra_budget
        self.max_num_seqs = max_num_seqs
        self.scheduler, self.pool, self.cache = make_scheduler(
            capacity, max_num_seqs=max_num_seqs, max_num_batched_tokens=self.budget,
            max_model_len=MAX_MODEL_LEN, prefix_caching=prefix_caching)
        self.runner = FakeRunner(self.scheduler, MAX_MODEL_LEN)
        self.arrival: dict[str, int] = {}   # request id -> arrival index
        self.live: list[Sequence] = []      # samples added, not finished
        self.cut_short: set[int] = set()    # id() of samples ended before their full length

    # ---- rules ---------------------------------------------------------------------------
    @rule(prompt=prompts, max_new=st.integers(1, 24), n=st.sampled_from([1, 1, 2, 3]))
    def add_request(self, prompt: list[int], max_new: int, n: int = 1) -> None:
        max_new = min(max_new, MAX_MODEL_LEN - len(prompt))
        seq = make_sequence(f"r{len(self.arrival)}", prompt, max_new, min(n, self.max_num_seqs))
        self.scheduler.add(seq)
        self.arrival[seq.request_id] = len(self.arrival)
        self.live.extend([seq, *seq.forks])
        if seq.forks:
            event(f"n = {len(seq.forks) + 1}")

    @rule(burst=st.lists(st.tuples(prompts, st.integers(8, 24)), min_size=2, max_size=4))
    def add_burst(self, burst: list[tuple[list[int], int]]) -> None:
        """Several long requests at once: enough load to run the pool dry."""
        for prompt, max_new in burst:
            self.add_request(prompt, max_new)

    @precondition(lambda self: self.live)
    @rule()
    def step(self) -> None:
        self._check_step(self.runner.step())

    @precondition(lambda self: self.scheduler.running)
    @rule(data=st.data())
    def abort_while_the_step_runs(self, data: st.DataObject) -> None:
        def abort_one(plan) -> None:
            if plan.chunks:
                self._end(data.draw(st.sampled_from([c.seq for c in plan.chunks + plan.sampled])),
                          FinishReason.ABORTED)
        self._check_step(self.runner.step(during=abort_one))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        self._end(data.draw(st.sampled_from(self.live)), FinishReason.ABORTED)

    @precondition(lambda self: any(self._just_sampled(s) for s in self.live))
    @rule(data=st.data())
    def finish_on_eos(self, data: st.DataObject) -> None:
        """End a request right after it sampled, as an EOS token would (its rows get cached)."""
        self._end(data.draw(st.sampled_from([s for s in self.live if self._just_sampled(s)])),
                  FinishReason.EOS)

    @rule(clear_cache=st.booleans())
    def drain(self, clear_cache: bool) -> None:
        """Run until every request ends; the bound is the tokens left to compute, twice over."""
        bound = 2 * sum(s.num_tokens - s.num_computed + s.stopping.max_new_tokens
                        for s in self.live) + 2
        for _ in range(bound):
            if not self.scheduler.has_work():
                break
            self._check_step(self.runner.step())
        assert not self.scheduler.has_work(), f"requests still live after {bound} steps"
        assert self.live == []
        if clear_cache and self.cache is not None:
            self.cache.clear()
        if clear_cache or self.cache is None:
            assert self.pool.is_idle()

    # ---- helpers -------------------------------------------------------------------------
    @staticmethod
    def _just_sampled(seq: Sequence) -> bool:
        return seq.status is SeqStatus.RUNNING and bool(seq.output_ids) \
            and seq.num_uncomputed == 1

    def _end(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.pending_forks:
            event("a sample ends before its forks started")
        self.scheduler.finish(seq, reason)
        assert seq.status is SeqStatus.FINISHED and len(seq.rows) == 0 and not seq.forks
        self.live.remove(seq)
        self.cut_short.add(id(seq))

    def _check_step(self, record: StepRecord) -> None:
        plan = record.plan
        assert plan.num_tokens <= self.budget
        assert all(c.num_tokens >= 1 and len(c.new_rows) == c.num_tokens for c in plan.chunks)
        assert all(c.num_tokens == 1 and c.samples for c in plan.decode)
        assert len({id(c.seq) for c in plan.sampled}) == len(plan.sampled)
        assert not any(c.forks for c in plan.decode)
        for chunk in plan.prefill:   # forks start with the whole prompt, once it is computed
            assert not chunk.forks or chunk.start + chunk.num_tokens == len(chunk.seq.prompt_ids)
            for fork in chunk.forks:
                prompt = len(fork.seq.prompt_ids)
                assert (fork.start, fork.num_tokens, fork.samples) == (prompt, 0, True)
                assert fork.seq.index > 0 and fork.seq.request_id == chunk.seq.request_id
                event("forked")
        victims = len(record.preempted)
        assert plan.preempted == victims
        if victims:  # the newest running requests, and nobody else
            event(f"preempted {min(victims, 2)}+ of {min(len(record.running_before), 3)}+")
            assert record.preempted == record.running_before[len(record.running_before) - victims:]
            if any(s.index for s in record.preempted):
                event("preempted a forked sample")
        for seq in record.finished:
            self.live.remove(seq)
            if id(seq) not in self.cut_short:
                want = expected_output(seq.prompt_ids, seq.stopping.max_new_tokens, MAX_MODEL_LEN,
                                       seq.index)
                assert seq.output_ids == want, (seq.request_id, seq.index)

    # ---- invariants ----------------------------------------------------------------------
    @invariant()
    def rows_are_held_by_requests_and_the_tree(self) -> None:
        self.pool.check_invariants()
        cached = tree_rows(self.cache)
        held = [seq.rows for seq in self.live] + [np.array([row for _, row in cached], np.int64)]
        expected = np.bincount(np.concatenate(held), minlength=self.pool.capacity)
        assert np.array_equal(self.pool.ref_counts(), expected)
        content = self.runner.row_content
        for seq in self.live:
            tokens = tuple(seq.all_token_ids())
            for position, row in enumerate(seq.rows.tolist()):
                assert content[row] == tokens[:position + 1], (seq.request_id, position)
        for prefix, row in cached:
            assert content[row] == prefix

    @invariant()
    def queue_and_running_set_keep_arrival_order(self) -> None:
        def order(seq: Sequence) -> tuple[int, int]:
            return self.arrival[seq.request_id], seq.index

        running = [order(s) for s in self.scheduler.running]
        waiting = [order(s) for s in self.scheduler.waiting]
        assert running == sorted(running) and waiting == sorted(waiting)
        assert not running or not waiting or max(running) < min(waiting)
        assert len(running) <= self.max_num_seqs
        assert all(s.status is SeqStatus.RUNNING for s in self.scheduler.running)
        assert all(len(s.rows) == 0 for s in self.scheduler.waiting)
        forks = [s for s in self.live if s.status is SeqStatus.FORK_PENDING]
        assert sorted(running + waiting) == sorted(order(s) for s in self.live if s not in forks)
        assert all(len(s.rows) == 0 and s.slot == -1 for s in forks)


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
