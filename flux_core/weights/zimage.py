"""Z-Image transformer checkpoints: the original (Tongyi / ComfyUI single file) layout is ours; diffusers maps onto it.

Layouts seen in the wild:
  original   `layers.N.attention.qkv.weight` (fused q,k,v), `attention.out`, `attention.q_norm/k_norm`, `x_embedder`,
             `final_layer.*`; ComfyUI files carry a `model.diffusion_model.` prefix, some exports only `model.` or
             `diffusion_model.`. Some files also carry a stray, unused `norm_final.weight`, which we drop (diffusers'
             own converter drops it too: `D/loaders/single_file_utils.py`,
             `convert_z_image_transformer_checkpoint_to_diffusers`).
  diffusers  `to_q/to_k/to_v` split, `to_out.0`, `norm_q/norm_k`, and the embedder / final layer inside
             `all_x_embedder.2-1` / `all_final_layer.2-1` (ModuleDicts keyed "patch-fpatch"; every published model
             is 2-1).
Everything else (feed_forward, the four sandwich norms, adaLN_modulation, t_embedder, cap_embedder, pad tokens) has
the same name in both. docs/MODELS.md §Z4 lists the real-size table.
"""
from __future__ import annotations

import re
from typing import Mapping

from ..errors import WeightError
from .keymap import KeyMap, Rule, strip_prefix

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
BLOCK_KINDS = ("layers", "noise_refiner", "context_refiner")
# Keys that only a Z-Image transformer has (after a prefix): flux_core.families detects the family by them.
MARKERS = ("cap_embedder.1.weight", "cap_pad_token", "x_pad_token")
# The diffusers converter pops this key; it belongs to no module (the final LayerNorm has no affine).
STRAY = ("norm_final.weight",)


def _attention_rules(kind: str) -> list[Rule]:
    a = kind + ".{n}.attention."
    return [
        Rule(a + "qkv.weight", (a + "to_q.weight", a + "to_k.weight", a + "to_v.weight"), op="cat"),
        Rule(a + "out.weight", a + "to_out.0.weight"),
        Rule(a + "q_norm.weight", a + "norm_q.weight"),
        Rule(a + "k_norm.weight", a + "norm_k.weight"),
    ]


DIFFUSERS = KeyMap(
    rules=[r for kind in BLOCK_KINDS for r in _attention_rules(kind)] + [
        Rule("x_embedder.weight", "all_x_embedder.2-1.weight"),
        Rule("x_embedder.bias", "all_x_embedder.2-1.bias"),
        Rule("final_layer.linear.weight", "all_final_layer.2-1.linear.weight"),
        Rule("final_layer.linear.bias", "all_final_layer.2-1.linear.bias"),
        # Scale only (no shift), so no half-swap here, unlike FLUX.2's final adaLN.
        Rule("final_layer.adaLN_modulation.1.weight", "all_final_layer.2-1.adaLN_modulation.1.weight"),
        Rule("final_layer.adaLN_modulation.1.bias", "all_final_layer.2-1.adaLN_modulation.1.bias"),
    ],
    ignore=tuple("^" + k.replace(".", r"\.") + "$" for k in STRAY),
)

# Keys that identify each layout (after prefix stripping).
_DIFFUSERS_MARKS = ("all_x_embedder.", ".attention.to_q.weight")
_ORIGINAL_MARKS = ("x_embedder.weight", ".attention.qkv.weight")


def detect_layout(sd: Mapping) -> str | None:
    """'diffusers', 'original' or None (not a Z-Image transformer) for a state dict with or without prefixes."""
    keys = list(strip_prefix(dict.fromkeys(sd), PREFIXES))
    has_refiner = any(k.startswith("noise_refiner.") for k in keys) and any(k.startswith("cap_embedder.") for k in keys)
    if not has_refiner:
        return None
    if any(m in k for k in keys for m in _DIFFUSERS_MARKS):
        return "diffusers"
    if any(k == _ORIGINAL_MARKS[0] or k.endswith(_ORIGINAL_MARKS[1]) for k in keys):
        return "original"
    return None


def to_native(sd: Mapping) -> dict:
    """Any supported Z-Image transformer layout -> our (original-key) layout. Shapes are checked later, at load."""
    layout = detect_layout(sd)
    if layout is None:
        sample = ", ".join(sorted(sd)[:6])
        raise WeightError("this is not a Z-Image transformer checkpoint (no noise_refiner / cap_embedder / x_embedder "
                          f"keys found; first keys: {sample}). Pick the Z-Image diffusion model file, not the text "
                          "encoder, the VAE or a LoRA.")
    sd = strip_prefix(sd, PREFIXES)
    sd = {k: v for k, v in sd.items() if k not in STRAY}
    return DIFFUSERS.to_native(sd) if layout == "diffusers" else sd


def to_diffusers(native_sd: Mapping) -> dict:
    """Ours -> diffusers names (the inverse map); used for fixtures and key-table checks."""
    return DIFFUSERS.from_native(native_sd)


def size_name(config) -> str:
    """Z-Image has one published size; variant names do not carry it."""
    return ""


# ------------------------------------------------------------------------------------------------ LoRA files
# (flux_core/lora/names.py) see the same block in weights/klein.py
_SEP = "[._]"
LORA_MODULES = re.compile(rf"(^|{_SEP})(layers|noise{_SEP}refiner|context{_SEP}refiner){_SEP}\d+{_SEP}"
                          rf"(attention|feed{_SEP}forward|adaLN)")
LORA_WIDTH_MODULES = re.compile(rf"attention{_SEP}(qkv|to{_SEP}q)$")


def model_width(shapes: Mapping) -> int | None:
    if "x_embedder.weight" not in shapes or not any(k.startswith("noise_refiner.") for k in shapes):
        return None
    return int(shapes["x_embedder.weight"][0])


def describe_width(width: int | None) -> str:
    return "Z-Image" if width in (3840, None) else f"Z-Image (width {width})"
