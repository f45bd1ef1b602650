"""Which GEMM each projection shape uses at each row count, decided by measurement.

At engine start (kernels/cpu/linear.py `prepare_weights`) every projection shape of the model
(qkv, o, gate_up, down, lm_head) is timed at the row buckets 1, 8, 32, 256, 2048 on the model's
own weights, through two candidates: for bf16 weights the C AVX512-BF16 kernel
(csrc/gemm_bf16.c) and oneDNN on reordered weights (which uses AMX tiles where the CPU has them);
for int8/int4 weights (kernels/cpu/quant_linear.py) the VNNI kernel ("quant") and the weight
dequantized to bf16 for the bf16 GEMM ("dequant": panels through the C kernel's tiles, or oneDNN
where the CPU has AMX). Per bucket the faster one is kept, with the first (the C kernel, the
VNNI kernel) as the incumbent: the challenger must win by MARGIN on the median of paired,
alternating runs. A step of `rows` rows uses the bucket nearest to it on a log scale.

A busy machine makes timings lie (a descheduled thread stalls either kernel for milliseconds),
so a bucket whose runs were spread wide (median >= NOISY_SPREAD x fastest), or that the time
budget (BUDGET_S; timing goes bucket by bucket across shapes) cut short or never reached, takes
the prior instead: the challenger (oneDNN, or dequantized weights through it) from 32 rows where the
CPU has AMX (oneDNN won 2.6x at 32 rows and 6x at 2048 on a Xeon, lost 1.9x at 1 row), the
incumbent elsewhere.

Small buckets rotate over enough distinct layers' weights to overflow the last-level cache, as a
forward pass reads them (memory-bound); big ones time one (compute-bound). lm_head is
not timed at 2048 rows (it sees one row per request) and takes its 256-row choice there.

The table is cached per CPU model, flags, torch version, thread count, C library build and
shapes under the cache dir (~/.cache/llmserve/gemm_choice/), so only the first start pays the
~1.5 s of timing here; LLMSERVE_GEMM_CACHE=0 measures anew and stores nothing. A table with
noisy or untimed buckets is reused for PROVISIONAL_TTL_S only (a busy machine does not pay the
timing at every start, nor keep a partial measurement for good).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kernels.cpu import native

log = logging.getLogger(__name__)

BUCKET_ROWS: tuple[int, ...] = (1, 8, 32, 256, 2048)
NATIVE, ONEDNN = "native", "onednn"      # bf16 weights: the C kernel, oneDNN
QUANT, DEQUANT = "quant", "dequant"      # int8/int4 weights: the VNNI kernel, bf16 after all
BF16_LABELS: tuple[str, str] = (NATIVE, ONEDNN)
QUANT_LABELS: tuple[str, str] = (QUANT, DEQUANT)
MARGIN = 0.05            # oneDNN must be this much faster (paired median) to replace the C kernel
MEMORY_BOUND_ROWS = 32   # up to here weights stream from memory: rotate over many layers
LM_HEAD_MAX_ROWS = 256   # lm_head sees one row per request: not timed beyond this
CHOOSER_VERSION = 3      # part of the cache key: bump when the method changes
NOISY_SPREAD = 1.5       # median / fastest run at or above this: timings too noisy to cache
BUDGET_S = 5.0           # timing stops here (a busy machine): later buckets take the prior
AMX_ONEDNN_FROM_ROWS = 32   # the prior on AMX CPUs: oneDNN from this many rows
PROVISIONAL_TTL_S = 3600.0   # a noisy or cut-short table is reused this long, then re-measured


@dataclass(slots=True)
class BucketTiming:
    """Seconds per call of each candidate at one bucket, paired runs in order, and the pick
    (native_s: the incumbent's, the C or VNNI kernel; onednn_s: the challenger's)."""

    rows: int
    native_s: list[float]
    onednn_s: list[float]
    choice: str = NATIVE
    measured: bool = True   # False: copied from a smaller bucket (lm_head at 2048) or untimed
    prior: bool = False     # True: the choice is the prior's (noisy, cut short or untimed)

    def noisy(self) -> bool:
        """Whether either candidate's median run took NOISY_SPREAD x its fastest or more."""
        return self.measured and any(
            times and statistics.median(times) >= NOISY_SPREAD * min(times)
            for times in (self.native_s, self.onednn_s))


