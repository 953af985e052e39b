"""Loader nodes: klein / Z-Image transformer, Qwen3 text encoder, VAE.

Each resolves the picked file, loads it through `flux_core.models` (cached there), and outputs a `ModelRef`
handle plus a badge saying which backend, precision and variant were chosen and why.
"""
from __future__ import annotations

from dataclasses import replace

from flux_core.errors import ConfigError
from flux_core.families import VAE_KINDS

from . import host
from .common import (BACKEND_OPTIONS, BACKEND_TIP, CATEGORY, DTYPE_OPTIONS, DTYPE_TIP, MODEL, OFFLOAD_OPTIONS,
                     OFFLOAD_TIP, QUANT_OPTIONS, QUANT_TIP, TEXT_ENCODER, VAE, ModelRef, describe, ui)

_CATEGORY = CATEGORY + "/loaders"
LOADER_NODES = {"klein": "FluxCore klein Model Loader", "zimage": "FluxCore Z-Image Model Loader"}  # by family
TE_COMPILE_TIP = ("torch on a CUDA GPU: compile each Qwen3 layer with torch.compile (the first encode takes ~15 s "
                  "longer, then an encode is ~1.5x faster). Not with offload.")
VAE_COMPILE_TIP = ("torch on a CUDA GPU: compile the decoder channels-last with torch.compile (the first decode at "
                   "each size takes ~20-30 s longer, then a 1024x1024 decode is ~2.4x faster). Tiled decodes stay "
                   "uncompiled.")
COMPILE_TIP = ("torch: compile each transformer block with torch.compile. On a CUDA GPU the first run takes ~15 s "
               "longer, then every step is ~1.1-1.15x faster (uncompiled CUDA steps already use a fused Triton kernel). "
               "MLX always compiles its step; on a CPU compiling is slow.")


def _load(ref: ModelRef):
    """Load (or hit the cache) after asking ComfyUI to make room on the GPU."""
    from flux_core import backend

    try:
        device = backend.choose(ref.backend).device
    except Exception:
        device = "cpu"  # the load below reports the real problem
    host.make_room(ref.path, device)
    return ref.load()


class _TransformerLoader:
    FAMILY = ""
    VARIANTS: dict = {}
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The diffusion model (a handle into FluxCore's model cache).",)
    FUNCTION = "load"
    CATEGORY = _CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (host.list_models("diffusion_models"),
                           {"tooltip": f"The {cls.LABEL} file in models/diffusion_models/ (ComfyUI/BFL single file, a "
                                       "ComfyUI-GGUF .gguf or a FluxCore quantized file)."}),
            "backend": (BACKEND_OPTIONS, {"default": "auto", "tooltip": BACKEND_TIP}),
            "dtype": (DTYPE_OPTIONS, {"default": "auto", "tooltip": DTYPE_TIP}),
            "quantization": (QUANT_OPTIONS, {"default": "none", "tooltip": QUANT_TIP}),
            "variant": (list(cls.VARIANTS), {"default": "auto", "tooltip": cls.VARIANT_TIP}),
            "compile": ("BOOLEAN", {"default": False, "tooltip": COMPILE_TIP}),
            "offload": (OFFLOAD_OPTIONS, {"default": "auto", "tooltip": OFFLOAD_TIP}),
        }}

    def load(self, model_name, backend, dtype, quantization, variant, compile=False, offload="auto"):
        path = host.model_path("diffusion_models", model_name)
        if variant not in self.VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(self.VARIANTS)}, got {variant!r}")
        ref = ModelRef("transformer", path, backend, dtype, quantization, self.VARIANTS[variant], compile=bool(compile),
                       offload=offload)
        loaded = _load(ref)
        if loaded.family.name != self.FAMILY:
            raise ConfigError(f"{model_name} is a {loaded.variant.name} model, not {self.LABEL}: load it with the "
                              f"{LOADER_NODES[loaded.family.name]} node.")
        v = loaded.variant
        payload = describe(loaded, f"{v.steps} steps" + (f" · cfg {v.guidance:g}" if v.uses_cfg_by_default else ""))
        return ui(payload, (replace(ref, family=v.family.name, variant=v),))


class KleinModelLoader(_TransformerLoader):
    FAMILY = "klein"
    LABEL = "FLUX.2 [klein]"
    VARIANTS = {"auto": None, "distilled": True, "base": False}
    VARIANT_TIP = ("distilled: 4 steps, no CFG (flux-2-klein-4b). base: 50 steps with CFG 4 (flux-2-klein-base-4b). "
                   "The weights look the same, so auto reads the file's metadata and otherwise assumes distilled: "
                   "pick base for a base file.")
    DESCRIPTION = ("Loads a FLUX.2 [klein] transformer (4B or 9B; distilled or base) from models/diffusion_models/ "
                   "with FluxCore's own implementation on MLX or torch. The badge shows the backend, precision and "
                   "variant actually chosen; hover it for the reasons.")
    SEARCH_ALIASES = ["flux2", "flux 2", "klein", "unet loader", "load diffusion model", "bfl"]


