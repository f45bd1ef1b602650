"""Where one decode step of the in-process engine spends its time, per batch size.

Wraps (from outside: no engine code is changed) the engine's step phases, each kernel op,
every F.linear (split by weight shape: qkv, o_proj, gate_up, down, lm_head) and the sampler with
wall-clock timers, runs --steps pure-decode steps per batch size and prints ms per step per part.
"Python/glue" is what the step took beyond the timed parts (views, dataclasses, tensor building).
Untimed steps are measured first so the timers' own overhead shows. A bf16 model on CPU runs its
layers in one C call (kernels/cpu/layer_loop.py): the untimed steps use it, the timed
ones the Python loop over the same kernels, so the parts show where the time goes.

    python bench/profile_decode.py --batch 1 32 --dtype float32 --threads 2 --json OUT
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import OtherLoad, machine_info, set_threads, wait_for_quiet  # noqa: E402


class Timers:
    """Accumulated wall seconds and call counts per label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.enabled = False

    def wrap(self, label, fn):
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label if isinstance(label, str) else label(*args)] += (
                    time.perf_counter() - start)
                self.calls[label if isinstance(label, str) else label(*args)] += 1
        return timed


def linear_label(names: dict[tuple, str]):
    def label(x, weight, *rest) -> str:
        return "matmul " + names.get(tuple(weight.shape), f"other {tuple(weight.shape)}")
    return label


def instrument(engine, timers: Timers) -> None:
    """Replace engine/runner/model callables by timed wrappers (instance attributes only)."""
    import torch.nn.functional as F

    import engine_svc.models.llama as llama_module

    runner, model = engine.runner, engine.runner.model
    layer = model.weights.layers[0]
    names = {tuple(layer.qkv_proj.shape): "qkv_proj", tuple(layer.o_proj.shape): "o_proj",
             tuple(layer.gate_up_proj.shape): "gate_up_proj",
             tuple(layer.down_proj.shape): "down_proj",
             tuple(model.weights.lm_head.shape): "lm_head"}
    functional = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F)
                                          if not k.startswith("_")})
    model.linear = timers.wrap(linear_label(names), model.linear)
    functional.embedding = timers.wrap("embedding", F.embedding)
    llama_module.F = functional
    ops = model.ops
    model.ops = dataclasses.replace(ops, **{
        name: timers.wrap(f"op {name}", getattr(ops, name))
        for name in ("rms_norm", "apply_rope", "silu_and_mul", "store_kv", "rope_and_store_kv",
                     "prefill_attention", "decode_attention")})
    model.forward = timers.wrap("forward (all)", model.forward)
    runner._build_batch = timers.wrap("runner._build_batch", runner._build_batch)
    sampler = runner.sampler
    runner.sampler = timers.wrap("sampler", sampler.__call__)
    scheduler = engine.scheduler
    scheduler.schedule = timers.wrap("scheduler.schedule", scheduler.schedule)
    scheduler.commit = timers.wrap("scheduler.commit", scheduler.commit)
    engine._process = timers.wrap("engine._process", engine._process)
    engine._drain_inbox = timers.wrap("engine._drain_inbox", engine._drain_inbox)


def profile_batch(engine, timers: Timers, batch: int, prompt_len: int, steps: int) -> dict:
    """Prefill `batch` requests, then time `steps` plain and `steps` instrumented decode steps."""
    from engine_svc.params import SamplingParams, StoppingParams

    greedy = SamplingParams(temperature=0.0)
    stopping = StoppingParams(max_new_tokens=2 * steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"p{batch}-{i}", [1000 + (7 * i + j) % 40000 for j in range(prompt_len)],
                           greedy, stopping)
    while engine.last_step.phase != "decode" or len(engine.scheduler.waiting):
        engine.step()
    for _ in range(3):
        engine.step()
    plain = []
    with OtherLoad() as load:
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            plain.append(time.perf_counter() - start)
        timers.seconds.clear()
        timers.calls.clear()
        timers.enabled = True
        # the per-kernel breakdown needs the Python layer loop (the same kernels one call at a
        # time); the untimed steps above ran the C loop where the model has one
        model = engine.runner.model
        native, model.native = model.native, None
        start = time.perf_counter()
        try:
            for _ in range(steps):
                engine.step()
                assert engine.last_step.phase == "decode" and engine.last_step.batch_size == batch
        finally:
            model.native = native
        wall = time.perf_counter() - start
        timers.enabled = False
    while engine.has_work():
        engine.step()
    result = breakdown(timers, wall, plain, steps, batch)
    result["others_cpu_cores"] = load.others_cores
    return result


