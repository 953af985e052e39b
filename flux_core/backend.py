"""The one place that chooses the backend and device, and says why.

Order for `auto`: MLX on Apple Silicon when `mlx` imports (the reason this pack exists: PyTorch-MPS is slow there);
torch CUDA when a GPU is present; torch MPS on a Mac without MLX; torch CPU otherwise. MLX on Linux (mlx[cpu] or
mlx[cuda]) is used only when asked for explicitly. An explicit request that cannot be met is an error that names
what is missing. Everything backend-specific that the rest of flux_core needs (loading a module, freeing memory)
is dispatched from here, so nothing else imports torch.cuda or mlx directly.
"""
from __future__ import annotations

import gc
import importlib.util
import logging
import os
import platform
import sys
from dataclasses import dataclass

from .errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "mlx", "torch")
DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZATIONS = ("none", "int8", "int4", "fp8")


@dataclass(frozen=True)
class Choice:
    backend: str   # "torch" | "mlx"
    device: str    # torch: "cuda", "cuda:1", "mps", "cpu"; mlx: "gpu" | "cpu"
    reason: str


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def mlx_available() -> bool:
    if importlib.util.find_spec("mlx") is None:
        return False
    try:
        import mlx.core  # noqa: F401
    except Exception:  # a broken install (e.g. missing libblas) must not take torch down with it
        return False
    return True


def _torch_device(explicit: str | None) -> tuple[str, str]:
    import torch

    if explicit:
        dev = explicit
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {dev} asked for CUDA, but torch {torch.__version__} sees no CUDA GPU "
                              "(a CPU-only torch build, or no driver). Use --device cpu, or install a CUDA build of torch.")
        if dev == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("--device mps asked for Apple's Metal backend, which this torch cannot use.")
        return dev, f"torch on {dev} (your choice)"
    if torch.cuda.is_available():
        return "cuda", f"torch on CUDA ({torch.cuda.get_device_name(0)})"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps", "torch on MPS (Apple GPU; install mlx for the faster MLX path: pip install mlx)"
    return "cpu", "torch on CPU (no CUDA GPU or Apple GPU found)"


def choose(backend: str = "auto", device: str | None = None) -> Choice:
    backend = (backend or "auto").lower()
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "mlx":
        if not mlx_available():
            hint = 'pip install mlx' if is_apple_silicon() else 'pip install "mlx[cpu]" (or "mlx[cuda]")'
            raise ConfigError(f"backend mlx was asked for, but the mlx package is not importable here: {hint}")
        return Choice("mlx", _mlx_device(device), "MLX (your choice)")
    if backend == "auto" and is_apple_silicon() and mlx_available() and device in (None, "gpu", "auto"):
        return Choice("mlx", "gpu", "MLX on the Apple GPU (Apple Silicon with mlx installed)")
    dev, why = _torch_device(None if device in (None, "auto") else device)
    if backend == "auto" and is_apple_silicon() and not mlx_available():
        why += "; mlx is not installed"
    return Choice("torch", dev, why)


def _mlx_device(device: str | None) -> str:
    import mlx.core as mx

    if device in (None, "auto"):
        return "gpu" if mx.metal.is_available() or _mlx_has_cuda() else "cpu"
    if device not in ("cpu", "gpu"):
        raise ConfigError(f"MLX devices are 'cpu' and 'gpu', not {device!r}")
    return device


def _mlx_has_cuda() -> bool:
    import mlx.core as mx

    try:
        return bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
    except Exception:
        return False


def resolve_dtype(dtype: str | None, choice: Choice) -> str:
    dtype = (dtype or "auto").lower()
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    # bf16 wherever it is fast; float32 on a CPU (torch or MLX), where bf16 matmuls skip BLAS and are slow.
    if choice.device == "cpu":
        return "float32"
    return "bfloat16"


def supported_quantizations(choice: Choice) -> tuple[str, ...]:
    """Weight-only quantization applied after loading (torch/quant.py, mlx/quant.py); MLX fp8 needs mxfp8."""
    if choice.backend == "mlx":
        from .mlx.quant import supported_modes

        return ("none",) + supported_modes()
    return QUANTIZATIONS


