"""Smoke runs of the serving benchmark tools on tiny configurations: the result files must hold
every key, token counts must be exact and latencies positive and ordered."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.common import stable_prompt_ids, summarize_ms
from tests.conftest import REPO_ROOT, build_tiny_model

LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
STAT_KEYS = {"mean", "p50", "p90", "p99", "max", "count"}


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_summarize_ms_converts_and_orders() -> None:
    stats = summarize_ms([0.001, 0.002, 0.003, 0.010])
    assert set(stats) == STAT_KEYS
    assert stats["mean"] == pytest.approx(4.0)
    assert stats["p50"] == pytest.approx(2.5)
    assert stats["p50"] <= stats["p99"] <= stats["max"] == pytest.approx(10.0)
    assert summarize_ms([])["count"] == 0


def test_stable_prompt_ids_round_trip(default_model_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    encode = lambda text: tokenizer.encode(text).ids  # noqa: E731
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    rng = np.random.default_rng(3)
    for length in (1, 17, 96):
        text, ids = stable_prompt_ids(encode, decode, rng, length, 1000, 49152)
        assert len(ids) == length
        assert encode(text) == ids and decode(ids) == text
    with pytest.raises(ValueError, match="input length"):
        stable_prompt_ids(encode, decode, rng, 0, 1000, 49152)


def test_vs_hf_quick_on_tiny_model(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path)
    out = tmp_path / "vs_hf.json"
    done = run_tool("bench/vs_hf.py", "--model", str(model), "--quick", "--no-service",
                    "--threads", "1", "--repeats", "2", "--json", str(out))
    assert "x HF seq" in done.stdout
    result = json.loads(out.read_text())
    assert result["threads"]["torch_num_threads"] == 1
    assert {"torch_version", "transformers_version", "cpu", "command"} <= set(result["machine"])
    rows = result["rows"]
    # 2 dtypes x (hf_sequential 2 scenarios + hf_batched 1 + engine 3 (with the TTFT probe))
    assert len(rows) == 2 * 6
    assert {(r["method"], r["dtype"]) for r in rows} == {
        (m, d) for m in ("hf_sequential", "hf_batched", "engine") for d in ("float32", "bfloat16")}
    probe = result["scenarios"]["ttft_probe"]
    assert probe["requests"] == 3 and len(set(probe["prompt_tokens"])) == 1   # one prompt, 3x
    for row in rows:
        scenario = result["scenarios"][row["scenario"]]
        assert row["exact_counts"] is True
        assert row["seconds"] > 0 and row["tokens_per_s"] > 0
        # --repeats 2: the fastest of two runs is kept (hf_sequential, the reference, runs once)
        runs = row["extra"]["runs_seconds"]
        assert len(runs) == (1 if row["method"] == "hf_sequential" else 2)
        assert row["seconds"] == pytest.approx(min(runs), abs=1e-3)
        if row["scenario"] == "ttft_probe":   # engine only: no transformers run, no ratios
            assert row["method"] == "engine" and row["tokens"] == 3 * 4
            assert row["x_vs_hf_sequential"] is None and row["agree_with_hf"] is None
            continue
        assert row["tokens"] == scenario["requests"] * row["new_tokens"] == row["requests"] * 16
        assert row["x_vs_hf_sequential"] > 0
        assert (row["x_vs_hf_batched"] is None) == (not scenario["concurrent"])
        if row["method"] != "hf_sequential":
            assert 0.0 <= row["agree_with_hf"] <= 1.0
    engine_rows = [r for r in rows if r["method"] == "engine"]
    assert all(r["extra"]["decode_step_ms"]["count"] > 0 for r in engine_rows)
    for r in engine_rows:   # one first-token latency per request, within the run's wall time
        ttft = r["extra"]["ttft_ms"]
        assert ttft["count"] == r["requests"] and 0 < ttft["p50"] <= ttft["max"] <= r["seconds"] * 1e3
    assert result["ttft_overhead"] == []   # --no-service: nothing to compare
    best = {}
    for r in rows:
        if r["method"] == "hf_sequential":
            best[r["scenario"]] = max(best.get(r["scenario"], 0), r["tokens_per_s"])
    for r in rows:
        if r["scenario"] != "ttft_probe":
            assert r["x_vs_hf_sequential"] == pytest.approx(r["tokens_per_s"] / best[r["scenario"]])


def test_ttft_overhead_pairs_service_with_engine_per_scenario_and_dtype() -> None:
    from bench.vs_hf import ttft_overheads

    def row(scenario, dtype, method, p50):
        return {"scenario": scenario, "dtype": dtype, "method": method,
                "extra": {"ttft_ms": {"p50": p50}} if p50 is not None else {}}
    rows = [row("single", "bfloat16", "engine", 20.0), row("single", "bfloat16", "service", 27.5),
            row("single", "float32", "service", 50.0),               # no engine row: skipped
            row("single", "bfloat16", "hf_sequential", None),
            row("many", "bfloat16", "engine", 100.0), row("many", "bfloat16", "service", 90.0),
            row("many", "bfloat16", "service_si2", 104.0)]
    out = {(o["scenario"], o["dtype"], o["method"]): o["overhead_p50_ms"]
           for o in ttft_overheads(rows)}
    assert out == {("single", "bfloat16", "service"): pytest.approx(7.5),
                   ("many", "bfloat16", "service"): -10.0,
                   ("many", "bfloat16", "service_si2"): 4.0}


def test_ratio_table_gives_every_service_run_its_ratio_to_the_engine() -> None:
    from bench.vs_hf import ratio_table
    from bench.vs_hf_runners import Measurement

    def measured(method: str, dtype: str, seconds: float) -> Measurement:
        return Measurement("many", method, dtype, requests=4, new_tokens=10, seconds=seconds,
                           outputs=[[1] * 10 for _ in range(4)])
    rows = ratio_table([measured("hf_batched", "bfloat16", 4.0),
                        measured("engine", "bfloat16", 1.0),
                        measured("service", "bfloat16", 1.25),
                        measured("service_si2", "bfloat16", 1.1),
                        measured("service", "float32", 2.0)])   # no float32 engine run
    by_method = {(r["method"], r["dtype"]): r for r in rows}
    assert by_method["service", "bfloat16"]["x_vs_engine"] == pytest.approx(0.8)
    assert by_method["service_si2", "bfloat16"]["x_vs_engine"] == pytest.approx(1 / 1.1)
    assert by_method["service", "float32"]["x_vs_engine"] is None
    assert by_method["engine", "bfloat16"]["x_vs_engine"] is None
    assert by_method["service", "bfloat16"]["x_vs_hf_batched"] == pytest.approx(4.0 / 1.25)


def test_serve_against_started_services(default_model_dir: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    run_tool("bench/serve.py", "--start-services", "--model", str(default_model_dir),
             "--threads", "1", "--concurrency", "1", "3", "--num-prompts", "3",
             "--input-len", "12", "--output-len", "5", "--warmup", "1", "--no-progress",
             "--json", str(out), "--plot", str(png), timeout=180)
    result = json.loads(out.read_text())
    assert result["threads"] == {"OMP_NUM_THREADS": 1}
    assert [r["concurrency"] for r in result["runs"]] == [1, 3]
    for run in result["runs"]:
        assert run["completed"] == 3 and run["failed"] == 0
        assert run["total_output_tokens"] == 15 and run["output_tokens_per_request"] == [5]
        assert run["total_input_tokens"] == 3 * 12
        assert run["output_throughput"] == pytest.approx(15 / run["duration_s"])
        for key in LATENCY_KEYS:
            assert set(run[key]) == STAT_KEYS
            assert 0 < run[key]["p50"] <= run[key]["p99"] <= run[key]["max"]
        assert run["itl_ms"]["count"] >= 1  # gaps after the first message
        assert run["ttft_ms"]["max"] < run["e2e_ms"]["max"]
        assert run["tpot_ms"]["count"] == 3
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hf_side_goes_on_through_eos_like_ignore_eos(tmp_path: Path) -> None:
    """vs_hf's transformers runs must generate what the engine's ignore_eos does: EOS is an
    ordinary token, picked where greedy picks it, and the row goes on (banning EOS until the
    count is reached, as min_new_tokens does, made 3 of 32 benchmark prompts disagree)."""
    import torch

    from bench.vs_hf_runners import _hf_generate, _load_hf
    from engine_svc.config import EngineConfig
    from engine_svc.engine import LLMEngine
    from engine_svc.params import SamplingParams, StoppingParams

    model_dir = build_tiny_model(tmp_path)
    model = _load_hf(model_dir, "float32", "cpu")
    prompt = [1, 17, 42, 99, 7]
    ids = torch.tensor([prompt])
    first = int(_hf_generate(model, ids, torch.ones_like(ids), 1)[0, 0])
    model.generation_config.eos_token_id = first   # make greedy's first pick the EOS token
    model.config.eos_token_id = first
    out = _hf_generate(model, ids, torch.ones_like(ids), 6)[0].tolist()
    assert len(out) == 6 and out[0] == first
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu",
                                    max_model_len=64, max_num_seqs=2))
    engine.add_request("r", prompt, SamplingParams(temperature=0.0),
                       StoppingParams(max_new_tokens=6, ignore_eos=True))
    engine_out: list[int] = []
    while engine.has_work():
        for step_out in engine.step():
            engine_out.extend(step_out.token_ids)
    assert engine_out == out


def test_free_port_binds_and_stays_out_of_the_ephemeral_range() -> None:
    """A bind(0) port lies in the range client connections take their source ports from, so a
    service started on it could lose it first; free_port picks below that range."""
    import socket

    from bench import common

    ports = [common.free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)   # never handed out twice in a process
    low = common._ephemeral_low()
    for port in ports:
        assert 1024 <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_cpu_gemm_bench_prints_and_saves_ratios(tmp_path: Path) -> None:
    from kernels.cpu import linear as cpu_linear

    if not cpu_linear.native_available():
        pytest.skip("no AVX512-BF16 build of the C kernels here")
    out = tmp_path / "gemm.json"
    done = run_tool("bench/cpu_gemm.py", "--rows", "3", "--layers", "1", "--repeats", "1",
                    "--json", str(out))
    assert "all (a step)" in done.stdout
    results = json.loads(out.read_text())["results"]
    assert {r["projection"] for r in results} == {"qkv_proj", "o_proj", "gate_up_proj",
                                                  "down_proj", "lm_head"}
    assert all(r["rows"] == 3 and r["native_ms"] > 0 and r["speedup"] > 0 for r in results)
