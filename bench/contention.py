"""Throughput of the services when the CPU is shared: quiet, with busy neighbours, under a quota.

Starts the engine + tokenizer service (as `make run` does, 2 threads) once per engine setting
(`--setting NAME=ENGINE_ARGS`, e.g. the adaptive thread governor on and off) and, for each, runs
the same greedy load (default 4 streams) while 0, 1 or 2 busy processes (`while True: pass`)
share the machine, and, where this machine lets us create a cgroup, with the engine under a
`cpu.max` quota of one CPU. Prints tokens/s per condition and each condition's ratio to quiet,
side by side for every setting. Example:

    python bench/contention.py --setting adaptive= --setting fixed=--no-adaptive-threads \
        --json bench/results/contention_cpu.json
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import Services, machine_info  # noqa: E402
from bench.serve import LoadSpec, build_prompts, run_load  # noqa: E402

HOG = "while True: pass"
CGROUP_ROOT = Path("/sys/fs/cgroup")


@contextlib.contextmanager
def hogs(count: int) -> Iterator[None]:
    """`count` busy Python processes for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def cpu_quota(pids: list[int], cpus: float) -> Iterator[bool]:
    """Move `pids` into a fresh cgroup limited to `cpus` (v2 cpu.max, else the v1 cpu
    controller's cfs quota); yields False where this machine does not allow it."""
    v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
    parent = CGROUP_ROOT if v2 else CGROUP_ROOT / "cpu"
    group = parent / f"llmserve-bench-{pids[0]}"
    period = 100000
    try:
        group.mkdir()
        if v2:
            (group / "cpu.max").write_text(f"{int(cpus * period)} {period}\n")
        else:
            (group / "cpu.cfs_period_us").write_text(f"{period}\n")
            (group / "cpu.cfs_quota_us").write_text(f"{int(cpus * period)}\n")
        for pid in pids:
            (group / "cgroup.procs").write_text(f"{pid}\n")
    except OSError as err:
        print(f"  no cgroup quota here ({err.strerror}); skipped", file=sys.stderr)
        _remove_group(group, parent)
        yield False
        return
    try:
        yield True
    finally:
        _remove_group(group, parent)


def _remove_group(group: Path, parent: Path) -> None:
    if not group.exists():
        return
    with contextlib.suppress(OSError):
        for pid in (group / "cgroup.procs").read_text().split():
            (parent / "cgroup.procs").write_text(f"{pid}\n")
    with contextlib.suppress(OSError):
        group.rmdir()


def measure(address: str, prompts: list, spec: LoadSpec) -> dict:
    records, seconds = asyncio.run(run_load(address, prompts, spec, progress=False))
    errors = [r.error for r in records if r.error]
    tokens = sum(r.output_tokens for r in records)
    return {"tok_s": round(tokens / seconds, 1), "seconds": round(seconds, 2),
            "output_tokens": tokens, "errors": errors[:3]}


def run_setting(args: argparse.Namespace, name: str, engine_args: list[str]) -> dict:
    results: dict[str, dict] = {}
    log_dir = Path(args.log_dir) / name
    with Services(args.model, ["--dtype", args.dtype, *engine_args], args.threads,
                  log_dir) as services:
        prompts = build_prompts(services.address, args.num_prompts, args.input_len, 0.0, 0)
        spec = LoadSpec(concurrency=args.concurrency, output_len=args.output_len)
        measure(services.address, prompts[:args.concurrency], spec)   # warm up
        for count in args.hogs:
            with hogs(count):
                results[f"{count}_hogs"] = measure(services.address, prompts, spec)
            print(f"{name:>12} {count} busy neighbours: {results[f'{count}_hogs']['tok_s']:8.1f} "
                  f"tok/s", flush=True)
        if args.quota:
            pids = [services.engine.process.pid]
            with cpu_quota(pids, args.quota) as applied:
                if applied:
                    results["quota"] = measure(services.address, prompts, spec)
                    print(f"{name:>12} engine under a {args.quota:g}-CPU quota: "
                          f"{results['quota']['tok_s']:8.1f} tok/s", flush=True)
    quiet = results.get("0_hogs", {}).get("tok_s")
    for row in results.values():
        row["x_quiet"] = round(row["tok_s"] / quiet, 3) if quiet else None
    return results


def print_table(settings: dict[str, dict]) -> None:
    conditions = sorted({c for rows in settings.values() for c in rows})
    print("\n| condition | " + " | ".join(settings) + " |")
    print("|---|" + "---|" * len(settings))
    for condition in conditions:
        cells = []
        for rows in settings.values():
            row = rows.get(condition)
            cells.append("-" if row is None else f"{row['tok_s']:.1f} tok/s ({row['x_quiet']}x)")
        print(f"| {condition} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO_ROOT / "models" / "smollm2-135m-instruct"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the services")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=ARGS",
                   help="an engine setting to compare (engine args after '=', space separated); "
                        "default: adaptive= and fixed=--no-adaptive-threads")
    p.add_argument("--hogs", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quota", type=float, default=1.0,
                   help="also run with the engine under this cgroup CPU quota (0: skip)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--log-dir", default="/tmp/llmserve-contention")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    settings = args.setting or ["adaptive=", "fixed=--no-adaptive-threads"]
    results = {}
    for item in settings:
        name, _, engine_args = item.partition("=")
        results[name] = run_setting(args, name, engine_args.split())
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": " ".join(sys.argv), "machine": machine_info(), "args": vars(args),
            "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