def breakdown(timers: Timers, wall: float, plain: list[float], steps: int, batch: int) -> dict:
    per_step = {k: 1e3 * v / steps for k, v in timers.seconds.items()}
    inside_forward = sum(v for k, v in per_step.items()
                         if k.startswith(("matmul", "op ", "embedding")))
    top = ("runner._build_batch", "forward (all)", "sampler", "scheduler.schedule",
           "scheduler.commit", "engine._process", "engine._drain_inbox")
    parts = {k: v for k, v in per_step.items() if k not in top}
    parts["forward glue (views, reshape, cat, index_select, .float())"] = (
        per_step.get("forward (all)", 0.0) - inside_forward)
    for name in ("runner._build_batch", "sampler", "scheduler.schedule", "scheduler.commit",
                 "engine._process", "engine._drain_inbox"):
        parts[name] = per_step.get(name, 0.0)
    step_ms = 1e3 * wall / steps
    parts["engine.step glue (rest)"] = step_ms - sum(per_step.get(k, 0.0) for k in top)
    plain_ms = sorted(1e3 * s for s in plain)
    return {"batch": batch, "steps": steps, "step_ms_plain_median": plain_ms[len(plain_ms) // 2],
            "step_ms_instrumented_mean": step_ms,
            "tokens_per_s_plain": batch * 1e3 / (sum(plain_ms) / len(plain_ms)),
            "parts_ms_per_step": dict(sorted(parts.items(), key=lambda kv: -kv[1])),
            "calls_per_step": {k: v / steps for k, v in timers.calls.items()}}


def print_breakdown(result: dict) -> None:
    step = result["step_ms_instrumented_mean"]
    print(f"\nbatch {result['batch']}: decode step {result['step_ms_plain_median']:.2f} ms "
          f"(median, untimed; {result['tokens_per_s_plain']:.1f} tok/s), {step:.2f} ms timed; "
          f"other processes kept {result['others_cpu_cores']:.2f} cores busy")
    for name, ms in result["parts_ms_per_step"].items():
        calls = result["calls_per_step"].get(name)
        calls_text = f"{calls:6.0f} calls" if calls else " " * 12
        print(f"  {name:58} {ms:8.3f} ms {100 * ms / step:5.1f}%  {calls_text}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--max-others", type=float, default=None, metavar="CORES",
                   help="wait for an idle machine and measure again while others were busier")
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    from engine_svc.config import EngineConfig
    from engine_svc.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device="cpu",
                                    max_model_len=1024, max_num_seqs=max(32, *args.batch)))
    timers = Timers()
    instrument(engine, timers)
    print(f"threads {threads}, dtype {args.dtype}, prompt {args.prompt_len} tokens")
    results = []
    for batch in args.batch:
        for attempt in range(args.retries + 1):
            if args.max_others is not None:
                wait_for_quiet(900.0)
            result = profile_batch(engine, timers, batch, args.prompt_len, args.steps)
            if args.max_others is None or result["others_cpu_cores"] <= args.max_others:
                break
            verdict = "measuring again" if attempt < args.retries else "keeping it"
            print(f"batch {batch}: other processes kept {result['others_cpu_cores']:.2f} cores "
                  f"busy; {verdict}")
        results.append(result)
        print_breakdown(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_info(), "threads": threads,
                                         "dtype": args.dtype, "prompt_len": args.prompt_len,
                                         "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
