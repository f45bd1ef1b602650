"""gpu_check steps through the whole engine: the model, compile counts, parity with transformers,
graphs vs eager, host syncs, memory sizing, a Llama-3-8B-shaped engine, the torch backend."""
from __future__ import annotations

import gc
import json
import math
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

from bench.gpu_check import REPO_ROOT, CheckFailed, Context, log

DEFAULT_MODEL = REPO_ROOT / "models" / "smollm2-135m-instruct"
CARRY_DIR = REPO_ROOT / ".gpu_carry"
SMOLLM2_135M = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152,
                    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
TINY = dict(SMOLLM2_135M, vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                 tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def _random_model(config: dict, out: Path, seed: int = 0) -> Path:
    """A transformers Llama with random weights (norms perturbed off 1) saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    model = LlamaForCausalLM(LlamaConfig(**fields)).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out)
    return out


def _carried_gguf() -> Path | None:
    """A carried GGUF under .gpu_carry/: whole (*.gguf), or parts (*.gguf.part*, in any subfolder,
    joined in file-name order; a *.gguf.sha256 beside them is checked)."""
    import hashlib

    whole = sorted(CARRY_DIR.rglob("*.gguf"))
    if whole:
        return whole[0]
    parts = sorted(CARRY_DIR.rglob("*.gguf.part*"), key=lambda p: p.name)
    if not parts:
        return None
    joined = Path("/tmp") / parts[0].name.split(".part")[0]
    digest = hashlib.sha256()
    with joined.open("wb") as out:
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            out.write(data)
    expected = sorted(CARRY_DIR.rglob("*.gguf.sha256"))
    if expected and expected[0].read_text().split()[0] != digest.hexdigest():
        log.warning("GGUF parts %s do not join to %s (a part missing: the machine was not warm "
                    "between the calls?): using a random model", [p.name for p in parts], expected[0].name)
        return None
    return joined


def model_step(ctx: Context) -> dict:
    """Pick the model: --model, the converted default, a carried GGUF converted here, or random."""
    if ctx.dry_run:
        ctx.model_dir, ctx.model_note = _random_model(TINY, ctx.scratch / "tiny"), "tiny random (dry run)"
    elif ctx.model_dir is not None:
        ctx.model_note = "given with --model"
    elif (DEFAULT_MODEL / ".complete").is_file():
        ctx.model_dir, ctx.model_note = DEFAULT_MODEL, "default model (converted)"
    elif (gguf := _carried_gguf()) is not None:
        done = subprocess.run([sys.executable, "-m", "engine_svc.convert_gguf", "--gguf", str(gguf),
                               "--out", str(DEFAULT_MODEL), "--no-verify"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=110)
        if done.returncode != 0:
            raise CheckFailed(f"converting {gguf.name} failed: {done.stderr[-2000:]}")
        ctx.model_dir, ctx.model_note = DEFAULT_MODEL, f"default model converted here from {gguf.name}"
    else:
        ctx.model_dir = _random_model(SMOLLM2_135M, ctx.scratch / "smollm2-shaped")
        ctx.model_note = ("random SmolLM2-135M-shaped weights: the default model's 98 MB GGUF is over "
                          "the 64 MiB a device call carries (see README, GPU section)")
    ctx.shared["report"].doc["model"] = {"dir": str(ctx.model_dir), "note": ctx.model_note}
    return {"dir": str(ctx.model_dir), "note": ctx.model_note,
            "config": json.loads((ctx.model_dir / "config.json").read_text())}


def make_engine(ctx: Context, model_dir: Path | None = None, **overrides):
    """An engine on the check's device: Triton on CUDA (torch in a dry run), small pool."""
    from engine_svc.config import EngineConfig
    from engine_svc.engine import LLMEngine

    settings = dict(model=str(model_dir or ctx.model_dir), dtype="float32", device=str(ctx.device),
                    backend="torch" if ctx.dry_run else "triton", max_model_len=512, max_num_seqs=8,
                    max_num_batched_tokens=512, kv_capacity_tokens=16384, enable_prefix_caching=False)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings))


