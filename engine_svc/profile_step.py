"""The worst step the scheduler can plan, built as a real StepPlan for the model runner to execute
on a scratch pool: it measures that step's peak memory (kv_sizing) and, on the Triton backend,
compiles every kernel variant serving uses before the first request (the warm-up).
"""
from __future__ import annotations

import numpy as np
import torch

from engine_svc.params import MAX_TOP_LOGPROBS, SamplingParams, StoppingParams
from engine_svc.scheduler import ScheduledChunk, StepPlan
from engine_svc.sequence import Sequence, SeqStatus

# the costliest sampling a row can ask for: top-p sorts the whole vocabulary, penalties build
# [rows, vocab] counts, top logprobs add a topk; unseeded (seeded rows only add a loop)
COSTLIEST_SAMPLING = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                    presence_penalty=0.5, frequency_penalty=0.5,
                                    top_logprobs=MAX_TOP_LOGPROBS)


def _sequence(request_id: str, prompt_len: int, slot: int, computed: int) -> Sequence:
    seq = Sequence(request_id, [0] * prompt_len, COSTLIEST_SAMPLING, StoppingParams())
    seq.status = SeqStatus.RUNNING
    seq.slot = slot
    seq.num_computed = computed
    return seq


def worst_case_plan(decode_rows: int, prefill_lens: list[int]) -> StepPlan:
    """A plan of `decode_rows` decode requests (2 tokens of context each) then one prefill chunk
    per length (no prefix), every request sampled; slots 0.., pool rows 0.. in order.

    Pool rows used: decode_rows + sum(prefill_lens); table slots: decode_rows + len(prefill_lens).
    """
    plan = StepPlan()
    next_row = 0
    for slot in range(decode_rows):
        seq = _sequence(f"profile-decode-{slot}", 2, slot, computed=1)
        rows = np.arange(next_row, next_row + 1, dtype=np.int64)
        plan.decode.append(ScheduledChunk(seq, start=1, num_tokens=1, new_rows=rows, samples=True))
        next_row += 1
    for index, length in enumerate(prefill_lens):
        seq = _sequence(f"profile-prefill-{index}", length, decode_rows + index, computed=0)
        rows = np.arange(next_row, next_row + length, dtype=np.int64)
        plan.prefill.append(ScheduledChunk(seq, start=0, num_tokens=length, new_rows=rows,
                                           samples=True))
        next_row += length
    return plan


def profile_worst_step(runner, measure: bool) -> tuple[int, int]:
    """Run the worst step through `runner.execute` on a scratch pool and table (its own are not
    built yet), then the largest CUDA-graph decode bucket eagerly; returns their peak bytes above
    resident memory (0, 0 when `measure` is False: a warm-up only, e.g. CPU tensors).

    runner: a ModelRunner during __init__ (config, model, device, dtype, model_config,
    max_model_len, graph_mode, execute); its table/cache/graphs are swapped in and back.
    """
    from engine_svc.cuda_graphs import DecodeGraphs
    from engine_svc.device_setup import CAPTURE
    from engine_svc.forward_batch import KVCache
    from engine_svc.kv_sizing import CudaMemory, measure_peak, worst_case_shape
    from engine_svc.req_to_token import ReqToTokenTable

    cfg, mcfg = runner.config, runner.model_config
    decode_rows, prefill_lens = worst_case_shape(cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                                 runner.max_model_len)
    table = ReqToTokenTable(cfg.max_num_seqs, runner.max_model_len,
                            decode_rows + sum(prefill_lens), runner.device)
    k = torch.zeros((table.pool_rows, mcfg.num_kv_heads, mcfg.head_dim), dtype=runner.dtype,
                    device=runner.device)   # one scratch pool for every layer
    v = torch.zeros_like(k)
    cache = KVCache(k=[k] * mcfg.num_layers, v=[v] * mcfg.num_layers, req_to_token=table.tensor)
    memory = CudaMemory(runner.device) if measure else None

    def peak(run) -> int:
        if memory is None:
            run()
            return 0
        return measure_peak(memory, run)

    saved = tuple(getattr(runner, name, None) for name in ("table", "cache", "graphs"))
    runner.table, runner.cache, runner.graphs = table, cache, None
    try:
        plan = worst_case_plan(decode_rows, prefill_lens)
        step_peak = peak(lambda: runner.execute(plan))
        decode_peak = 0
        if runner.graph_mode == CAPTURE:
            graphs = DecodeGraphs(runner.model, cache, table, capture=False)
            batch = graphs._static_batch(graphs.buckets[-1], runner.max_model_len)
            decode_peak = peak(lambda: runner.model.forward(batch, cache))
    finally:
        runner.table, runner.cache, runner.graphs = saved
    return step_peak, decode_peak
