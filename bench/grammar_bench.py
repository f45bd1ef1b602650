"""Structured-output cost per decode step: 0 vs 32 constrained rows, side by side in one run.

    .venv/bin/python bench/grammar_bench.py --model models/smollm2-135m-instruct

In-process engine, 32 requests decoding together (greedy, ignore_eos, the same prompts in every
run). Run kinds: "free" (no response_format), "json" (every request follows a JSON schema of at
least 64 notes, so it never ends inside the measured steps) and "json+maxLength" (the same with
bounded strings: xgrammar then checks tokens at run time near a string's end). The kinds
alternate, repeat after repeat, so a busy machine's drift lands on all. Per decode step: median
and mean step time of each kind, and for the constrained kinds the grammar work timed inside the
step: bitmask fill (xgrammar, every constrained row), mask application (-inf on the logits) and
the matchers' accept. It also times what an unconstrained step gained from this feature (one
check per row). `--json PATH` saves the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import timeit
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_svc import grammar  # noqa: E402
from engine_svc.config import EngineConfig  # noqa: E402
from engine_svc.engine import LLMEngine  # noqa: E402
from engine_svc.params import SamplingParams, StoppingParams  # noqa: E402

ROWS = 32


def notes_schema(text: dict) -> dict:
    """At least 64 notes: never complete within the measured steps."""
    return {"type": "object", "required": ["notes"], "properties": {"notes": {
        "type": "array", "minItems": 64, "items": {
            "type": "object", "required": ["id", "text", "done"], "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 999},
                "text": text, "done": {"type": "boolean"}}}}}}


# run kind -> schema (None: unconstrained). maxLength makes xgrammar check every token at run
# time near a string's end (its cost per row grows as the room left shrinks).
KINDS = {"free": None,
         "json": notes_schema({"type": "string"}),
         "json+maxLength": notes_schema({"type": "string", "maxLength": 24})}


class GrammarClock:
    """Wraps the grammar hooks of one engine to add up the time spent in each."""

    def __init__(self, engine: LLMEngine) -> None:
        self.seconds = {"fill": 0.0, "apply": 0.0, "accept": 0.0}
        masks = engine.runner.token_masks
        build, apply, accept = masks.build, grammar.apply_token_mask, grammar.GrammarState.accept
        import engine_svc.sampler as sampler_module

        def timed_build(seqs, rows):
            started = time.perf_counter()
            try:
                return build(seqs, rows)
            finally:
                self.seconds["fill"] += time.perf_counter() - started

        def timed_apply(logits, mask):
            started = time.perf_counter()
            try:
                return apply(logits, mask)
            finally:
                self.seconds["apply"] += time.perf_counter() - started

        def timed_accept(state, token_id):
            started = time.perf_counter()
            try:
                return accept(state, token_id)
            finally:
                self.seconds["accept"] += time.perf_counter() - started

        masks.build = timed_build
        sampler_module.apply_token_mask = timed_apply
        grammar.GrammarState.accept = timed_accept

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


def prompts(model: str) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    topics = ["groceries", "a trip", "a party", "work", "a garden", "a move", "school", "sport"]
    return [tokenizer.encode(f"<|im_start|>user\nWrite notes about {topics[i % 8]} number {i} "
                             f"as JSON.<|im_end|>\n<|im_start|>assistant\n").ids
            for i in range(ROWS)]


def run_once(engine: LLMEngine, batch: list[list[int]], sampling: SamplingParams, steps: int,
             tag: str, clock: GrammarClock | None = None,
             grammar_times: dict[str, list[float]] | None = None) -> list[float]:
    """Decode `steps` steps with all ROWS requests running; the step times in seconds (and
    each step's grammar work into grammar_times)."""
    stopping = StoppingParams(max_new_tokens=steps + 8, ignore_eos=True)
    for i, prompt in enumerate(batch):
        engine.add_request(f"{tag}-{i}", prompt, sampling, stopping)
    while engine.scheduler.waiting:   # prefill (not measured)
        engine.step()
    times = []
    for _ in range(steps):
        if clock is not None:
            clock.reset()
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
        assert engine.last_step.batch_size == ROWS, engine.last_step
        if clock is not None and grammar_times is not None:
            for key, seconds in clock.seconds.items():
                grammar_times[key].append(seconds)
    for i in range(len(batch)):
        engine.abort(f"{tag}-{i}")
    while engine.has_work():
        engine.step()
    return times


def check_cost(rows: int) -> float:
    """Seconds per step of the one check an unconstrained step gained (a row's format)."""
    params = [SamplingParams(temperature=0.0) for _ in range(rows)]
    number = 20000
    seconds = timeit.timeit(
        lambda: [row for row, p in enumerate(params) if p.response_format is not None],
        number=number)
    return seconds / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=24, help="decode steps measured per run")
    parser.add_argument("--repeats", type=int, default=3, help="free/json run pairs")
    parser.add_argument("--json", type=Path, default=None, help="save the results here")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device="cpu",
                                    max_num_seqs=ROWS, max_model_len=1024,
                                    enable_prefix_caching=False))
    clock = GrammarClock(engine)
    batch = prompts(args.model)
    free = SamplingParams(temperature=0.0)
    sampling = {kind: free if schema is None else replace(free, response_format=grammar.
                ResponseFormat("json_schema", json.dumps(schema)))
                for kind, schema in KINDS.items()}
    for kind in KINDS:  # compiler, first compiles, kernels
        run_once(engine, batch, sampling[kind], 2, f"warm-{kind}")
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    grammar_times = {kind: {"fill": [], "apply": [], "accept": []} for kind in KINDS if
                     KINDS[kind] is not None}
    for repeat in range(args.repeats):
        for kind in KINDS:
            constrained = KINDS[kind] is not None
            times[kind] += run_once(engine, batch, sampling[kind], args.steps,
                                    f"{kind}{repeat}", clock if constrained else None,
                                    grammar_times.get(kind))
    report(args, engine, times, grammar_times)