def free_memory() -> None:
    """Give the device memory of dropped engines/models back (call after `del engine`)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def prompts(ctx: Context, count: int, lengths: tuple[int, ...] = (9, 17, 26, 33, 41)) -> list[list[int]]:
    vocab = json.loads((ctx.model_dir / "config.json").read_text())["vocab_size"]
    generator = torch.Generator().manual_seed(count)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=generator).tolist()
            for i in range(count)]


def greedy(new_tokens: int):
    from engine_svc.params import SamplingParams, StoppingParams

    return SamplingParams(temperature=0.0), StoppingParams(max_new_tokens=new_tokens, ignore_eos=True)


def compiles_step(ctx: Context) -> dict:
    """After start-up, a mixed workload compiles nothing; every compiled kernel is spill-free."""
    if ctx.dry_run:
        return {"skipped": "dry run: the interpreter has no JIT (tests/kernels/test_compile_count.py "
                           "counts on CPU through the JIT's own key)"}
    from tests.kernels.compile_count import drive, workload

    before = _compiled()
    engine = make_engine(ctx, dtype="bfloat16", max_model_len=2048, max_num_batched_tokens=512,
                         cuda_graphs=True, enable_prefix_caching=True)
    at_start = _compiled()
    steps = drive(engine, workload(scale=3))
    after = _compiled()
    new = {name: after[name] - at_start.get(name, 0) for name in after if after[name] > at_start.get(name, 0)}
    resources = _resources()
    del engine
    free_memory()
    result = {"compiled_at_start": {k: v - before.get(k, 0) for k, v in at_start.items()},
              "compiled_after_start": new, "workload_steps": steps, "resources": resources}
    # both are speed matters (a compile stalls the engine thread 1-2 s; spills slow a kernel):
    # recorded as targets, they do not stop the run
    ctx.target("compiles_after_start", sum(new.values()), 0, at_most=True)
    ctx.target("kernels_with_spills", sum(1 for r in resources if r.get("spills")), 0, at_most=True)
    return result


def _jit_kernels() -> dict:
    import importlib

    found = {}
    for module in ("rmsnorm", "rope", "silu_mul", "store_kv", "prefill_attention", "decode_attention",
                   "split_combine"):
        mod = importlib.import_module(f"kernels.triton.{module}")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "device_caches"):
                found[name] = obj
    return found


def _caches(fn) -> list[dict]:
    return [entry[0] for entry in fn.device_caches.values() if isinstance(entry[0], dict)]


def _compiled() -> dict[str, int]:
    """Kernel name -> compiled variants held in the JIT's caches (all devices)."""
    return {name: sum(len(c) for c in _caches(fn)) for name, fn in _jit_kernels().items()}


def _resources() -> list[dict]:
    rows = []
    for name, fn in _jit_kernels().items():
        for cache in _caches(fn):
            for kernel in cache.values():
                if hasattr(kernel, "_init_handles"):
                    kernel._init_handles()
                meta = getattr(kernel, "metadata", None)
                rows.append({"kernel": name, "registers": getattr(kernel, "n_regs", None),
                             "spills": getattr(kernel, "n_spills", None),
                             "shared": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None)})
    return rows


def _hf_greedy(model, prompt: list[int], new_tokens: int, device) -> list[int]:
    """transformers' greedy continuation, resumed after an EOS (the engine ignores EOS here)."""
    import copy

    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.pad_token_id = False, 0
    config.temperature = config.top_p = config.top_k = None
    tokens = list(prompt)
    while len(tokens) - len(prompt) < new_tokens:
        config.max_new_tokens = new_tokens - (len(tokens) - len(prompt))
        ids = torch.tensor([tokens], device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        tokens = out[0].tolist()
    return tokens[len(prompt):len(prompt) + new_tokens]


def parity_step(ctx: Context) -> dict:
    """Greedy tokens equal transformers' on the device: fp32 all 5 (required), bf16 reported."""
    from transformers import AutoModelForCausalLM

    batch, new_tokens = prompts(ctx, 5), 16
    results = {}
    for dtype_name, dtype in [("float32", torch.float32)] + ([] if ctx.quick else [("bfloat16", torch.bfloat16)]):
        engine = make_engine(ctx, dtype=dtype_name, cuda_graphs=None if not ctx.dry_run else True)
        ours = engine.generate(batch, *greedy(new_tokens))
        del engine
        free_memory()
        hf = AutoModelForCausalLM.from_pretrained(ctx.model_dir, dtype=dtype).to(ctx.device).eval()
        theirs = [_hf_greedy(hf, p, new_tokens, ctx.device) for p in batch]
        del hf
        free_memory()
        equal = [a == b for a, b in zip(ours, theirs)]
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                      for a, b in zip(ours, theirs)]
        results[dtype_name] = {"equal": sum(equal), "of": len(batch), "first_divergence": first_diff}
        if dtype_name == "float32":
            ctx.shared["fp32_tokens"] = ours
            ctx.target("parity_float32_equal", sum(equal), len(batch))
            if not all(equal):
                raise CheckFailed(f"fp32 greedy parity {sum(equal)}/{len(batch)}; first divergence "
                                  f"at {first_diff}: ours {ours} vs transformers {theirs}")
    return results


