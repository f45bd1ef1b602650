"""KVPool: reference counts against a model of the holders, contiguous-first allocation, errors."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine_svc.kv_pool import KVPool


def longest_free_run(pool: KVPool) -> int:
    """Brute-force longest run of rows with count 0 (the oracle for contiguous allocation)."""
    free = np.r_[False, pool.ref_counts() == 0, False].astype(np.int8)
    edges = np.diff(free)
    return int((np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).max(initial=0))


def is_run(rows: np.ndarray) -> bool:
    return bool(rows.size == 0 or np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)))


def fragment(pool: KVPool, keep_free: list[tuple[int, int]]) -> np.ndarray:
    """Allocate the whole pool, then free only the [start, end) ranges; returns the rows still held."""
    everything = pool.alloc(pool.capacity)
    assert everything is not None
    free_rows = np.concatenate([np.arange(a, b) for a, b in keep_free])
    pool.free(free_rows)
    return np.setdiff1d(everything, free_rows)


class PoolMachine(RuleBasedStateMachine):
    """Random alloc / share / free / abort sequences; every holder is modelled on the side."""

    @initialize(capacity=st.integers(1, 200), block_rows=st.sampled_from([2, 8, 32, 1024]))
    def setup(self, capacity: int, block_rows: int) -> None:
        self.pool = KVPool(capacity, block_rows=block_rows)
        self.holders: list[np.ndarray] = []  # each holder owns one reference on each of its rows

    @rule(n=st.integers(0, 80))
    def alloc(self, n: int) -> None:
        before = self.pool.ref_counts()
        longest = longest_free_run(self.pool)
        rows = self.pool.alloc(n)
        if n > int(np.count_nonzero(before == 0)):
            assert rows is None
            assert np.array_equal(self.pool.ref_counts(), before)
            return
        assert rows is not None and rows.dtype == np.int64 and rows.size == n
        assert np.unique(rows).size == n and (before[rows] == 0).all()
        assert is_run(rows) == (longest >= n)  # contiguous exactly when a free run of n existed
        self.holders.append(rows)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def share_prefix(self, data: st.DataObject) -> None:
        source = self.holders[data.draw(st.integers(0, len(self.holders) - 1))]
        take = data.draw(st.integers(0, source.size))
        self.pool.share(source[:take])
        self.holders.append(source[:take].copy())

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rows = self.holders.pop(data.draw(st.integers(0, len(self.holders) - 1)))
        self.pool.free(rows)

    @precondition(lambda self: any(rows.size for rows in self.holders))
    @rule(data=st.data())
    def share_rows_repeated_in_one_call(self, data: st.DataObject) -> None:
        """One share() call naming some rows several times: each listing is one reference."""
        source = self.holders[data.draw(st.sampled_from(
            [i for i, rows in enumerate(self.holders) if rows.size]))]
        picks = data.draw(st.lists(st.integers(0, source.size - 1), min_size=2, max_size=8))
        picks.append(picks[0])  # at least one row listed twice
        rows = source[picks]
        expected = self._expected_counts() + np.bincount(rows, minlength=self.pool.capacity)
        self.pool.share(rows)
        self.holders.append(rows.copy())
        assert np.array_equal(self.pool.ref_counts(), expected)

    @precondition(lambda self: bool((self._expected_counts() >= 2).any()))
    @rule(data=st.data())
    def free_one_row_twice_in_one_call(self, data: st.DataObject) -> None:
        """free([r, r, ...]) on a row with count >= 2 drops as many references as listings."""
        expected = self._expected_counts()
        row = data.draw(st.sampled_from(np.flatnonzero(expected >= 2).tolist()))
        times = data.draw(st.integers(2, int(expected[row])))
        others = [r for r in np.flatnonzero(expected == 1).tolist() if r != row]
        other = data.draw(st.sampled_from(others)) if others and data.draw(st.booleans()) else None
        released = [row] * times + ([other] if other is not None else [])
        released = data.draw(st.permutations(released))
        self.pool.free(np.array(released, np.int64))
        for gone in released:  # drop one listing of the row from whichever holder has it
            holder = next(i for i, rows in enumerate(self.holders) if (rows == gone).any())
            rows = self.holders[holder]
            self.holders[holder] = np.delete(rows, int(np.flatnonzero(rows == gone)[0]))
        assert self.pool.ref_counts([row])[0] == expected[row] - times
        if other is not None:
            assert self.pool.ref_counts([other])[0] == 0
        assert np.array_equal(self.pool.ref_counts(), self._expected_counts())

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def double_free_is_rejected(self, data: st.DataObject) -> None:
        expected = self._expected_counts()
        rows = self.holders[data.draw(st.integers(0, len(self.holders) - 1))]
        if rows.size == 0:
            return
        extra = int(expected[rows[0]])  # one release more than there are references
        with pytest.raises(ValueError, match="double free"):
            self.pool.free(np.r_[np.full(extra + 1, rows[0]), rows[1:]])
        assert np.array_equal(self.pool.ref_counts(), expected)

    @rule()
    def abort_everything(self) -> None:
        for rows in self.holders:
            self.pool.free(rows)
        self.holders.clear()
        assert self.pool.is_idle() and self.pool.num_used == 0 and self.pool.num_shared == 0

    def _expected_counts(self) -> np.ndarray:
        rows = np.concatenate(self.holders) if self.holders else np.empty(0, np.int64)
        return np.bincount(rows, minlength=self.pool.capacity)

    @invariant()
    def counts_match_holders(self) -> None:
        self.pool.check_invariants()
        expected = self._expected_counts()
        assert np.array_equal(self.pool.ref_counts(), expected)
        assert self.pool.num_used + self.pool.num_free == self.pool.capacity
        assert self.pool.num_used == int(np.count_nonzero(expected))
        assert self.pool.num_shared == int(np.count_nonzero(expected >= 2))

    def teardown(self) -> None:
        for rows in self.holders:
            self.pool.free(rows)
        assert self.pool.is_idle()
        self.pool.check_invariants()


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(
    max_examples=120, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 300),
    block_rows=st.sampled_from([2, 4, 16, 64]),
    seed=st.integers(0, 2**32 - 1),
    offset=st.integers(-2, 2),
)
def test_fragmented_pool_contiguous_iff_a_run_exists(
    capacity: int, block_rows: int, seed: int, offset: int
) -> None:
    pool = KVPool(capacity, block_rows=block_rows)
    held = pool.alloc(capacity)
    rng = np.random.default_rng(seed)
    pool.free(held[rng.random(capacity) < rng.uniform(0.05, 0.95)])
    pool.alloc(int(rng.integers(0, 3)))  # move the cursor somewhere
    free_before = pool.ref_counts() == 0
    longest = longest_free_run(pool)
    n = max(1, longest + offset)  # right at the edge of what fits contiguously
    rows = pool.alloc(n)
    if n > free_before.sum():
        assert rows is None
        return
    assert free_before[rows].all() and np.unique(rows).size == n
    assert is_run(rows) == (longest >= n)
    pool.check_invariants()


def test_finds_the_only_run_across_block_boundaries() -> None:
    pool = KVPool(64, block_rows=8)
    fragment(pool, [(0, 3), (13, 26), (40, 44), (60, 64)])  # run 13..25 spans blocks 1, 2 and 3
    rows = pool.alloc(12)
    assert rows is not None and np.array_equal(rows, np.arange(13, 25))
    pool.check_invariants()


def test_finds_a_run_strictly_inside_one_block() -> None:
    pool = KVPool(64, block_rows=16)
    fragment(pool, [(0, 2), (20, 27), (33, 35), (50, 52)])
    assert np.array_equal(pool.alloc(6), np.arange(20, 26))


def test_run_at_the_end_of_a_pool_that_is_not_a_whole_number_of_blocks() -> None:
    pool = KVPool(70, block_rows=16)
    fragment(pool, [(0, 3), (61, 70)])
    assert np.array_equal(pool.alloc(9), np.arange(61, 70))
    assert pool.num_free == 3 and pool.alloc(4) is None


def test_run_ending_exactly_at_the_end_of_a_whole_number_of_blocks() -> None:
    pool = KVPool(64, block_rows=16)
    fragment(pool, [(0, 3), (10, 14), (40, 43), (53, 64)])  # 53..63 crosses into the last block
    assert np.array_equal(pool.alloc(11), np.arange(53, 64))


def test_exact_length_run_strictly_inside_a_block() -> None:
    pool = KVPool(64, block_rows=32)
    fragment(pool, [(1, 3), (5, 12), (40, 42)])
    assert np.array_equal(pool.alloc(7), np.arange(5, 12))


def test_cursor_near_the_end_wraps_to_a_run_at_the_start() -> None:
    pool = KVPool(10, block_rows=4)
    pool.free(pool.alloc(7))  # the cursor now sits at row 7; rows 7..9 are too few for 4
    assert np.array_equal(pool.alloc(4), np.arange(0, 4))
    pool.check_invariants()


def test_a_whole_free_block_between_used_rows_is_a_run() -> None:
    pool = KVPool(64, block_rows=16)
    fragment(pool, [(0, 2), (16, 32), (40, 42), (48, 64)])  # blocks 1 and 3 wholly free; 3 ends the pool
    assert np.array_equal(pool.alloc(16), np.arange(16, 32))
    assert np.array_equal(pool.alloc(16), np.arange(48, 64))


def test_wrapping_cursor_does_not_take_a_used_row() -> None:
    pool = KVPool(10, block_rows=4)
    rows = pool.alloc(7)  # cursor at 7
    pool.free(rows[:3])  # free: 0, 1, 2 and 7, 8, 9; no run of 4
    got = pool.alloc(4)
    assert got is not None and set(got.tolist()) <= {0, 1, 2, 7, 8, 9}
    pool.check_invariants()


def test_scattered_fallback_takes_only_free_rows() -> None:
    pool = KVPool(40, block_rows=8)
    holes = [(1, 3), (9, 11), (20, 22), (37, 39)]
    held = fragment(pool, holes)
    rows = pool.alloc(7)
    assert rows is not None and not is_run(rows)
    assert set(rows.tolist()) < {r for a, b in holes for r in range(a, b)}
    pool.free(np.concatenate([held, rows]))
    assert pool.is_idle()
    pool.check_invariants()


def test_next_fit_keeps_allocating_contiguously_after_frees() -> None:
    pool = KVPool(1 << 14)
    live = [pool.alloc(256) for _ in range(40)]
    for step in range(200):  # a decode-like steady state: oldest request ends, a new one starts
        pool.free(live.pop(0))
        rows = pool.alloc(256)
        assert rows is not None and is_run(rows), step
        live.append(rows)
    pool.check_invariants()


def test_alloc_beyond_free_returns_none_and_changes_nothing() -> None:
    pool = KVPool(10)
    rows = pool.alloc(7)
    before = pool.ref_counts()
    assert pool.alloc(4) is None
    assert np.array_equal(pool.ref_counts(), before) and pool.num_free == 3
    pool.free(rows)
    assert pool.is_idle()


def test_double_free_raises_and_changes_nothing() -> None:
    pool = KVPool(16)
    a = pool.alloc(4)
    b = pool.alloc(4)
    pool.free(a)
    before = pool.ref_counts()
    with pytest.raises(ValueError, match="double free of row 0"):
        pool.free(np.r_[b, a[:1]])
    assert np.array_equal(pool.ref_counts(), before) and pool.num_free == 12
    pool.check_invariants()


def test_repeated_rows_count_as_repeated_references() -> None:
    pool = KVPool(8)
    rows = pool.alloc(3)
    pool.share(np.r_[rows, rows[:1]])  # row 0 now has 3 references
    assert pool.ref_counts(rows).tolist() == [3, 2, 2] and pool.num_shared == 3
    pool.free([rows[0], rows[0], rows[1]])
    assert pool.ref_counts(rows).tolist() == [1, 1, 2] and pool.num_shared == 1
    with pytest.raises(ValueError, match="double free"):
        pool.free([rows[2]] * 3)
    pool.free(np.r_[rows, rows[2]])
    assert pool.is_idle()


def test_share_of_a_free_row_raises_and_changes_nothing() -> None:
    pool = KVPool(8)
    rows = pool.alloc(2)
    with pytest.raises(ValueError, match="free"):
        pool.share([int(rows[0]), 5])
    assert pool.ref_counts(rows).tolist() == [1, 1] and pool.num_shared == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: KVPool(0), "capacity"),
        (lambda p: KVPool(8, block_rows=6), "block_rows"),
        (lambda p: p.alloc(-1), "n must be"),
        (lambda p: p.free([8]), r"\[0, 8\)"),
        (lambda p: p.free([-1]), r"\[0, 8\)"),
        (lambda p: p.share([[0]]), "1-D"),
        (lambda p: p.free([0.5]), "integers"),
    ],
)
def test_bad_input_raises_value_error(call, message: str) -> None:
    pool = KVPool(8)
    with pytest.raises(ValueError, match=message):
        call(pool)
    assert pool.is_idle()


def test_zero_rows_and_empty_lists_are_no_ops() -> None:
    pool = KVPool(4)
    assert pool.alloc(0).size == 0
    pool.free([])
    pool.share(np.empty(0, np.int64))
    assert pool.is_idle() and pool.ref_counts().tolist() == [0, 0, 0, 0]
