"""What the FluxCore nodes share: socket types, model handles, the badge payload, and ComfyUI's LATENT convention.

Model handles: a loader node outputs a small `ModelRef` (the file and the load arguments plus what was decided),
never the loaded model. Consumers call `ref.load()`, which is a cache hit in `flux_core.models` (keyed by file,
backend, dtype, quantization). So the model lives in the library's cache only (docs/CONTRIBUTING.md §C8): when ComfyUI
unloads models (/free, OOM) and we release that cache, nothing in ComfyUI's node-output cache keeps the weights
alive, and the next run simply reloads them.
"""
from __future__ import annotations

from dataclasses import dataclass

from flux_core import backend as fc_backend

CATEGORY = "FluxCore"
MODEL = "FLUXCORE_MODEL"
TEXT_ENCODER = "FLUXCORE_TEXT_ENCODER"
VAE = "FLUXCORE_VAE"
CONDITIONING = "FLUXCORE_CONDITIONING"

BACKEND_OPTIONS = list(fc_backend.BACKENDS)
DTYPE_OPTIONS = list(fc_backend.DTYPES)
QUANT_OPTIONS = list(fc_backend.QUANTIZATIONS)
OFFLOAD_OPTIONS = list(fc_backend.OFFLOADS)
VAE_TILE_OPTIONS = ["auto", "off", "512", "768", "1024"]

BACKEND_TIP = ("auto: MLX on Apple Silicon when mlx is installed, else torch on CUDA, MPS or CPU. "
               "mlx / torch: force one (an error says what is missing).")
DTYPE_TIP = "auto: bfloat16 on GPUs and MLX, float32 on a CPU (where bf16 is slow). The badge shows the choice."
QUANT_TIP = ("Quantize the weights at load time (none | int8 | int4 | fp8 where the backend supports it). "
             "Files that are already fp8 load either way; pre-quantized files (.gguf, FluxCore quantized) need none.")
OFFLOAD_TIP = ("CUDA: where the weights live between uses. auto: ComfyUI's memory management decides (the model "
               "moves to system RAM when ComfyUI needs the VRAM, and streams its blocks when it does not fit; "
               "blocks always under --lowvram). model: on the GPU only while it runs. blocks: transformer blocks "
               "streamed from system RAM while the previous one computes (klein-4B in ~2 GB of VRAM, ~1.5x slower "
               "steps). MLX and CPU: only auto / none (unified memory, nothing to move).")
VAE_TILE_TIP = ("Decode / encode in overlapping tiles of this many pixels (less memory, about 2x the time, tiny "
                "differences from one pass). auto: tiles above 2 MP or when the GPU's free memory is short.")

@dataclass(frozen=True)
class ModelRef:
    """A loaded model's address in the flux_core cache plus what was decided when it was loaded."""
    kind: str                          # "transformer" | "text_encoder" | "vae"
    path: str
    backend: str                       # as asked: auto | mlx | torch
    dtype: str                         # as asked
    quantization: str = "none"
    distilled: bool | None = None      # transformer: the variant choice (None = from the file)
    tokenizer: str | None = None       # text encoder
    tokenizer_search: tuple = ()
    family: str | None = None          # transformer: the family's name (klein | zimage); vae: its kind (flux2 | flux1)
    variant: object = None             # flux_core.families.Variant (transformer)
    compile: bool = False              # torch.compile: transformer blocks, Qwen3 layers, VAE decoder
    offload: str = "auto"              # as asked: auto | none | model | blocks
    loras: tuple = ()                  # transformer: ((path, strength), ...) from LoRA Loader nodes, in order

    def load(self):
        """The model from the library's cache, then ComfyUI's memory management makes room and places it."""
        from flux_core import memory as fc_memory
        from flux_core import models

        from . import memory

        off = memory.resolve_offload(self.offload)
        if self.kind == "transformer":
            loaded = models.load_transformer(self.path, self.backend, None, self.dtype, self.quantization,
                                             self.distilled, compile=self.compile, offload=off, loras=self.loras)
        elif self.kind == "text_encoder":
            loaded = models.load_text_encoder(self.path, self.tokenizer, self.backend, None, self.dtype,
                                              self.quantization, tokenizer_search=self.tokenizer_search, offload=off,
                                              compile=self.compile)
        else:
            loaded = models.load_vae(self.path, self.backend, None, self.dtype, offload=off, compile=self.compile)
        memory.use(loaded, fc_memory.WORKING_BYTES[self.kind])
        return loaded


