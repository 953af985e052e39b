"""A state dict whose entries are read on demand, and whose quantized Linear weights stay quantized.

Pre-quantized files (our own format, GGUF, MLX affine folders) are loaded through one path: their tensors become a
`QState`, `{our key: Lazy | QWeight}`, in our key layout. `Lazy` is one stored tensor (shape + a reader); `QWeight`
is a quantized Linear weight: its LOGICAL shape [out, in] (so the config detection and the strict key check, which
read shapes only, work unchanged) plus the stored parts it is made of. The backend loaders
(`flux_core/torch/qload.py`, `flux_core/mlx/qload.py`) build the model from the shapes, swap each quantized Linear
for a layer that keeps the parts, and read the remaining tensors one at a time: host memory stays at the file's
size plus one tensor, full precision is never materialised.

Schemes and their parts:
  fluxcore  mode int8 | int4 | fp8       weight (codes), weight_scale          (flux_core/weights/qfile.py)
  gguf      mode = ggml type name         data (the raw blocks, uint8)           (flux_core/weights/gguf.py)
  mlx       mode affine, bits, group     weight (uint32 words), scales, biases  (flux_core/weights/mlx_affine.py)

`SafetensorsStream` reads single tensors straight from a .safetensors file with `readinto` into a fresh buffer:
not through mmap, whose touched pages would count as resident memory on top of the copy.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..errors import WeightError

# safetensors dtype names -> torch dtype attribute names
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U32": "uint32",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U64": "uint64"}


@dataclass
class Lazy:
    """One stored tensor: its shape and a function that reads it (a torch CPU tensor)."""
    shape: tuple
    read: Callable[[], object]
    dtype: str = ""

    def __repr__(self) -> str:
        return f"Lazy{self.shape}{':' + self.dtype if self.dtype else ''}"


@dataclass
class QWeight:
    """A quantized Linear weight: logical [out, in] `shape`, and the stored `parts` (name -> Lazy)."""
    scheme: str
    mode: str
    shape: tuple
    parts: dict = field(default_factory=dict)
    bits: int = 0
    group_size: int = 0

    def read(self, name: str):
        return self.parts[name].read()

    def __repr__(self) -> str:
        return f"QWeight({self.scheme}:{self.mode}{self.shape})"


def layer_of(key: str) -> str:
    """'double_blocks.0.img_attn.qkv.weight' -> 'double_blocks.0.img_attn.qkv'."""
    return key[: -len(".weight")]


def quantized_layers(qstate: Mapping) -> dict:
    """{layer name: QWeight} of a QState."""
    return {layer_of(k): v for k, v in qstate.items() if isinstance(v, QWeight)}


class SafetensorsStream:
    """Header + per-tensor reads of one .safetensors file (no mmap, no whole-file read)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                if n > 100_000_000:
                    raise ValueError("header too large")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise WeightError(f"checkpoint not found: {self.path}") from None
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise WeightError(f"cannot read {self.path} as safetensors ({e}). Is the download complete?") from None
        self.metadata = dict(header.pop("__metadata__", None) or {})
        self.entries = header
        self.base = 8 + n

    def keys(self):
        return self.entries.keys()

    def shape(self, key: str) -> tuple:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> str:
        return self.entries[key]["dtype"]

    def lazy(self, key: str) -> Lazy:
        return Lazy(self.shape(key), lambda: self.read(key), self.dtype(key))

    def read(self, key: str):
        import torch

        e = self.entries[key]
        start, end = e["data_offsets"]
        dtype = getattr(torch, _ST_DTYPES[e["dtype"]])
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.base + start)
            got = f.readinto(memoryview(buf.numpy()))
        if got != end - start:
            raise WeightError(f"{self.path}: tensor {key} is truncated ({got} of {end - start} bytes). "
                              "Is the download complete?")
        return buf.view(dtype).reshape(e["shape"])


QState = dict  # {our key: Lazy | QWeight}
