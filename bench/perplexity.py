"""Quality of the weight formats: perplexity over the GPL-3 text and greedy agreement with bf16.

    .venv/bin/python bench/perplexity.py [--variants bf16 int8 int4 gguf] [--products kernels]
                                         [--max-tokens 8192] [--json bench/results/perplexity_cpu.json]

Each variant is the default model loaded as the engine loads it (engine_svc/weights.py) and run
by the engine's own model (engine_svc/models/llama.py) on the CPU backend, in process:
- bf16: --quantization none --dtype bfloat16. The default model's safetensors are the GGUF's
  Q4_1 / Q8_0 values dequantized to float32, so this is also "the bf16 of the GGUF's dequantized
  values" that the gguf variant is held to. fp32: the same values in float32 (optional).
- int8 / int4: --quantization int8|int4 (group --group-size) of those values, LM head int8.
- gguf: --quantization gguf, the GGUF's own Q4_1 projections and Q8_0 LM head as stored.
--products kernels runs the backend's products as the engine would (the C kernels where they
take the weights; the route of each quantized shape and row bucket, as the GEMM chooser picked it
at load, is recorded: LLMSERVE_CPU_GEMM=native keeps the VNNI route with int8 activations
everywhere, =dequant the bf16 panels, and the run is stored under a key naming it);
--products oracle runs every quantized product through kernels.quant's torch oracle (weights
dequantized exactly, products in float32: weight-only), plain ones through F.linear.

Perplexity: the text (/usr/share/common-licenses/GPL-3 by default) tokenized with the model's
tokenizer without special tokens, its first --max-tokens tokens scored in windows of --window
tokens advancing by --stride: each window is one prefill with logits at every position; the
first window scores all its tokens after the first, every later window only the tokens past the
previous window's end (so each scored token sees at least window - stride tokens of context).
Greedy agreement: the 5 prompts of tests/engine/test_parity.py, --new-tokens greedy tokens each.
"teacher-forced": over bf16's greedy continuations, the fraction of positions where the variant's
argmax is bf16's token; "free-running": the variant's own greedy tokens compared position by
position with bf16's, and the mean length of the identical prefix.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, set_threads  # noqa: E402

DEFAULT_MODEL = Path("models/smollm2-135m-instruct")
DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
PROMPTS = [   # tests/engine/test_parity.py
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "List three colors of the rainbow:",
    "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n",
]
VARIANTS = {   # name -> (dtype, --quantization)
    "bf16": ("bfloat16", "none"), "fp32": ("float32", "none"), "int8": ("bfloat16", "int8"),
    "int4": ("bfloat16", "int4"), "gguf": ("bfloat16", "gguf")}
TARGETS = {"int8": 0.01, "int4": 0.05, "gguf": 0.005}   # issue 22: perplexity within this of bf16


def oracle_weights(weights):
    """Every QuantizedWeight replaced by its exact float32 values (kernels.quant.dequantize):
    what the torch oracle multiplies by, computed once instead of on every call."""
    from dataclasses import replace as copy_with

    from kernels.quant import QuantizedWeight, dequantize

    def exact(w):
        return dequantize(w) if isinstance(w, QuantizedWeight) else w

    layers = [copy_with(layer, qkv_proj=exact(layer.qkv_proj), o_proj=exact(layer.o_proj),
                        gate_up_proj=exact(layer.gate_up_proj), down_proj=exact(layer.down_proj))
              for layer in weights.layers]
    return copy_with(weights, layers=layers, lm_head=exact(weights.lm_head))


def oracle_linear(x, weight, bias=None):
    """kernels.quant.quantized_linear's arithmetic (x in float32 times the exact float32
    weight, back to x's dtype) for a dequantized weight; F.linear for a plain one."""
    import torch
    import torch.nn.functional as F

    if weight.dtype == torch.float32 and x.dtype != torch.float32:
        return F.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


