"""How much device memory a load will take, from the checkpoint's header alone, and the refusal when it cannot fit.

The estimate reads only the safetensors headers (shapes and dtypes), before any tensor is materialised: each tensor
costs numel x the compute dtype's bytes (files in fp8 or fp8-scaled are widened at load, so the file dtype does not
matter), except the Linear weights under load-time quantization (same rule as torch/quant.py: 2-D `.weight` inside
the repeated blocks, no modulation except for int4, which also takes the modulation Linears): int8 / fp8 1 byte per
weight + a float32 scale per output row, int4 half a byte + a float16 scale per 64 inputs. A FluxCore quantized file
(weights/qfile.py) is charged its stored bytes for the quantized layers (their codes and scales stay as stored). Offload `blocks` keeps everything outside the blocks plus two slots of the
largest block; `model` and `none` need the whole component while it runs. A working-memory allowance per component
(activations at 1024², measured on the H200) is added.

Free memory is known only on CUDA (`torch.cuda.mem_get_info`, `backend.free_bytes`); elsewhere (CPU, MPS, MLX's
unified memory) nothing is refused here. `check_fits` takes the free-memory function as an argument so that tests
can fake it.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .configs import BLOCK_CONTAINERS, MODULATION_CONTAINERS
from .errors import ConfigError

GB = 1e9
BLOCK_RE = re.compile(r"(?:^|\.)(" + "|".join(BLOCK_CONTAINERS) + r")\.(\d+)\.")
INT4_GROUP = 64
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Working memory above the weights while the component runs (1024², batch 1), from the H200 measurements in
# docs/PERF.md: klein-4B denoise +0.8 GB, Qwen3 encode (512 tokens) +0.3 GB, VAE decode untiled +2.6 GB (tiling
# brings it under 1 GB, and decode tiles itself when memory is short, so the VAE is charged the tiled figure).
WORKING_BYTES = {"transformer": int(1.0 * GB), "text_encoder": int(0.4 * GB), "vae": int(1.0 * GB)}


STORED_BYTES = {"I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F16": 2, "BF16": 2, "F32": 4, "U32": 4}


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple
    stored: bool = False   # kept as stored on the device (a pre-quantized layer's codes / scales)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


def read_header(path: str | Path) -> dict[str, TensorSpec]:
    """{key: TensorSpec} of one .safetensors file, from its JSON header only."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") or {}
    kept = set()
    if meta.get("fluxcore.format") == "fluxcore-quantized":
        layers = json.loads(meta.get("fluxcore.quantized", "[]"))
        kept = {f"{layer}.{part}" for layer in layers for part in ("weight", "weight_scale")}
    return {k: TensorSpec(v["dtype"], tuple(v["shape"]), k in kept) for k, v in header.items() if k != "__metadata__"}


def checkpoint_specs(path, component: str | None = None) -> dict[str, TensorSpec] | None:
    """Specs of a file, a component folder or a pipeline folder's `component/`; None for other formats."""
    p = Path(path).expanduser()
    if p.is_dir() and component and (p / component).is_dir():
        p = p / component
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files or any(f.suffix.lower() not in (".safetensors", ".sft") for f in files):
        return None
    specs = {}
    try:
        for f in files:
            specs.update(read_header(f))
    except (OSError, ValueError, KeyError, struct.error):
        return None  # the loader reports unreadable files properly
    return specs


def _quantized_bytes(spec: TensorSpec, mode: str, compute_bytes: int) -> int:
    out_f, in_f = spec.shape
    if mode in ("int8", "fp8"):
        return out_f * in_f + out_f * 4
    if mode == "int4" and in_f % INT4_GROUP == 0:
        return out_f * in_f // 2 + out_f * (in_f // INT4_GROUP) * 2
    return spec.numel * compute_bytes


def _quantized(key: str, spec: TensorSpec, mode: str, in_block: bool) -> bool:
    """The load-time quantizer's selection (torch/quant.py containers_for / skipped), on checkpoint keys."""
    if mode == "none" or not key.endswith(".weight") or len(spec.shape) != 2:
        return False
    if in_block:
        return mode == "int4" or "modulation" not in key
    return mode == "int4" and key.startswith(MODULATION_CONTAINERS)


