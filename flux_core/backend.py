"""The one place that chooses the backend and device, and says why.

Order for `auto`: MLX on Apple Silicon when `mlx` imports (the reason this pack exists: PyTorch-MPS is slow there);
torch CUDA when a GPU is present; torch MPS on a Mac without MLX; torch CPU otherwise. MLX on Linux (mlx[cpu] or
mlx[cuda]) is used only when asked for explicitly. An explicit request that cannot be met is an error that names
what is missing. Device probing lives here; everything else backend-specific (loading, quantizing, compiling,
freeing memory, the sampler's arithmetic) is reached through one table, `IMPLEMENTATIONS`, whose entries
(`flux_core/torch/`, `flux_core/mlx/`) have the same functions and never import each other.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import platform
import sys
from dataclasses import dataclass

from .errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "mlx", "torch")
DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZATIONS = ("none", "int8", "int4", "fp8")
OFFLOADS = ("auto", "none", "model", "blocks")


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
        kind, _, index = dev.partition(":")
        if kind not in ("cpu", "cuda", "mps") or (index and not (kind == "cuda" and index.isdigit())):
            raise ConfigError(f"--device {dev}: the torch backend runs on cpu, cuda, cuda:N or mps")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {dev} asked for CUDA, but torch {torch.__version__} sees no CUDA GPU "
                              "(a CPU-only torch build, or no driver). Use --device cpu, or install a CUDA build of torch.")
        if dev == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("--device mps asked for Apple's Metal backend, which this torch cannot use.")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"--device {dev}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
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


# ---------------------------------------------------------------------------------------------- the backend table
# Everything backend-specific the rest of flux_core needs goes through one of these modules, which have the same
# functions (load_transformer / load_qwen3 / load_vae / quantize_model / compile_blocks / compile_vae / device_memory_gb /
# empty_cache); the sampler's per-backend arithmetic is the matching `runtime` module.
IMPLEMENTATIONS = {"torch": "flux_core.torch", "mlx": "flux_core.mlx"}


def impl(backend: str, part: str = "loaders"):
    """The backend's `loaders` (or `runtime`) module."""
    if backend not in IMPLEMENTATIONS:
        raise ConfigError(f"unknown backend {backend!r}: one of {', '.join(IMPLEMENTATIONS)}")
    return importlib.import_module(f"{IMPLEMENTATIONS[backend]}.{part}")


def supported_quantizations(choice: Choice) -> tuple[str, ...]:
    """Weight-only quantization applied after loading (torch/quant.py, mlx/quant.py); MLX fp8 needs mxfp8."""
    return ("none",) + tuple(impl(choice.backend).supported_quantizations())


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
        n = impl(choice.backend).quantize_model(module, quantization)
        log.info("fluxcore: %s quantized %d Linear layers of %s", quantization, n, type(module).__name__)
    return module


def load_transformer(choice: Choice, family, ckpt, dtype: str, quantization: str):
    if ckpt.metadata.get("fluxcore.prequantized"):  # GGUF / FluxCore quantized / MLX affine: stays quantized
        return impl(choice.backend).load_prequantized(family.module, ckpt, dtype, choice.device)
    module = impl(choice.backend).load_transformer(family, ckpt, dtype, choice.device)
    return quantize(choice, module, quantization)


def compile_blocks(module, choice: Choice) -> str:
    """Regional compilation where the backend has it (torch); MLX compiles its whole step itself."""
    return impl(choice.backend).compile_blocks(module)


def compile_text_encoder(module, choice: Choice) -> str:
    """The Qwen3 decoder layers compiled where the backend has it (torch)."""
    return impl(choice.backend).compile_text_encoder(module)


def compile_vae(module, choice: Choice) -> str:
    """The VAE decoder compiled where the backend has it (torch: channels-last + torch.compile)."""
    return impl(choice.backend).compile_vae(module)


def build_text_encoder(choice: Choice, ckpt, dtype: str, quantization: str, tokenizer):
    from .configs import Qwen3Config
    from .text import TextEncoder, check_depth, layers_needed
    from .weights.qwen3 import to_native

    # Both encodings together need layers up to num_layers-1 (Z-Image's hs[-2]); the last layer and the final norm
    # are never used, so they are not loaded (docs/MODELS.md §Q2).
    cfg = Qwen3Config.from_state_dict(to_native(ckpt.sd), ckpt.config)
    check_depth(cfg.num_layers, cfg.hidden_size, ckpt.source)
    n_layers = cfg.num_layers
    if ckpt.metadata.get("fluxcore.prequantized"):
        model = impl(choice.backend).load_prequantized("qwen3", ckpt, dtype, choice.device,
                                                       max_layers=layers_needed("both", n_layers))
    else:
        model = impl(choice.backend).load_qwen3(ckpt, dtype, choice.device, max_layers=layers_needed("both", n_layers))
        quantize(choice, model, quantization)
    # the prompt cache is shared across encoders: a file loaded at two precisions must not share entries
    return TextEncoder(model, tokenizer, source_id=f"{ckpt.source}|{choice.backend}|{dtype}|{quantization}")


def load_vae(choice: Choice, ckpt, dtype: str):
    return impl(choice.backend).load_vae(ckpt, dtype, choice.device)


def free_bytes(choice: Choice) -> int | None:
    """Free device memory in bytes where it is known (CUDA), else None (CPU, MPS, MLX's unified memory)."""
    return impl(choice.backend).free_bytes(choice.device)


def offload(choice: Choice, module, mode: str, spare_bytes: int = 0) -> str:
    """Keep a host-loaded module's weights on the host and bring them to the device when it runs (docs/MEMORY.md);
    `spare_bytes` of device memory beyond the streaming minimum keep some blocks resident (fewer copies per step)."""
    return impl(choice.backend).offload(module, choice.device, mode, spare_bytes)


def device_memory_gb(backend: str, device: str) -> float:
    """Memory of the device a model runs on: GPU memory for CUDA, system (unified) memory otherwise."""
    return impl(backend).device_memory_gb(device)


LOW_MEMORY_GB = 32.0  # flux.c / mflux release the 8 GB text encoder after encoding below this


def empty_cache() -> None:
    """Free cached device memory of every backend that is in use (imported) in this process."""
    gc.collect()
    if "torch" in sys.modules:
        impl("torch").empty_cache()
    if "mlx.core" in sys.modules and mlx_available():
        impl("mlx").empty_cache()
