"""One registry of the model variants we run, their defaults, and how a checkpoint is recognised.

Detection looks at keys, shapes and metadata, never at the file name (HOUSE_STYLE 5). The distilled/base split of
FLUX.2 klein and the Turbo/base split of Z-Image are not visible in the weights (same architecture, same shapes): we
read it from a diffusers `model_index.json` (`is_distilled`), from safetensors metadata when an exporter wrote it,
or from the user's choice, defaulting to the distilled / Turbo model that most people download.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import WeightError


@dataclass(frozen=True)
class Variant:
    name: str            # klein-4b, klein-9b-base, zimage-turbo, ...
    family: str          # "klein" | "zimage"
    distilled: bool      # klein distilled / Z-Image Turbo: few steps, no CFG
    steps: int
    guidance: float
    text_mode: str       # Qwen3 encoding mode: "klein" | "zimage"
    vae_kind: str        # "flux2" | "flux1"

    @property
    def uses_cfg_by_default(self) -> bool:
        return not self.distilled


def make_variant(family: str, distilled: bool, size: str = "") -> Variant:
    if family == "klein":
        # distilled: 4 steps, guidance ignored (diffusers is_distilled); base: 50 steps, g = 4 (Flux2KleinPipeline defaults)
        steps, guidance = (4, 1.0) if distilled else (50, 4.0)
        name = f"klein{'-' + size if size else ''}{'' if distilled else '-base'}"
        return Variant(name, "klein", distilled, steps, guidance, "klein", "flux2")
    if family == "zimage":
        # Turbo: 8 forwards, g = 0 (REFERENCE §0.7, §2.5). Base: 50 steps with CFG, g = 4 in Z-Image's "extra" convention.
        steps, guidance = (8, 0.0) if distilled else (50, 4.0)
        return Variant("zimage-turbo" if distilled else "zimage-base", "zimage", distilled, steps, guidance,
                       "zimage", "flux1")
    raise ValueError(family)


# Keys that identify each family, in either layout, after any prefix.
_KLEIN_MARKERS = ("double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight")
_ZIMAGE_MARKERS = ("cap_embedder.1.weight", "cap_pad_token", "x_pad_token")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "")


def _find(keys, marker):
    for p in _PREFIXES:
        if p + marker in keys:
            return p + marker
    return None


def detect_family(sd) -> str:
    keys = set(sd.keys())
    if any(_find(keys, m) for m in _KLEIN_MARKERS):
        return "klein"
    if any(_find(keys, m) for m in _ZIMAGE_MARKERS):
        return "zimage"
    if any("embed_tokens" in k for k in keys):
        raise WeightError("this file is a text encoder (Qwen3), not a diffusion model: pass it as the text encoder "
                          "(--text-encoder / the FluxCore text-encoder loader)")
    if any(k.endswith("decoder.conv_in.weight") for k in keys):
        raise WeightError("this file is a VAE, not a diffusion model: pass it as the VAE (--vae / the FluxCore VAE loader)")
    sample = ", ".join(sorted(keys)[:5])
    raise WeightError(f"not a FLUX.2 klein or Z-Image transformer (first keys: {sample}). Supported: "
                      "flux-2-klein-*.safetensors, z_image_*.safetensors, or a diffusers transformer/ folder.")


def klein_size(hidden: int) -> str:
    return {3072: "4b", 4096: "9b"}.get(hidden, f"d{hidden}")


def read_is_distilled(source: str, metadata: dict | None = None, config: dict | None = None) -> bool | None:
    """`is_distilled` / turbo flag from metadata, a transformer config or the pipeline's model_index.json, if any."""
    for d in (metadata or {}, config or {}):
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
            except ValueError:
                return None
            if "is_distilled" in data:
                return bool(data["is_distilled"])
            if data.get("_class_name", "").startswith("Flux2Klein"):
                return False  # the -base- repos omit the flag (REFERENCE §1.1)
            return None
    return None
