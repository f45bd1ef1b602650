"""A GGUF file's tensors as the engine holds them, by Hugging Face name, without a float32 detour.

- Q8_0 blocks (fp16 scale d, 32 int8) -> `QuantizedWeight` kind "int8", group 32: the int8 values
  as they are, d widened to float32 (exact).
- Q4_0 (d, 32 nibbles; w = d * (q - 8)) and Q4_1 (d, m, 32 nibbles; w = d * q + m) -> kind
  "int4", group 32, offsets -8d resp. m. A GGUF Q4 block holds element j in the low nibble of
  byte j and element j + 16 in the high nibble; kernels/quant.py wants elements 2j and 2j + 1 in
  byte j: the nibbles are moved with integer ops only.
- F32 / F16 / BF16 -> cast to the engine dtype. Any other type: ValueError naming the tensor.

llama.cpp stores Q and K rows permuted for its interleaved rope; rows are undone here as
engine_svc/convert_gguf.py does for float32 (whole rows move; the quantized blocks run along
`in`, so every row keeps its values, scales and offsets). `kernels.quant.dequantize` of a loaded
weight equals `gguf.quants.dequantize` of the tensor bit for bit (tests/unit/test_gguf_weights.py).
The file is parsed by engine_svc/gguf_file.py (the gguf package's reader takes seconds to start).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engine_svc.convert_gguf import KEPT_GGUF, hf_tensor_name, unpermute_qk
from engine_svc.gguf_metadata import ConversionError, GgufHyperParams, read_hyper_params
from engine_svc.gguf_file import GgufFile, GgufTensor, MetadataView
from kernels.quant import QuantizedWeight, dequantize


GGUF_FILE = KEPT_GGUF             # the GGUF kept beside a converted directory's safetensors
BLOCK = 32                        # weights per Q8_0 / Q4_0 / Q4_1 block
EMBED_CHUNK_ROWS = 8192           # rows of a quantized embedding table dequantized at a time
_BLOCK_BYTES = {"Q8_0": 2 + BLOCK, "Q4_0": 2 + BLOCK // 2, "Q4_1": 4 + BLOCK // 2}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

Weight = Tensor | QuantizedWeight


def gguf_file(model: str | Path) -> Path:
    """The GGUF for `--model`: the file itself, or `<dir>/model.gguf`; ValueError if neither."""
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return path
    candidate = path / GGUF_FILE
    if not candidate.is_file():
        raise ValueError(f"--quantization gguf: {candidate} not found (convert_gguf keeps the GGUF "
                         "there; run `make model` to add it to an existing conversion)")
    return candidate


def _blocks(tensor: GgufTensor) -> tuple[np.ndarray, int, int]:
    """The tensor's raw bytes as uint8 [out, in // 32, block bytes], with (out, in)."""
    if len(tensor.shape) != 2:
        raise ValueError(f"GGUF tensor {tensor.name}: {tensor.type_name} must be 2-D, got shape "
                         f"{tensor.shape}")
    out_features, in_features = tensor.shape
    raw = np.asarray(tensor.data, dtype=np.uint8)   # a view of the memory map
    blocks = raw.reshape(out_features, in_features // BLOCK, _BLOCK_BYTES[tensor.type_name])
    return blocks, out_features, in_features


def _fp16_field(blocks: np.ndarray, start: int) -> Tensor:
    """Bytes [start, start + 2) of every block as float32 [out, blocks] (fp16 widened: exact)."""
    halves = np.ascontiguousarray(blocks[:, :, start:start + 2]).view(np.float16)[:, :, 0]
    return torch.from_numpy(halves.astype(np.float32))


def _int4_levels(nibbles: np.ndarray, out_features: int, in_features: int) -> Tensor:
    """GGUF nibbles uint8 [out, blocks, 16] -> packed uint8 [out, in // 2] in kernels/quant.py's
    order. A GGUF block holds element j in the low nibble of byte j and element j + 16 in the
    high nibble; quant.py wants elements 2k, 2k + 1 in byte k: bytes 0-7 of a block take the low
    nibbles of GGUF bytes (2k, 2k + 1), bytes 8-15 their high nibbles (integer ops only)."""
    even, odd = nibbles[:, :, 0::2], nibbles[:, :, 1::2]      # [out, blocks, 8] each
    low = (even & 0x0F) | (odd << 4)                          # elements 0..15 of each block
    high = (even >> 4) | (odd & 0xF0)                         # elements 16..31
    packed = np.concatenate([low, high], axis=2)              # [out, blocks, 16]
    return torch.from_numpy(packed.reshape(out_features, in_features // 2))


def quantized_tensor(tensor: GgufTensor) -> QuantizedWeight:
    """A Q8_0 / Q4_0 / Q4_1 GGUF tensor as a CPU QuantizedWeight (group 32), values as stored."""
    blocks, out_features, in_features = _blocks(tensor)
    scales = _fp16_field(blocks, 0)                           # [out, blocks] float32
    if tensor.type_name == "Q8_0":
        q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8)
        return QuantizedWeight("int8", torch.from_numpy(q.reshape(out_features, in_features)),
                               scales, None, BLOCK)
    if tensor.type_name == "Q4_0":
        offsets = -8.0 * scales                               # d * (q - 8) = d * q - 8d (exact)
        nibbles = blocks[:, :, 2:]
    else:
        offsets = _fp16_field(blocks, 2)                      # m
        nibbles = blocks[:, :, 4:]
    return QuantizedWeight("int4", _int4_levels(nibbles, out_features, in_features), scales,
                           offsets.contiguous(), BLOCK)


def plain_tensor(tensor: GgufTensor) -> Tensor:
    """An F32 / F16 / BF16 GGUF tensor as a CPU tensor of its own dtype, shape [out, in] / [n]."""
    raw = np.array(tensor.data, dtype=np.uint8, copy=True)
    return torch.from_numpy(raw).view(_PLAIN[tensor.type_name]).reshape(tensor.shape)


def read_tensor(tensor: GgufTensor) -> Weight:
    """One GGUF tensor as stored: QuantizedWeight for Q8_0/Q4_0/Q4_1, a tensor for F32/F16/BF16."""
    if tensor.type_name in _BLOCK_BYTES:
        return quantized_tensor(tensor)
    if tensor.type_name in _PLAIN:
        return plain_tensor(tensor)
    raise ValueError(f"GGUF tensor {tensor.name}: type {tensor.type_name} is not supported "
                     f"(supported: {', '.join([*_BLOCK_BYTES, *_PLAIN])}); requantize the GGUF "
                     "to one of those, or serve the converted safetensors with --quantization "
                     "none|int8|int4")


def unpermute_rows(weight: Weight, num_heads: int) -> Weight:
    """convert_gguf.unpermute_qk on whole rows, for a plain or a quantized weight."""
    if isinstance(weight, Tensor):
        return unpermute_qk(weight, num_heads).contiguous()
    def rows(tensor: Tensor) -> Tensor:
        return unpermute_qk(tensor, num_heads).contiguous()

    offsets = None if weight.offsets is None else rows(weight.offsets)
    return QuantizedWeight(weight.kind, rows(weight.qweight), rows(weight.scales), offsets,
                           weight.group_size)


def dequantize_rows(weight: QuantizedWeight, dtype: torch.dtype) -> Tensor:
    """dequantize(weight) in `dtype`, EMBED_CHUNK_ROWS rows at a time (small float32 transients)."""
    out_features, in_features = weight.shape
    result = torch.empty(out_features, in_features, dtype=dtype)
    for start in range(0, out_features, EMBED_CHUNK_ROWS):
        rows = slice(start, start + EMBED_CHUNK_ROWS)
        part = QuantizedWeight(weight.kind, weight.qweight[rows], weight.scales[rows],
                               None if weight.offsets is None else weight.offsets[rows],
                               weight.group_size)
        result[rows] = dequantize(part, dtype)
    return result


_HYPER_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                 "head_dim")


def check_matches_config(hp: GgufHyperParams, config: Any, path: Path) -> None:
    """ValueError naming the first hyper-parameter where the GGUF and config.json disagree."""
    for field in _HYPER_FIELDS:
        if getattr(hp, field) != getattr(config, field):
            raise ValueError(f"{path}: GGUF {field}={getattr(hp, field)} but config.json has "
                             f"{getattr(config, field)}; the GGUF is not this model's")


class GgufTensorSource:
    """Tensors of one GGUF by HF name, for engine_svc/weights.py: projections and the LM head as
    stored (quantized stays quantized), everything else (norms, the gathered embedding table)
    in the engine dtype. Q/K rows un-permuted."""

    def __init__(self, path: Path, config: Any, dtype: torch.dtype, device: torch.device) -> None:
        gguf = GgufFile(path)
        try:
            hp = read_hyper_params(MetadataView(gguf.metadata))
            self._tensors = {hf_tensor_name(t.name): t for t in gguf.tensors}
        except ConversionError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        check_matches_config(hp, config, path)
        self.path, self._config, self._dtype, self._device = path, config, dtype, device

    def has(self, name: str) -> bool:
        """True when the GGUF holds the tensor the HF name stands for."""
        return name in self._tensors

    def _read(self, name: str, shape: tuple[int, ...]) -> Weight:
        tensor = self._tensors.get(name)
        if tensor is None:
            raise ValueError(f"{self.path}: tensor {name!r} is missing")
        weight = read_tensor(tensor)
        if tuple(weight.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name!r} ({tensor.name}) has shape "
                             f"{tuple(weight.shape)}, expected {shape} from config.json")
        if name.endswith("q_proj.weight"):
            weight = unpermute_rows(weight, self._config.num_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rows(weight, self._config.num_kv_heads)
        return weight

    def get(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """A tensor in the engine dtype on the device (a quantized one dequantized: embeddings)."""
        weight = self._read(name, shape)
        if isinstance(weight, QuantizedWeight):
            weight = dequantize_rows(weight, self._dtype)
        return weight.to(device=self._device, dtype=self._dtype)

    def projection(self, name: str, shape: tuple[int, int]) -> Weight:
        """A projection as stored: QuantizedWeight on the device, or a plain one cast to dtype."""
        weight = self._read(name, shape)
        if isinstance(weight, QuantizedWeight):
            return weight.to(self._device)
        return weight.to(device=self._device, dtype=self._dtype)

    def head(self, name: str, shape: tuple[int, int], plain: Tensor | None = None) -> Weight:
        """The LM head from tensor `name` as stored; `plain` (the embedding table) when tied and
        the GGUF stores it unquantized, so the two stay one tensor."""
        tensor = self._tensors.get(name)
        if plain is not None and tensor is not None and tensor.type_name in _PLAIN:
            return plain
        return self.projection(name, shape)
