"""A GGUF file's scalar metadata and tensor index, read without parsing its arrays.

The ``gguf`` package's ``GGUFReader`` builds a view of every element of every metadata array:
16 s on the 2-core host for Gemma-3-270M's 262,144-token vocabulary (2.7 s for SmolLM2), before
a single tensor is read. Mapping a file's 4-bit blocks (:func:`llmkernels.loading.gguf_int4_projections`)
needs only the architecture, the alignment and where each tensor lies, so this reader skips the
arrays (0.1-0.3 s). It follows the GGUF specification (versions 2 and 3, little-endian) and is
tested against ``GGUFReader`` on both embedded files.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["GGUFIndex", "GGUFTensor", "read_index"]

# GGUF metadata value types: struct format of each scalar; 8 = string, 9 = array
# (uint8, int8, uint16, int16, uint32, int32, float32, bool, uint64, int64, float64)
_SCALARS = dict(zip((0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12), "BbHhIif?Qqd"))
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    kind: str  # the ggml type's name, e.g. "Q4_K", "F32"
    shape: tuple[int, ...]  # PyTorch order: rows first (GGUF lists the innermost dimension first)
    offset: int  # bytes from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFIndex:
    path: Path
    fields: dict  # scalar and string metadata; arrays are left out
    tensors: dict  # name -> GGUFTensor

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor, uint8 ``[rows, bytes per row]`` (memory-mapped)."""
        t = self.tensors[name]
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))
        rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
        return data.reshape(rows, t.nbytes // rows)


class _Cursor:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        size = self.take("Q")
        self.pos += size
        return self.buf[self.pos - size : self.pos].decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF metadata value type {kind}")
        item, count = self.take("I"), self.take("Q")
        if item in _SCALARS:  # skipped: a fixed size per element
            self.pos += count * struct.calcsize("<" + _SCALARS[item])
        elif item == _STRING:  # skipped by their lengths, not decoded (a vocabulary)
            for _ in range(count):
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
        else:
            for _ in range(count):
                self.value(item)
        return None


def read_index(path: str | Path) -> GGUFIndex:
    """The metadata scalars and the tensor index of the GGUF file at ``path``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as f:
        header = f.read(24)
        if header[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", header, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        file_size = path.stat().st_size
        # each field takes at least 12 bytes (key length, value type), each tensor 24
        if 12 * n_fields + 24 * n_tensors > file_size:
            raise ValueError(
                f"{path}: truncated GGUF header ({n_fields} fields and {n_tensors} tensors "
                f"cannot fit in {file_size} bytes)"
            )
        size, buf = 16 << 20, header
        while True:  # the metadata and index fit in the first 16 MB unless arrays are huge
            buf += f.read(size)
            try:
                return _parse(
                    path, buf, n_tensors, n_fields, GGML_QUANT_SIZES, GGMLQuantizationType
                )
            except struct.error:
                if len(buf) >= file_size:
                    raise ValueError(f"{path}: truncated GGUF header") from None
                size *= 4


def _parse(path, buf, n_tensors, n_fields, quant_sizes, quant_types) -> GGUFIndex:
    cursor = _Cursor(buf)
    cursor.pos = 24
    fields = {}
    for _ in range(n_fields):
        key = cursor.string()
        value = cursor.value(cursor.take("I"))
        if value is not None:
            fields[key] = value
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.take("I")
        if n_dims > _MAX_DIMS:
            raise ValueError(
                f"{path}: tensor {name!r} has {n_dims} dimensions (GGML has at most 4)"
            )
        dims = [cursor.take("Q") for _ in range(n_dims)]
        kind, offset = cursor.take("I"), cursor.take("Q")
        infos.append((name, dims, kind, offset))
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment must be a power of two, got {alignment!r}")
    start = -(-cursor.pos // alignment) * alignment
    file_size = path.stat().st_size
    tensors = {}
    for name, dims, kind, offset in infos:
        if name in tensors:
            raise ValueError(f"{path}: tensor {name!r} is listed twice")
        block, block_bytes = quant_sizes[quant_types(kind)]
        elements = math.prod(dims)  # Python ints: no wrap-around for absurd sizes
        tensor = GGUFTensor(
            name,
            quant_types(kind).name,
            tuple(reversed(dims)),
            start + offset,
            elements // block * block_bytes,
        )
        if elements % block or tensor.offset + tensor.nbytes > file_size:
            raise ValueError(
                f"{path}: tensor {name!r} ({tensor.kind} {list(tensor.shape)}) does not fit the "
                f"file (truncated, or not a whole number of {block}-element blocks)"
            )
        tensors[name] = tensor
    return GGUFIndex(path, fields, tensors)
