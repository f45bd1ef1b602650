"""The model runner owns the device tensors: weights, the K/V pool tensors, the request->token
table (a `ReqToTokenTable`, whose slot allocator the scheduler uses).

It turns a `StepPlan` into index tensors (one host->device copy per step), runs the model and
samples. Bookkeeping (which rows, which slots) is decided by the scheduler beforehand.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from engine_svc.config import EngineConfig
from engine_svc.cpu_threads import ThreadGovernor, start_cpu_threads
from engine_svc.cpu_tuning import keep_freed_memory_on_heap
from engine_svc.cuda_graphs import DecodeGraphs
from engine_svc.forward_batch import ForwardBatch, KVCache
from engine_svc.grammar import TokenMasks
from engine_svc.models.llama import LlamaModel
from engine_svc.req_to_token import ReqToTokenTable
from engine_svc.sampler import Sampler, SamplerOutput
from engine_svc.scheduler import ScheduledChunk, StepPlan
from engine_svc.weights import ModelConfig, load_weights
from kernels.backend import get_ops, resolve_backend

log = logging.getLogger(__name__)

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
        self.config = config
        self.max_model_len = config.model_len
        self.model_config = model_config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        log.info("dtype %s -> %s on %s%s", config.dtype, str(self.dtype).removeprefix("torch."),
                 self.device, " (native bf16 on this CPU; --dtype float32 for exact parity)"
                 if config.dtype == "auto" and self.dtype == torch.bfloat16
                 and self.device.type == "cpu" else "")
        self.backend = resolve_backend(config.backend, self.device)
        self.thread_governor: ThreadGovernor | None = None   # CPU: OpenMP team size per step
        if self.device.type == "cpu":
            keep_freed_memory_on_heap()
            self.thread_governor = start_cpu_threads(config.cpu_threads, config.adaptive_threads)
        torch.manual_seed(config.seed)
        weights = load_weights(config.model, model_config, self.dtype, self.device,
                               config.load_format, seed=config.seed)
        # the backend packs the projections once where it can (it logs how: kernels/cpu/linear.py)
        self.model = LlamaModel(model_config, weights, get_ops(self.backend), self.max_model_len)
        self.sampler = Sampler(model_config.vocab_size, self.device,
                               argmax=self.model.ops.argmax_rows)
        self.token_masks = TokenMasks(model_config.vocab_size, config.max_num_seqs, self.device)
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
        enabled = self.config.cuda_graphs
        if enabled is None:
            enabled = self.device.type == "cuda"
        if not enabled:
            return None
        capture = self.device.type == "cuda"
        graphs = DecodeGraphs(self.model, self.cache, self.table, capture=capture)
        if capture:
            graphs.capture_all()
        return graphs

    # ---- capacity ---------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        cfg = self.model_config
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize

    def _kv_capacity(self) -> int:
        if self.device.type != "cuda":
            return self.config.kv_capacity_tokens or max(16384, self.max_model_len)
        if self.config.kv_capacity_tokens:
            return self.config.kv_capacity_tokens
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._profile_forward()
        free, total = torch.cuda.mem_get_info()
        peak_activations = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        budget = free * self.config.gpu_memory_utilization - peak_activations
        capacity = int(budget // self.kv_bytes_per_token())
        if capacity < self.max_model_len:
            raise ValueError(f"gpu_memory_utilization={self.config.gpu_memory_utilization} leaves "
                             f"room for {capacity} KV tokens, fewer than max_model_len="
                             f"{self.max_model_len}")
        log.info("KV pool: %d tokens (%.2f GiB of %.2f GiB)", capacity,
                 capacity * self.kv_bytes_per_token() / 2**30, total / 2**30)
        return capacity

    def _profile_forward(self) -> None:
        """One prefill forward at the token budget, on a scratch pool, to measure peak memory."""
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        cfg = self.model_config
        shape = (tokens, cfg.num_kv_heads, cfg.head_dim)
        scratch = KVCache(k=[torch.zeros(shape, dtype=self.dtype, device=self.device)] * cfg.num_layers,
                          v=[torch.zeros(shape, dtype=self.dtype, device=self.device)] * cfg.num_layers,
                          req_to_token=torch.arange(tokens, dtype=torch.int32,
                                                    device=self.device).view(1, tokens))
        dev = self.device
        batch = ForwardBatch(
            input_ids=torch.zeros(tokens, dtype=torch.int64, device=dev),
            positions=torch.arange(tokens, device=dev),
            out_rows=torch.arange(tokens, device=dev),
            slots=torch.zeros(1, dtype=torch.int32, device=dev),
            logits_index=torch.tensor([tokens - 1], device=dev),
            num_decode=0, seq_lens=torch.zeros(0, dtype=torch.int32, device=dev), max_seq_len=0,
            prefix_lens=torch.zeros(1, dtype=torch.int32, device=dev),
            cu_new_lens=torch.tensor([0, tokens], dtype=torch.int32, device=dev),
            max_new_len=tokens)
        self.model.forward(batch, scratch)
        torch.cuda.synchronize()
        del scratch

    # ---- one step -----------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> SamplerOutput | None:
        """Run the plan's forward pass; sample for chunks with `samples` (in plan order)."""
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
            if seq.sampler_state is None and seq.sampling.seed is not None:
                seq.sampler_state = torch.Generator(self.device).manual_seed(seq.sampling.seed)
        params = [s.sampling for s in seqs]
        biases = [s.step_logit_bias() for s in seqs]   # logit_bias, min_tokens bans; mostly None
        constrained = [row for row, p in enumerate(params) if p.response_format is not None]
        token_mask = self.token_masks.build(seqs, constrained) if constrained else None
        return self.sampler(logits, params, [s.sampler_state for s in seqs],
                            [s.prompt_ids for s in seqs], [s.output_ids for s in seqs],
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
        dev = self.device
        rows_flat = torch.from_numpy(np.concatenate([c.new_rows for c in chunks]))
        table.write(np.concatenate(table_pos), np.concatenate(table_rows))
        nd = len(plan.decode)
        prefill_lens = [c.num_tokens for c in plan.prefill]
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=dev),
            positions=torch.from_numpy(np.concatenate(positions)).to(dev),
            out_rows=rows_flat.to(dev),
            slots=torch.tensor([c.seq.slot for c in chunks], dtype=torch.int32, device=dev),
            logits_index=torch.tensor(logits_index, dtype=torch.int64, device=dev),
            num_decode=nd,
            seq_lens=torch.tensor([c.start + 1 for c in plan.decode], dtype=torch.int32, device=dev),
            max_seq_len=max((c.start + 1 for c in plan.decode), default=0),
            prefix_lens=torch.tensor([c.start for c in plan.prefill], dtype=torch.int32, device=dev),
            cu_new_lens=torch.tensor(np.concatenate([[0], np.cumsum(prefill_lens, dtype=np.int64)]),
                                     dtype=torch.int32, device=dev),
            max_new_len=max(prefill_lens, default=0))
        return batch, sampled

    def memory_stats(self) -> dict[str, int]:
        """Device memory in bytes by kind, for the metrics gauges."""
        kv = self.capacity * self.kv_bytes_per_token()
        weights = sum(t.numel() * t.element_size() for t in _weight_tensors(self.model.weights))
        stats = {"kv_cache": kv, "weights": weights}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            stats.update(allocated=torch.cuda.memory_allocated(), total=total, free=free)
        return stats


def _weight_tensors(weights) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in [weights.embed_tokens, weights.final_norm, weights.lm_head]:
        seen[id(t)] = t
    for layer in weights.layers:
        for t in (layer.input_norm, layer.qkv_proj, layer.qkv_bias, layer.o_proj,
                  layer.post_norm, layer.gate_up_proj, layer.down_proj):
            if t is not None:
                seen[id(t)] = t
    return list(seen.values())
