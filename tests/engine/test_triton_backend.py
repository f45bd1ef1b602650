"""The whole engine on the Triton backend (interpreter on CPU, compiled on CUDA) vs torch backend.

Triton fixes its mode (interpreter or compiled) at first import, and transformers imports
Triton, so on CPU this runs in a fresh process with TRITON_INTERPRET=1 set before anything.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys, torch
from engine_svc.config import EngineConfig
from engine_svc.engine import LLMEngine
from engine_svc.params import SamplingParams, StoppingParams
model, device = sys.argv[1], sys.argv[2]
prompts = [torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist()
           for n in (3, 11, 26)]
stopping = StoppingParams(max_new_tokens=10, ignore_eos=True)
results = {}
for backend in ("torch", "triton"):
    engine = LLMEngine(EngineConfig(model=model, dtype="float32", device=device, backend=backend,
                                    max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
                                    kv_capacity_tokens=256))
    # staggered: the third prompt arrives while the others decode (mixed prefill + decode steps)
    out = {i: [] for i in range(3)}
    step = 0
    while step < 3 or engine.has_work():
        if step in (0, 3):
            for i in ((0, 1) if step == 0 else (2,)):
                engine.add_request(str(i), prompts[i], SamplingParams(temperature=0.0), stopping)
        for o in engine.step():
            out[int(o.request_id)].extend(o.token_ids)
        step += 1
    results[backend] = {"tokens": [out[i] for i in range(3)], "backend": engine.runner.backend,
                        "mixed": step}
print(json.dumps(results))
"""


@pytest.mark.timeout(900)
def test_triton_backend_engine_matches_torch_backend(tmp_path, make_tiny_model):
    import torch

    model_dir = make_tiny_model(tmp_path, num_kv_heads=2, head_dim=16, seed=21)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir), device], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["triton"]["backend"] == "triton"
    assert results["triton"]["tokens"] == results["torch"]["tokens"]
    assert all(len(tokens) == 10 for tokens in results["torch"]["tokens"])