def build_model(model_dir: Path, variant: str, group_size: int, products: str, max_len: int):
    """The engine's LlamaModel for one variant on the CPU backend."""
    import torch

    from engine_svc.models.llama import LlamaModel
    from engine_svc.model_config import ModelConfig
    from engine_svc.weights import load_weights
    from kernels.backend import get_ops

    dtype_name, quantization = VARIANTS[variant]
    dtype = getattr(torch, dtype_name)
    config = ModelConfig.from_dir(model_dir)
    weights = load_weights(model_dir, config, dtype, torch.device("cpu"),
                           quantization=quantization, group_size=group_size)
    ops = get_ops("torch")
    if products == "oracle":
        ops = replace(ops, prepare_weights=oracle_weights, model_linear=lambda w: oracle_linear,
                      layer_loop=lambda *args: None)
    return LlamaModel(config, weights, ops, max_len), dtype


class Session:
    """A few sequences over a private KV pool, driven with the engine's ForwardBatch directly."""

    def __init__(self, model, dtype, num_seqs: int, max_len: int) -> None:
        import torch

        from engine_svc.forward_batch import KVCache

        cfg, self.model, self.max_len = model.config, model, max_len
        shape = (num_seqs * max_len + 1, cfg.num_kv_heads, cfg.head_dim)   # + scratch row
        self.cache = KVCache(
            k=[torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)],
            v=[torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)],
            req_to_token=torch.arange(num_seqs * max_len, dtype=torch.int32).view(num_seqs,
                                                                                 max_len))

    def prefill(self, slot: int, ids: list[int], all_logits: bool):
        """float32 logits [len(ids), vocab] (or [1, vocab] at the last token) of a fresh prompt."""
        import torch

        from engine_svc.forward_batch import ForwardBatch

        n, i32, i64 = len(ids), torch.int32, torch.int64
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=i64), positions=torch.arange(n, dtype=i64),
            out_rows=slot * self.max_len + torch.arange(n, dtype=i64),
            slots=torch.tensor([slot], dtype=i32),
            logits_index=torch.arange(n, dtype=i64) if all_logits else torch.tensor([n - 1]),
            num_decode=0, seq_lens=torch.zeros(0, dtype=i32), max_seq_len=0,
            prefix_lens=torch.zeros(1, dtype=i32), cu_new_lens=torch.tensor([0, n], dtype=i32),
            max_new_len=n)
        return self.model.forward(batch, self.cache)

    def decode(self, tokens: list[int], positions: list[int]):
        """float32 logits [len(tokens), vocab]: token i of sequence (slot) i at positions[i]."""
        import torch

        from engine_svc.forward_batch import ForwardBatch

        b, i32, i64 = len(tokens), torch.int32, torch.int64
        pos = torch.tensor(positions, dtype=i64)
        slots = torch.arange(b, dtype=i32)
        batch = ForwardBatch(
            input_ids=torch.tensor(tokens, dtype=i64), positions=pos,
            out_rows=slots.to(i64) * self.max_len + pos, slots=slots,
            logits_index=torch.arange(b, dtype=i64), num_decode=b,
            seq_lens=(pos + 1).to(i32), max_seq_len=max(positions) + 1,
            prefix_lens=torch.zeros(0, dtype=i32), cu_new_lens=torch.zeros(1, dtype=i32),
            max_new_len=0)
        return self.model.forward(batch, self.cache)


def perplexity(session: Session, tokens: list[int], window: int, stride: int) -> dict:
    """Sliding-window perplexity (see the module docstring)."""
    import torch

    nll, scored, scored_until = 0.0, 0, 0
    for begin in range(0, len(tokens) - 1, stride):
        end = min(begin + window, len(tokens))
        logits = session.prefill(0, tokens[begin:end], all_logits=True)   # [n, vocab]
        first = max(scored_until, begin + 1)                  # first target scored here
        targets = torch.tensor(tokens[first:end])
        log_probs = torch.log_softmax(logits[first - begin - 1:end - begin - 1], dim=-1)
        nll -= log_probs.gather(1, targets.view(-1, 1)).sum().item()
        scored, scored_until = scored + end - first, end
        if end == len(tokens):
            break
    return {"perplexity": math.exp(nll / scored), "mean_nll": nll / scored,
            "scored_tokens": scored}