@dataclass(slots=True)
class ShapeChoice:
    """One projection shape's choice per bucket."""

    name: str
    out_features: int
    in_features: int
    buckets: list[BucketTiming] = field(default_factory=list)
    labels: tuple[str, str] = BF16_LABELS   # (incumbent, challenger)

    def choices(self) -> list[str]:
        """The implementation per bucket, in BUCKET_ROWS order."""
        return [b.choice for b in self.buckets]


@dataclass(slots=True)
class GemmTable:
    """The whole model's choice: shape name -> ShapeChoice, where it came from and its cost."""

    shapes: dict[str, ShapeChoice]
    source: str             # "measured" | "cached" | "env"
    seconds: float = 0.0    # spent timing (0 when cached)

    def noisy(self) -> bool:
        """Whether any bucket's runs were spread wide (a busy machine): then not cached."""
        return any(b.noisy() for shape in self.shapes.values() for b in shape.buckets)

    def provisional(self) -> bool:
        """Whether any bucket took the prior (noisy, cut short or untimed): cached briefly."""
        return any(b.prior for shape in self.shapes.values() for b in shape.buckets)

    def truncated(self) -> bool:
        """Whether the time budget ran out before every bucket was timed."""
        return any(not b.measured and not b.native_s
                   for shape in self.shapes.values() for b in shape.buckets)

    def uses_onednn(self, name: str) -> bool:
        """Whether any bucket of this shape picks oneDNN."""
        return ONEDNN in self.shapes[name].choices()


@dataclass(slots=True)
class ShapeCandidates:
    """What to time for one shape: one call of each candidate on weight i (i < len(onednn))."""

    name: str
    out_features: int
    in_features: int
    layers: int                                   # distinct weights available to rotate over
    run_native: Callable[[object, int], object]   # (x, weight index) -> y
    run_onednn: Callable[[object, int], object]
    make_x: Callable[[int], object]               # rows -> x [rows, in]
    max_rows: int = BUCKET_ROWS[-1]
    labels: tuple[str, str] = BF16_LABELS         # (incumbent: run_native, challenger)
    weight_bytes: float = 2.0                     # bytes per weight element as stored


def bucket_index(rows: int) -> int:
    """The bucket nearest to `rows` on a log scale (bounds at the geometric means)."""
    for index in range(len(BUCKET_ROWS) - 1):
        if rows * rows < BUCKET_ROWS[index] * BUCKET_ROWS[index + 1]:
            return index
    return len(BUCKET_ROWS) - 1


def decide(native_s: Sequence[float], onednn_s: Sequence[float], margin: float = MARGIN,
           labels: tuple[str, str] = BF16_LABELS) -> str:
    """The challenger (oneDNN) when both the median of the paired ratios (challenger /
    incumbent, run i against run i) and the ratio of the medians are below 1 - margin; else
    the incumbent (the C kernel)."""
    if not native_s or len(native_s) != len(onednn_s) or min(native_s) <= 0:
        return labels[0]
    paired = statistics.median(o / n for n, o in zip(native_s, onednn_s))
    of_medians = statistics.median(onednn_s) / statistics.median(native_s)
    return labels[1] if max(paired, of_medians) < 1.0 - margin else labels[0]


def time_pair(run_a: Callable[[], object], run_b: Callable[[], object], repeats: int,
              clock: Callable[[], float] = time.perf_counter,
              deadline: float = math.inf) -> tuple[list[float], list[float]]:
    """Alternating timed runs of a and b after one warm-up each (a, b, a, b, ...); fewer
    pairs (at least one) once `deadline` has passed."""
    run_a()
    run_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for run, times in ((run_a, times_a), (run_b, times_b)):
            start = clock()
            run()
            times.append(clock() - start)
        if clock() >= deadline:
            break
    return times_a, times_b


def rotation(layers: int, out_features: int, in_features: int, rows: int,
             cache_bytes: int, bytes_per_weight: float = 2.0) -> int:
    """How many distinct weights a timed run goes through: enough to spill the last-level
    cache twice over in the memory-bound buckets, one in the compute-bound ones."""
    if rows > MEMORY_BOUND_ROWS:
        return 1
    weight_bytes = max(1.0, bytes_per_weight * out_features * in_features)
    return max(1, min(layers, math.ceil(2 * cache_bytes / weight_bytes)))


