#!/usr/bin/env bash
# The engine's CUDA path checked in one run (bench/gpu_check.py says what each step does).
#
#   bench/gpu_check.sh [--quick] [--keep-going] [--only STEPS] [--model DIR]   on a CUDA machine
#   bench/gpu_check.sh --dry-run                                                on a CPU (plumbing)
#
# Writes $OUT/gpu_check.json (rewritten after every step: where it stopped, and why) and
# $OUT/gpu_check.log (--out DIR, else $OUT, else /tmp/gpu_check). Nothing is downloaded: the CUDA
# torch is the machine's own (checked first), and wheels carried in .gpu_carry/wheels (e.g. gguf,
# to convert a carried .gpu_carry/*.gguf) are installed offline into a scratch site dir.
#   bench/gpu_check.sh --prepare-carry    here, before the calls: .gpu_carry/ with the default
#       model's GGUF in two halves (p1/, p2/: each under the 64 MiB a call carries) + its sha256,
#       and the gguf wheel; git ignores it. Then two calls to the lent machine, back to back (it
#       keeps carried files while warm): carry [".gpu_carry/p1"] with `true`, then carry
#       [".gpu_carry/p2", ".gpu_carry/wheels"] with `bench/gpu_check.sh`. Without it the check
#       uses a random SmolLM2-shaped model.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare-carry" ]; then
    PY=.venv/bin/python
    gguf=$("$PY" -c "from engine_svc.convert_gguf import locate_gguf; print(locate_gguf(None))") || exit 1
    rm -rf .gpu_carry && mkdir -p .gpu_carry/p1 .gpu_carry/p2 .gpu_carry/wheels
    name=$(basename "$gguf")
    half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
    head -c "$half" "$gguf" > ".gpu_carry/p1/$name.part1"
    tail -c +"$(( half + 1 ))" "$gguf" > ".gpu_carry/p2/$name.part2"
    sha256sum "$gguf" | cut -d' ' -f1 > ".gpu_carry/p2/$name.sha256"
    version=$(grep -E '^gguf==' requirements.txt | cut -d= -f3)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform any \
        -d .gpu_carry/wheels "gguf==$version" || exit 1
    grep -qxF '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
    du -sh .gpu_carry/* && echo "carry .gpu_carry/p1, then .gpu_carry/p2 + .gpu_carry/wheels"
    exit 0
fi
OUT_DIR="${OUT:-/tmp/gpu_check}"
DRY=0
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR="$2"; shift 2 ;;
        --out=*) OUT_DIR="${1#--out=}"; shift ;;
        --dry-run) DRY=1; ARGS+=("$1"); shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
if [ -z "${PYTHON:-}" ]; then
    if [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
JSON="$OUT_DIR/gpu_check.json"

fail_early() {  # a JSON that says where the run stopped, before Python could write one
    printf '{"schema": 1, "status": "failed", "stopped_at": "%s", "error": "%s"}\n' "$1" "$2" > "$JSON"
    echo "gpu_check: stopped at $1: $2" | tee -a "$LOG" >&2
    exit 1
}

echo "gpu_check.sh ${ARGS[*]:-} ($(date -u +%FT%TZ), python: $PYTHON, out: $OUT_DIR)" > "$LOG"
if [ "$DRY" = 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$LOG" 2>&1 \
        || echo "nvidia-smi: not available" >> "$LOG"
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" >> "$LOG" 2>&1 \
        || fail_early preflight "$PYTHON has no CUDA torch (or sees no GPU)"
fi
if compgen -G ".gpu_carry/wheels/*.whl" > /dev/null; then
    SITE=/tmp/gpu_check_site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .gpu_carry/wheels/*.whl >> "$LOG" 2>&1 || fail_early wheels "offline wheel install failed"
    export PYTHONPATH="$SITE"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRITON_DEFAULT_FP_FUSION=1
"$PYTHON" bench/gpu_check.py --out "$OUT_DIR" ${ARGS[@]+"${ARGS[@]}"} 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
"$PYTHON" - "$JSON" <<'PY' 2>/dev/null | tee -a "$LOG"
import json, sys
doc = json.load(open(sys.argv[1]))
print(f"gpu_check: {doc.get('status')}" + (f", stopped at {doc['stopped_at']}: {doc.get('error')}"
                                          if doc.get("stopped_at") else ""))
for step in doc.get("steps", []):
    marks = " ".join(f"{k}={v['value']}{'' if v['met'] else '(!)'}" for k, v in step.get("targets", {}).items())
    print(f"  {step['name']:14s} {step['status']:8s} {step['seconds']:7.1f} s  {marks}")
PY
exit "$rc"