def greedy(session: Session, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of every prompt (prefilled one by one, decoded together)."""
    out = [[int(session.prefill(s, p, all_logits=False)[0].argmax())] for s, p in
           enumerate(prompts)]
    for step in range(1, new_tokens):
        logits = session.decode([o[-1] for o in out], [len(p) + step - 1 for p in prompts])
        for seq, row in zip(out, logits.argmax(dim=-1).tolist()):
            seq.append(int(row))
    return out


def teacher_forced(session: Session, prompts: list[list[int]],
                   reference: list[list[int]]) -> float:
    """Fraction of reference continuation tokens that are this model's argmax after the
    reference's own prefix."""
    same = total = 0
    for prompt, ref in zip(prompts, reference):
        logits = session.prefill(0, prompt + ref[:-1], all_logits=True)   # [len, vocab]
        picks = logits[len(prompt) - 1:].argmax(dim=-1).tolist()
        same += sum(int(a == b) for a, b in zip(picks, ref))
        total += len(ref)
    return same / total


def free_running(ours: list[list[int]], reference: list[list[int]]) -> dict:
    """Position-wise identical fraction and mean identical-prefix length vs the reference."""
    same = sum(int(a == b) for o, r in zip(ours, reference) for a, b in zip(o, r))
    prefixes = []
    for o, r in zip(ours, reference):
        n = next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r))
        prefixes.append(n)
    return {"identical_fraction": same / sum(len(r) for r in reference),
            "mean_identical_prefix": sum(prefixes) / len(prefixes)}


def routes_of(model) -> dict[str, dict[int, str]]:
    """The C kernels' route per row bucket of each quantized shape (layer 0, the LM head): the
    VNNI route quantizes activations to int8 per group, panel/dense multiply bf16 activations
    by the dequantized weight; the GEMM chooser picks per bucket by timing at load."""
    from kernels.cpu.gemm_choice import BUCKET_ROWS

    weights, found = model.weights, {}
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"):
        weight = weights.lm_head if name == "lm_head" else getattr(weights.layers[0], name)
        routes = getattr(weight, "routes", None)
        if routes:
            found[name] = dict(zip(BUCKET_ROWS, routes))
    return found


def run_variant(args, variant: str, tokens: list[int], prompts: list[list[int]],
                reference: list[list[int]] | None) -> tuple[dict, list[list[int]]]:
    start = time.perf_counter()
    max_len = max(args.window, max(len(p) for p in prompts) + args.new_tokens)
    model, dtype = build_model(args.model, variant, args.group_size, args.products, max_len)
    session = Session(model, dtype, len(prompts), max_len)
    loaded = time.perf_counter()
    result = perplexity(session, tokens, args.window, args.stride)
    continuations = greedy(session, prompts, args.new_tokens)
    if reference is not None:
        result["greedy_teacher_forced"] = teacher_forced(session, prompts, reference)
        result.update({f"greedy_free_running_{k}": v
                       for k, v in free_running(continuations, reference).items()})
    result.update(load_s=round(loaded - start, 2), run_s=round(time.perf_counter() - loaded, 2))
    if args.products == "kernels" and routes_of(model):
        result["quantized_routes"] = routes_of(model)
    return result, continuations


