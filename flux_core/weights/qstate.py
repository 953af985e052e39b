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
import re
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
    """{layer name: QWeight} of a QState's quantized `*.weight` entries."""
    return {layer_of(k): v for k, v in qstate.items() if isinstance(v, QWeight) and k.endswith(".weight")}


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
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            meta = header.pop("__metadata__", None) or {}
            if not isinstance(meta, dict):
                raise ValueError("__metadata__ is not a JSON object")
            self.metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
            for k, e in header.items():
                start, end = e["data_offsets"]
                if e["dtype"] not in _ST_DTYPES or not all(isinstance(d, int) and d >= 0 for d in e["shape"]) \
                        or not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                    raise ValueError(f"bad entry for tensor {k!r}")
        except FileNotFoundError:
            raise WeightError(f"checkpoint not found: {self.path}") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError, struct.error, UnicodeDecodeError) as e:
            raise WeightError(f"cannot read {self.path} as safetensors ({e}). Is the download complete?") from None
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


# ------------------------------------------------------------------------------------------------ key maps on QStates

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _pattern(p: str) -> re.Pattern:
    out, last = [], 0
    for m in _PLACEHOLDER.finditer(p):
        out += [re.escape(p[last:m.start()]), f"(?P<{m.group(1)}>\\d+)"]
        last = m.end()
    return re.compile("^" + "".join(out) + re.escape(p[last:]) + "$")


def apply_keymap(keymap, qstate: Mapping) -> dict:
    """A foreign-layout QState -> our layout, with the rules of a `weights.keymap.KeyMap` (data: native pattern,
    source patterns, op). Row ops work on quantized weights too: `cat` stacks the sources' rows (q, k, v) and
    `swap_halves` swaps the two row halves, of every stored part (codes, scales, biases are per output row),
    which is exact. Unmatched keys pass through; ignored keys are dropped."""
    rules = [(_pattern(r.sources[0]), r) for r in keymap.rules]
    out, used, produced = {}, set(), set()
    for key in qstate:
        if key in used or keymap.ignored(key):
            continue
        for pat, rule in rules:
            m = pat.match(key)
            if not m:
                continue
            names = [s.format(**m.groupdict()) for s in rule.sources]
            missing = [n for n in names if n not in qstate]
            if missing:
                raise WeightError(f"checkpoint has {key} but not its partner key(s) {missing}")
            native = rule.native.format(**m.groupdict())
            out[native] = _row_op(rule.op, [qstate[n] for n in names], key)
            used.update(names)
            produced.add(native)
            break
        else:
            out[key] = qstate[key]
    # a later cat source (to_k) may have passed through before its first source (to_q) consumed it
    return {k: v for k, v in out.items() if k not in used or k in produced}


def _row_op(op: str, items: list, key: str):
    if op == "copy":
        return items[0]
    if op not in ("cat", "swap_halves"):
        raise WeightError(f"{key}: key-map op {op} is not supported for pre-quantized checkpoints")
    first = items[0]
    if isinstance(first, QWeight):
        if any(not isinstance(i, QWeight) or (i.scheme, i.mode, i.bits, i.group_size, i.shape[1]) !=
               (first.scheme, first.mode, first.bits, first.group_size, first.shape[1]) for i in items):
            raise WeightError(f"{key}: the parts to concatenate are quantized differently")
        rows = sum(i.shape[0] for i in items)
        parts = {name: _lazy_rows(op, [i.parts[name] for i in items]) for name in first.parts}
        return QWeight(first.scheme, first.mode, (rows,) + tuple(first.shape[1:]), parts, first.bits,
                       first.group_size)
    return _lazy_rows(op, items)


def _lazy_rows(op: str, items: list) -> Lazy:
    rows = sum(i.shape[0] for i in items)

    def read():
        import torch

        ts = [i.read() if isinstance(i, Lazy) else i for i in items]
        if op == "cat":
            return torch.cat(ts, 0)
        h = ts[0].shape[0] // 2
        return torch.cat([ts[0][h:], ts[0][:h]], 0)

    return Lazy((rows,) + tuple(items[0].shape[1:]), read, items[0].dtype if isinstance(items[0], Lazy) else "")
