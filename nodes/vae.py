"""VAE Decode (LATENT -> IMAGE) and VAE Encode (IMAGE -> LATENT) in ComfyUI's native data conventions."""
from __future__ import annotations

from flux_core.families import VAE_KINDS

from .common import CATEGORY, VAE, VAE_TILE_OPTIONS, VAE_TILE_TIP, describe, from_comfy_latent, to_comfy_latent, ui

_CATEGORY = CATEGORY + "/latent"


class VAEDecode:
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("Images [B,H,W,3], 0..1, for Save Image / Preview Image.",)
    FUNCTION = "decode"
    CATEGORY = _CATEGORY
    DESCRIPTION = ("Decodes a latent with a FluxCore VAE into a native IMAGE. Accepts our sampler's LATENT and "
                   "native ones of the same family (EmptyFlux2LatentImage-sized for klein, SD3/FLUX.1 16-channel "
                   "latents for Z-Image).")
    SEARCH_ALIASES = ["vae decode", "decode", "latent to image"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE, {"tooltip": "From the FluxCore VAE Loader (the same family as the model)."}),
            "samples": ("LATENT", {"tooltip": "The latent to decode, e.g. from the FluxCore sampler."}),
            "tile": (VAE_TILE_OPTIONS, {"default": "auto", "tooltip": VAE_TILE_TIP}),
        }}

    def decode(self, vae, samples, tile="auto"):
        import torch

        from flux_core import pipeline

        v = vae.load()
        z = from_comfy_latent(samples, VAE_KINDS[v.module.kind], v.module.latent_channels, "VAE Decode")
        images = torch.from_numpy(pipeline.decode(v, z, tile).copy()).float()
        return ui(describe(v, f"{images.shape[2]}x{images.shape[1]}"), (images,))


class VAEEncode:
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The image's latent (native LATENT), e.g. for the sampler's latent input (image-to-image).",)
    FUNCTION = "encode"
    CATEGORY = _CATEGORY
    DESCRIPTION = ("Encodes a native IMAGE with a FluxCore VAE into a native LATENT (the posterior mean, as the "
                   "pipelines do). The image is center-cropped to a multiple of the VAE's scale (16 for FLUX.2, 8 "
                   "for FLUX.1).")
    SEARCH_ALIASES = ["vae encode", "encode image", "image to latent", "img2img"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE, {"tooltip": "From the FluxCore VAE Loader."}),
            "pixels": ("IMAGE", {"tooltip": "Images [B,H,W,C] 0..1, e.g. from Load Image (alpha is dropped)."}),
            "tile": (VAE_TILE_OPTIONS, {"default": "auto", "tooltip": VAE_TILE_TIP}),
        }}

    def encode(self, vae, pixels, tile="auto"):
        from flux_core import pipeline

        v = vae.load()
        x = crop_to_multiple(rgb(pixels), v.module.downscale)                     # [B, H, W, 3]
        z = pipeline.encode_image(v, x.permute(0, 3, 1, 2).contiguous().float().cpu().numpy(), tile)
        latent = to_comfy_latent(z, VAE_KINDS[v.module.kind])
        return ui(describe(v, f"{x.shape[2]}x{x.shape[1]}"), (latent,))


def rgb(images):
    """A native IMAGE [B,H,W,C] as RGB: alpha dropped, grey repeated; other channel counts are refused."""
    from flux_core.errors import ConfigError

    channels = int(images.shape[-1]) if images.ndim == 4 else 0
    if channels not in (1, 3, 4):
        raise ConfigError(f"VAE Encode needs an IMAGE [B, H, W, 3] (RGB; RGBA and greyscale are converted), got "
                          f"shape {tuple(images.shape)} with {channels} channels: feed it from Load Image or convert "
                          "the image to RGB")
    return images.repeat(1, 1, 1, 3) if channels == 1 else images[..., :3]


def crop_to_multiple(images, multiple: int):
    """Center crop [B,H,W,C] so both sides are multiples of `multiple` (native VAEEncode crops the same way)."""
    from flux_core.errors import ConfigError

    h, w = int(images.shape[1]), int(images.shape[2])
    h2, w2 = h // multiple * multiple, w // multiple * multiple
    if h2 == 0 or w2 == 0:
        raise ConfigError(f"the image is {w}x{h}; the VAE needs at least {multiple}x{multiple} pixels")
    top, left = (h - h2) // 2, (w - w2) // 2
    return images[:, top:top + h2, left:left + w2]
