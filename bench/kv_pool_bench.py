"""KV pool bookkeeping cost per decode step and per prefill, against a naive pool in the same run.

The naive pool keeps the same reference counts but rebuilds the sorted free list with
np.flatnonzero over the whole free mask on every alloc, then searches it for a contiguous run.

    .venv/bin/python bench/kv_pool_bench.py [--capacity 1000000] [--batch 256] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_svc.kv_pool import KVPool  # noqa: E402


class NaivePool:
    """Baseline: counts + free mask, a full np.flatnonzero of the mask on every alloc."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.counts = np.zeros(capacity, np.int32)
        self.free_mask = np.ones(capacity, bool)

    def alloc(self, n: int) -> np.ndarray | None:
        free_rows = np.flatnonzero(self.free_mask)  # sorted free rows, rebuilt every time
        if free_rows.size < n:
            return None
        hits = np.flatnonzero(free_rows[n - 1 :] - free_rows[: free_rows.size - n + 1] == n - 1)
        rows = np.arange(free_rows[hits[0]], free_rows[hits[0]] + n) if hits.size else free_rows[:n]
        self.counts[rows] = 1
        self.free_mask[rows] = False
        return rows

    def free(self, rows: np.ndarray) -> None:
        unique_rows, times = np.unique(rows, return_counts=True)
        if (self.counts[unique_rows] < times).any():
            raise ValueError("double free")
        self.counts[unique_rows] -= times
        self.free_mask[unique_rows[self.counts[unique_rows] == 0]] = True


@dataclass(slots=True)
class Timings:
    """Microsecond samples per named operation."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(seconds * 1e6)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {"median_us": float(np.median(v)), "p99_us": float(np.percentile(v, 99)), "n": len(v)}
            for name, v in self.samples.items()
        }


def timed(timings: Timings, name: str, call: Callable[[], object]) -> object:
    start = time.perf_counter()
    result = call()
    timings.add(name, time.perf_counter() - start)
    return result


def steady_state(pool, batch: int, steps: int, warmup: int, seed: int, timings: Timings) -> None:
    """Continuous batching: each step allocs one row per running request; finished requests free in bulk."""
    rng = np.random.default_rng(seed)
    held: list[list[np.ndarray]] = [[] for _ in range(batch)]  # per slot: prompt rows + decode rows
    left = np.zeros(batch, np.int64)  # decode tokens left per slot
    for step in range(warmup + steps):
        starting = np.flatnonzero(left == 0)
        finished = [np.concatenate(held[s]) for s in starting if held[s]]
        to_free = np.concatenate(finished) if finished else None  # bench bookkeeping, not timed
        prompts = rng.integers(50, 300, starting.size)
        start = time.perf_counter()
        if to_free is not None:
            pool.free(to_free)  # requests that ended last step free everything at once
        prompt_rows = [pool.alloc(int(n)) for n in prompts]  # new requests prefill their prompt
        t_decode = time.perf_counter()
        rows = pool.alloc(batch)  # one new row per running request
        end = time.perf_counter()
        for s, prompt in zip(starting, prompt_rows):
            held[s] = [prompt]
            left[s] = rng.integers(150, 450)
        for s in range(batch):
            held[s].append(rows[s : s + 1])
        left -= 1
        if step >= warmup:
            timings.add("decode step: alloc(batch) + bulk frees + new prompts", end - start)
            timings.add("decode alloc(batch) only", end - t_decode)
    for rows in held:
        pool.free(np.concatenate(rows))


def prefill_cycles(pool, n: int, iters: int, label: str, timings: Timings) -> None:
    for _ in range(iters):
        start = time.perf_counter()
        rows = pool.alloc(n)
        pool.free(rows)
        timings.add(label, time.perf_counter() - start)


def fragment(pool, free_fraction: float, seed: int) -> np.ndarray:
    """Fill the pool, then free a random fraction of rows one by one (in bulk calls)."""
    rng = np.random.default_rng(seed)
    rows = np.concatenate([pool.alloc(c) for c in np.full(pool.capacity // 4000, 4000)])
    rest = pool.capacity - rows.size
    if rest:
        rows = np.concatenate([rows, pool.alloc(rest)])
    released = rows[rng.random(rows.size) < free_fraction]
    for chunk in np.array_split(released, 64):
        pool.free(chunk)
    return released


def run(make_pool: Callable[[int], object], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    timings = Timings()
    pool = make_pool(args.capacity)
    steady_state(pool, args.batch, args.steps, args.warmup, args.seed, timings)
    pool = make_pool(args.capacity)
    fragment(pool, args.free_fraction, args.seed)
    prefill_cycles(pool, args.batch, 1, f"fragmented: first alloc({args.batch}) + free (one-off)", timings)
    prefill_cycles(pool, args.batch, args.iters, f"fragmented: alloc({args.batch}) + free", timings)
    prefill_cycles(pool, args.prefill, args.iters, f"fragmented: alloc({args.prefill}) + free", timings)
    pool = make_pool(args.capacity)
    held = [pool.alloc(int(n)) for n in np.random.default_rng(args.seed).integers(50, 600, 300)]
    prefill_cycles(pool, args.prefill, args.iters, f"prefill: alloc({args.prefill}) + free", timings)
    for rows in held:
        pool.free(rows)
    if isinstance(pool, KVPool):
        pool.check_invariants()
    return timings.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prefill", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=2000, help="measured decode steps")
    parser.add_argument("--warmup", type=int, default=600, help="steps before measuring (reach steady state)")
    parser.add_argument("--iters", type=int, default=300, help="alloc+free cycles per prefill figure")
    parser.add_argument("--free-fraction", type=float, default=0.3, help="rows freed at random to fragment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    ours = run(KVPool, args)
    naive = run(NaivePool, args)
    print(f"capacity {args.capacity:,} rows, batch {args.batch}, prefill {args.prefill}; microseconds per op")
    print(f"{'operation':<56} {'KVPool p50':>11} {'p99':>9} {'naive p50':>10} {'p99':>9} {'speedup':>8}")
    for name, mine in ours.items():
        base = naive[name]
        ratio = base["median_us"] / mine["median_us"]
        print(
            f"{name:<56} {mine['median_us']:>11.1f} {mine['p99_us']:>9.1f}"
            f" {base['median_us']:>10.1f} {base['p99_us']:>9.1f} {ratio:>7.1f}x"
        )
    if args.json:
        meta = {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
                "processor": platform.processor(), "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"meta": meta, "kv_pool": ours, "naive": naive}, indent=2))


if __name__ == "__main__":
    main()
