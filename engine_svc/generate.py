"""Command line: stream a completion from the in-process engine.

    python -m engine_svc.generate --model models/smollm2-135m-instruct --chat "Hi there"
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from engine_svc.config import EngineConfig
from engine_svc.engine import LLMEngine
from engine_svc.params import SamplingParams, StoppingParams


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine_svc.generate",
        description="Generate text with the in-process llmserve engine (no gRPC).")
    p.add_argument("prompt", help="the prompt text (raw unless --chat)")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message with the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * max prob")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--backend", default="auto", help="kernel backend: auto, torch or triton")
    p.add_argument("--stats", action="store_true", help="print tokens/s to stderr at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer  # deferred: --help stays instant

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    try:
        engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                        backend=args.backend))
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                  seed=args.seed)
        engine.add_request("cli", prompt_ids, sampling,
                           StoppingParams(max_new_tokens=args.max_new_tokens,
                                          ignore_eos=args.ignore_eos))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output_ids: list[int] = []
    printed = ""
    started = time.perf_counter()
    reason = None
    while engine.has_work():
        for out in engine.step():
            output_ids.extend(out.token_ids)
            text = tokenizer.decode(output_ids, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(printed):
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
            reason = out.finish_reason or reason
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - started
    if args.stats:
        print(f"[{len(output_ids)} tokens in {elapsed:.2f}s = {len(output_ids) / elapsed:.1f} tok/s, "
              f"finish: {reason.value if reason else '?'}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
