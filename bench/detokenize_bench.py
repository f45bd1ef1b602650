"""Streaming detokenization speed: the Python offset window against `tokenizers`' DecodeStream.

Both run through tokenizer_svc.detokenizer.IncrementalDetokenizer the way generation.py drives
it (one id per `add`, then `flush`): "window" is given the service's decode function
(ModelTokenizer.decode_stream_piece), "decode_stream" the `tokenizers.Tokenizer` itself.
Streams of English prose, CJK, emoji and code of --tokens ids each; the runs of the two methods
are interleaved, and every run's text is checked against the full decode.

    .venv/bin/python bench/detokenize_bench.py [--model models/smollm2-135m-instruct]
        [--tokens 3000] [--repeats 7] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import OtherLoad, machine_info  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizer_svc.detokenizer import DecodeFn, IncrementalDetokenizer  # noqa: E402
from tokenizer_svc.tokenizer import ModelTokenizer  # noqa: E402

SAMPLES = {
    "english": ("The committee met on Tuesday to review the quarterly figures. Revenue grew by "
                "12% while costs stayed flat, so the board approved the new hiring plan. "
                "Questions about the schedule should go to the project office by Friday.\n"),
    "cjk": ("今天的会议讨论了第三季度的数据。收入增长了百分之十二，成本保持不变。"
            "東京の天気は晴れで、午後から少し風が強くなるでしょう。"
            "한국어 문장도 조금 포함되어 있습니다.\n"),
    "emoji": ("Great job team 🎉🎉 shipped on time 🚀 coffee ☕ is on me 😀👍🏽 "
              "family 👨‍👩‍👧 weekend 🌞🏖️ flags 🇯🇵🇫🇷 hearts ❤️💙💚\n"),
    "code": ('def fibonacci(n: int) -> list[int]:\n    """Return the first n numbers."""\n'
             "    values = [0, 1]\n    while len(values) < n:\n"
             "        values.append(values[-1] + values[-2])\n    return values[:n]\n\n"
             "if __name__ == \"__main__\":\n    print({k: v for k, v in enumerate(fibonacci(10))})\n"),
}


def stream_ids(tokenizer: ModelTokenizer, sample: str, tokens: int) -> list[int]:
    """The sample repeated until it encodes to at least `tokens` ids, cut to `tokens`."""
    ids: list[int] = []
    while len(ids) < tokens:
        ids.extend(tokenizer.encode(sample, add_special_tokens=False))
    return ids[:tokens]


def run_once(decode: DecodeFn, ids: list[int], expected: str) -> float:
    """Seconds to detokenize ids one at a time plus the flush; checks the text."""
    start = time.perf_counter()
    detokenizer = IncrementalDetokenizer(decode)
    pieces = [detokenizer.add((token_id,)) for token_id in ids]
    pieces.append(detokenizer.flush())
    elapsed = time.perf_counter() - start
    if "".join(pieces) != expected:
        raise AssertionError("streamed text differs from the full decode")
    return elapsed


def measure(methods: dict[str, DecodeFn], ids: list[int], expected: str,
            repeats: int) -> dict[str, dict[str, float]]:
    """Interleaved runs per method; best and median tokens/s."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for name, decode in methods.items():  # warm-up
        run_once(decode, ids, expected)
    for _ in range(repeats):
        for name, decode in methods.items():
            times[name].append(run_once(decode, ids, expected))
    return {name: {"best_tokens_per_s": len(ids) / min(runs),
                   "median_tokens_per_s": len(ids) / statistics.median(runs)}
            for name, runs in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/smollm2-135m-instruct"))
    parser.add_argument("--tokens", type=int, default=3000, help="ids per stream")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per method")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    service = ModelTokenizer.from_pretrained(args.model)
    methods: dict[str, DecodeFn] = {
        "window": service.decode_stream_piece,
        "decode_stream": Tokenizer.from_file(str(args.model / "tokenizer.json")),
    }
    info = machine_info()
    print(f"cpu: {info['cpu']} ({info['cpu_count']} cpus), model: {args.model.name}")
    print(f"{'stream':8} {'tokens':>6} {'window tok/s':>13} {'DecodeStream tok/s':>19} "
          f"{'ratio':>6}   (median of {args.repeats}; best in brackets)")
    results: dict[str, object] = {}
    with OtherLoad() as load:
        for stream, sample in SAMPLES.items():
            ids = stream_ids(service, sample, args.tokens)
            result = measure(methods, ids, service.decode_stream_piece(ids), args.repeats)
            window, rust = result["window"], result["decode_stream"]
            ratio = rust["median_tokens_per_s"] / window["median_tokens_per_s"]
            print(f"{stream:8} {len(ids):6d} {window['median_tokens_per_s']:13,.0f} "
                  f"{rust['median_tokens_per_s']:19,.0f} {ratio:5.2f}x   "
                  f"[{window['best_tokens_per_s']:,.0f} / {rust['best_tokens_per_s']:,.0f}]")
            results[stream] = {**result, "tokens": len(ids), "ratio_median": ratio}
    print(f"other processes kept {load.others_cores:.2f} cores busy meanwhile")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "others_cores": load.others_cores,
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