def check_quantization(quantization: str, choice: Choice) -> None:
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    ok = supported_quantizations(choice)
    if quantization not in ok:
        raise ConfigError(f"quantization {quantization!r} is not available on {choice.backend}: choose one of "
                          f"{', '.join(ok)}")


def quantize(choice: Choice, module, quantization: str):
    """Quantize the block Linears of a loaded transformer / Qwen3 in place (nothing for 'none')."""
    if quantization != "none":
        check_quantization(quantization, choice)
        if choice.backend == "mlx":
            from .mlx.quant import quantize_model
        else:
            from .torch.quant import quantize_model
        n = quantize_model(module, quantization)
        log.info("fluxcore: %s quantized %d Linear layers of %s", quantization, n, type(module).__name__)
    return module


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_module(choice: Choice, family: str, ckpt, dtype: str, quantization: str):
    if choice.backend == "mlx":
        from .mlx import loaders

        return quantize(choice, loaders.load_transformer(family, ckpt, dtype), quantization)
    if family == "klein":
        from .torch.klein import load_klein

        return quantize(choice, load_klein(ckpt, dtype=torch_dtype(dtype), device=choice.device).eval(), quantization)
    from .torch.zimage import load_zimage

    return quantize(choice, load_zimage(ckpt, dtype=torch_dtype(dtype), device=choice.device).eval(), quantization)


def compile_blocks(module, choice: Choice) -> str:
    """Regional torch.compile: every transformer block, not the whole model (compiles in seconds per block type,
    and the per-step Python loop stays outside the graph). MLX compiles its step itself (mlx/runtime.py)."""
    if choice.backend != "torch":
        return "compile: MLX always compiles its step"
    blocks = [b for name in ("double_blocks", "single_blocks", "noise_refiner", "context_refiner", "layers")
              for b in getattr(module, name, ())]
    for b in blocks:
        b.compile()
    return f"torch.compile on {len(blocks)} blocks (first generation compiles)"


def load_text_encoder(choice: Choice, ckpt, dtype: str, quantization: str, tokenizer):
    from .text import TextEncoder, layers_needed
    from .torch.qwen3 import Qwen3Config
    from .weights.qwen3 import to_native

    # Both encodings together need layers up to num_layers-1 (Z-Image's hs[-2]); the last layer and the final norm
    # are never used, so they are not loaded (REFERENCE §0.1).
    n_layers = Qwen3Config.from_state_dict(to_native(ckpt.sd), ckpt.config).num_layers
    max_layers = layers_needed("both", n_layers)
    if choice.backend == "mlx":
        from .mlx import loaders

        model = loaders.load_qwen3(ckpt, dtype, max_layers=max_layers)
    else:
        from .torch.qwen3 import load_qwen3

        model = load_qwen3(ckpt, dtype=torch_dtype(dtype), device=choice.device, max_layers=max_layers).eval()
    quantize(choice, model, quantization)
    # the prompt cache is shared across encoders: a file loaded at two precisions must not share entries
    return TextEncoder(model, tokenizer, source_id=f"{ckpt.source}|{choice.backend}|{dtype}|{quantization}")


def load_vae(choice: Choice, ckpt, dtype: str):
    if choice.backend == "mlx":
        from .mlx import loaders

        return loaders.load_vae(ckpt, dtype)
    from .torch.vae import load_vae as load

    return load(ckpt, dtype=torch_dtype(dtype), device=choice.device).eval()


def device_memory_gb(backend: str, device: str) -> float:
    """Memory of the device a model runs on: GPU memory for CUDA, system (unified) memory otherwise."""
    if backend == "torch" and device.startswith("cuda"):
        import torch

        idx = int(device.split(":")[1]) if ":" in device else 0
        return torch.cuda.get_device_properties(idx).total_memory / 2**30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("inf")


LOW_MEMORY_GB = 32.0  # flux.c / mflux release the 8 GB text encoder after encoding below this


def empty_cache() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        mps = getattr(torch, "mps", None)
        if mps is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            mps.empty_cache()
    if "mlx.core" in sys.modules:
        import mlx.core as mx

        clear = getattr(mx, "clear_cache", None) or getattr(getattr(mx, "metal", None), "clear_cache", None)
        if clear:
            clear()