class ZImageModelLoader(_TransformerLoader):
    FAMILY = "zimage"
    LABEL = "Z-Image"
    VARIANTS = {"auto": None, "turbo": True, "base": False}
    VARIANT_TIP = ("turbo: 8 steps, no CFG (z_image_turbo). base: 50 steps with CFG. The weights look the same, "
                   "so auto reads the file's metadata and otherwise assumes Turbo: pick base for a base file.")
    DESCRIPTION = ("Loads a Z-Image (Turbo or base) transformer from models/diffusion_models/ with FluxCore's own "
                   "implementation on MLX or torch. The badge shows the backend, precision and variant chosen.")
    SEARCH_ALIASES = ["zimage", "z image", "z-image turbo", "tongyi", "unet loader", "load diffusion model"]


class TextEncoderLoader:
    RETURN_TYPES = (TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The Qwen3 text encoder with its tokenizer (a handle into FluxCore's model cache).",)
    FUNCTION = "load"
    CATEGORY = _CATEGORY
    DESCRIPTION = ("Loads the Qwen3 text encoder (qwen_3_4b.safetensors serves both klein 4B and Z-Image) from "
                   "models/text_encoders/. The tokenizer is found next to the file, in the optional tokenizer "
                   "folder, or in ComfyUI's bundled Qwen tokenizer.")
    SEARCH_ALIASES = ["qwen", "qwen3", "clip loader", "text encoder", "load clip"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (host.list_models("text_encoders"),
                             {"tooltip": "The Qwen3 file in models/text_encoders/ (qwen_3_4b.safetensors for klein "
                                         "4B and Z-Image; a llama.cpp .gguf or a FluxCore quantized file too)."}),
            "backend": (BACKEND_OPTIONS, {"default": "auto", "tooltip": BACKEND_TIP}),
            "dtype": (DTYPE_OPTIONS, {"default": "auto", "tooltip": DTYPE_TIP}),
            "quantization": (QUANT_OPTIONS, {"default": "none", "tooltip": QUANT_TIP}),
            "offload": (OFFLOAD_OPTIONS, {"default": "auto", "tooltip": OFFLOAD_TIP}),
        }, "optional": {
            "tokenizer": ("STRING", {"default": "",
                                     "tooltip": "Optional folder with the Qwen tokenizer (tokenizer.json, or "
                                                "vocab.json + merges.txt). Empty: look next to the weights, then in "
                                                "ComfyUI's bundled qwen25_tokenizer."}),
            "compile": ("BOOLEAN", {"default": False, "tooltip": TE_COMPILE_TIP}),
        }}

    def load(self, text_encoder, backend, dtype, quantization, offload="auto", tokenizer="", compile=False):
        path = host.model_path("text_encoders", text_encoder)
        ref = ModelRef("text_encoder", path, backend, dtype, quantization, None, (tokenizer or "").strip() or None,
                       host.tokenizer_dirs(), compile=bool(compile), offload=offload)
        loaded = _load(ref)
        payload = describe(loaded)
        return ui(payload, (ref,))


class VAELoader:
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE (a handle into FluxCore's model cache).",)
    FUNCTION = "load"
    CATEGORY = _CATEGORY
    DESCRIPTION = ("Loads a FLUX VAE from models/vae/: flux2-vae.safetensors for klein (128-channel latents, 16x) or "
                   "the FLUX.1 ae.safetensors for Z-Image (16 channels, 8x); the kind is detected from the weights.")
    SEARCH_ALIASES = ["vae loader", "load vae", "flux2 vae", "ae.safetensors", "autoencoder"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (host.list_models("vae"),
                         {"tooltip": "The VAE file in models/vae/: flux2-vae.safetensors (klein) or ae.safetensors "
                                     "(Z-Image)."}),
            "backend": (BACKEND_OPTIONS, {"default": "auto", "tooltip": BACKEND_TIP}),
            "dtype": (DTYPE_OPTIONS, {"default": "auto", "tooltip": DTYPE_TIP}),
        }, "optional": {
            "compile": ("BOOLEAN", {"default": False, "tooltip": VAE_COMPILE_TIP}),
        }}

    def load(self, vae_name, backend, dtype, compile=False):
        path = host.model_path("vae", vae_name)
        ref = ModelRef("vae", path, backend, dtype, compile=bool(compile))
        loaded = _load(ref)
        kind = loaded.module.kind
        payload = describe(loaded, VAE_KINDS[kind].title)
        return ui(payload, (replace(ref, family=kind),))
