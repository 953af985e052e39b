"""Which native weight a LoRA module name means: a lookup table built from the model's own parameter names.

The table holds, for every weight of the loaded model:
  * our native name (BFL / original checkpoint keys: `double_blocks.0.img_attn.qkv`),
  * every diffusers name that our key map (`weights/klein.py`, `weights/zimage.py` `DIFFUSERS` rules) turns into it:
    `copy` -> the whole weight, `cat` -> a row slice (q, k, v in order), `swap_halves` -> the whole weight with its
    two row halves swapped (klein `norm_out.linear` is [scale; shift], ours [shift; scale]),
  * and the kohya / LyCORIS flattening of each of those names (`.` -> `_`).
Names in the file are matched WHOLE against this table, never split on `_`: `adaLN_modulation`, `feed_forward`,
`to_q`, `img_attn`, `noise_refiner` all contain underscores, which is why splitting needs endless fix-ups
(diffusers' Z-Image converter, docs/LORA.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..families import FAMILIES, Family
from ..weights.keymap import _compile

# Stripped from a file's module names, repeatedly (`base_model.model.transformer.` has two).
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.",
            "lora_unet_", "lycoris_", "lora_transformer_")
TEXT_ENCODER_PREFIXES = ("text_encoders.", "text_encoder.", "text_model.", "lora_te_", "lora_te1_", "lora_te2_",
                         "lora_te3_", "base_model.model.text_encoder.", "te.", "qwen3")
WEIGHT_SUFFIXES = (".weight", ".scale")   # klein's QK norms are `.scale` in our layout


@dataclass(frozen=True)
class Target:
    key: str                          # our parameter name, e.g. "double_blocks.0.img_attn.qkv.weight"
    rows: tuple[int, int] | None      # row slice of that weight the source module is, or None for all rows
    swap: bool = False                # the source's row halves are swapped relative to ours
    split: bool = False               # came from a split (cat) source: preferred over a fused duplicate


def build_table(shapes: dict, family) -> dict[str, Target]:
    """module name (dotted or underscored, native or diffusers) -> Target, for every weight of the model.

    `shapes` maps our parameter keys to their logical shapes (quantized weights report [out, in])."""
    table: dict[str, Target | None] = {}

    def add(name: str, target: Target) -> None:
        for alias in (name, name.replace(".", "_")):
            old = table.get(alias, target)
            table[alias] = target if old == target else None   # an ambiguous flattening matches nothing

    for key in shapes:
        if key.endswith(WEIGHT_SUFFIXES):
            add(key.rsplit(".", 1)[0], Target(key, None))
    for rule in family.keys.DIFFUSERS.rules:
        if not rule.native.endswith(WEIGHT_SUFFIXES):   # a module's bias delta follows its weight's target
            continue
        pattern = _compile(rule.native)
        for key in shapes:
            m = pattern.match(key)
            if not m:
                continue
            names = [s.format(**m.groupdict()) for s in rule.sources]
            if rule.op == "cat":
                size = shapes[key][0] // len(names)
                for i, name in enumerate(names):
                    add(_module(name), Target(key, (i * size, (i + 1) * size), split=True))
            else:
                add(_module(names[0]), Target(key, None, swap=rule.op == "swap_halves"))
    return {k: v for k, v in table.items() if v is not None}


def _module(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


def strip_prefixes(name: str) -> str:
    for _ in range(3):
        for p in PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
                break
        else:
            break
    return name


def is_text_encoder(name: str) -> bool:
    return name.startswith(TEXT_ENCODER_PREFIXES)


# ------------------------------------------------------------------------------------------------ what a file is for

_SEP = "[._]"
# FLUX.1 names no FLUX.2 / Z-Image model has (its per-block modulation, single-block MLP, time+text embedder)
FLUX1 = re.compile(rf"(img|txt){_SEP}mod{_SEP}lin|single{_SEP}blocks{_SEP}\d+{_SEP}modulation|proj{_SEP}mlp|"
                   rf"time{_SEP}text{_SEP}embed|norm1{_SEP}(context{_SEP})?linear")


def model_identity(shapes: dict) -> tuple[Family, int]:
    """(family, hidden width) of a loaded transformer, from its own parameter shapes."""
    for family in FAMILIES.values():
        width = family.keys.model_width(shapes)
        if width is not None:
            return family, width
    raise ValueError("not a transformer of a known family")


def guess_lora_target(names_and_in_dims: list) -> tuple[object, int | None, str]:
    """(family or "flux1" or None, width, description) a LoRA was made for, from its module names and input widths.
    None when the names say nothing (then key matching decides)."""
    names = [n for n, _ in names_and_in_dims]
    if any(FLUX1.search(n) for n in names):
        return "flux1", None, "FLUX.1"
    family = next((f for f in FAMILIES.values() if any(f.keys.LORA_MODULES.search(n) for n in names)), None)
    if family is None:
        return None, None, "an unknown model"
    dims = [d for n, d in names_and_in_dims if d and family.keys.LORA_WIDTH_MODULES.search(n)]
    width = max(set(dims), key=dims.count) if dims else None
    return family, width, family.keys.describe_width(width)
