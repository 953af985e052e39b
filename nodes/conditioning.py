"""Conditioning nodes: Qwen3 Encode (prompt + negative prompt) and Reference Image Encode (klein editing)."""
from __future__ import annotations

from flux_core.errors import ConfigError

from .common import CATEGORY, CONDITIONING, MODEL, TEXT_ENCODER, VAE, describe, ui

_CATEGORY = CATEGORY + "/conditioning"
MODES = ["auto", "klein", "zimage"]


def resolve_mode(mode: str, model) -> str:
    """auto -> the linked model's text mode; an explicit mode must agree with a linked model."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    linked = model.variant.text_mode if model is not None and model.variant is not None else None
    if mode == "auto":
        if linked is None:
            raise ConfigError("mode is auto but no model is linked: link the klein or Z-Image model loader's output "
                              "to this node's model input, or pick the mode (klein | zimage).")
        return linked
    if linked is not None and linked != mode:
        raise ConfigError(f"mode {mode} does not match the linked model ({model.variant.name}, which needs "
                          f"{linked}); set mode to auto.")
    return mode


class Qwen3Encode:
    RETURN_TYPES = (CONDITIONING, CONDITIONING)
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("The prompt's Qwen3 features.",
                       "The negative prompt's features (empty prompt by default): used by the sampler only with CFG "
                       "(klein base, or guidance > 0 on Z-Image).")
    FUNCTION = "encode"
    CATEGORY = _CATEGORY
    DESCRIPTION = ("Encodes a prompt (and a negative prompt) with Qwen3 the way each model was trained: klein reads "
                   "hidden layers 9, 18 and 27 of a 512-token chat template, Z-Image the second-to-last layer of its "
                   "own template. mode auto follows the linked model. Both prompts run in one batch.")
    SEARCH_ALIASES = ["clip text encode", "prompt", "text encode", "qwen3 encode", "conditioning"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (TEXT_ENCODER, {"tooltip": "From the FluxCore Text Encoder Loader."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                  "tooltip": "What the image should show (for klein edits: what to change)."}),
            "mode": (MODES, {"default": "auto",
                             "tooltip": "Which model the features are for. auto: from the linked model (link it)."}),
        }, "optional": {
            "model": (MODEL, {"tooltip": "Optional: the model these features are for; mode auto reads it."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "What to avoid; only used with CFG (klein base, Z-Image with "
                                                      "guidance > 0). Empty is the usual choice."}),
        }}

    def encode(self, text_encoder, prompt, mode, model=None, negative_prompt=""):
        from flux_core import pipeline

        mode = resolve_mode(mode, model)
        te = text_encoder.load()
        both = pipeline.encode_prompt(te, [prompt, negative_prompt or ""], mode)
        payload = describe(te, f"{mode} mode")
        return ui(payload, (both.row(0), both.row(1)))


class ReferenceImageEncode:
    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The input conditioning with the image's latent appended as a reference.",)
    FUNCTION = "encode"
    CATEGORY = _CATEGORY
    DESCRIPTION = ("Adds a reference image to a klein conditioning for editing and multi-reference generation. The "
                   "image is prepared as the FLUX.2 pipeline does (area capped at 1024x1024, center-cropped to a "
                   "multiple of 16), encoded with the FLUX.2 VAE and appended; chain several of these nodes for "
                   "several references (the first one sets the output size when the sampler's size is 0). The "
                   "sampler gives the negative the same references.")
    SEARCH_ALIASES = ["reference latent", "image edit", "edit image", "kontext", "multi reference", "ref image"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": (CONDITIONING, {"tooltip": "klein conditioning from Qwen3 Encode (or another "
                                                        "Reference Image Encode, to chain references)."}),
            "vae": (VAE, {"tooltip": "The FLUX.2 VAE (flux2-vae.safetensors)."}),
            "image": ("IMAGE", {"tooltip": "The reference image, e.g. from Load Image. A batch adds each image."}),
            "keep_size": ("BOOLEAN", {"default": False,
                                      "tooltip": "Off: cap the area at 1024x1024 as the pipeline does (faster). On: "
                                                 "keep the exact size (only cropped to a multiple of 16)."}),
        }}

    def encode(self, conditioning, vae, image, keep_size):
        from flux_core import pipeline

        check_reference_inputs(conditioning, vae)
        v = vae.load()
        cond, sizes = conditioning, []
        for i in range(int(image.shape[0])):
            latent = pipeline.encode_reference(v, image[i:i + 1], bool(keep_size))
            cond = cond.with_reference(latent)
            sizes.append(f"{int(latent.shape[-1]) * v.module.downscale}x{int(latent.shape[-2]) * v.module.downscale}")
        payload = describe(v, f"ref {len(cond.refs)}: {', '.join(sizes)}")
        return ui(payload, (cond,))


def check_reference_inputs(conditioning, vae) -> None:
    """References only for families that take them, encoded with that family's VAE (checked before any encoding)."""
    from flux_core.families import VAE_KINDS, by_text_mode

    family = by_text_mode(conditioning.mode)
    if not family.references:
        raise ConfigError(f"reference images are a FLUX.2 klein feature; this conditioning was encoded for "
                          f"{family.title}. For Z-Image, feed the image through VAE Encode into the sampler's latent "
                          "input.")
    if vae.family != family.vae_kind:
        raise ConfigError(f"{family.title} references need {VAE_KINDS[family.vae_kind].title}; this one is "
                          f"{VAE_KINDS[vae.family].title}.")
