"""PrefixCache: radix-tree matching, reference counting with the pool, LRU eviction."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine_svc.kv_pool import KVPool
from engine_svc.prefix_cache import PrefixCache

sequences = st.lists(st.integers(0, 3), min_size=1, max_size=14)  # small alphabet: many shared prefixes


class CacheMachine(RuleBasedStateMachine):
    """Requests match, allocate, insert, finish or abort; a side model tracks every holder."""

    @initialize(capacity=st.integers(8, 80), block_rows=st.sampled_from([4, 16, 1024]))
    def setup(self, capacity: int, block_rows: int) -> None:
        self.pool = KVPool(capacity, block_rows=block_rows)
        self.cache = PrefixCache(self.pool)
        self.content: dict[int, tuple[int, ...]] = {}  # row -> the token prefix whose last token it holds
        self.tree: dict[tuple[int, ...], int] = {}  # model of the tree: cached prefix -> row
        self.requests: list[tuple[list[int], np.ndarray]] = []  # (tokens, rows held) per live request

    def _check_match(self, tokens: list[int], rows: np.ndarray) -> None:
        cached = [k for k in range(1, len(tokens) + 1) if tuple(tokens[:k]) in self.tree]
        longest = max(cached, default=0)
        assert rows.dtype == np.int64 and rows.size == longest
        for i, row in enumerate(rows.tolist()):
            assert self.content[row] == tuple(tokens[: i + 1])  # the row really holds this prefix
            assert self.tree[tuple(tokens[: i + 1])] == row

    @rule(tokens=sequences)
    def start_request(self, tokens: list[int]) -> None:
        matched = self.cache.match(tokens)
        self._check_match(tokens, matched)
        need = len(tokens) - matched.size
        if self.pool.num_free < need:
            self._evict(need - self.pool.num_free, in_flight=matched)
        new_rows = self.pool.alloc(need)
        if new_rows is None:
            self.pool.free(matched)  # no room: give the matched prefix back
            return
        for i, row in enumerate(new_rows.tolist(), start=matched.size):
            self.content[row] = tuple(tokens[: i + 1])
        self.requests.append((tokens, np.concatenate([matched, new_rows])))

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), finish=st.booleans())
    def end_request(self, data: st.DataObject, finish: bool) -> None:
        tokens, rows = self.requests.pop(data.draw(st.integers(0, len(self.requests) - 1)))
        if finish:  # a finished request hands its KV to the cache; an aborted one just frees it
            self._insert(tokens, rows)
        self.pool.free(rows)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def cache_running_prefix(self, data: st.DataObject) -> None:
        tokens, rows = self.requests[data.draw(st.integers(0, len(self.requests) - 1))]
        cut = data.draw(st.integers(0, len(tokens)))
        self._insert(tokens[:cut], rows[:cut])

    @rule(num_rows=st.integers(0, 30))
    def evict(self, num_rows: int) -> None:
        self._evict(num_rows)

    @rule()
    def clear(self) -> None:
        self.cache.clear()
        self.tree.clear()
        assert self.cache.num_cached_tokens == 0 and self.cache.evictable_tokens() == 0

    def _insert(self, tokens: list[int], rows: np.ndarray) -> None:
        added = self.cache.insert(tokens, rows)
        fresh = [k for k in range(1, len(tokens) + 1) if tuple(tokens[:k]) not in self.tree]
        assert added == len(fresh)
        for k in fresh:
            self.tree[tuple(tokens[:k])] = int(rows[k - 1])

    def _evict(self, num_rows: int, in_flight: np.ndarray | None = None) -> None:
        evictable = self._model_evictable(in_flight)
        assert self.cache.evictable_tokens() == len(evictable)
        freed = self.cache.evict(num_rows)
        gone = {prefix for prefix, row in self.tree.items() if self.pool.ref_counts([row])[0] == 0}
        assert freed == len(gone) >= min(num_rows, len(evictable))
        assert gone <= evictable  # never a row a request still holds, never a path to one
        for prefix in gone:
            del self.tree[prefix]
        assert freed >= num_rows or self.cache.evictable_tokens() == 0

    def _model_evictable(self, in_flight: np.ndarray | None) -> set[tuple[int, ...]]:
        held = self._request_counts()
        if in_flight is not None:  # rows matched by a request that is not admitted yet
            np.add.at(held, in_flight, 1)
        busy = {p for p, row in self.tree.items() if held[row] > 0}
        return {p for p in self.tree if not any(q[: len(p)] == p for q in busy)}

    def _request_counts(self) -> np.ndarray:
        rows = [r for _, r in self.requests]
        flat = np.concatenate(rows) if rows else np.empty(0, np.int64)
        return np.bincount(flat, minlength=self.pool.capacity)

    @invariant()
    def counts_equal_live_holders(self) -> None:
        self.pool.check_invariants()
        expected = self._request_counts()
        np.add.at(expected, np.fromiter(self.tree.values(), np.int64, len(self.tree)), 1)
        assert np.array_equal(self.pool.ref_counts(), expected)
        assert self.cache.num_cached_tokens == len(self.tree)

    def teardown(self) -> None:
        for _, rows in self.requests:
            self.pool.free(rows)
        assert self.pool.num_used == self.cache.num_cached_tokens  # only the tree holds rows now
        assert set(np.flatnonzero(self.pool.ref_counts()).tolist()) == set(self.tree.values())
        assert self.cache.evictable_tokens() == len(self.tree)
        self.cache.clear()
        assert self.pool.is_idle()


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(
    max_examples=150, stateful_step_count=35, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def filled(capacity: int = 64) -> tuple[KVPool, PrefixCache]:
    pool = KVPool(capacity)
    return pool, PrefixCache(pool)


def cache_sequence(pool: KVPool, cache: PrefixCache, tokens: list[int]) -> np.ndarray:
    """Run a request through: match, allocate the rest, insert, release. Returns the rows of tokens."""
    matched = cache.match(tokens)
    rows = np.concatenate([matched, pool.alloc(len(tokens) - matched.size)])
    cache.insert(tokens, rows)
    pool.free(rows)
    return rows


def test_least_recently_used_leaf_is_evicted_first() -> None:
    pool, cache = filled()
    old = cache_sequence(pool, cache, [1, 2, 3])
    new = cache_sequence(pool, cache, [4, 5, 6])
    pool.free(cache.match([1, 2, 3]))  # [1, 2, 3] is now the most recently used
    assert cache.evict(3) == 3
    assert pool.ref_counts(new).tolist() == [0, 0, 0] and pool.ref_counts(old).tolist() == [1, 1, 1]
    assert cache.match([4, 5, 6]).size == 0


def test_shared_parent_outlives_its_leaves_and_goes_last() -> None:
    pool, cache = filled()
    cache_sequence(pool, cache, [7, 8, 9, 1])
    cache_sequence(pool, cache, [7, 8, 9, 2])  # splits: [7, 8, 9] -> {[1], [2]}
    assert cache.num_cached_tokens == 5
    assert cache.evict(2) == 2 and cache.num_cached_tokens == 3
    held = cache.match([7, 8, 9])
    assert held.size == 3 and cache.evict(10) == 0  # a request holds the rest
    pool.free(held)
    assert cache.evict(10) == 3 and pool.is_idle()


def test_only_the_unheld_tail_of_a_leaf_is_evicted() -> None:
    pool, cache = filled()
    rows = cache_sequence(pool, cache, [1, 2, 3, 4, 5, 6])
    held = cache.match([1, 2])  # ends inside the single edge
    assert np.array_equal(held, rows[:2]) and cache.evictable_tokens() == 4
    assert cache.evict(100) == 4
    assert pool.ref_counts(rows).tolist() == [2, 2, 0, 0, 0, 0]
    pool.free(held)
    assert np.array_equal(cache.match([1, 2, 9]), rows[:2])


def test_existing_rows_win_and_duplicates_are_not_taken() -> None:
    pool, cache = filled()
    first = cache_sequence(pool, cache, [5, 6, 7])
    second = pool.alloc(4)  # a request that computed [5, 6, 7, 8] itself
    assert cache.insert([5, 6, 7, 8], second) == 1
    assert pool.ref_counts(second).tolist() == [1, 1, 1, 2]
    assert cache.evictable_tokens() == 0 and cache.evict(10) == 0  # the held [8] pins its path
    pool.free(second)
    assert cache.evictable_tokens() == 4
    got = cache.match([5, 6, 7, 8])
    assert np.array_equal(got, np.r_[first, second[3]])
    assert cache.insert([5, 6], second[:2]) == 0  # already cached, and ending inside an edge


def test_clear_keeps_rows_that_requests_still_hold() -> None:
    pool, cache = filled()
    rows = cache_sequence(pool, cache, [1, 2, 3])
    held = cache.match([1, 2, 3])
    cache.clear()
    assert cache.num_cached_tokens == 0 and pool.ref_counts(rows).tolist() == [1, 1, 1]
    assert cache.match([1, 2, 3]).size == 0
    pool.free(held)
    assert pool.is_idle()


def test_evicted_rows_are_reusable() -> None:
    pool, cache = filled(8)
    cache_sequence(pool, cache, list(range(8)))
    assert pool.alloc(1) is None
    assert cache.evict(3) == 3
    rows = pool.alloc(3)
    assert rows is not None and np.array_equal(cache.match(list(range(8))), np.arange(5))


def test_long_prompt_matches_across_many_edges() -> None:
    pool, cache = filled(20_000)
    base = np.random.default_rng(0).integers(0, 2**31 - 1, 4096)
    rows = cache_sequence(pool, cache, base.tolist())
    for cut in (100, 1000, 3000):  # branch off at several depths
        branch = np.r_[base[:cut], 7, 7, 7]
        cache_sequence(pool, cache, branch.tolist())
    got = cache.match(np.r_[base, 1])
    assert np.array_equal(got, rows)
    pool.free(got)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.match([[1]]), "1-D"),
        (lambda c: c.match([-1]), "token_ids"),
        (lambda c: c.match([2**31]), "token_ids"),
        (lambda c: c.match([1.5]), "integers"),
        (lambda c: c.insert([1, 2], np.array([0])), "len"),
        (lambda c: c.evict(1.5), "num_rows"),
    ],
)
def test_bad_input_raises_value_error(call, message: str) -> None:
    pool, cache = filled(8)
    with pytest.raises(ValueError, match=message):
        call(cache)
    assert pool.is_idle() and cache.num_cached_tokens == 0


def test_insert_of_free_rows_raises_and_caches_nothing() -> None:
    pool, cache = filled(8)
    with pytest.raises(ValueError, match="free"):
        cache.insert([1, 2], np.array([0, 1]))
    assert cache.num_cached_tokens == 0 and cache.match([1, 2]).size == 0