def prior_choice(rows: int, amx: bool, labels: tuple[str, str] = BF16_LABELS) -> str:
    """A bucket's pick without a trustworthy timing: the challenger (oneDNN) from
    AMX_ONEDNN_FROM_ROWS rows on a CPU with AMX, else the incumbent (the C kernel)."""
    return labels[1] if amx and rows >= AMX_ONEDNN_FROM_ROWS else labels[0]


def measure_bucket(shape: ShapeCandidates, rows: int, cache_bytes: int,
                   clock: Callable[[], float] = time.perf_counter, deadline: float = math.inf,
                   amx: bool = False) -> BucketTiming:
    """Both candidates' seconds per call at `rows` rows, and the pick: the faster, or the
    prior when the runs were noisy or the deadline cut them short."""
    count = rotation(shape.layers, shape.out_features, shape.in_features, rows, cache_bytes,
                     shape.weight_bytes)
    x = shape.make_x(rows)

    def run_native() -> None:
        for i in range(count):
            shape.run_native(x, i)

    def run_onednn() -> None:
        for i in range(count):
            shape.run_onednn(x, i)

    repeats = 5 if rows <= MEMORY_BOUND_ROWS else 3
    native_s, onednn_s = time_pair(run_native, run_onednn, repeats, clock, deadline)
    timing = BucketTiming(rows, [t / count for t in native_s], [t / count for t in onednn_s])
    if len(native_s) < repeats or timing.noisy():
        timing.choice, timing.prior = prior_choice(rows, amx, shape.labels), True
    else:
        timing.choice = decide(timing.native_s, timing.onednn_s, labels=shape.labels)
    return timing


def measure_all(candidates: Sequence[ShapeCandidates], cache_bytes: int,
                clock: Callable[[], float] = time.perf_counter, deadline: float = math.inf,
                amx: bool = False) -> dict[str, ShapeChoice]:
    """Every shape at every bucket, smallest bucket first across shapes; buckets reached after
    `deadline` (on `clock`) stay untimed and take the prior."""
    results = {c.name: ShapeChoice(c.name, c.out_features, c.in_features, labels=c.labels)
               for c in candidates}
    for rows in BUCKET_ROWS:
        for shape in candidates:
            buckets = results[shape.name].buckets
            if rows > shape.max_rows:
                last = buckets[-1]
                buckets.append(BucketTiming(rows, last.native_s, last.onednn_s, last.choice,
                                            measured=False, prior=last.prior))
            elif clock() >= deadline:
                buckets.append(BucketTiming(rows, [], [], prior_choice(rows, amx, shape.labels),
                                            measured=False, prior=True))
            else:
                buckets.append(measure_bucket(shape, rows, cache_bytes, clock, deadline, amx))
    return results


def measure_shape(shape: ShapeCandidates, cache_bytes: int,
                  clock: Callable[[], float] = time.perf_counter,
                  amx: bool = False) -> ShapeChoice:
    """One shape at every bucket up to shape.max_rows (beyond it: the last timed choice)."""
    return measure_all([shape], cache_bytes, clock, amx=amx)[shape.name]


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size from sysfs (32 MiB when unreadable)."""
    largest = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size_file.read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            largest = max(largest, int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return largest or 32 << 20


def cpu_has_amx() -> bool:
    """Whether /proc/cpuinfo lists AMX tiles with bf16."""
    return {"amx_tile", "amx_bf16"} <= native.cpu_flags()


def cpu_identity() -> dict[str, str]:
    """The CPU's model name and a hash of its feature flags (from /proc/cpuinfo)."""
    info = native.cpu_info()
    return {"cpu_model": info.model or "unknown",
            "cpu_flags_sha": hashlib.sha256(info.flags_text.encode()).hexdigest()[:16]}


