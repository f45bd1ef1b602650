"""`python -m engine_svc`: serve a model over the internal llmserve.v1.Engine gRPC API."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine_svc",
        description="llmserve engine service: token ids in, streamed token ids out (gRPC), "
                    "continuous batching over a reference-counted token KV pool. "
                    "Prometheus metrics on --metrics-port.")
    p.add_argument("--model", required=True, help="Hugging Face model directory (config.json, "
                   "*.safetensors, generation_config.json)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: loopback only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=50052, help="gRPC port (default 50052)")
    p.add_argument("--metrics-port", type=int, default=8002,
                   help="Prometheus /metrics HTTP port (default 8002; -1 disables)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), float32, "
                        "bfloat16, float16; float32 gives token-exact transformers parity")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                   help="kernels: triton on CUDA, torch on CPU (auto)")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="dummy = random weights for the config (benchmarks)")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4", "gguf"],
                   help="weights: none (all in --dtype); int8 / int4: every projection of any HF "
                        "model quantized at load, weight-only, per group of "
                        "--quantization-group-size weights (int8: a symmetric scale; int4: a "
                        "scale and the group's minimum, GGUF Q4_1's form), the LM head int8 (a tied one becomes its own int8 copy, as llama.cpp "
                        "keeps its output tensor at higher precision); gguf: the GGUF's own "
                        "Q8_0 / Q4_0 / Q4_1 tensors as they are, from MODEL/model.gguf (kept "
                        "there by `make model`). Embeddings and norms stay in --dtype in every "
                        "case: decode only gathers rows of the embedding table (default none)")
    p.add_argument("--quantization-group-size", type=int, default=32, choices=[32, 64],
                   help="weights per scale for int8 / int4 (default 32; gguf blocks are 32)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + generated tokens per request (default: min(model context, 4096))")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests in the running batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per step; longer prompts are prefilled in chunks")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="waiting requests beyond which Generate fails with RESOURCE_EXHAUSTED")
    p.add_argument("--kv-capacity-tokens", type=int, default=None,
                   help="KV pool size in tokens (CPU default: what the unquantized weights "
                        "plus 16384 tokens would take, less the weights as loaded, so quantized "
                        "weights give the pool more; CUDA: from memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="fraction of free GPU memory after profiling given to the KV pool")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share KV rows of common prompt prefixes (default on)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay decode steps as CUDA graphs, one per batch-size bucket "
                        "(default: on with CUDA)")
    p.add_argument("--stream-interval", type=int, default=1, metavar="N",
                   help="send a request's tokens N per message after its first token (the first "
                        "token and the last message are never held). Each message costs CPU in "
                        "the engine, the tokenizer service and the client; on a small CPU, N=2 "
                        "gives more throughput under load, and users see tokens arrive N at a "
                        "time (default 1: every token at once)")
    p.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                   help="CPU: OpenMP threads of the engine (default: OMP_NUM_THREADS, else the "
                        "CPUs this process may use: its affinity mask and cgroup CPU quota)")
    p.add_argument("--adaptive-threads", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: run fewer threads while other processes keep cores busy, so a "
                        "busy neighbour does not stall every OpenMP barrier (default on)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight streams before exiting")
    p.add_argument("--stall-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="health turns NOT_SERVING (and llmserve_engine_stalls_total counts one) "
                        "when requests are pending and no engine step finished for this long; "
                        "SERVING again once a step finishes (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed for unseeded sampling and dummy weights")
    p.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest gRPC message accepted or sent; bigger requests fail with "
                        "RESOURCE_EXHAUSTED (default 4 MiB)")
    tls = p.add_argument_group("security", "TLS and mutual TLS on the gRPC port")
    tls.add_argument("--tls-cert", metavar="PEM", help="serve gRPC over TLS with this "
                     "certificate (chain); health and reflection are on the same port")
    tls.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    tls.add_argument("--tls-ca", metavar="PEM",
                     help="require every client (the tokenizer service: --engine-tls-cert/"
                          "--engine-tls-key) to present a certificate signed by this CA")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (Path(args.model) / "config.json").is_file():
        print(f"error: --model {args.model}: no config.json there", file=sys.stderr)
        return 2
    if args.cpu_threads is not None and args.cpu_threads < 1:
        print(f"error: --cpu-threads must be >= 1, got {args.cpu_threads}", file=sys.stderr)
        return 2
    if args.stream_interval < 1:
        print(f"error: --stream-interval must be >= 1, got {args.stream_interval}",
              file=sys.stderr)
        return 2
    if not args.stall_timeout > 0:
        print(f"error: --stall-timeout must be > 0 seconds, got {args.stall_timeout}",
              file=sys.stderr)
        return 2
    if args.max_message_bytes < 1024:
        print(f"error: --max-message-bytes must be >= 1024, got {args.max_message_bytes}",
              file=sys.stderr)
        return 2
    from engine_svc.config import EngineConfig
    from engine_svc.engine import LLMEngine
    from engine_svc.server import BindError, load_server_credentials, serve

    try:   # before the (slow) model load
        EngineConfig(model=args.model, load_format=args.load_format,
                     quantization=args.quantization,
                     quantization_group_size=args.quantization_group_size).check_quantization()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        credentials = load_server_credentials(args.tls_cert, args.tls_key, args.tls_ca)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # the engine is built on the thread that will run its steps (see EngineLoop)
    engine_thread = ThreadPoolExecutor(1, "engine-loop")
    try:
        engine = engine_thread.submit(LLMEngine, EngineConfig(
            model=args.model, dtype=args.dtype, device=args.device, backend=args.backend,
            load_format=args.load_format, max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_queue=args.max_queue, kv_capacity_tokens=args.kv_capacity_tokens,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
            cuda_graphs=args.cuda_graphs, cpu_threads=args.cpu_threads,
            adaptive_threads=args.adaptive_threads,
            stall_timeout_s=args.stall_timeout, quantization=args.quantization,
            quantization_group_size=args.quantization_group_size)).result()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runner = engine.runner
    logging.getLogger("engine_svc").info(
        "model %s: dtype=%s quantization=%s device=%s backend=%s max_model_len=%d "
        "kv_pool=%d tokens", args.model, runner.dtype, args.quantization, runner.device,
        runner.backend, engine.max_model_len, engine.pool.capacity)
    try:
        return asyncio.run(serve(
            engine, host=args.host, port=args.port,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            model_name=Path(args.model).name, drain_timeout=args.drain_timeout,
            server_credentials=credentials, max_message_bytes=args.max_message_bytes,
            engine_thread=engine_thread, stream_interval=args.stream_interval))
    except (BindError, OSError) as err:  # gRPC or metrics port taken
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
