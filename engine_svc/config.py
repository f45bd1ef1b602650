"""The engine's settings: one dataclass, the single source for engine, runner and scheduler.

CLI flags (`python -m engine_svc`) map onto these fields one to one. The only setting that
depends on the model, `max_model_len`, is resolved once by `resolved()`; the runner and the
scheduler take the resolved config and refuse an unresolved one. No torch here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DEFAULT_MAX_MODEL_LEN = 4096   # cap on the default max_model_len (the model's context if smaller)
QUANTIZATIONS = ("none", "int8", "int4", "gguf")
QUANTIZATION_GROUP_SIZES = (32, 64)
GGUF_BLOCK = 32                # every GGUF Q8_0 / Q4_0 / Q4_1 block holds 32 weights


@dataclass(slots=True)
class EngineConfig:
    """Everything that shapes an engine instance (CLI flags map onto these)."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None          # default: min(model's context, 4096)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_queue: int = 1024
    kv_capacity_tokens: int | None = None     # CPU default max(16384, max_model_len); CUDA: memory
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    seed: int = 0
    cuda_graphs: bool | None = None           # None: on for CUDA decode; True on CPU runs the
    #                                           padded graph path eagerly (tests)
    stall_timeout_s: float = 30.0             # no step finished this long with work pending:
    #                                           the engine reports itself NOT_SERVING
    cpu_threads: int | None = None            # CPU: OpenMP team size (None: OMP_NUM_THREADS, else
    #                                           the CPUs this process may use)
    adaptive_threads: bool = True             # CPU: fewer threads while other processes are busy
    quantization: str = "none"                # none | int8 | int4 (weight-only, at load) | gguf
    #                                           (the model directory's model.gguf as it is)
    quantization_group_size: int = 32         # weights per scale for int8 / int4 (32 or 64)

    def check_quantization(self) -> None:
        """Raise ValueError naming the flag when the quantization settings do not fit together."""
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, "
                             f"got {self.quantization!r}")
        if self.quantization_group_size not in QUANTIZATION_GROUP_SIZES:
            raise ValueError("--quantization-group-size must be one of "
                             f"{', '.join(map(str, QUANTIZATION_GROUP_SIZES))}, "
                             f"got {self.quantization_group_size}")
        if self.quantization != "gguf":
            return
        if self.quantization_group_size != GGUF_BLOCK:
            raise ValueError(f"--quantization gguf keeps the GGUF's blocks of {GGUF_BLOCK} "
                             "weights; --quantization-group-size "
                             f"{self.quantization_group_size} does not apply (leave it at 32)")
        if self.load_format != "auto":
            raise ValueError(f"--quantization gguf reads the model's GGUF file; it cannot be "
                             f"combined with --load-format {self.load_format} (leave it at auto; "
                             "int8 or int4 quantize dummy or safetensors weights)")

    def resolved(self, model_context: int) -> EngineConfig:
        """A copy with max_model_len fixed against the model's context length.

        Unset: min(model_context, 4096). Set: capped at model_context.
        """
        wanted = self.max_model_len or min(model_context, DEFAULT_MAX_MODEL_LEN)
        return dataclasses.replace(self, max_model_len=min(wanted, model_context))

    @property
    def model_len(self) -> int:
        """The resolved max_model_len (raises on a config that was not `resolved()`)."""
        if self.max_model_len is None:
            raise ValueError("EngineConfig.max_model_len is unresolved: build the runner and the "
                             "scheduler from config.resolved(model_context)")
        return self.max_model_len
