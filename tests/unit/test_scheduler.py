"""Scheduler with a fake runner (no model): FCFS, token budget, chunked prefill, preemption of
the newest request, queue limit. Built only through tests/unit/scheduler_harness.py."""
from __future__ import annotations

import numpy as np
import pytest

from engine_svc.scheduler import QueueFullError
from engine_svc.sequence import Sequence, SeqStatus
from tests.unit.scheduler_harness import FakeRunner, StepRecord, expected_output, make_scheduler, \
    make_sequence


def admission_order(records: list[StepRecord]) -> list[Sequence]:
    """Sequences in the order of their first prefill chunk (start 0, first admission)."""
    order: list[Sequence] = []
    for record in records:
        order.extend(c.seq for c in record.plan.prefill if c.start == 0 and c.seq not in order)
    return order


def run_all(runner: FakeRunner, max_steps: int = 2000) -> list[StepRecord]:
    records = []
    while runner.scheduler.has_work():
        assert len(records) < max_steps, "no progress"
        records.append(runner.step())
    return records


def assert_rows_hold_own_tokens(runner: FakeRunner, seq: Sequence) -> None:
    tokens = tuple(seq.all_token_ids())
    for position, row in enumerate(seq.rows.tolist()):
        assert runner.row_content[row] == tokens[:position + 1], (seq.request_id, position)


def test_admission_is_first_come_first_served_even_when_a_later_request_would_fit() -> None:
    scheduler, pool, _ = make_scheduler(64, max_num_seqs=8, max_num_batched_tokens=64)
    runner = FakeRunner(scheduler, max_model_len=64)
    old = make_sequence("old", [1] * 40, 10)
    scheduler.add(old)
    records = [runner.step()]                   # old holds 40 rows, 24 are free
    big = make_sequence("big", [2] * 30, 4)     # 30 rows + reserve do not fit beside old
    small = make_sequence("small", [3] * 2, 4)  # would fit, but arrived after big
    scheduler.add(big)
    scheduler.add(small)
    while old.status is not SeqStatus.FINISHED:
        records.append(runner.step())
        assert big.status is SeqStatus.WAITING and small.status is SeqStatus.WAITING
        assert list(scheduler.waiting) == [big, small]
    records.extend(run_all(runner))
    assert admission_order(records) == [old, big, small]
    assert old.output_ids == expected_output([1] * 40, 10, 64)
    assert pool.is_idle()


def test_many_requests_are_admitted_in_arrival_order() -> None:
    scheduler, pool, _ = make_scheduler(128, max_num_seqs=3, max_num_batched_tokens=16)
    runner = FakeRunner(scheduler, max_model_len=128)
    rng = np.random.default_rng(0)
    seqs = [make_sequence(f"r{i}", rng.integers(0, 7, int(rng.integers(1, 30))).tolist(),
                          int(rng.integers(1, 8))) for i in range(12)]
    for seq in seqs:
        scheduler.add(seq)
    records = run_all(runner)
    assert admission_order(records) == seqs
    for record in records:  # a request never runs while an earlier arrival still waits
        running_index = max((seqs.index(s) for s in record.running_before), default=-1)
        assert all(seqs.index(s) > running_index for s in scheduler.waiting)
    for seq in seqs:
        assert seq.output_ids == expected_output(seq.prompt_ids, seq.stopping.max_new_tokens, 128)
    assert pool.is_idle()


def test_every_step_stays_within_the_token_budget_and_fills_it_when_it_can() -> None:
    budget = 24
    scheduler, pool, _ = make_scheduler(512, max_num_seqs=6, max_num_batched_tokens=budget)
    runner = FakeRunner(scheduler, max_model_len=512)
    rng = np.random.default_rng(1)
    seqs = [make_sequence(f"r{i}", rng.integers(0, 7, int(rng.integers(1, 60))).tolist(),
                          int(rng.integers(1, 10))) for i in range(14)]
    for seq in seqs:
        scheduler.add(seq)
    records = run_all(runner)
    assert records[0].plan.num_tokens == budget  # chunking fills the budget exactly
    for record in records:
        plan = record.plan
        assert 0 < plan.num_tokens <= budget
        assert plan.num_tokens == sum(c.num_tokens for c in plan.chunks)
        assert all(c.num_tokens == 1 for c in plan.decode)
        assert all(len(c.new_rows) == c.num_tokens for c in plan.chunks)
        assert len(plan.chunks) <= 6
    for seq in seqs:
        assert seq.output_ids == expected_output(seq.prompt_ids, seq.stopping.max_new_tokens, 512)
    assert pool.is_idle()


