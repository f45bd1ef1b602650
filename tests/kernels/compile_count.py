"""Count the Triton compiles a mixed serving workload would cause, on a machine without a GPU.

Run as a script in a process where Triton is in compiled mode (TRITON_INTERPRET unset):
`python -m tests.kernels.compile_count MODEL_DIR` prints JSON: {"compiles": {kernel name:
distinct compiles}, "after_start": {kernel name: compiles first needed after the engine was
built}} (the engine's start-up warm-up should leave none for serving).

The whole engine runs on the `triton` backend over CPU tensors under
`tests.kernels.jit_capture`: every kernel launch goes through the JIT's real binding,
specialization and cache key, and each compile the JIT would start is recorded and skipped (the
kernels' outputs stay unwritten, so the tokens are noise; the launches, their arguments and the
scheduling are those of serving). The workload mixes what changes from step to step: staggered
arrivals, chunked prefills, a prefix-cache hit, decode batches of 1..6 rows at lengths across the
split edges, mixed prefill + decode steps, and decode through the CUDA-graph runner's padded
static path (run eagerly here).
"""

from __future__ import annotations

import json
import sys

from tests.kernels.jit_capture import capture_specializations, distinct_compiles


def workload(scale: int = 1) -> list[tuple[int, str, list[int], int]]:
    """(arrival step, request id, prompt, max_new_tokens): lengths 20..450 (x scale) over a
    512 (x scale) context."""
    import torch

    def prompt(n: int, seed: int) -> list[int]:
        return torch.randint(3, 300, (n * scale,), generator=torch.Generator().manual_seed(seed)).tolist()

    shared = prompt(300, 1)
    return [(0, "a", shared, 12), (0, "b", prompt(140, 2), 30), (3, "c", shared[:200 * scale] + prompt(40, 3), 20),
            (5, "d", prompt(20, 4), 40), (6, "e", prompt(25, 5), 8), (9, "f", prompt(450, 6), 5),
            (14, "g", prompt(60, 7), 25)]


def drive(engine, requests: list[tuple[int, str, list[int], int]]) -> int:
    """Feed the requests at their arrival steps, greedy and seeded top-p alternating, until all
    finish; returns the number of steps."""
    from engine_svc.params import SamplingParams, StoppingParams

    pending = list(requests)
    step = 0
    while pending or engine.has_work():
        for arrival, request_id, prompt, new_tokens in [p for p in pending if p[0] <= step]:
            sampling = SamplingParams(temperature=0.0) if step % 2 else SamplingParams(
                temperature=0.8, top_p=0.9, seed=step)
            engine.add_request(request_id, prompt, sampling,
                               StoppingParams(max_new_tokens=new_tokens, ignore_eos=True))
            pending.remove((arrival, request_id, prompt, new_tokens))
        engine.step()
        step += 1
    return step


def count_compiles(model_dir: str) -> dict[str, dict[str, int]]:
    """Run the workload on the triton backend (CPU tensors, compiles skipped): distinct compiles
    in all, and those first needed after start-up."""
    import kernels.backend as backend
    from engine_svc.config import EngineConfig
    from engine_svc.engine import LLMEngine

    backend.interpret_mode = lambda: True  # admit the triton backend on CPU tensors (the kernels
    #                                        themselves still see compiled mode and GPU tile sizes)
    with capture_specializations() as recorded:
        engine = LLMEngine(EngineConfig(model=model_dir, dtype="bfloat16", device="cpu",
                                        backend="triton", load_format="dummy", max_model_len=512,
                                        max_num_seqs=8, max_num_batched_tokens=192,
                                        kv_capacity_tokens=4096, cuda_graphs=True))
        at_start = {spec.key for spec in recorded}
        drive(engine, workload())
    return {"compiles": distinct_compiles(recorded),
            "after_start": distinct_compiles([s for s in recorded if s.key not in at_start])}


if __name__ == "__main__":
    print(json.dumps(count_compiles(sys.argv[1])))
