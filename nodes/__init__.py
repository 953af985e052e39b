"""FluxCore's ComfyUI nodes (V1 classic API): thin wrappers over `flux_core`, grouped by concern.

Ids are stable and prefixed `FluxCore`; a changed meaning gets a new id and the old one stays, marked DEPRECATED
(docs/CONTRIBUTING.md §C7). Importing this package never needs ComfyUI (see host.py).
"""
from . import conditioning, host, loaders, lora, sampler, vae

NODE_CLASS_MAPPINGS = {
    "FluxCoreKleinModelLoader": loaders.KleinModelLoader,
    "FluxCoreZImageModelLoader": loaders.ZImageModelLoader,
    "FluxCoreTextEncoderLoader": loaders.TextEncoderLoader,
    "FluxCoreVAELoader": loaders.VAELoader,
    "FluxCoreQwen3Encode": conditioning.Qwen3Encode,
    "FluxCoreReferenceImageEncode": conditioning.ReferenceImageEncode,
    "FluxCoreSampler": sampler.RectifiedFlowSampler,
    "FluxCoreVAEDecode": vae.VAEDecode,
    "FluxCoreVAEEncode": vae.VAEEncode,
    "FluxCoreLoraLoader": lora.LoraLoader,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxCoreKleinModelLoader": "FluxCore klein Model Loader",
    "FluxCoreZImageModelLoader": "FluxCore Z-Image Model Loader",
    "FluxCoreTextEncoderLoader": "FluxCore Text Encoder Loader (Qwen3)",
    "FluxCoreVAELoader": "FluxCore VAE Loader",
    "FluxCoreQwen3Encode": "FluxCore Qwen3 Encode",
    "FluxCoreReferenceImageEncode": "FluxCore Reference Image Encode",
    "FluxCoreSampler": "FluxCore Rectified-Flow Sampler",
    "FluxCoreVAEDecode": "FluxCore VAE Decode",
    "FluxCoreVAEEncode": "FluxCore VAE Encode",
    "FluxCoreLoraLoader": "FluxCore LoRA Loader",
}

if host.IN_COMFYUI:
    host.install_memory_hooks()
