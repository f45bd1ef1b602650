"""The engine's settings: one dataclass, the single source for engine, runner and scheduler.

CLI flags (`python -m engine_svc`) map onto these fields one to one. The only setting that
depends on the model, `max_model_len`, is resolved once by `resolved()`; the runner and the
scheduler take the resolved config and refuse an unresolved one. No torch here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DEFAULT_MAX_MODEL_LEN = 4096   # cap on the default max_model_len (the model's context if smaller)


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
