"""One registry of what differs between the model families we run (FLUX.2 [klein], Z-Image), and their variants.

Everything outside this file and the per-family model files (`flux_core/{torch,mlx}/<module>.py`,
`flux_core/weights/<module>.py`) asks a `Family` instead of comparing family names: the latent geometry, which VAE
and text encoding pair with it, the sigma schedule, what the network is fed as time and what it returns, the CFG
convention, how a checkpoint is recognised, and the per-variant defaults. Adding a third family is one entry in
`FAMILIES` plus its model and key-map files.

  klein   σ = e^μ / (e^μ + (1/s − 1)), μ from the image-token count; t = σ; the network predicts v = noise − x0;
          CFG (base models only, g > 1) = neg + g·(pos − neg). Latent [B, 128, H/16, W/16] (FLUX.2 VAE, 2x2 patches).
  Z-Image σ = 3s / (1 + 2s) (static shift 3); t = 1 − σ; the network predicts x0 − noise (so v = −output);
          CFG (g > 0, "extra" guidance) = pos + g·(pos − neg). Latent [B, 16, H/8, W/8] (FLUX.1 VAE).
(docs/MODELS.md §S1-§S4 holds the derivations and the diffusers code each rule matches.)

Detection looks at keys, shapes and metadata, never at the file name. The distilled/base split of klein and the
Turbo/base split of Z-Image are not visible in the weights (same architecture, same shapes): we read it from a
diffusers `model_index.json` (`is_distilled`), from safetensors metadata when an exporter wrote it, or from the
user's choice, defaulting to the distilled / Turbo model that most people download.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from . import schedule
from .configs import FLUX1_SCALE, FLUX1_SHIFT
from .errors import ConfigError, WeightError
from .weights import klein as klein_keys
from .weights import zimage as zimage_keys

MAX_SEED = 2**64 - 1  # seeds are 64-bit (torch.Generator.manual_seed, native ComfyUI's KSampler)


@dataclass(frozen=True)
class VaeKind:
    """The two FLUX VAEs, as a latent producer."""
    name: str              # "flux2" | "flux1"
    title: str             # what to tell a user to load
    downscale: int         # pixels per latent cell (FLUX.2 latents are 2x2-patchified: 16; FLUX.1: 8)
    comfy_scale: float     # ComfyUI's LATENT holds the raw VAE mean for FLUX.1; ours is normalised:
    comfy_shift: float     # comfy = ours / scale + shift (scale 1, shift 0 = the same)


# FLUX.1: diffusers AutoencoderKL config of Z-Image (scaling_factor 0.3611, shift_factor 0.1159) = ComfyUI's
# latent_formats.Flux. FLUX.2: the VAE's batch-norm normalises in both (ComfyUI latent_formats.Flux2 is identity).
VAE_KINDS = {
    "flux2": VaeKind("flux2", "the FLUX.2 VAE (flux2-vae.safetensors)", 16, 1.0, 0.0),
    "flux1": VaeKind("flux1", "the FLUX.1 VAE (ae.safetensors)", 8, FLUX1_SCALE, FLUX1_SHIFT),
}


@dataclass(frozen=True)
class Family:
    name: str                    # "klein" | "zimage"
    title: str                   # for messages
    module: str                  # model file in flux_core/torch/ and flux_core/mlx/, key map in flux_core/weights/
    keys: object                 # that key-map module (PREFIXES, MARKERS)
    latent_factor: int           # image pixels per native-latent cell, per side
    size_multiple: int           # image sides must be multiples of this (klein: the latent factor; Z-Image: 8 x patch 2)
    preview_group: int           # native channels per VAE channel (klein packs 2x2 patches: 4) for cheap previews
    vae_kind: str                # key of VAE_KINDS
    text_mode: str               # Qwen3 encoding (flux_core/text.py)
    text_width_field: str        # config field that the text features' width must equal
    sigmas_fn: Callable          # (steps, image tokens) -> N+1 float32 sigmas
    time_is_sigma: bool          # the network's time input: σ (klein) or 1 − σ (Z-Image)
    predicts_velocity: bool      # output v = noise − x0 (klein) or x0 − noise (Z-Image, negated by the sampler)
    cfg_from_negative: bool      # neg + g(pos − neg) (klein) vs pos + g(pos − neg) (Z-Image "extra" guidance)
    cfg_min_guidance: float      # CFG runs when guidance is above this ...
    cfg_on_distilled: bool       # ... and, for klein, only on base (undistilled) models
    references: bool             # accepts reference images (klein editing)
    img2img: bool                # accepts an init image + strength
    defaults: Mapping            # distilled? -> (steps, guidance)
    variant_names: Mapping       # distilled? -> name; "{size}" is filled from the weights

    # -------------------------------------------------------------- latents
    def latent_shape(self, config, width: int, height: int) -> tuple[int, int, int]:
        """(channels, h, w) of the native latent of a width x height image."""
        f = self.latent_factor
        return config.in_channels, height // f, width // f

    def image_size(self, latent) -> tuple[int, int]:
        """(width, height) in pixels of a native latent [..., h, w]."""
        return int(latent.shape[-1]) * self.latent_factor, int(latent.shape[-2]) * self.latent_factor

    @property
    def vae(self) -> VaeKind:
        return VAE_KINDS[self.vae_kind]

    # -------------------------------------------------------------- sampling rules
    def sigmas(self, steps: int, width: int, height: int) -> np.ndarray:
        f = self.latent_factor
        return self.sigmas_fn(steps, (height // f) * (width // f))

    def model_time(self, sigma) -> np.float32:
        """The scalar the network is conditioned on, rounded as diffusers computes it (σ·1000 in float32, /1000)."""
        t = np.float32(np.float32(sigma) * np.float32(1000.0))
        if self.time_is_sigma:
            return np.float32(t / np.float32(1000.0))
        return np.float32((np.float32(1000.0) - t) / np.float32(1000.0))

    def velocity(self, out):
        """Network output -> v = noise − x0 (works on torch tensors and mx arrays)."""
        return out if self.predicts_velocity else -out

    def cfg_combine(self, pos, neg, g: float):
        """Classifier-free guidance in the family's own convention (torch tensors and mx arrays alike)."""
        if self.cfg_from_negative:
            return neg + g * (pos - neg)
        return pos + g * (pos - neg)

    def uses_cfg(self, guidance: float, distilled: bool) -> bool:
        return (self.cfg_on_distilled or not distilled) and guidance > self.cfg_min_guidance

    def text_width(self, config) -> int:
        return int(getattr(config, self.text_width_field))

    # -------------------------------------------------------------- checkpoints
    def marker_key(self, keys) -> str | None:
        """The key (with whatever prefix the file uses) that marks a checkpoint of this family, if any."""
        for p in self.keys.PREFIXES + ("",):
            for m in self.keys.MARKERS:
                if p + m in keys:
                    return p + m
        return None

    def variant(self, distilled: bool, config=None) -> "Variant":
        steps, guidance = self.defaults[distilled]
        size = self.keys.size_name(config) if config is not None else ""
        name = self.variant_names[distilled].format(size=f"-{size}" if size else "")
        return Variant(name, self, distilled, steps, guidance)


