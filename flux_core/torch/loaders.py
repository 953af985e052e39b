"""The torch side of the backend table (`flux_core/backend.py`): load, quantize, compile, free. Twin of mlx/loaders.py.

`ckpt` is a `flux_core.weights.io.Checkpoint`; `dtype` is 'bfloat16' | 'float16' | 'float32'; `device` a torch
device string ('cuda', 'cuda:1', 'mps', 'cpu'). Models are built on the meta device and loaded strictly.
"""
from __future__ import annotations

import importlib
import os

import torch

from . import quant
from .common import blocks

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def load_transformer(family, ckpt, dtype: str, device: str):
    """The family's transformer (`flux_core/torch/<family.module>.py`, `load_<module>`), in eval mode."""
    module = importlib.import_module(f".{family.module}", __package__)
    return getattr(module, f"load_{family.module}")(ckpt, dtype=torch_dtype(dtype), device=device).eval()


def load_qwen3(ckpt, dtype: str, device: str, max_layers: int | None = None):
    from .qwen3 import load_qwen3 as load

    model = load(ckpt, dtype=torch_dtype(dtype), device=device, max_layers=max_layers).eval()
    # on CUDA every repeated encode (the 512-token klein shape above all) replays a CUDA graph: same kernels
    return model.use_cuda_graphs() if str(device).startswith("cuda") else model


def load_prequantized(kind: str, ckpt, dtype: str, device: str, max_layers: int | None = None):
    """A pre-quantized checkpoint (ckpt.sd is a QState): klein / zimage / qwen3 with its quantized layers kept."""
    from .qload import load_qstate

    return load_qstate(kind, ckpt.sd, ckpt.config, torch_dtype(dtype), device, max_layers,
                       f"{kind} ({ckpt.source})")


def load_vae(ckpt, dtype: str, device: str):
    from .vae import load_vae as load

    return load(ckpt, dtype=torch_dtype(dtype), device=device).eval()


def supported_quantizations() -> tuple[str, ...]:
    return quant.MODES


def quantize_model(module, mode: str) -> int:
    return quant.quantize_model(module, mode)


def compile_blocks(module) -> str:
    """Regional torch.compile: every transformer block, not the whole model (compiles in seconds per block type,
    and the per-step Python loop stays outside the graph). On CUDA the sampler then also replays each step from a
    CUDA graph (runtime.make_denoiser; `FLUXCORE_CUDA_GRAPHS=0` turns that off)."""
    found = blocks(module)
    for b in found:
        b.compile()
    module.fluxcore_cuda_graphs = True
    return f"torch.compile on {len(found)} blocks (first generation compiles); CUDA-graphed steps on CUDA"


def compile_text_encoder(model) -> str:
    """torch.compile each Qwen3 decoder layer (one layer type: compiles once). On CUDA the encoder already replays
    each call from a CUDA graph (load_qwen3): the compiled layers are captured into it, which took a 512-token klein
    encode from 10.1 to 6.2 ms on an H200 (docs/PERF.md §P12)."""
    found = blocks(model)
    for b in found:
        b.compile()
    if getattr(model, "graphed", None) is not None:
        model.use_cuda_graphs()  # graphs captured before would replay the uncompiled kernels: start a new cache
    return f"torch.compile on {len(found)} Qwen3 layers (first encode compiles)"


def compile_vae(vae) -> str:
    """Compile the VAE decoder (channels-last, torch.compile of the decoder's forward): the compiler fuses each
    GroupNorm's statistics, normalisation and SiLU into one pass and the convolutions skip the NCHW<->NHWC copies.
    First decode at a new size compiles (tens of seconds); tiled decodes call the decoder's parts and stay eager."""
    vae.decoder.to(memory_format=torch.channels_last)
    vae.decoder.compile()
    return "torch.compile on the VAE decoder (channels-last; first decode at each size compiles)"


def device_memory_gb(device: str) -> float:
    """GPU memory for CUDA, system (unified) memory otherwise."""
    if device.startswith("cuda"):
        idx = int(device.split(":")[1]) if ":" in device else 0
        return torch.cuda.get_device_properties(idx).total_memory / 2**30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("inf")


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        mps.empty_cache()


def free_bytes(device: str) -> int | None:
    """Free memory of a CUDA device (what `cudaMemGetInfo` reports); None elsewhere (CPU, MPS: unknown or shared)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    idx = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    return int(torch.cuda.mem_get_info(idx)[0])


def offload(module, device: str, mode: str, spare_bytes: int = 0) -> str:
    """Wrap a module loaded on the host for `mode` (model | blocks) on `device` (flux_core/torch/offload.py); with
    blocks, a share of `spare_bytes` keeps blocks resident (each one kept is one copy fewer per step)."""
    from .offload import RESIDENT_SHARE
    from .offload import offload as wrap

    keep = 0
    sizes = [sum(t.numel() * t.element_size() for t in (*b.parameters(), *b.buffers())) for b in blocks(module)]
    if mode == "blocks" and spare_bytes > 0 and sizes:
        keep = int(RESIDENT_SHARE * spare_bytes // (sum(sizes) / len(sizes)))
    off = wrap(module, device, mode, resident_blocks=keep)
    streamed = f", {len(off.stream_ids)} of {len(sizes)} blocks streamed" if mode == "blocks" else ""
    return (f"offload {mode}: {off.host_bytes / 1e9:.2f} GB in pinned host memory, "
            f"{off.device_bytes('resident' if mode == 'model' else 'blocks') / 1e9:.2f} GB on {device} while it "
            f"runs{streamed}")
