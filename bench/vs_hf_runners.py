"""The four timed sides of bench/vs_hf.py: HF sequential, HF batched, engine, service."""
from __future__ import annotations

import asyncio
import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import OtherLoad, Services, summarize_ms

WARMUP_TOKENS = 4


@dataclass(slots=True)
class Measurement:
    """One method x dtype x scenario: wall time for all its requests and what they generated."""

    scenario: str
    method: str
    dtype: str
    requests: int
    new_tokens: int
    seconds: float
    tokens: int = 0
    tokens_per_s: float = 0.0
    exact_counts: bool = False
    agree_with_hf: float | None = None   # mean common-prefix fraction vs hf_sequential, same dtype
    others_cores: float = 0.0            # CPU cores other processes kept busy meanwhile
    note: str = ""
    extra: dict = field(default_factory=dict)
    outputs: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = sum(len(o) for o in self.outputs)
        self.tokens_per_s = self.tokens / self.seconds if self.seconds > 0 else 0.0
        self.exact_counts = (len(self.outputs) == self.requests
                             and all(len(o) == self.new_tokens for o in self.outputs))

    def score_against(self, reference: list[list[int]] | None) -> None:
        if reference is None or self.method == "hf_sequential":
            return
        fractions = []
        for ours, theirs in zip(self.outputs, reference):
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                        min(len(ours), len(theirs)))
            fractions.append(same / max(1, self.new_tokens))
        self.agree_with_hf = sum(fractions) / max(1, len(fractions))

    def line(self) -> str:
        return (f"  {self.scenario:16} {self.method:14} {self.dtype:9} {self.tokens:6d} tokens "
                f"in {self.seconds:7.2f} s = {self.tokens_per_s:8.1f} tok/s "
                f"(others {self.others_cores:.2f} cores) {self.note}")


# ---- transformers ------------------------------------------------------------------------------
def _load_hf(model_dir: Path, dtype: str, device: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(
        device).eval()


def _hf_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 new_tokens: int) -> torch.Tensor:
    """Greedy generate of exactly new_tokens per row, going on through EOS as the engine's
    ignore_eos does; returns only the new ids [rows, new]."""
    config = copy.deepcopy(model.generation_config)
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (
        eos[0] if isinstance(eos, list) else eos)
    # An end-of-sequence id no row can produce: every row runs the full new_tokens and EOS stays
    # an ordinary token. (min_new_tokens would ban EOS instead, and the two sides would part
    # wherever the model's greedy pick is EOS: 3 of the 32 benchmark prompts did.)
    config.eos_token_id = model.config.vocab_size
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             generation_config=config, max_new_tokens=new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=pad)
    return out[:, input_ids.shape[1]:]


def _left_padded(prompts: list[list[int]], pad_id: int, device: str):
    width = max(len(p) for p in prompts)
    # ids, mask: [rows, width]; pads on the left so every row's last token is aligned
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_hf_sequential(model_dir: Path, dtype: str, scenarios: list,
                      device: str = "cpu") -> list[Measurement]:
    """(a) transformers generate, one request at a time."""
    model = _load_hf(model_dir, dtype, device)
    first = scenarios[0].prompt_ids[0]
    _hf_generate(model, *_left_padded([first], 0, device), WARMUP_TOKENS)
    results = []
    for scenario in scenarios:
        outputs = []
        with OtherLoad() as load:
            start = time.perf_counter()
            for prompt in scenario.prompt_ids:
                ids, mask = _left_padded([prompt], 0, device)
                outputs.append(_hf_generate(model, ids, mask, scenario.new_tokens)[0].tolist())
            _sync(device)
            seconds = time.perf_counter() - start
        results.append(Measurement(scenario.name, "hf_sequential", dtype, len(scenario.prompt_ids),
                                   scenario.new_tokens, seconds, outputs=outputs,
                                   others_cores=load.others_cores))
    del model
    return results


def run_hf_batched(model_dir: Path, dtype: str, scenarios: list,
                   device: str = "cpu") -> list[Measurement]:
    """(b) transformers generate on one left-padded batch per scenario."""
    if not scenarios:
        return []
    model = _load_hf(model_dir, dtype, device)
    pad_id = model.generation_config.pad_token_id or 0
    _hf_generate(model, *_left_padded(scenarios[0].prompt_ids[:2], pad_id, device), WARMUP_TOKENS)
    results = []
    for scenario in scenarios:
        ids, mask = _left_padded(scenario.prompt_ids, pad_id, device)
        with OtherLoad() as load:
            start = time.perf_counter()
            new_ids = _hf_generate(model, ids, mask, scenario.new_tokens)
            _sync(device)
            seconds = time.perf_counter() - start
        results.append(Measurement(scenario.name, "hf_batched", dtype, len(scenario.prompt_ids),
                                   scenario.new_tokens, seconds, outputs=new_ids.tolist(),
                                   others_cores=load.others_cores,
                                   note=f"batch {len(scenario.prompt_ids)} x {ids.shape[1]} "
                                        "padded prompt tokens"))
    del model
    return results