@dataclass(frozen=True)
class Variant:
    name: str            # klein-4b, klein-9b-base, zimage-turbo, ...
    family: Family
    distilled: bool      # klein distilled / Z-Image Turbo: few steps, no CFG
    steps: int
    guidance: float

    @property
    def text_mode(self) -> str:
        return self.family.text_mode

    @property
    def vae_kind(self) -> str:
        return self.family.vae_kind

    @property
    def uses_cfg_by_default(self) -> bool:
        return self.family.uses_cfg(self.guidance, self.distilled)


FAMILIES: dict[str, Family] = {
    "klein": Family(
        name="klein", title="FLUX.2 [klein]", module="klein", keys=klein_keys,
        latent_factor=16, size_multiple=16, preview_group=4, vae_kind="flux2", text_mode="klein", text_width_field="context_in_dim",
        sigmas_fn=schedule.klein_sigmas, time_is_sigma=True, predicts_velocity=True,
        cfg_from_negative=True, cfg_min_guidance=1.0, cfg_on_distilled=False,
        references=True, img2img=False,
        # distilled: 4 steps, guidance ignored (diffusers is_distilled); base: 50 steps, g = 4 (Flux2KleinPipeline)
        defaults={True: (4, 1.0), False: (50, 4.0)},
        variant_names={True: "klein{size}", False: "klein{size}-base"}),
    "zimage": Family(
        name="zimage", title="Z-Image", module="zimage", keys=zimage_keys,
        latent_factor=8, size_multiple=16, preview_group=1, vae_kind="flux1", text_mode="zimage", text_width_field="cap_feat_dim",
        sigmas_fn=lambda steps, tokens: schedule.zimage_sigmas(steps), time_is_sigma=False,
        predicts_velocity=False, cfg_from_negative=False, cfg_min_guidance=0.0, cfg_on_distilled=True,
        references=False, img2img=True,
        # Turbo: 8 forwards, g = 0 (ZImagePipeline usage); base: 50 steps with CFG g = 4 ("extra" convention)
        defaults={True: (8, 0.0), False: (50, 4.0)},
        variant_names={True: "zimage-turbo", False: "zimage-base"}),
}