def _ms(values: list[float]) -> dict[str, float]:
    return {"median": 1e3 * statistics.median(values), "mean": 1e3 * statistics.fmean(values)}


def report(args, engine: LLMEngine, times: dict[str, list[float]],
           grammar_times: dict[str, dict[str, list[float]]]) -> None:
    steps = len(times["free"])
    ms = {name: _ms(values) for name, values in times.items()}
    parts = {kind: {key: _ms(values) for key, values in work.items()}
             for kind, work in grammar_times.items()}
    for kind, work in grammar_times.items():
        parts[kind]["total"] = _ms([sum(step) for step in zip(*work.values())])
    check_ms = 1e3 * check_cost(ROWS)
    result = {"rows": ROWS, "steps_per_run": args.steps, "repeats": args.repeats,
              "dtype": str(engine.runner.dtype).removeprefix("torch."), "step_ms": ms,
              "grammar_ms_per_step": parts, "free_check_ms_per_step": check_ms,
              "schemas": KINDS, "machine": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    print(f"{ROWS} rows decoding, {steps} steps per run kind, {engine.runner.dtype}, "
          f"{torch.get_num_threads()} torch threads, load average "
          f"{', '.join(f'{load:.1f}' for load in os.getloadavg())} (a shared machine: noisy)")
    print(f"{'ms per decode step':24}" + "".join(f"{kind:>16}" for kind in KINDS))
    constrained = [kind for kind in KINDS if KINDS[kind] is not None]
    for stat in ("median", "mean"):
        print(f"{'step (' + stat + ')':24}" + "".join(f"{ms[kind][stat]:16.2f}" for kind in KINDS))
        for key in ("fill", "apply", "accept", "total"):
            print(f"{'  grammar ' + key + ' (' + stat + ')':24}{'-':>16}" +
                  "".join(f"{parts[kind][key][stat]:16.2f}" for kind in constrained))
    print(f"unconstrained step's added check: {check_ms * 1e3:.1f} us per step "
          f"({100 * check_ms / ms['free']['median']:.4f} % of a step)")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
