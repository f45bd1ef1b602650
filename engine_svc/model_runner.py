"""The model runner owns the device tensors: weights, the K/V pool tensors, the request->token
table (a `ReqToTokenTable`, whose slot allocator the scheduler uses).

It turns a `StepPlan` into index tensors (one pinned host->device copy per step, straight into
the CUDA graphs' static inputs on graph steps: engine_svc/step_staging.py), runs the model,
samples, and brings the sampled results back with one device->host copy. Bookkeeping (which rows,
which slots) is decided by the scheduler beforehand. On CUDA the pool is sized from a measured
worst-case step (engine_svc/kv_sizing.py), which also compiles every Triton variant up front.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from engine_svc.config import EngineConfig
from engine_svc.cpu_threads import ThreadGovernor, start_cpu_threads
from engine_svc.cpu_tuning import keep_freed_memory_on_heap
from engine_svc.cuda_graphs import DecodeGraphs, batch_buckets
from engine_svc.device_setup import CAPTURE, bind_device, bind_thread, decode_graph_mode
from engine_svc.forward_batch import ForwardBatch, KVCache
from engine_svc.grammar import TokenMasks
from engine_svc.kv_sizing import (CudaMemory, DeviceMemory, MemoryBudget, graph_reserve_bytes,
                                  read_budget)
from engine_svc.model_config import ModelConfig
from engine_svc.models.llama import LlamaModel
from engine_svc.profile_step import profile_worst_step
from engine_svc.req_to_token import ReqToTokenTable
from engine_svc.sampler import Sampler, SamplerOutput, seeded_generator
from engine_svc.scheduler import ScheduledChunk, StepPlan
from engine_svc.step_staging import StepStaging, outputs_to_host
from engine_svc.weights import dense_weight_bytes, load_weights
from kernels.backend import get_ops, resolve_backend
from kernels.triton.launch import interpret_mode, persist_triton_cache

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_TOKENS = 16384   # the CPU pool's default with unquantized weights

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no CUDA device is available")
    return device


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA (fp16 without bf16); on CPU bf16 where it is native, else fp32.

    bf16 is about 2x faster than fp32 here but only near greedy parity with fp32 (see the
    README); `--dtype float32` gives token-exact transformers parity.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(sorted(_DTYPES))}; got {name!r}")
    return _DTYPES[name]


class ModelRunner:
    """Builds the model on its device and executes scheduler plans."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        """config: resolved against model_config (`EngineConfig.resolved`)."""
        config.check_quantization()
        self.config = config
        self.max_model_len = config.model_len
        self.model_config = model_config
        self.device = bind_device(resolve_device(config.device))   # cuda:N current from here on
        self.dtype = resolve_dtype(config.dtype, self.device)
        if config.quantization != "none" and self.device.type == "cpu" and \
                self.dtype == torch.float16:
            raise ValueError(f"--quantization {config.quantization} on CPU needs --dtype "
                             "bfloat16 or float32 (the CPU's quantized products take those "
                             "activations), got float16")
        log.info("dtype %s -> %s on %s%s", config.dtype, str(self.dtype).removeprefix("torch."),
                 self.device, " (native bf16 on this CPU; --dtype float32 for exact parity)"
                 if config.dtype == "auto" and self.dtype == torch.bfloat16
                 and self.device.type == "cpu" else "")
        self.backend = resolve_backend(config.backend, self.device)
        if self.backend == "triton" and not interpret_mode():
            persist_triton_cache()
        self.thread_governor: ThreadGovernor | None = None   # CPU: OpenMP team size per step
        if self.device.type == "cpu":
            keep_freed_memory_on_heap()
            self.thread_governor = start_cpu_threads(config.cpu_threads, config.adaptive_threads)
        torch.manual_seed(config.seed)
        weights = load_weights(config.model, model_config, self.dtype, self.device,
                               config.load_format, seed=config.seed,
                               quantization=config.quantization,
                               group_size=config.quantization_group_size)
        # the backend packs the projections once where it can (it logs how: kernels/cpu/linear.py)
        self.model = LlamaModel(model_config, weights, get_ops(self.backend), self.max_model_len)
        self.sampler = Sampler(model_config.vocab_size, self.device,
                               argmax=self.model.ops.argmax_rows)
        self.token_masks = TokenMasks(model_config.vocab_size, config.max_num_seqs, self.device)
        self.staging = StepStaging(self.device)   # the step's one host->device copy
        self.graph_mode = decode_graph_mode(config.cuda_graphs, self.device, self.backend)
        self.graphs: DecodeGraphs | None = None
        self.memory_budget: MemoryBudget | None = None   # CUDA sizing's numbers (gpu_check reads)
        self.capacity = self._kv_capacity()
        # the table also owns the padding conventions (its dummy slot, the pool's scratch row)
        self.table = ReqToTokenTable(config.max_num_seqs, self.max_model_len, self.capacity,
                                     self.device)
        shape = (self.table.pool_rows, model_config.num_kv_heads, model_config.head_dim)
        # k, v: per layer [capacity + 1 (scratch row), kv_heads, head_dim]
        self.cache = KVCache(
            k=[torch.zeros(shape, dtype=self.dtype, device=self.device)
               for _ in range(model_config.num_layers)],
            v=[torch.zeros(shape, dtype=self.dtype, device=self.device)
               for _ in range(model_config.num_layers)],
            req_to_token=self.table.tensor)
        self.graphs = self._decode_graphs()

    def _decode_graphs(self) -> DecodeGraphs | None:
        if self.graph_mode is None:
            return None
        graphs = DecodeGraphs(self.model, self.cache, self.table, capture=self.graph_mode == CAPTURE)
        if graphs.capture:
            graphs.capture_all()
        return graphs

    # ---- capacity ---------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        cfg = self.model_config
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize

    def _kv_capacity(self) -> int:
        """Pool tokens: the flag, the CPU default, or on CUDA what the measured worst step leaves.

        On the compiled Triton backend the worst step also runs when the size is given: it
        compiles every kernel variant serving needs before the first request.
        """
        given = self.config.kv_capacity_tokens
        sizing = self.device.type == "cuda" and not given
        if sizing or (self.backend == "triton" and not interpret_mode()):
            step_peak, decode_peak = profile_worst_step(self, measure=sizing)
            if sizing:
                return self._capacity_from_memory(step_peak, decode_peak)
        return given or self._cpu_default_capacity()

    def _cpu_default_capacity(self) -> int:
        """CPU without --kv-capacity-tokens: a memory budget, not a token count. The budget is
        what the unquantized weights in the engine dtype plus max(16384, max_model_len) tokens
        take; the pool gets what the loaded weights leave of it, so quantized weights give it
        more tokens (and unquantized ones exactly that many)."""
        baseline = max(CPU_DEFAULT_KV_TOKENS, self.max_model_len)
        per_token = self.kv_bytes_per_token()
        budget = dense_weight_bytes(self.model_config, self.dtype) + baseline * per_token
        loaded = weight_bytes(self.model.weights)
        capacity = max(baseline, (budget - loaded) // per_token)
        log.info("KV pool: %d tokens (CPU default: a %.0f MiB budget for weights + pool; weights "
                 "take %.0f MiB; --kv-capacity-tokens sets it)", capacity, budget / 2**20,
                 loaded / 2**20)
        return capacity

    def _capacity_from_memory(self, step_peak: int, decode_peak: int,
                              memory: DeviceMemory | None = None) -> int:
        """Tokens the pool gets once the worst step's and the graphs' peaks are measured."""
        cfg = self.config
        buckets = batch_buckets(cfg.max_num_seqs) if self.graph_mode == CAPTURE else []
        logits_width = self.model.weights.lm_head.shape[0]
        budget = read_budget(memory or CudaMemory(self.device), step_peak,
                             graph_reserve_bytes(buckets, logits_width, decode_peak),
                             table_bytes=(cfg.max_num_seqs + 1) * self.max_model_len * 4)
        capacity = budget.kv_tokens(self.kv_bytes_per_token(), cfg.gpu_memory_utilization)
        if capacity < self.max_model_len:
            raise ValueError(f"gpu_memory_utilization={cfg.gpu_memory_utilization} leaves room for "
                             f"{capacity} KV tokens, fewer than max_model_len={self.max_model_len} "
                             f"(free {budget.free / 2**30:.2f} GiB, reserved "
                             f"{budget.reserved / 2**30:.2f} GiB)")
        self.memory_budget = budget
        log.info("KV pool: %d tokens (%.2f GiB of %.2f GiB; reserved: worst step %.2f GiB, "
                 "graphs %.2f GiB, table %.2f GiB, slack %.2f GiB)", capacity,
                 capacity * self.kv_bytes_per_token() / 2**30, budget.total / 2**30,
                 step_peak / 2**30, budget.graph_reserve / 2**30, budget.table_bytes / 2**30,
                 budget.slack / 2**30)
        return capacity

    # ---- one step -----------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> SamplerOutput | None:
        """Run the plan's forward pass; sample for chunks with `samples` (in plan order).

        The result's tensors are on the CPU (one device->host copy of all of them)."""
        bind_thread(self.device)   # torch's current device is per thread
        sampled = self._execute(plan)
        return None if sampled is None else outputs_to_host(sampled)

    def idle(self) -> None:
        """The engine has nothing to run: the thread governor stops measuring until the next step."""
        if self.thread_governor is not None:
            self.thread_governor.pause()

    def _execute(self, plan: StepPlan) -> SamplerOutput | None:
        if self.thread_governor is not None:
            self.thread_governor.tick()   # a clock read; /proc twice a second
        batch, sampled = self._build_batch(plan)
        if self.graphs is not None and not plan.prefill and self.graphs.fits(len(plan.decode)):
            logits = self.graphs.run(batch)
        else:
            logits = self.model.forward(batch, self.cache)
        if not sampled:
            return None
        seqs = [chunk.seq for chunk in sampled]
        for seq in seqs:
            if seq.sampling.seed is not None:   # noise of (seed, position): resumable
                seq.sampler_state = seeded_generator(seq.sampler_state, seq.sampling.seed,
                                                     seq.num_tokens, self.device)
        params = [s.sampling for s in seqs]
        biases = [s.step_logit_bias() for s in seqs]   # logit_bias, min_tokens bans; mostly None
        constrained = [row for row, p in enumerate(params) if p.response_format is not None]
        token_mask = self.token_masks.build(seqs, constrained) if constrained else None
        return self.sampler(logits, params, [s.sampler_state for s in seqs],
                            [s.prompt_ids for s in seqs], [s.generated_ids() for s in seqs],
                            need_logprobs=any(p.top_logprobs for p in params),
                            logit_bias=biases if any(biases) else None, token_mask=token_mask)

    def _build_batch(self, plan: StepPlan) -> tuple[ForwardBatch, list[ScheduledChunk]]:
        chunks = plan.chunks
        input_ids: list[int] = []
        positions: list[np.ndarray] = []
        table_pos: list[np.ndarray] = []     # flat req_to_token indices to (re)write
        table_rows: list[np.ndarray] = []
        logits_index: list[int] = []
        sampled: list[ScheduledChunk] = []
        table = self.table
        for index, chunk in enumerate(chunks):
            seq, start, count = chunk.seq, chunk.start, chunk.num_tokens
            input_ids.extend(seq.token_ids(start, start + count))
            positions.append(np.arange(start, start + count))
            # a prefill chunk rewrites the table row up to its start too (those rows may be new
            # to this slot: prefix-cache hit, re-admission after preemption); decode adds one
            if index >= len(plan.decode) and start > 0:
                table_rows.append(seq.rows)
                table_pos.append(table.positions(seq.slot, 0, start))
            table_rows.append(chunk.new_rows)
            table_pos.append(table.positions(seq.slot, start, start + count))
            if chunk.samples:
                logits_index.append(len(input_ids) - 1)
                sampled.append(chunk)
            for fork in chunk.forks:  # another sample of this prompt: its rows, the same logits
                table_rows.append(fork.seq.rows)
                table_pos.append(table.positions(fork.seq.slot, 0, fork.start))
                logits_index.append(len(input_ids) - 1)
                sampled.append(fork)
        return self._stage_batch(plan, input_ids, positions, table_pos, table_rows,
                                 logits_index), sampled

    def _stage_batch(self, plan: StepPlan, input_ids: list[int], positions: list[np.ndarray],
                     table_pos: list[np.ndarray], table_rows: list[np.ndarray],
                     logits_index: list[int]) -> ForwardBatch:
        """The step's index tensors on the device after one host->device copy (into the CUDA
        graphs' static inputs for a graph step); the table updates are scattered on the device."""
        chunks, nd = plan.chunks, len(plan.decode)
        arrays = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                  "positions": np.concatenate(positions).astype(np.int64, copy=False),
                  "out_rows": np.concatenate([c.new_rows for c in chunks]).astype(np.int64, copy=False),
                  "slots": np.array([c.seq.slot for c in chunks], dtype=np.int32),
                  "seq_lens": np.array([c.start + 1 for c in plan.decode], dtype=np.int32),
                  "table_pos": np.concatenate(table_pos).astype(np.int64, copy=False),
                  "table_rows": np.concatenate(table_rows).astype(np.int32, copy=False)}
        prefill_lens = [c.num_tokens for c in plan.prefill]
        graphs = self.graphs
        if graphs is not None and not plan.prefill and graphs.fits(nd) and len(logits_index) == nd:
            views = graphs.stage(self.staging, arrays)
            views.update(logits_index=graphs.logits_index[:nd], prefix_lens=graphs._empty_i32,
                         cu_new_lens=graphs._cu_zero)
        else:
            arrays.update(
                logits_index=np.asarray(logits_index, dtype=np.int64),
                prefix_lens=np.array([c.start for c in plan.prefill], dtype=np.int32),
                cu_new_lens=np.concatenate([[0], np.cumsum(prefill_lens)]).astype(np.int32))
            views = self.staging.stage(arrays)
        self.table.tensor.view(-1).index_copy_(0, views["table_pos"], views["table_rows"])
        return ForwardBatch(
            input_ids=views["input_ids"], positions=views["positions"], out_rows=views["out_rows"],
            slots=views["slots"], logits_index=views["logits_index"], num_decode=nd,
            seq_lens=views["seq_lens"], max_seq_len=max((c.start + 1 for c in plan.decode), default=0),
            prefix_lens=views["prefix_lens"], cu_new_lens=views["cu_new_lens"],
            max_new_len=max(prefill_lens, default=0))

    def memory_stats(self) -> dict[str, int]:
        """Device memory in bytes by kind, for the metrics gauges."""
        kv = self.capacity * self.kv_bytes_per_token()
        stats = {"kv_cache": kv, "weights": weight_bytes(self.model.weights)}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            stats.update(allocated=torch.cuda.memory_allocated(self.device), total=total, free=free)
        return stats


def _nbytes(weight: object) -> int:
    """Bytes of a plain tensor (packed or not), or of a quantized / packed object (`.nbytes`)."""
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    return int(weight.nbytes)   # QuantizedWeight, or a backend's packed form of one


def weight_bytes(weights) -> int:
    """Bytes of every weight as the model holds it (after the backend packed it), each object
    once (a tied LM head that is the embedding table counts once)."""
    seen: dict[int, object] = {}
    for t in [weights.embed_tokens, weights.final_norm, weights.lm_head]:
        seen[id(t)] = t
    for layer in weights.layers:
        for t in (layer.input_norm, layer.qkv_proj, layer.qkv_bias, layer.o_proj,
                  layer.post_norm, layer.gate_up_proj, layer.down_proj):
            if t is not None:
                seen[id(t)] = t
    return sum(_nbytes(t) for t in seen.values())