def cache_key(identity: dict[str, object]) -> str:
    """The file name part for a table measured under `identity` (any JSON-able fields)."""
    blob = json.dumps({**identity, "chooser": CHOOSER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _table_from_json(data: dict) -> GemmTable:
    shapes = {}
    for name, shape in data["shapes"].items():
        buckets = [BucketTiming(**bucket) for bucket in shape.pop("buckets")]
        labels = tuple(shape.pop("labels", BF16_LABELS))
        shapes[name] = ShapeChoice(**shape, buckets=buckets, labels=labels)
    return GemmTable(shapes, source="cached")


def load_cached(path: Path, names: Sequence[str], now: float | None = None) -> GemmTable | None:
    """The table stored at path, or None (absent, unreadable, missing a shape, or provisional
    and older than PROVISIONAL_TTL_S)."""
    try:
        data = json.loads(path.read_text())
        age = (time.time() if now is None else now) - float(data.get("measured_at", 0.0))
        if data.get("provisional", False) and not 0 <= age < PROVISIONAL_TTL_S:
            return None
        table = _table_from_json(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    ok = set(table.shapes) >= set(names) and all(
        len(table.shapes[n].buckets) == len(BUCKET_ROWS) for n in names)
    return table if ok else None


def store(path: Path, table: GemmTable, identity: dict[str, object],
          provisional: bool = False) -> None:
    """Write the table atomically (a failure to write is logged, never raised)."""
    data = {"identity": identity, "measured_seconds": table.seconds, "measured_at": time.time(),
            "provisional": provisional,
            "shapes": {name: asdict(shape) for name, shape in table.shapes.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps(data, indent=1))
        os.replace(scratch, path)
    except OSError as error:
        log.warning("could not cache the GEMM choice at %s: %s", path, error)


def choose(candidates: Sequence[ShapeCandidates], identity: dict[str, object], cache_dir: Path,
           cache_bytes: int | None = None, clock: Callable[[], float] = time.perf_counter,
           budget_s: float = BUDGET_S, amx: bool | None = None) -> GemmTable:
    """The table for these shapes: from the cache when one matches, else measured within
    budget_s and stored (for PROVISIONAL_TTL_S only when noisy or cut short)."""
    path = cache_dir / f"{cache_key(identity)}.json"
    use_cache = os.environ.get("LLMSERVE_GEMM_CACHE", "1") != "0"
    names = [c.name for c in candidates]
    if use_cache and (cached := load_cached(path, names)) is not None:
        return cached
    started = time.perf_counter()
    llc = cache_bytes if cache_bytes is not None else last_level_cache_bytes()
    amx = cpu_has_amx() if amx is None else amx
    table = GemmTable(measure_all(candidates, llc, clock, clock() + budget_s, amx),
                      source="measured")
    table.seconds = time.perf_counter() - started
    provisional = table.provisional()
    if table.truncated():
        log.warning("GEMM timing stopped at its %.1f s budget (a busy machine?): the untimed "
                    "buckets take the prior (*)", budget_s)
    elif table.noisy():
        log.warning("GEMM timings were noisy (a busy machine?): those buckets take the prior "
                    "(*)")
    if use_cache:
        store(path, table, identity, provisional)
        if provisional:
            log.warning("this GEMM choice is reused for %.0f min only, then measured again",
                        PROVISIONAL_TTL_S / 60)
    return table


PICK_NAMES = {NATIVE: "C", ONEDNN: "oneDNN", QUANT: "VNNI", DEQUANT: "deq"}


def format_table(table: GemmTable) -> str:
    """shape x bucket -> choice with both times (ms, medians), one line per shape."""
    head = f"{'shape':<10}{'out x in':>13}" + "".join(f"{r:>24}" for r in BUCKET_ROWS)
    lines = [f"GEMM choice ({table.source}"
             + (f", {table.seconds:.2f} s" if table.source == "measured" else "")
             + "): rows -> pick (C ms / oneDNN ms, or int8/int4: VNNI ms / dequantized bf16 "
             "ms); * the prior: noisy or untimed", head]
    for shape in table.shapes.values():
        cells = []
        for b in shape.buckets:
            times = (f"{statistics.median(b.native_s) * 1e3:.3f}/"
                     f"{statistics.median(b.onednn_s) * 1e3:.3f}") if b.measured else (
                "as 256" if b.native_s else "untimed")
            pick = PICK_NAMES.get(b.choice, b.choice) + ("*" if b.prior else "")
            cells.append(f"{pick} {times}")
        lines.append(f"{shape.name:<10}{f'{shape.out_features}x{shape.in_features}':>13}"
                     + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)
