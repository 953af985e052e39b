"""Qwen3 text-encoder checkpoints -> our layout (HF names without the leading `model.`).

Layouts seen in the wild (docs/MODELS.md §Q6):
  - ComfyUI / HF single file `qwen_3_4b.safetensors`: `model.embed_tokens.weight`, `model.layers.N.*`,
    `model.norm.weight`, sometimes `lm_head.weight` (tied to the embedding, unused by an encoder).
  - diffusers klein `text_encoder/` (Qwen3ForCausalLM, sharded + index): same names.
  - diffusers Z-Image `text_encoder/` (Qwen3Model): the same names without `model.`.
So the key map is the identity after the prefix is stripped; only the ignore list matters. Layers beyond the ones a
model needs are dropped by `drop_unused` on purpose (klein runs 27 of 36 layers), everything else stays strict.
"""
from __future__ import annotations

import re
from typing import Mapping

from .keymap import KeyMap, strip_prefix

# Qwen3ForCausalLM / ComfyUI files carry `model.`; Qwen3Model files carry nothing (keymap.strip_prefix).
PREFIXES = ("model.language_model.", "model.")  # Qwen3-VL files nest the text model one level deeper

# lm_head: tied to embed_tokens (tie_word_embeddings=true) and never used by an encoder.
# rotary_emb.inv_freq: a buffer some exporters write; we recompute RoPE from rope_theta.
IGNORE = (r"^lm_head\.", r"(^|\.)rotary_emb\.inv_freq$", r"^(model\.)?visual\.")  # VL: the vision tower is unused

KEYMAP = KeyMap(rules=[], ignore=IGNORE)

_LAYER = re.compile(r"^layers\.(\d+)\.")


def to_native(sd: Mapping) -> dict:
    """Any supported Qwen3 layout -> our keys (`embed_tokens.weight`, `layers.N.self_attn.q_proj.weight`, ...)."""
    return KEYMAP.to_native(strip_prefix(sd, PREFIXES))


def from_native(sd: Mapping, layout: str = "causal_lm") -> dict:
    """Ours -> `causal_lm` (HF Qwen3ForCausalLM / ComfyUI file, `model.` prefix) or `model` (Qwen3Model, no prefix)."""
    if layout == "model":
        return dict(sd)
    if layout == "causal_lm":
        return {"model." + k: v for k, v in sd.items()}
    raise ValueError(f"unknown Qwen3 layout {layout!r} (causal_lm | model)")


def layer_index(key: str) -> int | None:
    m = _LAYER.match(key)
    return int(m.group(1)) if m else None


def drop_unused(sd: Mapping, n_layers: int, keep_norm: bool) -> dict:
    """Drop decoder layers >= n_layers (and the final norm unless kept): a truncated encoder never loads them."""
    out = {}
    for k, v in sd.items():
        i = layer_index(k)
        if i is not None and i >= n_layers:
            continue
        if k.startswith("norm.") and not keep_norm:
            continue
        out[k] = v
    return out
