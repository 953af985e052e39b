"""The Rectified-Flow Sampler node: one loop for klein and Z-Image (flux_core.pipeline.sample), Euler or res_multistep.

Defaults come from the model's variant: steps 0 and guidance -1 mean "the variant's default" (klein distilled 4
steps without CFG, klein base 50 steps at CFG 4, Z-Image-Turbo 8 steps at guidance 0), and width/height 0 mean
"the first reference image's size, else the input latent's, else 1024".
"""
from __future__ import annotations

from flux_core.families import MAX_SEED
from flux_core.samplers import DEFAULT_SAMPLER, SAMPLERS

from . import host
from .common import CATEGORY, CONDITIONING, MODEL, describe, from_comfy_latent, to_comfy_latent, ui

MAX_SIZE = 8192
DEFAULT_SIZE = 1024
SAMPLER_TIP = ("euler: the Euler loop of the reference pipelines (diffusers). res_multistep: ComfyUI's second-order "
               "sampler, one model call per step, as in ComfyUI's official Z-Image-Turbo template (the same image "
               "as that template at the same seed and steps).")


class RectifiedFlowSampler:
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised latent (native ComfyUI LATENT: klein [B,128,H/16,W/16], Z-Image [B,16,H/8,W/8]).",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY + "/sampling"
    DESCRIPTION = ("Samples an image latent with the rectified-flow Euler loop the model was trained for (the klein "
                   "and Z-Image schedules and CFG conventions of the reference pipelines; the same seed gives the "
                   "same image as diffusers). steps 0 and guidance -1 use the model variant's defaults; width/height "
                   "0 follow the first reference image. With a latent input it does image-to-image at the given "
                   "denoise strength. sampler res_multistep is ComfyUI's (its official Z-Image-Turbo template's).")
    SEARCH_ALIASES = ["ksampler", "sampler", "euler", "res_multistep", "flow matching", "generate", "txt2img",
                      "img2img"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "From a FluxCore klein or Z-Image Model Loader."}),
            "positive": (CONDITIONING, {"tooltip": "From Qwen3 Encode (with references attached for klein edits)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                             "tooltip": "Noise seed; the same seed gives the same image as diffusers."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": 200,
                              "tooltip": "Denoising steps. 0 = the variant's default (klein 4, klein base 50, "
                                         "Z-Image-Turbo 8)."}),
            "guidance": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                   "tooltip": "CFG scale. -1 = the variant's default (klein base 4, Z-Image-Turbo 0, "
                                              "distilled klein ignores it). Needs the negative when CFG is on."}),
            "width": ("INT", {"default": DEFAULT_SIZE, "min": 0, "max": MAX_SIZE, "step": 16,
                              "tooltip": "Image width in pixels, a multiple of 16. 0 = the first reference's width "
                                         "(or 1024)."}),
            "height": ("INT", {"default": DEFAULT_SIZE, "min": 0, "max": MAX_SIZE, "step": 16,
                               "tooltip": "Image height in pixels, a multiple of 16. 0 = the first reference's "
                                          "height (or 1024)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "Images per run (one noise draw for the whole batch, as diffusers)."}),
        }, "optional": {
            "negative": (CONDITIONING, {"tooltip": "Negative conditioning from Qwen3 Encode; used only with CFG."}),
            "latent": ("LATENT", {"tooltip": "Optional start latent for image-to-image (e.g. from VAE Encode); its "
                                             "size and batch replace width, height and batch size."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "With a latent input: how much to change it (1 = ignore the image, "
                                             "0.6 = keep its layout)."}),
            # last, so that workflows saved before it existed keep their positional widget values
            "sampler": (list(SAMPLERS), {"default": DEFAULT_SAMPLER, "tooltip": SAMPLER_TIP}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def sample(self, model, positive, seed, steps, guidance, width, height, batch_size, negative=None, latent=None,
               denoise=1.0, sampler=DEFAULT_SAMPLER, unique_id=None):
        from flux_core import pipeline, validate

        m = model.load()
        channels = m.module.config.in_channels
        init = None if latent is None else from_comfy_latent(latent, m.family.vae, channels, "sampler latent input")
        progress = host.Progress(m.variant.steps if steps == 0 else steps, node_id=unique_id, family=m.family)
        strength = None if init is None else validate.check_strength(denoise, True, "denoise", "a latent input")
        res = pipeline.sample(m, positive, negative, width=width or None, height=height or None, steps=steps or None,
                              guidance=None if guidance < 0 else guidance, seed=int(seed), batch_size=batch_size,
                              init_latent=init, strength=strength, sampler=sampler, callback=progress.step,
                              interrupt=host.check_interrupt)
        return ui(describe(m, badge(res, denoise if init is not None else None)),
                  (to_comfy_latent(res.latent, m.family.vae),))


def badge(res, denoise=None) -> str:
    cfg = f"cfg {res.guidance:g}" if res.cfg else "no cfg"
    steps = f"{res.steps} steps" + ("" if res.sampler == DEFAULT_SAMPLER else f" {res.sampler}")
    return f"{steps} · {cfg} · {res.width}x{res.height}" + (f" · denoise {denoise:g}" if denoise else "")