def graphs_step(ctx: Context) -> dict:
    """Captured decode == eager decode for every bucket at n = bucket - 1 (padding rows present):
    greedy tokens equal, logits within fp32 rounding."""
    max_seqs = 64 if not ctx.dry_run else 8
    settings = dict(dtype="float32", max_num_seqs=max_seqs, max_num_batched_tokens=2048)
    eager, graphed = make_engine(ctx, cuda_graphs=False, **settings), make_engine(ctx, cuda_graphs=True, **settings)
    buckets = graphed.runner.graphs.buckets
    sizes = sorted({max(1, b - 1) for b in buckets})
    seen = {id(eager): [], id(graphed): []}
    for engine in (eager, graphed):
        sampler = engine.runner.sampler
        engine.runner.sampler = lambda logits, *a, _s=sampler, _log=seen[id(engine)], **k: (
            _log.append(logits.detach().clone()), _s(logits, *a, **k))[1]
    worst, checked = 0.0, []
    for n in sizes:
        batch = prompts(ctx, n, lengths=(5, 12, 23))
        a, b = eager.generate(batch, *greedy(6)), graphed.generate(batch, *greedy(6))
        if a != b:
            raise CheckFailed(f"graph decode tokens differ from eager at n={n}: {a} vs {b}")
        for x, y in zip(seen[id(eager)], seen[id(graphed)]):
            worst = max(worst, float((x.float() - y.float()).abs().max()))
        seen[id(eager)].clear()
        seen[id(graphed)].clear()
        checked.append(n)
    del eager, graphed, seen
    free_memory()
    if worst > 1e-3:
        raise CheckFailed(f"graph vs eager logits differ by {worst:.3g} (> 1e-3 in fp32)")
    return {"buckets": buckets, "batch_sizes": checked, "max_abs_logit_diff": worst,
            "captured": not ctx.dry_run}


def sync_debug_step(ctx: Context) -> dict:
    """Host syncs the CUDA driver sees during decode and mixed steps (warn mode), by location."""
    if ctx.dry_run:
        return {"skipped": "dry run: torch.cuda.set_sync_debug_mode needs CUDA"}
    sampling, stopping = greedy(24)
    engine = make_engine(ctx, dtype="bfloat16", cuda_graphs=True)
    for i, prompt in enumerate(prompts(ctx, 3)):
        engine.add_request(f"s{i}", prompt, sampling, stopping)
    for _ in range(3):
        engine.step()
    steps = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(4):   # decode (graph) steps
                engine.step()
                steps += 1
            engine.add_request("late", prompts(ctx, 1, (37,))[0], sampling, stopping)
            for _ in range(4):   # mixed step(s), then decode with the newcomer
                engine.step()
                steps += 1
        finally:
            torch.cuda.set_sync_debug_mode(0)
    del engine
    free_memory()
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    per_step = len(syncs) / max(steps, 1)
    ctx.target("host_syncs_per_step", per_step, 1.0, at_most=True)   # the results copy only
    return {"steps": steps, "syncs": len(syncs), "per_step": per_step, "locations": dict(where)}


def memory_step(ctx: Context) -> dict:
    """At 0.95 utilization: the worst step and the largest graph bucket run (no OOM), and their
    measured peaks stay within what sizing reserved."""
    if ctx.dry_run:
        return {"skipped": "dry run: sizing from device memory needs CUDA (tests/engine/test_kv_sizing.py "
                           "checks the arithmetic with a fake device)"}
    from engine_svc.kv_sizing import worst_case_shape
    from engine_svc.profile_step import worst_case_plan

    engine = make_engine(ctx, dtype="bfloat16", kv_capacity_tokens=None, gpu_memory_utilization=0.95,
                         max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=4096, cuda_graphs=True)
    runner, budget = engine.runner, engine.runner.memory_budget
    decode_rows, prefill = worst_case_shape(256, 8192, 4096)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    runner.execute(worst_case_plan(decode_rows, prefill))
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    graphs = runner.graphs
    bucket = graphs.buckets[-1]
    graphs.run(graphs._static_batch(bucket, runner.max_model_len))
    torch.cuda.synchronize()
    free_after, total = torch.cuda.mem_get_info()
    result = {"capacity_tokens": runner.capacity, "predicted": {
        "free_at_sizing": budget.free, "step_peak": budget.step_peak, "graph_reserve": budget.graph_reserve,
        "table": budget.table_bytes, "slack": budget.slack},
        "measured": {"step_peak": measured, "graph_pool": graphs.pool_bytes, "free_after": free_after,
                     "total": total}}
    graph_pool = graphs.pool_bytes
    del engine, runner, graphs
    free_memory()
    if measured > budget.step_peak * 1.1 + (64 << 20):
        raise CheckFailed(f"worst step peaked at {measured} B, sizing reserved {budget.step_peak} B")
    if graph_pool > budget.graph_reserve + (256 << 20):
        raise CheckFailed(f"graphs hold {graph_pool} B, sizing reserved {budget.graph_reserve} B")
    return result