# ---- this engine, in process ----------------------------------------------------------------
def _drive(engine, prompts: list[list[int]], new_tokens: int, step_log: list,
           ttft: list | None = None) -> list[list[int]]:
    """add every prompt, step until done; record (phase, seconds, batch) of each step and, in
    `ttft`, each request's seconds from add_request to its first token."""
    from engine_svc.params import SamplingParams, StoppingParams

    greedy = SamplingParams(temperature=0.0)
    stopping = StoppingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ids = [f"bench-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    added = time.perf_counter()
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, greedy, stopping)
    outputs: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for out in engine.step():
            if ttft is not None and out.token_ids and not outputs[out.request_id]:
                ttft.append(time.perf_counter() - added)
            outputs[out.request_id].extend(out.token_ids)
        stats = engine.last_step
        step_log.append((stats.phase, stats.duration_s, stats.batch_size))
    return [outputs[i] for i in ids]


def _step_summary(step_log: list) -> dict:
    decode = [s for phase, s, _ in step_log if phase == "decode"]
    other = [s for phase, s, _ in step_log if phase not in ("decode", "idle")]
    return {"steps": len(step_log), "decode_step_ms": summarize_ms(decode),
            "prefill_or_mixed_s": sum(other),
            "decode_batch_mean": (sum(b for p, _, b in step_log if p == "decode")
                                  / max(1, len(decode)))}


def run_engine(model_dir: Path, dtype: str, scenarios: list, max_model_len: int,
               device: str = "cpu") -> list[Measurement]:
    """(c) LLMEngine in this process: sequential scenarios one request at a time."""
    from engine_svc.config import EngineConfig
    from engine_svc.engine import LLMEngine

    batch = max(len(s.prompt_ids) for s in scenarios)
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype=dtype, device=device,
                                    max_model_len=max_model_len, max_num_seqs=max(32, batch)))
    _drive(engine, [scenarios[0].prompt_ids[0][:8]], WARMUP_TOKENS, [])
    results = []
    for scenario in scenarios:
        step_log: list = []
        ttft: list = []
        with OtherLoad() as load:
            start = time.perf_counter()
            if scenario.concurrent:
                outputs = _drive(engine, scenario.prompt_ids, scenario.new_tokens, step_log, ttft)
            else:
                outputs = [_drive(engine, [p], scenario.new_tokens, step_log, ttft)[0]
                           for p in scenario.prompt_ids]
            _sync(device)
            seconds = time.perf_counter() - start
        results.append(Measurement(scenario.name, "engine", dtype, len(scenario.prompt_ids),
                                   scenario.new_tokens, seconds, outputs=outputs,
                                   others_cores=load.others_cores,
                                   extra={**_step_summary(step_log),
                                          "ttft_ms": summarize_ms(ttft)}))
    del engine
    return results


# ---- this engine, over gRPC -------------------------------------------------------------------
def run_service(model_dir: Path, dtype: str, scenarios: list, max_model_len: int, threads: int,
                log_dir: Path, device: str = "cpu", stream_interval: int = 1) -> list[Measurement]:
    """(d) both services on loopback; requests sent sequentially or all at once. Method
    "service", or "service_siN" when the engine streams N tokens per message."""
    from bench.serve import LoadSpec, Prompt, run_load
    from bench.serve_report import summarize_run

    batch = max(len(s.prompt_ids) for s in scenarios)
    engine_args = ["--dtype", dtype, "--device", device, "--max-model-len", str(max_model_len),
                   "--max-num-seqs", str(max(32, batch)), "--stream-interval", str(stream_interval)]
    method = "service" if stream_interval == 1 else f"service_si{stream_interval}"
    results = []
    logging.getLogger(__name__).info("starting services (logs in %s)", log_dir)
    with Services(model_dir, engine_args, threads, log_dir) as services:
        warm = [Prompt("Warm-up request, not timed.", 0)]
        asyncio.run(run_load(services.address, warm, LoadSpec(1, output_len=WARMUP_TOKENS),
                             progress=False))
        for scenario in scenarios:
            prompts = [Prompt(text, len(ids))
                       for text, ids in zip(scenario.prompt_texts, scenario.prompt_ids)]
            spec = LoadSpec(len(prompts) if scenario.concurrent else 1,
                            output_len=scenario.new_tokens)
            with OtherLoad() as load:
                records, seconds = asyncio.run(run_load(services.address, prompts, spec,
                                                        progress=False))
            summary = summarize_run(records, seconds, spec.concurrency, spec.request_rate)
            mismatched = sum(r.prompt_tokens != p.num_tokens for r, p in zip(records, prompts))
            note = "; ".join(filter(None, [
                f"{summary['failed']} failed {summary['errors']}" if summary["failed"] else "",
                f"{mismatched} prompts tokenized to another length" if mismatched else ""]))
            results.append(Measurement(
                scenario.name, method, dtype, len(prompts), scenario.new_tokens, seconds,
                outputs=[r.token_ids for r in records if not r.error], note=note,
                others_cores=load.others_cores,
                extra={k: summary[k] for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")}))
    return results
