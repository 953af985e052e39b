"""The Rectified-Flow Sampler node: one Euler loop for klein and Z-Image (flux_core.pipeline.sample).

Defaults come from the model's variant: steps 0 and guidance -1 mean "the variant's default" (klein distilled 4
steps without CFG, klein base 50 steps at CFG 4, Z-Image-Turbo 8 steps at guidance 0), and width/height 0 mean
"the first reference image's size, else the input latent's, else 1024".
"""
from __future__ import annotations

import logging

from flux_core.errors import ConfigError

from . import host
from .common import (CATEGORY, CONDITIONING, MODEL, check_latent_channels, describe, from_comfy_latent,
                     to_comfy_latent, to_cpu_tensor, ui)

log = logging.getLogger(__name__)

MAX_SEED = 0xFFFFFFFFFFFFFFFF  # the noise generator takes 64-bit seeds (as native KSampler)
MAX_SIZE = 8192
DEFAULT_SIZE = 1024


def repeat_batch(cond, batch: int):
    """A batch-of-one Conditioning repeated `batch` times (the nodes encode one prompt; the sampler makes the batch)."""
    from flux_core.pipeline import Conditioning

    if cond.batch == batch:
        return cond
    if cond.batch != 1:
        raise ConfigError(f"the conditioning holds {cond.batch} prompts but the batch size is {batch}")
    embeds = cond.embeds.repeat(batch, 1, 1) if cond.mode == "klein" else cond.embeds * batch
    return Conditioning(cond.mode, embeds, cond.prompts * batch, list(cond.refs))


def with_refs(uncond, refs):
    """The negative sees the positive's references (diffusers and ComfyUI's edit templates do the same)."""
    from flux_core.pipeline import Conditioning

    if uncond is None or uncond.refs or not refs:
        return uncond
    return Conditioning(uncond.mode, uncond.embeds, uncond.prompts, list(refs))


def output_size(width: int, height: int, cond, init, family: str, model_factor: int) -> tuple[int, int]:
    """0 = automatic: the first reference's size (klein edits, as diffusers), else the latent's, else 1024."""
    if init is not None:  # img2img: the latent fixes the size
        return int(init.shape[-1]) * model_factor, int(init.shape[-2]) * model_factor
    if width and height:
        return int(width), int(height)
    if cond.refs:
        ref = cond.refs[0]
        auto = int(ref.shape[-1]) * 16, int(ref.shape[-2]) * 16  # klein reference latents are 16x (FLUX.2 VAE)
    else:
        auto = DEFAULT_SIZE, DEFAULT_SIZE
    return int(width) or auto[0], int(height) or auto[1]


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
                   "denoise strength.")
    SEARCH_ALIASES = ["ksampler", "sampler", "euler", "flow matching", "generate", "txt2img", "img2img"]

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
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "With a latent input: how much to change it (1 = ignore the image, "
                                             "0.6 = keep its layout)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def sample(self, model, positive, seed, steps, guidance, width, height, batch_size, negative=None, latent=None,
               denoise=1.0, unique_id=None):
        from flux_core import pipeline, schedule

        m = model.load()
        v = m.variant
        factor = 16 if v.family == "klein" else 8
        init = None
        if latent is not None:
            init = from_comfy_latent(latent, v.family)
            check_latent_channels(init, m.module.config.in_channels, "sampler latent input")
            if init.shape[0] == 1 and batch_size > 1:
                init = init.repeat(batch_size, 1, 1, 1)
        batch = int(init.shape[0]) if init is not None else int(batch_size)
        w, h = output_size(width, height, positive, init, v.family, factor)
        steps_used = v.steps if steps == 0 else int(steps)
        g = v.guidance if guidance < 0 else float(guidance)
        cond = repeat_batch(positive, batch)
        uncond = repeat_batch(with_refs(negative, positive.refs), batch) if negative is not None else None
        if schedule.uses_cfg(v.family, g, v.distilled) and uncond is None:
            raise ConfigError(f"{v.name} at guidance {g:g} uses CFG: link Qwen3 Encode's negative output to the "
                              "sampler's negative input (or set guidance to -1 / 0 for no CFG).")
        progress = host.Progress(steps_used, node_id=unique_id)
        previews = host.previews_enabled()

        def callback(step, total, x):
            rgb = None
            if previews:
                try:
                    rgb = pipeline.preview(to_cpu_tensor(x[:1]).numpy(), v.family)
                except Exception:  # a preview must never fail the run
                    log.debug("fluxcore: step preview failed", exc_info=True)
            progress.update(step, total, rgb)

        res = pipeline.sample(m, cond, uncond, width=w, height=h, steps=steps_used, guidance=g, seed=int(seed),
                              init_latent=init, strength=float(denoise) if init is not None else 1.0,
                              callback=callback, interrupt=host.check_interrupt)
        cfg = f"cfg {res.guidance:g}" if schedule.uses_cfg(v.family, g, v.distilled) else "no cfg"
        extra = f"{res.steps} steps · {cfg} · {w}x{h}" + (f" · denoise {denoise:g}" if init is not None else "")
        return ui(describe(m, extra), (to_comfy_latent(res.latent, v.family),))
