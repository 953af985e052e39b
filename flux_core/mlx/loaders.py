"""The MLX side of the backend table (`flux_core/backend.py`): load, quantize, compile, free. Twin of torch/loaders.py.

`ckpt` is a `flux_core.weights.io.Checkpoint` (torch CPU tensors of any dtype, fp8-scaled files already dequantized);
`dtype` is 'bfloat16' | 'float16' | 'float32'; `device` is 'gpu' | 'cpu' (MLX arrays live in unified memory; the
device picks the stream a step runs on). Each model file converts its weights to mx once, at load.
"""
from __future__ import annotations

import importlib
import os

import mlx.core as mx

from . import quant


def load_transformer(family, ckpt, dtype: str, device: str):
    """The family's transformer on MLX (`flux_core/mlx/<family.module>.py`, `load_<module>`).

    The checkpoint's tensors are released while they are converted (`ckpt.sd` is left empty): the caller
    (`models.load_transformer`) is done with it, and a 16 GB Mac cannot hold klein-4B twice."""
    module = importlib.import_module(f".{family.module}", __package__)
    return getattr(module, f"load_{family.module}")(ckpt, dtype, consume=True)


def load_qwen3(ckpt, dtype: str, device: str, max_layers: int | None = None):
    from .qwen3 import load_qwen3 as load

    return load(ckpt, dtype, max_layers=max_layers)


def load_prequantized(kind: str, ckpt, dtype: str, device: str, max_layers: int | None = None):
    """A pre-quantized checkpoint (ckpt.sd is a QState): klein / zimage / qwen3, quantized layers kept as MLX's own."""
    from .qload import load_qstate

    return load_qstate(kind, ckpt.sd, ckpt.config, dtype, max_layers, f"{kind} ({ckpt.source})")


def load_vae(ckpt, dtype: str, device: str):
    from .vae import load_vae as load

    return load(ckpt, dtype)


def supported_quantizations() -> tuple[str, ...]:
    return quant.supported_modes()


def quantize_model(module, mode: str) -> int:
    return quant.quantize_model(module, mode)


def compile_blocks(module) -> str:
    return "compile: MLX always compiles its step (mlx/runtime.py)"


def compile_text_encoder(model) -> str:
    return "compile: the MLX text encoder runs uncompiled (one call per prompt)"


def compile_vae(vae) -> str:
    return "compile: the MLX VAE runs eagerly (not compiled)"


def device_memory_gb(device: str) -> float:
    """Unified memory: the machine's RAM."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("inf")


def empty_cache() -> None:
    clear = getattr(mx, "clear_cache", None) or getattr(getattr(mx, "metal", None), "clear_cache", None)
    if clear:
        clear()


def free_bytes(device: str) -> None:
    """Unified memory: there is no separate device pool to measure (or to refuse a load against)."""
    return None


def offload(module, device: str, mode: str, spare_bytes: int = 0) -> str:
    """MLX computes from the memory the weights live in: nothing to move (`memory.resolve_offload` says so first)."""
    from ..errors import ConfigError

    raise ConfigError(f"offload {mode} is not available on MLX (unified memory): use offload none, and quantization "
                      "int8 / int4 to save memory")