def engine_8b_step(ctx: Context) -> dict:
    """A Llama-3-8B-shaped engine (dummy weights, bf16): decode step time vs weight-read roofline."""
    model_dir = ctx.scratch / "llama3-8b-shaped"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B if not ctx.dry_run else TINY))
    batches = [1, 2] if ctx.dry_run else ([1] if ctx.quick else [1, 32, 256])
    started = time.perf_counter()
    engine = make_engine(ctx, model_dir, load_format="dummy", dtype="bfloat16", max_model_len=1024,
                         max_num_seqs=max(batches), max_num_batched_tokens=8192,
                         kv_capacity_tokens=None if not ctx.dry_run else 4096)
    startup_s = time.perf_counter() - started
    weights = engine.runner.model.weights
    # a decode step reads every weight once, except the embedding table (only its rows are gathered)
    weight_bytes = engine.runner.memory_stats()["weights"]
    if weights.lm_head is not weights.embed_tokens:
        weight_bytes -= weights.embed_tokens.numel() * weights.embed_tokens.element_size()
    copy_bytes_per_ms = ctx.peaks.get("copy_gbps", math.nan) * 1e6
    results = {"startup_s": startup_s, "weight_bytes": weight_bytes, "capacity_tokens": engine.runner.capacity}
    for batch in batches:
        step_ms = _decode_step_ms(ctx, engine, batch, prompt_len=128, timed=16 if not ctx.dry_run else 2)
        kv_bytes = batch * (128 + 8) * engine.runner.kv_bytes_per_token()
        roofline_ms = (weight_bytes + kv_bytes) / copy_bytes_per_ms
        entry = {"step_ms": step_ms, "tokens_per_s": batch / step_ms * 1e3, "roofline_ms": roofline_ms,
                 "fraction_of_roofline": roofline_ms / step_ms}
        results[f"batch_{batch}"] = entry
        log.info("8B-shaped batch %d: %.2f ms/step (roofline %.2f ms, %.0f%%)", batch, step_ms,
                 roofline_ms, 100 * entry["fraction_of_roofline"])
        if batch == 1 and not ctx.dry_run:
            ctx.target("engine_8b_batch1_fraction_of_weight_roofline", entry["fraction_of_roofline"], 0.75)
    del engine
    free_memory()
    return results


def _decode_step_ms(ctx: Context, engine, batch: int, prompt_len: int, timed: int) -> float:
    """Median wall time of `timed` pure-decode steps with `batch` requests running."""
    sampling, stopping = greedy(timed + 8)
    for i, prompt in enumerate(prompts(ctx, batch, (prompt_len,))):
        engine.add_request(f"b{batch}-{i}", prompt, sampling, stopping)
    while engine.has_work() and engine.last_step.phase != "decode":
        engine.step()
    engine.step()
    times = []
    for _ in range(timed):
        started = time.perf_counter()
        engine.step()   # returns after the results' device->host copy: the step is done
        times.append((time.perf_counter() - started) * 1e3)
    while engine.has_work():
        engine.step()
    return statistics.median(times)


def torch_backend_step(ctx: Context) -> dict:
    """--backend torch on CUDA starts (no graph capture) and generates."""
    started = time.perf_counter()
    engine = make_engine(ctx, backend="torch", dtype="float32")
    startup_s = time.perf_counter() - started
    if not ctx.dry_run and engine.runner.graphs is not None:
        raise CheckFailed("the torch backend captured CUDA graphs")
    tokens = engine.generate(prompts(ctx, 5)[:2], *greedy(8))
    del engine
    free_memory()
    triton_tokens = ctx.shared.get("fp32_tokens")
    same = None if triton_tokens is None else [t[:8] for t in triton_tokens[:2]] == tokens
    return {"startup_s": startup_s, "tokens": tokens, "equal_to_triton_fp32": same}