def weight_bytes(specs: dict[str, TensorSpec], dtype: str, quantization: str = "none",
                 offload: str = "none") -> int:
    """Device bytes of the weights of a component in `dtype` with `quantization`, as `offload` places them."""
    cb = DTYPE_BYTES[dtype]
    base, blocks = 0, {}
    for key, spec in specs.items():
        m = BLOCK_RE.search(key)
        if spec.stored:
            size = spec.numel * STORED_BYTES[spec.dtype]
        elif _quantized(key, spec, quantization, m is not None):
            size = _quantized_bytes(spec, quantization, cb)
        else:
            size = spec.numel * cb
        if m is None:
            base += size
        else:
            blocks[m.groups()] = blocks.get(m.groups(), 0) + size
    if offload == "blocks" and blocks:
        return base + 2 * max(blocks.values())
    return base + sum(blocks.values())


def need_bytes(specs, kind: str, dtype: str, quantization: str = "none", offload: str = "none") -> int:
    return weight_bytes(specs, dtype, quantization, offload) + WORKING_BYTES[kind]


def alternatives(specs, kind: str, dtype: str, quantization: str, offload: str, free: int,
                 quantizations=("int8", "int4"), offloads=("blocks",)) -> list[str]:
    """The settings, other than the current ones, that fit in `free` bytes, the least intrusive first."""
    has_blocks = any(BLOCK_RE.search(k) for k in specs)
    candidates = [(q, offload) for q in quantizations if q != quantization]
    if has_blocks:
        candidates += [(quantization, o) for o in offloads if o != offload]
        candidates += [(q, o) for o in offloads if o != offload for q in quantizations if q != quantization]
    fits = []
    for q, o in candidates:
        if need_bytes(specs, kind, dtype, q, o) <= free:
            words = ([f"quantization {q}"] if q != quantization else []) + ([f"offload {o}"] if o != offload else [])
            fits.append(" with ".join(words))
    return fits


def check_fits(path, kind: str, dtype: str, quantization: str = "none", offload: str = "none",
               free_bytes: Callable[[], int | None] | None = None, what: str | None = None,
               quantizations=("int8", "int4")) -> int | None:
    """Raise ConfigError when the component at `path` cannot fit in the device's free memory, naming the options that
    do fit. Returns the estimate (bytes), or None when it cannot be made (unknown format or free memory unknown)."""
    free = free_bytes() if free_bytes is not None else None
    if free is None:
        return None
    specs = checkpoint_specs(path, component=kind)
    if not specs:
        return None
    need = need_bytes(specs, kind, dtype, quantization, offload)
    if need <= free:
        return need
    name = what or Path(path).name
    fits = alternatives(specs, kind, dtype, quantization, offload, free, quantizations)
    if fits:
        advice = "use " + " or ".join(fits[:3])
    else:
        advice = ("no quantization / offload combination fits either: free memory (close other programs, unload "
                  "other models) or run on the CPU (--device cpu)")
    raise ConfigError(f"{name} needs {need / GB:.1f} GB, {free / GB:.1f} GB free: {advice}")


OFFLOADS = ("auto", "none", "model", "blocks")


def resolve_offload(requested: str, backend: str, device: str, specs: dict | None = None, kind: str = "transformer",
                    dtype: str = "bfloat16", quantization: str = "none",
                    free_bytes: Callable[[], int | None] | None = None) -> tuple[str, str]:
    """(offload mode, why) for a component. Offload moves weights between host memory and a CUDA GPU; elsewhere
    (MLX, MPS: unified memory; the CPU) the weights already live in host memory, so only none / auto are accepted.
    auto on CUDA: none when the component fits in free memory, else blocks (model for a component without blocks)."""
    requested = (requested or "auto").lower()
    if requested not in OFFLOADS:
        raise ConfigError(f"unknown offload {requested!r}: choose one of {', '.join(OFFLOADS)}")
    cuda = backend == "torch" and device.startswith("cuda")
    if not cuda:
        where = "MLX (Apple's unified memory)" if backend == "mlx" else f"torch on {device}"
        if requested in ("model", "blocks"):
            raise ConfigError(f"offload {requested} moves weights between host memory and a CUDA GPU; with {where} "
                              "the weights already live in the memory the compute uses, so there is nothing to move: "
                              "use offload none (auto) and, to save memory, quantization int8 / int4")
        return "none", f"offload none: {where} computes from the memory the weights live in"
    if requested != "auto":
        return requested, f"offload {requested} (your choice)"
    free = free_bytes() if free_bytes is not None else None
    if free is None or not specs:
        return "none", "offload none (free memory unknown)"
    if need_bytes(specs, kind, dtype, quantization, "none") <= free:
        return "none", f"offload none ({free / GB:.1f} GB free is enough)"
    mode = "blocks" if any(BLOCK_RE.search(k) for k in specs) else "model"
    return mode, (f"offload {mode}: the {kind} needs {need_bytes(specs, kind, dtype, quantization) / GB:.1f} GB, "
                  f"{free / GB:.1f} GB free")