def table(results: dict[str, dict]) -> str:
    """The printed table, ratios against bf16."""
    base = results.get("bf16", {}).get("perplexity")
    lines = [f"{'variant':8} {'perplexity':>10} {'vs bf16':>8} {'target':>7} {'teacher-forced':>15}"
             f" {'free-running':>13} {'prefix':>7}"]
    for name, r in results.items():
        ratio = r["perplexity"] / base if base else float("nan")
        target = f"<{1 + TARGETS[name]:.3f}" if name in TARGETS else ""
        lines.append(f"{name:8} {r['perplexity']:10.4f} {ratio:8.4f} {target:>7} "
                     f"{r.get('greedy_teacher_forced', 1.0):15.3f} "
                     f"{r.get('greedy_free_running_identical_fraction', 1.0):13.3f} "
                     f"{r.get('greedy_free_running_mean_identical_prefix', float('nan')):7.1f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--variants", nargs="+", default=["bf16", "int8", "int4", "gguf"],
                   choices=list(VARIANTS))
    p.add_argument("--products", choices=["kernels", "oracle"], default="kernels",
                   help="kernels: the CPU backend as the engine runs it; oracle: quantized "
                        "products through kernels.quant's torch oracle (weight-only)")
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64])
    p.add_argument("--max-tokens", type=int, default=8192, help="score the text's first N tokens")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two threads wait "
                        "on each other; the figures do not depend on it)")
    p.add_argument("--json", type=Path, default=None,
                   help="merge this run into the file under a key naming --products (and a "
                        "group size other than 32, and LLMSERVE_CPU_GEMM when set)")
    args = p.parse_args(argv)
    if "bf16" not in args.variants:
        args.variants.insert(0, "bf16")   # the reference every ratio is taken against
    args.variants.sort(key=lambda v: v != "bf16")
    if not 0 < args.stride < args.window:
        p.error("--stride must be in (0, --window): each window needs context for its first "
                "scored token")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = set_threads(args.threads)
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokens = tokenizer.encode(args.text.read_text(encoding="utf-8"),
                              add_special_tokens=False)[:args.max_tokens]
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    info = {**machine_info(), **threads, "torch_threads": torch.get_num_threads()}
    print(f"{args.text}: scoring {len(tokens)} tokens (window {args.window}, stride "
          f"{args.stride}); {len(prompts)} prompts x {args.new_tokens} greedy tokens; products "
          f"{args.products}; {info['cpu']}", flush=True)
    results: dict[str, dict] = {}
    reference = None
    for variant in args.variants:
        results[variant], continuation = run_variant(args, variant, tokens, prompts, reference)
        reference = reference or continuation
        print(f"  {variant}: perplexity {results[variant]['perplexity']:.4f} "
              f"({results[variant]['run_s']} s)", flush=True)
    print(table(results))
    base = results["bf16"]["perplexity"]
    verdicts = {name: results[name]["perplexity"] / base - 1 <= limit
                for name, limit in TARGETS.items() if name in results}
    print("targets (perplexity within int8 1%, int4 5%, gguf 0.5% of bf16): " +
          ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in verdicts.items()))
    if args.json:
        write_json(args, info, tokens, results, verdicts)
    return 0


def write_json(args, info: dict, tokens: list[int], results: dict, verdicts: dict) -> None:
    payload = json.loads(args.json.read_text()) if args.json.is_file() else {}
    gemm = os.environ.get("LLMSERVE_CPU_GEMM")
    key = args.products + (f"-group{args.group_size}" if args.group_size != 32 else "") + (
        f"-LLMSERVE_CPU_GEMM={gemm}" if gemm and args.products == "kernels" else "")
    payload.setdefault("runs", {})[key] = {
        **info, "LLMSERVE_CPU_GEMM": gemm,
        "method": {"text": str(args.text), "tokens_scored_from": len(tokens),
                   "window": args.window, "stride": args.stride, "group_size": args.group_size,
                   "prompts": PROMPTS, "new_tokens": args.new_tokens, "products": args.products},
        "results": {name: {**r, "ratio_vs_bf16": r["perplexity"] / results["bf16"]["perplexity"]}
                    for name, r in results.items()},
        "targets": {name: {"max_ratio": 1 + TARGETS[name], "met": met}
                    for name, met in verdicts.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