def describe(loaded, extra: str = "") -> dict:
    """The badge payload for the JS extension: a short line plus the reasons behind each choice."""
    parts = [f"{loaded.backend}:{loaded.device}", loaded.dtype]
    if loaded.quantization != "none":
        parts.append(loaded.quantization)
    if getattr(loaded, "offload", "none") != "none":
        parts.append(f"offload {loaded.offload}")
    if loaded.variant is not None:
        parts.append(loaded.variant.name)
    if extra:
        parts.append(extra)
    return {"badge": " · ".join(parts), "details": list(loaded.notes)}


def ui(payload: dict, result: tuple) -> dict:
    """Node return value with the badge under our own UI key (values must be lists: ComfyUI merges them)."""
    return {"ui": {"fluxcore": [payload]}, "result": result}


# ------------------------------------------------------------------------------------------------------- LATENT
# ComfyUI's LATENT for the FLUX.1 VAE (Z-Image) is the raw VAE mean; the model applies (x - shift) * scale itself
# (comfy/latent_formats.py, class Flux). flux_core's native Z-Image latent is already normalised, so we convert at the
# LATENT boundary with the VAE kind's constants (flux_core.families.VAE_KINDS; FLUX.2 is the identity).

def to_comfy_latent(latent, vae_kind) -> dict:
    """flux_core native latent (any backend) -> ComfyUI LATENT dict on the CPU, float32."""
    samples = to_cpu_tensor(latent) / vae_kind.comfy_scale + vae_kind.comfy_shift
    out = {"samples": samples}
    if vae_kind.comfy_shift:  # FLUX.1-family latents: ComfyUI records the 8x spatial ratio
        out["downscale_ratio_spacial"] = vae_kind.downscale
    return out


def from_comfy_latent(latent: dict, vae_kind, channels: int | None = None, what: str = "LATENT"):
    """ComfyUI LATENT dict -> flux_core native layout (float32 torch tensor on the CPU). Never mutates the dict.
    With `channels`, the latent must have that many (else an error naming the fix)."""
    samples = to_cpu_tensor(latent["samples"])
    if channels is not None:
        check_latent_channels(samples, channels, what)
    return (samples - vae_kind.comfy_shift) * vae_kind.comfy_scale


def to_cpu_tensor(x):
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32)
    return torch.from_numpy(np.array(x, dtype=np.float32))  # MLX arrays and numpy go through numpy


def check_latent_channels(samples, expected: int, what: str) -> None:
    from flux_core.errors import ConfigError

    if samples.ndim != 4 or samples.shape[1] != expected:
        got = tuple(samples.shape)
        channels = got[1] if len(got) > 1 else 0
        if channels not in (16, 128):  # not ours at all: an SD/SDXL (4-channel) or other model's empty latent
            raise ConfigError(f"{what}: this LATENT has shape {got}, another model's latent (SD / SDXL 'Empty Latent "
                              f"Image' makes 4 channels) but {expected} channels are needed. For a new image leave "
                              "the latent input empty, or use EmptyFlux2LatentImage (klein) / EmptySD3LatentImage "
                              "(Z-Image); for image-to-image use FluxCore VAE Encode.")
        hint = {16: "a Z-Image / FLUX.1 latent", 128: "a FLUX.2 klein latent"}[channels]
        raise ConfigError(f"{what}: this LATENT has shape {got} ({hint}) but {expected} channels are needed. "
                          "Use the VAE and model of one family: klein with flux2-vae.safetensors, Z-Image with "
                          "ae.safetensors.")
