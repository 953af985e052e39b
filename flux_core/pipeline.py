"""encode -> sample -> decode for FLUX.2 klein and Z-Image, with progress / interrupt / preview callbacks.

The stages are separate functions because the ComfyUI nodes call them one by one (text encode, reference encode,
sample, decode); `generate()` strings them together for the CLI. Everything matches diffusers' Flux2KleinPipeline and
ZImagePipeline given the same noise (tests/test_pipeline_*.py), and the noise is drawn the way diffusers and ComfyUI
draw it: `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` in float32, so a seed means the
same image everywhere.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import samplers, schedule, validate
from .backend import impl
from .errors import ConfigError
from .families import MAX_SEED
from .models import LoadedModel, check_pair, check_text_width

log = logging.getLogger(__name__)

REF_AREA_CAP = 1024 * 1024  # diffusers Flux2KleinPipeline: references above 1024² px are resized to that area
DEFAULT_SIZE = 1024         # output side when neither the caller, a reference nor an init latent sets it


@dataclass
class Conditioning:
    """Text features for one family. klein: tensor [B, 512, 3H]; Z-Image: list of [L_i, H] (real tokens only)."""
    mode: str
    embeds: object
    prompts: list[str]
    refs: list = field(default_factory=list)  # klein reference latents, each [1, 128, h, w] (native layout)

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def stacked(self) -> bool:
        """klein embeds are one padded tensor [B, 512, D]; Z-Image's a list of [L_i, D] (real tokens only)."""
        return not isinstance(self.embeds, (list, tuple))

    def with_reference(self, latent) -> "Conditioning":
        return Conditioning(self.mode, self.embeds, self.prompts, self.refs + [latent])

    def with_refs(self, refs) -> "Conditioning":
        return Conditioning(self.mode, self.embeds, self.prompts, list(refs))

    def feature_width(self) -> int:
        return int(self.embeds.shape[-1]) if self.stacked else int(self.embeds[0].shape[-1])

    def row(self, index: int) -> "Conditioning":
        """Prompt `index` as a batch of one (the references are kept)."""
        embeds = self.embeds[index:index + 1] if self.stacked else [self.embeds[index]]
        return Conditioning(self.mode, embeds, [self.prompts[index]], list(self.refs))

    def repeat(self, batch: int) -> "Conditioning":
        """A batch of one repeated `batch` times (one prompt, several images); a batch of `batch` as is."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ConfigError(f"the conditioning holds {self.batch} prompts but the batch size is {batch}")
        embeds = self.embeds.repeat(batch, 1, 1) if self.stacked else list(self.embeds) * batch
        return Conditioning(self.mode, embeds, self.prompts * batch, list(self.refs))


# ----------------------------------------------------------------------------------------------------------------
# 1. text

def encode_prompt(text_encoder: LoadedModel, prompts, mode: str) -> Conditioning:
    prompts = [prompts] if isinstance(prompts, str) or prompts is None else list(prompts)
    prompts = [validate.check_prompt(p) for p in prompts]
    return Conditioning(mode, text_encoder.module.encode(prompts, mode), prompts)


# ----------------------------------------------------------------------------------------------------------------
# 2. images in

def to_pil(image):
    """PIL image, HxWxC uint8/float array or [1,H,W,C] / [H,W,C] tensor in 0..1 -> RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ConfigError("one reference image at a time (got a batch of %d)" % arr.shape[0])
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or min(arr.shape[:2]) < 1:
        raise ConfigError(f"an image must be [H, W, 3] (RGB) or [H, W, 4] (RGBA), got shape {tuple(arr.shape)}; "
                          "convert it to RGB first")
    if arr.dtype != np.uint8:
        arr = (np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    return Image.fromarray(arr).convert("RGB")


def prepare_reference(image, multiple: int, keep_size: bool = False):
    """A reference image as diffusers prepares it: cap the area at 1024² (LANCZOS), then center-crop to a multiple of
    the VAE's latent cell (16 for the FLUX.2 VAE). Returns a float32 array [1, 3, H, W] in 0..1. `keep_size` skips
    the area cap (crop only)."""
    img = to_pil(image)
    w, h = img.size
    if min(w, h) < 64 or max(w, h) / min(w, h) > 8:
        raise ConfigError(f"reference image {w}x{h}: each side must be at least 64 px and the aspect ratio at most 8:1")
    if not keep_size and w * h > REF_AREA_CAP:
        from PIL import Image

        s = math.sqrt(REF_AREA_CAP / (w * h))
        img = img.resize((int(w * s), int(h * s)), Image.Resampling.LANCZOS)
        w, h = img.size
    cw, ch = (w // multiple) * multiple, (h // multiple) * multiple
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr.transpose(2, 0, 1)[None].copy()


def encode_image(vae: LoadedModel, pixels01, tile="auto"):
    """[B,3,H,W] 0..1 (numpy or backend array) -> latent in the model's native layout. tile: auto | off | pixels."""
    x = _to_backend(pixels01, vae)
    return vae.module.encode(x, tile=tile_for(vae, tile, int(x.shape[-2]), int(x.shape[-1])))


def encode_reference(vae: LoadedModel, image, keep_size: bool = False, tile="auto"):
    return encode_image(vae, prepare_reference(image, vae.module.downscale, keep_size), tile)


def tile_for(vae: LoadedModel, option, height: int, width: int) -> int | None:
    """The VAE tile side in pixels for an image of height x width (None: one pass), from the option (auto | off |
    pixels), the image size and, where known (CUDA), the free device memory (flux_core/tiling.py)."""
    from . import memory, tiling

    free = impl(vae.backend).free_bytes(vae.device) if tiling.parse_option(option) == "auto" else None
    return tiling.resolve_tile(option, height, width, memory.DTYPE_BYTES[vae.dtype], free)


# ----------------------------------------------------------------------------------------------------------------
# 3. sampling

def make_noise(seed: int, batch: int, channels: int, h: int, w: int):
    """The seed's noise, float32 on the CPU, exactly as diffusers and ComfyUI draw it."""
    import torch

    if not 0 <= int(seed) <= MAX_SEED:
        raise ConfigError(f"seed must be in 0..{MAX_SEED}, got {seed}")
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((batch, channels, h, w), generator=g, dtype=torch.float32)


def latent_size(model: LoadedModel, width: int, height: int) -> tuple[int, int, int]:
    """(channels, h, w) of the native latent for an image of width x height."""
    return model.family.latent_shape(model.module.config, width, height)


def check_size(width: int, height: int, multiple: int, max_side: int = validate.MAX_SIDE) -> tuple[int, int]:
    """Floored to `multiple` (as diffusers does); the floored size is what runs and what the metadata records."""
    if width is None or height is None:
        raise ConfigError("width and height are required")
    w2, h2 = validate.check_size(width, height, multiple, max_side)
    if (w2, h2) != (width, height):
        log.warning("fluxcore: %dx%d is not a multiple of %d; using %dx%d (as diffusers does)",
                    width, height, multiple, w2, h2)
    return w2, h2


@dataclass
class Request:
    """A sampling job after every rule that the CLI, the Python API and the sampler node share has been applied."""
    cond: Conditioning
    uncond: Conditioning | None   # set only when CFG runs
    width: int
    height: int
    steps: int
    guidance: float
    batch: int
    init_latent: object = None
    strength: float = 1.0

    @property
    def cfg(self) -> bool:
        return self.uncond is not None


def prepare(model: LoadedModel, cond: Conditioning, uncond: Conditioning | None = None, *,
            width: int | None = None, height: int | None = None, steps: int | None = None,
            guidance: float | None = None, batch_size: int | None = None, init_latent=None,
            strength: float | None = None) -> Request:
    """The sampling rules, in one place: variant defaults for steps / guidance (None = default); the output size
    (None = the init latent's, else the first reference's, else 1024; floored to the family's multiple); the
    batch (an init latent sets it, a batch of one is repeated); the negative sees the positive's references; CFG
    needs a negative; references and init images only where the family takes them. Every value is checked here
    (validate.py) before any work: steps 1..MAX_STEPS, guidance finite >= 0, batch >= 1, strength in (0, 1] and only
    with an init latent, sides within the model's position range."""
    variant, family = model.variant, model.family
    steps, guidance = validate.check_steps(steps), validate.check_guidance(guidance)
    strength = validate.check_strength(strength, init_latent is not None, init_name="an init image / latent")
    if batch_size is not None:
        validate.check_batch(batch_size)
    if cond.mode != variant.text_mode:
        raise ConfigError(f"the conditioning was encoded in {cond.mode} mode but the model is {variant.name}: set "
                          f"the text encoder's mode to {variant.text_mode}")
    if cond.refs and not family.references:
        raise ConfigError(f"reference images are not a {family.title} feature; for Z-Image use an init image "
                          "(img2img: VAE Encode into the sampler's latent input, or --init-image)")
    if init_latent is not None and not family.img2img:
        raise ConfigError(f"image-to-image from an init latent is not a {family.title} feature; for klein pass "
                          "reference images instead")
    check_text_width(model, cond.feature_width())
    steps = variant.steps if steps is None else int(steps)
    guidance = variant.guidance if guidance is None else float(guidance)
    batch = int(batch_size or cond.batch)
    if init_latent is not None:
        if int(init_latent.shape[0]) == 1 and batch > 1:
            init_latent = init_latent.repeat(batch, 1, 1, 1)
        batch = int(init_latent.shape[0])
        auto = family.image_size(init_latent)   # img2img: the latent fixes the size
        width, height = auto
    elif cond.refs:
        auto = family.image_size(cond.refs[0])  # diffusers: the output size defaults to the first reference's
    else:
        auto = (DEFAULT_SIZE, DEFAULT_SIZE)
    width, height = check_size(auto[0] if width is None else width, auto[1] if height is None else height,
                               family.size_multiple,
                               validate.size_limit(model.module.config, family))
    cond = cond.repeat(batch)
    use_cfg = family.uses_cfg(guidance, variant.distilled)
    if use_cfg and uncond is None:
        raise ConfigError(f"{variant.name} at guidance {guidance:g} uses CFG and needs a negative conditioning (an "
                          "empty negative prompt is the usual one): link Qwen3 Encode's negative output to the "
                          "sampler, or lower the guidance to turn CFG off.")
    if use_cfg:
        uncond = (uncond if uncond.refs else uncond.with_refs(cond.refs)).repeat(batch)
    return Request(cond, uncond if use_cfg else None, width, height, steps, guidance, batch, init_latent,
                   1.0 if strength is None else strength)


@dataclass
class SampleResult:
    latent: object            # native layout, float32, on the backend's device
    seed: int
    steps: int
    guidance: float
    sigmas: np.ndarray
    width: int = 0
    height: int = 0
    cfg: bool = False
    sampler: str = samplers.DEFAULT_SAMPLER


def sample(model: LoadedModel, cond: Conditioning, uncond: Conditioning | None = None, *,
           width: int | None = None, height: int | None = None, steps: int | None = None,
           guidance: float | None = None, seed: int = 0, noise=None, batch_size: int | None = None,
           init_latent=None, strength: float | None = None, sampler: str = samplers.DEFAULT_SAMPLER,
           callback: Callable | None = None, interrupt: Callable[[], bool] | None = None) -> SampleResult:
    """The denoising loop, shared by both families and both backends (after `prepare`'s rules).

    noise: optional explicit float32 [B, C, h, w] (the seed's noise otherwise). init_latent + strength < 1: start
    from the encoded image at σ[start] (image-to-image). callback(step, total, latent) after every step;
    interrupt() is polled before every step and raises Interrupted. sampler: "euler" (what diffusers and the
    reference pipelines do) or "res_multistep" (ComfyUI's, as in its official Z-Image template); see samplers.py."""
    samplers.check_sampler(sampler)
    model.activate()   # a LoRA'd handle shares its module with the base: merge this handle's LoRAs (no-op if held)
    req = prepare(model, cond, uncond, width=width, height=height, steps=steps, guidance=guidance,
                  batch_size=batch_size, init_latent=init_latent, strength=strength)
    family = model.family
    c, h, w = latent_size(model, req.width, req.height)
    if noise is None:
        noise = make_noise(seed, req.batch, c, h, w)
    elif tuple(noise.shape) != (req.batch, c, h, w):
        raise ConfigError(f"noise shape {tuple(noise.shape)} != expected {(req.batch, c, h, w)}")
    sigmas = family.sigmas(req.steps, req.width, req.height)
    start = 0
    if req.init_latent is not None and req.strength < 1.0:
        start = schedule.img2img_start(sigmas, req.strength)
        if start >= req.steps:
            raise ConfigError(f"strength {req.strength} with {req.steps} steps leaves no step to run; raise "
                              "strength or steps")
    ops = impl(model.backend, "runtime")
    denoise = ops.make_denoiser(model, req.cond, req.uncond, req.guidance, req.batch, h, w)
    x = ops.initial_latent(noise, req.init_latent, sigmas[start], model)
    x = samplers.run(sampler, denoise, x, sigmas, family, start, callback, interrupt, ops)
    return SampleResult(x, int(seed), req.steps, req.guidance, sigmas, req.width, req.height, req.cfg, sampler)


def euler(denoise, x, sigmas, family, start: int = 0, callback=None, interrupt=None, ops=None):
    """x <- x + (σ_{i+1} − σ_i)·v, with v in the FLUX convention (noise − x0); float32 between steps."""
    return samplers.run("euler", denoise, x, sigmas, family, start, callback, interrupt, ops)


def _to_backend(arr, model: LoadedModel):
    return impl(model.backend, "runtime").to_backend(arr, model)


# ----------------------------------------------------------------------------------------------------------------
# 4. decode and the whole thing

def decode(vae: LoadedModel, latent, tile="auto"):
    """Native latent -> float32 numpy images [B, H, W, 3] in 0..1 (ComfyUI's IMAGE layout). tile: auto | off |
    pixels (auto: tiled above ~2 MP or when the untiled pass would not fit in free device memory)."""
    z = _to_backend(latent, vae)
    s = vae.module.downscale
    images = vae.module.decode(z, tile=tile_for(vae, tile, int(z.shape[-2]) * s, int(z.shape[-1]) * s))
    return impl(vae.backend, "runtime").to_numpy(images).transpose(0, 2, 3, 1)


def preview(latent, family):
    """A cheap RGB preview [h, w, 3] of a native latent (no VAE): the mean of channel groups, for step previews."""
    arr = np.asarray(latent[0], dtype=np.float32)
    g = family.preview_group  # klein: 4·zc channels = zc VAE channels x 2x2 patch (c·4 + ph·2 + pw): average each
    if g > 1:
        arr = arr.reshape(-1, g, *arr.shape[1:]).mean(1)
    rgb = np.stack([arr[i::3].mean(0) for i in range(3)], -1)
    lo, hi = np.percentile(rgb, 1), np.percentile(rgb, 99)
    return np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1)


@dataclass
class Generation:
    images: np.ndarray          # [B, H, W, 3] 0..1
    latent: object              # native layout
    seed: int
    params: dict


def generate(transformer: LoadedModel, text_encoder: LoadedModel, vae: LoadedModel, prompt: str, *,
             negative_prompt: str = "", width: int | None = None, height: int | None = None,
             steps: int | None = None, guidance: float | None = None, seed: int = 0, batch_size: int = 1,
             references=(), init_image=None, strength: float | None = None, noise=None,
             sampler: str = samplers.DEFAULT_SAMPLER, callback=None, interrupt=None,
             release_text_encoder: bool | None = None, vae_tile="auto") -> Generation:
    """The whole job. References and the init image may be paths or images; `strength` (0..1, default 1) only with
    an init image. `release_text_encoder`: drop the text encoder from memory once the prompts are encoded
    (None = automatically on devices with less than 32 GB, as flux.c and mflux do). `vae_tile`: auto | off | pixels
    for every VAE pass (references, init image, decode). Every input is checked before the first model call."""
    from . import backend as backends
    from .models import release

    variant, family = transformer.variant, transformer.family
    samplers.check_sampler(sampler)
    check_pair(transformer, vae)
    references, init_image = _check_inputs(transformer, prompt, negative_prompt, width, height, steps, guidance,
                                           seed, batch_size, references, init_image, strength)
    if references and not family.references:
        raise ConfigError(f"reference images are not a {family.title} feature; for Z-Image use an init image (img2img)")
    if init_image is not None and not family.img2img:
        raise ConfigError(f"init-image/strength (img2img) is not a {family.title} feature; for klein pass "
                          "--reference images")
    cond = encode_prompt(text_encoder, [prompt], variant.text_mode)
    g = variant.guidance if guidance is None else guidance
    uncond = None
    if family.uses_cfg(g, variant.distilled):
        uncond = encode_prompt(text_encoder, [negative_prompt], variant.text_mode)
    if release_text_encoder is None:
        release_text_encoder = backends.device_memory_gb(text_encoder.backend, text_encoder.device) < backends.LOW_MEMORY_GB
    if release_text_encoder:
        log.info("fluxcore: releasing the text encoder after encoding (low-memory device or asked)")
        release(text_encoder)
        text_encoder.module.release()
    for ref in references:
        cond = cond.with_reference(encode_reference(vae, ref, tile=vae_tile))
    init_latent = None
    if init_image is not None:
        pil = to_pil(init_image)
        m = family.size_multiple
        size = (width or pil.size[0] // m * m, height or pil.size[1] // m * m)
        pil = pil.resize(size, _lanczos()) if pil.size != size else pil
        init_latent = encode_image(vae, (np.asarray(pil, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None],
                                   vae_tile)
    res = sample(transformer, cond, uncond, width=width, height=height, steps=steps, guidance=guidance, seed=seed,
                 noise=noise, batch_size=batch_size, init_latent=init_latent, strength=strength,
                 sampler=sampler, callback=callback, interrupt=interrupt)
    images = decode(vae, res.latent, vae_tile)
    if transformer.backend == "mlx":
        backends.empty_cache()  # MLX keeps freed buffers in its cache until told; clear between generations
    params = {"model": variant.name, "prompt": prompt, "negative_prompt": negative_prompt, "seed": res.seed,
              "steps": res.steps, "sampler": res.sampler, "guidance": res.guidance, "width": res.width,
              "height": res.height,
              "references": len(references), "strength": None if init_image is None else (strength or 1.0),
              "backend": transformer.backend, "dtype": transformer.dtype}
    return Generation(images, res.latent, res.seed, params)


def _check_inputs(transformer, prompt, negative_prompt, width, height, steps, guidance, seed, batch_size,
                  references, init_image, strength):
    """generate()'s inputs, all checked before the first model call; returns the opened images."""
    family = transformer.family
    validate.check_prompt(prompt), validate.check_prompt(negative_prompt, "negative_prompt")
    validate.check_batch(batch_size), validate.check_seed(seed)
    validate.check_steps(steps), validate.check_guidance(guidance)
    validate.check_strength(strength, init_image is not None)
    if width is not None or height is not None:
        limit = validate.size_limit(transformer.module.config, family)
        validate.check_size(limit if width is None else width, limit if height is None else height,
                            family.size_multiple, limit)
    refs = [validate.open_image(r, "reference" if isinstance(r, (str, os.PathLike)) else f"reference {i + 1}",
                                validate.MIN_REFERENCE_SIDE) for i, r in enumerate(references)]
    init = None if init_image is None else validate.open_image(init_image, "init image", family.size_multiple)
    return refs, init


def _lanczos():
    from PIL import Image

    return Image.Resampling.LANCZOS