def by_text_mode(mode: str) -> Family:
    """The family whose prompts are encoded in Qwen3 mode `mode`."""
    for family in FAMILIES.values():
        if family.text_mode == mode:
            return family
    raise ConfigError(f"unknown text mode {mode!r}: one of {', '.join(f.text_mode for f in FAMILIES.values())}")


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}: one of {', '.join(FAMILIES)}") from None


def detect_family(sd) -> Family:
    """The family of a transformer checkpoint, from its keys (any layout, any prefix the key maps accept)."""
    keys = set(sd.keys())
    for family in FAMILIES.values():
        if family.marker_key(keys):
            return family
    if any("embed_tokens" in k for k in keys):
        raise WeightError("this file is a text encoder (Qwen3), not a diffusion model: pass it as the text encoder "
                          "(--text-encoder / the FluxCore text-encoder loader)")
    if any(k.endswith("decoder.conv_in.weight") for k in keys):
        raise WeightError("this file is a VAE, not a diffusion model: pass it as the VAE (--vae / the FluxCore VAE loader)")
    sample = ", ".join(sorted(keys)[:5])
    raise WeightError(f"not a FLUX.2 klein or Z-Image transformer (first keys: {sample}). Supported: "
                      "flux-2-klein-*.safetensors, z_image_*.safetensors, or a diffusers transformer/ folder.")


def read_is_distilled(source: str, metadata: dict | None = None, config: dict | None = None) -> bool | None:
    """`is_distilled` / turbo flag from metadata, a transformer config or the pipeline's model_index.json, if any."""
    for d in (metadata or {}, config or {}):
        if not isinstance(d, Mapping):
            continue
        for key in ("is_distilled", "fluxcore.distilled"):
            if key in d:
                v = d[key]
                return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
    p = Path(source)
    for folder in (p, p.parent, p.parent.parent):
        mi = folder / "model_index.json"
        if mi.is_file():
            try:
                data = json.loads(mi.read_text())
            except (ValueError, OSError, RecursionError):  # damaged: the variant falls back to the user's choice
                return None
            if not isinstance(data, dict):
                return None
            if "is_distilled" in data:
                return bool(data["is_distilled"])
            if str(data.get("_class_name", "")).startswith("Flux2Klein"):
                return False  # the -base- repos omit the flag (their model_index.json has no is_distilled)
            return None
    return None
