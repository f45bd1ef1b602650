"""A GGUF file's metadata and tensor table, parsed directly (v2 / v3, little-endian).

gguf.GGUFReader builds a Python object per element of every metadata array: 4 s for the default
model's 49k-token vocabulary and merges, on every engine start. The engine needs the
hyper-parameters and the tensors only, so this reader skips arrays without materialising them
(a string array still walks its lengths: ~0.1 s) and memory-maps the tensor data.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# metadata value type -> struct format of a scalar (8: string, 9: array are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
SMALL_ARRAY = 64   # arrays up to this many numbers are kept; longer ones (vocabularies) skipped
# ggml tensor type id -> (name, weights per block, bytes per block) for the types read here
TENSOR_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
                8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}


@dataclass(slots=True)
class GgufTensor:
    """One tensor of a GGUF: name, ggml type name, shape [out, in] (or [n]), raw bytes."""

    name: str
    type_name: str
    shape: tuple[int, ...]     # slowest dimension first (GGUF lists the fastest first)
    data: np.ndarray | None    # uint8 view of the memory map; None for a type not read here


class _Cursor:
    """Little-endian reads from a bytes-like buffer."""

    def __init__(self, buffer: Any) -> None:
        self.buffer, self.offset = buffer, 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buffer, self.offset)[0]
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        start, self.offset = self.offset, self.offset + length
        return bytes(self.buffer[start:self.offset]).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array()
        raise ValueError(f"unknown metadata value type {kind}")

    def array(self) -> list[Any] | None:
        """A small numeric array as a list; strings and long arrays skipped (None)."""
        kind, count = self.unpack("<I"), self.unpack("<Q")
        if kind in _SCALARS:
            size = struct.calcsize(_SCALARS[kind])
            values = (list(struct.unpack_from(f"<{count}{_SCALARS[kind][1]}", self.buffer,
                                              self.offset)) if count <= SMALL_ARRAY else None)
            self.offset += size * count
            return values
        if kind == _STRING:   # walk the lengths only (a vocabulary: ~100k strings)
            buffer, offset, unpack = self.buffer, self.offset, struct.Struct("<Q").unpack_from
            for _ in range(count):
                offset += 8 + unpack(buffer, offset)[0]
            self.offset = offset
            return None
        for _ in range(count):
            self.value(kind)
        return None


class GgufFile:
    """The metadata (scalars, strings, small numeric arrays) and tensors of a GGUF file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        cursor = _Cursor(memoryview(self._map))
        if bytes(self._map[:4]) != MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (magic {bytes(self._map[:4])!r})")
        cursor.offset = 4
        version = cursor.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        tensor_count, kv_count = cursor.unpack("<Q"), cursor.unpack("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.unpack("<I"))
        infos = [self._tensor_info(cursor) for _ in range(tensor_count)]
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cursor.offset // alignment) * alignment
        self.tensors = [self._tensor(name, dims, kind, data_start + offset)
                        for name, dims, kind, offset in infos]

    @staticmethod
    def _tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = cursor.string()
        dims = tuple(cursor.unpack("<Q") for _ in range(cursor.unpack("<I")))
        return name, tuple(reversed(dims)), cursor.unpack("<I"), cursor.unpack("<Q")

    def _tensor(self, name: str, shape: tuple[int, ...], kind: int, start: int) -> GgufTensor:
        if kind not in TENSOR_TYPES:
            return GgufTensor(name, _type_name(kind), shape, None)
        type_name, block, block_bytes = TENSOR_TYPES[kind]
        elements = int(np.prod(shape))
        if elements % block or (shape and shape[-1] % block):
            raise ValueError(f"{self.path}: tensor {name} ({type_name}) has shape {shape}, not "
                             f"whole blocks of {block}")
        end = start + elements // block * block_bytes
        if end > self._map.shape[0]:
            raise ValueError(f"{self.path}: tensor {name} runs past the end of the file "
                             "(truncated download?)")
        return GgufTensor(name, type_name, shape, self._map[start:end])


def _type_name(kind: int) -> str:
    """The ggml name of a tensor type id (for error messages about types not read here)."""
    try:
        from gguf.constants import GGMLQuantizationType

        return GGMLQuantizationType(kind).name
    except (ImportError, ValueError):
        return f"type {kind}"


class MetadataView:
    """`GgufFile.metadata` with gguf.GGUFReader's `fields[key].contents()` surface, so
    gguf_metadata.read_hyper_params reads either."""

    class _Field:
        def __init__(self, value: Any) -> None:
            self._value = value

        def contents(self) -> Any:
            return self._value

    def __init__(self, metadata: dict[str, Any]) -> None:
        self.fields = {key: self._Field(value) for key, value in metadata.items()}