def test_long_prompt_is_prefilled_in_chunks_beside_a_decoding_request() -> None:
    budget = 32
    scheduler, pool, _ = make_scheduler(256, max_num_seqs=4, max_num_batched_tokens=budget)
    runner = FakeRunner(scheduler, max_model_len=256)
    short = make_sequence("short", [1, 2, 3, 4], 30)
    scheduler.add(short)
    runner.step()
    prompt = [(7 * i) % 5 for i in range(100)]
    long = make_sequence("long", prompt, 3)
    scheduler.add(long)
    chunks = []
    while long.num_computed < len(prompt):
        plan = runner.step().plan
        assert [c.seq for c in plan.decode] == [short]  # the decode runs every step, first
        assert [c.seq for c in plan.prefill] == [long]
        chunk = plan.prefill[0]
        chunks.append((chunk.start, chunk.num_tokens, chunk.samples))
        assert np.array_equal(long.rows[chunk.start:], chunk.new_rows)
        assert_rows_hold_own_tokens(runner, long)
    # decode takes 1 token of each step's budget, the prompt the rest; only the last chunk samples
    assert chunks == [(0, 31, False), (31, 31, False), (62, 31, False), (93, 7, True)]
    assert len(long.output_ids) == 1
    plan = runner.step().plan
    assert {c.seq for c in plan.decode} == {short, long} and not plan.prefill
    run_all(runner)
    assert long.output_ids == expected_output(prompt, 3, 256)
    assert pool.is_idle()


def test_a_prompt_longer_than_the_budget_alone_takes_whole_budget_chunks() -> None:
    scheduler, pool, _ = make_scheduler(256, max_num_seqs=4, max_num_batched_tokens=16)
    runner = FakeRunner(scheduler, max_model_len=256)
    seq = make_sequence("r", list(range(7)) * 10, 2)
    scheduler.add(seq)
    sizes = []
    while seq.num_computed < 70:
        sizes.append(runner.step().plan.prefill[0].num_tokens)
    assert sizes == [16, 16, 16, 16, 6]
    run_all(runner)
    assert pool.is_idle()


def test_pool_pressure_preempts_the_newest_running_request() -> None:
    # 3 requests of 6 + 20 tokens cannot all finish in 32 rows: decoding runs the pool dry
    scheduler, pool, _ = make_scheduler(32, max_num_seqs=4, max_num_batched_tokens=32)
    runner = FakeRunner(scheduler, max_model_len=32)
    seqs = [make_sequence(name, [i + 1] * 6, 20) for i, name in enumerate("ABC")]
    for seq in seqs:
        scheduler.add(seq)
    records = run_all(runner)
    preempting = [r for r in records if r.preempted]
    assert preempting, "the pool never ran dry: the test does not exercise preemption"
    first = preempting[0]
    assert first.running_before == seqs and first.preempted == [seqs[2]]
    for record in preempting:  # every victim is the most recently admitted running request
        victims = len(record.preempted)
        assert record.plan.preempted == victims
        assert record.preempted == record.running_before[-victims:]
    assert seqs[0].num_preemptions == 0  # the oldest request is never the victim
    assert scheduler.num_preemptions == sum(s.num_preemptions for s in seqs)
    for seq in seqs:  # recomputation after preemption gives the same output
        assert seq.output_ids == expected_output(seq.prompt_ids, 20, 32)
    assert pool.is_idle()


def test_preempted_request_goes_back_to_the_head_of_the_queue() -> None:
    scheduler, pool, _ = make_scheduler(32, max_num_seqs=2, max_num_batched_tokens=32)
    runner = FakeRunner(scheduler, max_model_len=32)
    first, second = make_sequence("A", [1] * 6, 20), make_sequence("B", [2] * 6, 20)
    late = make_sequence("late", [3] * 2, 2)
    scheduler.add(first)
    scheduler.add(second)
    scheduler.add(late)  # max_num_seqs=2 keeps it waiting
    record = runner.step()
    while not record.preempted:
        record = runner.step()
    assert record.preempted == [second]
    assert list(scheduler.waiting)[:2] == [second, late]
    assert second.status is SeqStatus.WAITING and len(second.rows) == 0 and second.output_ids
    run_all(runner)
    assert second.output_ids == expected_output([2] * 6, 20, 32)
    assert pool.is_idle()


def test_full_queue_raises_queue_full_error_and_keeps_the_queue() -> None:
    scheduler, pool, _ = make_scheduler(64, max_num_seqs=4, max_num_batched_tokens=64, max_queue=2)
    runner = FakeRunner(scheduler, max_model_len=64)
    a, b, c = (make_sequence(name, [1, 2, 3], 2) for name in "abc")
    scheduler.add(a)
    scheduler.add(b)
    with pytest.raises(QueueFullError, match="queue is full"):
        scheduler.add(c)
    assert list(scheduler.waiting) == [a, b] and c.status is SeqStatus.WAITING
    runner.step()  # both admitted: the queue has room again
    assert not scheduler.waiting
    scheduler.add(c)
    run_all(runner)
    assert c.output_ids == expected_output([1, 2, 3], 2, 64)
    assert pool.is_idle()
