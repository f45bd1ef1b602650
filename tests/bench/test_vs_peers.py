"""bench/vs_peers.py and bench/peers/: the llama.cpp build flags, the /completion client against
a fake llama-server, and the ratio table (no llama.cpp build needed)."""
from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.peers import build_llama_cpp
from bench.peers.llama_server import run_completions
from bench.vs_peers import LLMSERVE, ratio_table, side_name


def test_build_flags_are_explicit_never_native_and_follow_the_cpu() -> None:
    flags = build_llama_cpp.isa_cmake_flags({"avx", "avx2", "fma", "f16c", "bmi2", "avx512f"})
    assert "-DGGML_NATIVE=OFF" in flags
    assert {"-DGGML_AVX2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_BF16=OFF",
            "-DGGML_AVX512_VNNI=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF"} <= set(flags)
    assert build_llama_cpp.isa_tag({"avx512f", "avx512_bf16"}) == "avx512bf16"
    assert build_llama_cpp.isa_tag({"avx2"}) == "avx2"
    configure = build_llama_cpp.cmake_configure_flags({"avx2"})
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in configure and "-DGGML_AVX512=OFF" in configure


class _FakeLlamaServer(BaseHTTPRequestHandler):
    """Streams n_predict one-token chunks, then llama-server's stop chunk."""

    bodies: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(body["n_predict"]):
            self.wfile.write(f"data: {json.dumps({'content': f't{i}', 'stop': False})}\n\n"
                             .encode())
            self.wfile.flush()
        stop = {"content": "", "stop": True, "tokens_predicted": body["n_predict"],
                "tokens_evaluated": len(body["prompt"]), "stop_type": "limit"}
        self.wfile.write(f"data: {json.dumps(stop)}\n\n".encode())

    def log_message(self, *args) -> None:
        pass


def test_completions_are_greedy_ignore_eos_uncached_and_timed() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeLlamaServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        prompts = [[5, 6, 7], [8, 9], [10]]
        records, duration = asyncio.run(run_completions(url, prompts, 2, n_predict=4))
    finally:
        server.shutdown()
    assert duration > 0 and len(records) == 3
    for record, ids in zip(records, prompts):
        assert not record.error
        assert record.output_tokens == 4 and record.prompt_tokens == len(ids)
        assert 0 < record.ttft_s <= record.e2e_s and len(record.itl_s) == 3
        assert record.finish_reason == "limit"
    for body in _FakeLlamaServer.bodies:
        assert body["ignore_eos"] is True and body["cache_prompt"] is False
        assert body["temperature"] == 0.0 and body["n_predict"] == 4 and body["stream"] is True
    assert sorted(b["prompt"] for b in _FakeLlamaServer.bodies) == sorted(prompts)


def test_ratio_table_divides_each_variant_by_each_quantization_the_best_and_bf16() -> None:
    def run(tok_s: float) -> dict:
        return {"output_throughput": tok_s}

    results = {side_name("bf16"): {1: run(60.0), 8: run(200.0)},
               side_name("int4"): {1: run(90.0), 8: run(180.0)},
               "Q4_1": {1: run(30.0), 8: run(100.0)}, "BF16": {1: run(120.0)}}
    lines, ratios = ratio_table(results, ["bf16", "int4"], ["Q4_1", "Q8_0", "BF16"], [1, 8])
    assert ratios[1]["bf16"] == {"Q4_1": pytest.approx(2.0), "BF16": pytest.approx(0.5),
                                 "best": pytest.approx(0.5)}
    assert ratios[1]["int4"] == {"Q4_1": pytest.approx(3.0), "BF16": pytest.approx(0.75),
                                 "best": pytest.approx(0.75), "bf16": pytest.approx(1.5)}
    # at 8 the only llama.cpp run is Q4_1, so it is the best
    assert ratios[8]["int4"] == {"Q4_1": pytest.approx(1.8), "BF16": None,
                                 "best": pytest.approx(1.8), "bf16": pytest.approx(0.9)}
    assert "Q8_0" not in lines[0] and "int4 x best" in lines[0] and "int4 x bf16" in lines[0]
    assert "1.50x" in lines[1] and "0.90x" in lines[2]
    for name in list(results):   # --no-llmserve: the peer's numbers, no ratios
        if name.startswith(LLMSERVE):
            del results[name]
    lines, ratios = ratio_table(results, ["bf16"], ["Q4_1", "BF16"], [1, 8])
    assert ratios == {1: {}, 8: {}} and "llmserve" not in lines[0] and "x best" not in lines[0]
