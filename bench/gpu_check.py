"""The engine's CUDA path checked in one run: correctness first, then speed against the device's
own measured ceilings. Writes one JSON (device, driver, versions, command, every step's numbers)
to OUT/gpu_check.json after every step, so a run cut short still says where it stopped.

    bench/gpu_check.sh [--quick] [--keep-going]       # on the GPU machine (the log: gpu_check.log)
    python bench/gpu_check.py --dry-run --out DIR      # CPU: every step's plumbing at tiny sizes
    python bench/gpu_check.py --table FILE.json        # the README table of a finished run

Steps (q: also in --quick, ~2 min; the full run aims at ~8 min on an H200):
  env q            versions, device, driver; measured HBM copy bandwidth and bf16 matmul rate
  model q          the default model (converted, or a carried GGUF converted here), else a
                   random SmolLM2-135M-shaped model (98 MB GGUF > the 64 MiB a call carries)
  kernel_tests     pytest tests/kernels on CUDA (compiled kernels vs the torch reference)
  kernel_sweep q   prefill/decode attention: bf16/fp16/fp32, head_dim 64/128, GQA 1/3/4/8,
                   lengths across tile and split edges; poisoned outputs, no NaN, vs reference
  quant_gemm q     W8A16/W4A16 GEMM vs the torch oracle: int8, Q8_0-, int4, Q4_1-like, group
                   32/64, bf16/fp16/fp32, rows 1..2048 across tile and split edges (q: bf16)
  compiles q       a mixed workload compiles nothing after start-up; registers/spills/shared
  parity q         greedy tokens vs transformers on CUDA: fp32 5/5 (required), bf16 (reported)
  graphs q         CUDA-graph decode == eager for every bucket with n < bucket (logits, tokens)
  sync_debug q     torch.cuda.set_sync_debug_mode("warn") around decode and mixed steps
  memory           predicted vs measured peak of a worst-case step at 0.95 utilization
  prefill_perf     TFLOP/s vs F.scaled_dot_product_attention (8K causal; 2K after 30K)
  decode_perf q    GB/s vs the copy bandwidth, batch 1/64 x context 1K/8K/32K (q: 64 x 8K)
  quant_perf q     W8A16/W4A16 GEMM vs bf16 F.linear at Llama-3-8B's projections, rows
                   1/16/256/2048: speedup, GB/s vs the copy rate (q: gate_up, down at 1/2048)
  engine_8b q      Llama-3-8B-shaped dummy engine, batch 1/32/256 (q: 1): step vs weight roofline
  torch_backend    --backend torch on CUDA starts (no capture) and generates

A correctness failure stops the run (--keep-going runs on); speed targets are recorded as met or
not and never stop it. Exit status: 0 all passed, 1 a step failed, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ heads sys.path and bench/kernels.py would shadow the kernels package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "bench"]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

log = logging.getLogger("gpu_check")
if __name__ == "__main__":   # the step modules import this one as bench.gpu_check: one instance
    sys.modules.setdefault("bench.gpu_check", sys.modules[__name__])


class CheckFailed(Exception):
    """A correctness check failed (stops the run)."""


class StepTimeout(Exception):
    """A step ran past its time limit."""


@dataclass(slots=True)
class Context:
    """What the steps share: options, the device, the model, the measured ceilings."""

    out_dir: Path
    quick: bool
    dry_run: bool
    device: object                      # torch.device
    scratch: Path
    model_dir: Path | None = None
    model_note: str = ""
    peaks: dict = field(default_factory=dict)   # copy_gbps, matmul_tflops
    targets: dict = field(default_factory=dict)  # the current step's speed targets
    shared: dict = field(default_factory=dict)   # results later steps reuse

    def target(self, name: str, value: float, goal: float, unit: str = "", at_most: bool = False) -> bool:
        """Record a target: value >= goal (or <= goal with at_most); returns whether it was met."""
        met = bool(value == value and (value <= goal if at_most else value >= goal))
        relation = "<=" if at_most else ">="
        self.targets[name] = {"value": round(float(value), 4), "goal": goal, "relation": relation,
                              "unit": unit, "met": met}
        log.info("target %s: %.3f%s (goal %s %s) %s", name, value, unit, relation, goal,
                 "met" if met else "NOT MET")
        return met


@dataclass(slots=True)
class Step:
    """One check: its function, whether --quick runs it, its time limit (seconds)."""

    name: str
    run: Callable[[Context], dict]
    quick: bool
    timeout_s: int


def _steps() -> list[Step]:
    from bench import gpu_check_engine as engine
    from bench import gpu_check_kernels as kernels
    from bench import gpu_check_quant as quant

    return [Step("env", kernels.env_step, True, 60), Step("model", engine.model_step, True, 120),
            Step("kernel_tests", kernels.kernel_tests_step, False, 240),
            Step("kernel_sweep", kernels.kernel_sweep_step, True, 180),
            Step("quant_gemm", quant.quant_gemm_step, True, 240),
            Step("compiles", engine.compiles_step, True, 120),
            Step("parity", engine.parity_step, True, 150), Step("graphs", engine.graphs_step, True, 120),
            Step("sync_debug", engine.sync_debug_step, True, 60),
            Step("memory", engine.memory_step, False, 120),
            Step("prefill_perf", kernels.prefill_perf_step, False, 90),
            Step("decode_perf", kernels.decode_perf_step, True, 90),
            Step("quant_perf", quant.quant_perf_step, True, 120),
            Step("engine_8b", engine.engine_8b_step, True, 240),
            Step("torch_backend", engine.torch_backend_step, False, 90)]


def _on_alarm(signum, frame) -> None:
    raise StepTimeout("time limit reached")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Report:
    """The JSON document, rewritten after every step."""

    def __init__(self, path: Path, argv: list[str], mode: str) -> None:
        self.path = path
        self.doc = {"schema": 1, "mode": mode, "status": "running", "stopped_at": None,
                    "error": None, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "command": " ".join(["bench/gpu_check.py", *argv]), "git_commit": _git_commit(),
                    "host": platform.node(), "python": platform.python_version(), "steps": []}
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        tmp.replace(self.path)

    def add_step(self, entry: dict) -> None:
        self.doc["steps"].append(entry)
        self.write()

    def finish(self, status: str, stopped_at: str | None, error: str | None) -> None:
        self.doc.update(status=status, stopped_at=stopped_at, error=error,
                        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.write()


def run_steps(ctx: Context, steps: list[Step], report: Report, keep_going: bool) -> int:
    """Run each step under its time limit; record it; stop at the first failure unless asked."""
    failed: list[str] = []
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        signal.signal(signal.SIGALRM, _on_alarm)
    for step in steps:
        if ctx.quick and not step.quick:
            continue
        ctx.targets = {}
        entry = {"name": step.name, "status": "passed", "seconds": None, "result": {}, "targets": {}}
        started = time.perf_counter()
        log.info("== step %s (limit %d s)", step.name, step.timeout_s)
        try:
            if use_alarm:
                signal.alarm(step.timeout_s)
            result = step.run(ctx) or {}
            entry["result"] = result
            if result.get("skipped"):
                entry["status"] = "skipped"
        except StepTimeout:
            entry.update(status="timeout", error=f"{step.name}: no result within {step.timeout_s} s")
        except (CheckFailed, Exception) as exc:  # noqa: BLE001 - every failure is reported
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc()[-4000:])
        finally:
            if use_alarm:
                signal.alarm(0)
        entry["seconds"] = round(time.perf_counter() - started, 2)
        entry["targets"] = ctx.targets
        report.add_step(entry)
        log.info("== step %s: %s in %.1f s%s", step.name, entry["status"], entry["seconds"],
                 f" ({entry.get('error')})" if entry.get("error") else "")
        if entry["status"] in ("failed", "timeout"):
            failed.append(step.name)
            if not keep_going:
                report.finish(entry["status"], step.name, entry.get("error"))
                return 1
    report.finish("failed" if failed else "passed", failed[0] if failed else None,
                  f"failed steps: {', '.join(failed)}" if failed else None)
    return 1 if failed else 0


def render_table(paths: list[Path]) -> str:
    """Markdown: one row per speed target / check of each run (for the README)."""
    lines = ["| run | step | check | value | goal | met |", "|---|---|---|---|---|---|"]
    for path in paths:
        doc = json.loads(path.read_text())
        device = doc.get("device", {}).get("name", "?")
        for step in doc.get("steps", []):
            for name, target in step.get("targets", {}).items():
                lines.append(f"| {device} {doc.get('mode', '')} | {step['name']} | {name} | "
                             f"{target['value']}{target.get('unit', '')} | {target.get('relation', '>=')} "
                             f"{target['goal']} | "
                             f"{'yes' if target['met'] else 'no'} |")
            if not step.get("targets"):
                lines.append(f"| {device} {doc.get('mode', '')} | {step['name']} | status | "
                             f"{step['status']} | passed | {'yes' if step['status'] == 'passed' else 'no'} |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu_check"),
                        help="folder for gpu_check.json (default: $OUT, else /tmp/gpu_check)")
    parser.add_argument("--quick", action="store_true", help="the ~2 minute subset (a rerun)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: every step's plumbing on CPU at tiny sizes (kernels interpreted)")
    parser.add_argument("--keep-going", action="store_true", help="run every step even after a failure")
    parser.add_argument("--only", default="", help="comma-separated step names to run (default: all)")
    parser.add_argument("--model", type=Path, help="a converted model directory to use")
    parser.add_argument("--table", type=Path, nargs="+", help="print the README table of these JSON files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.table:
        print(render_table(args.table))
        return 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"   # before anything imports Triton
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "dry-run" if args.dry_run else ("quick" if args.quick else "full")
    report = Report(args.out / "gpu_check.json", argv, mode)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        report.finish("failed", "preflight", f"torch {torch.__version__} sees no CUDA device "
                      "(use --dry-run on a CPU machine)")
        log.error("no CUDA device: torch %s", torch.__version__)
        return 1
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = Context(out_dir=args.out, quick=args.quick, dry_run=args.dry_run, device=device,
                  scratch=scratch, model_dir=args.model)
    steps = _steps()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in steps}
        if unknown:
            print(f"--only: unknown steps {sorted(unknown)}", file=sys.stderr)
            return 2
        steps = [s for s in steps if s.name in wanted]
    report.doc["device"] = {"name": "cpu (dry run)"} if args.dry_run else {}
    ctx.shared["report"] = report
    return run_steps(ctx, steps, report, args.keep_going)


if __name__ == "__main__":
    sys.exit(main())
