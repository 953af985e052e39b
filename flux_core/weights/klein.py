"""FLUX.2 [klein] transformer checkpoints: layouts, detection and the diffusers -> BFL key map.

Our model (`flux_core.torch.klein.Flux2Transformer`) is named after the original BFL / ComfyUI keys, so a BFL or
ComfyUI single file loads one to one after its prefix is stripped. A diffusers `Flux2Transformer2DModel` folder is
converted by the `DIFFUSERS` rules below, which are the inverse of diffusers' own
`convert_flux2_transformer_checkpoint_to_diffusers` (`diffusers/loaders/single_file_utils.py`, 0.42.1); the tests
check our map against that converter, not against itself.

Pitfalls this file handles:
- diffusers splits each fused double-block qkv into to_q/to_k/to_v (add_q/k/v_proj for text): `cat` in q, k, v order.
- the final adaLN rows are [shift; scale] in BFL and [scale; shift] in diffusers: `swap_halves`.
- BFL files name the QK-norm weights `*_norm.scale`; ComfyUI, after loading, calls them `*_norm.weight` (and so do
  files saved back from ComfyUI). Both are accepted and become `.scale`.
- a FLUX.1 file also has `double_blocks.*` / `img_in.*` but no `double_stream_modulation_img`: refused by name.
"""
from __future__ import annotations

import re
from typing import Mapping

from ..errors import WeightError
from .keymap import KeyMap, Rule, strip_prefix

# Tried in order; the first one that any key carries is stripped (ComfyUI full checkpoints, bare UNet files,
# diffusers pipeline-level state dicts).
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")
# Keys that only a FLUX.2 transformer has (either layout, after a prefix): flux_core.families detects the family by them.
MARKERS = ("double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight")

_D = "transformer_blocks.{n}.attn."
_S = "single_transformer_blocks.{n}.attn."

DIFFUSERS = KeyMap([
    Rule("img_in.weight", "x_embedder.weight"),
    Rule("txt_in.weight", "context_embedder.weight"),
    Rule("time_in.in_layer.weight", "time_guidance_embed.timestep_embedder.linear_1.weight"),
    Rule("time_in.out_layer.weight", "time_guidance_embed.timestep_embedder.linear_2.weight"),
    Rule("guidance_in.in_layer.weight", "time_guidance_embed.guidance_embedder.linear_1.weight"),
    Rule("guidance_in.out_layer.weight", "time_guidance_embed.guidance_embedder.linear_2.weight"),
    Rule("double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight"),
    Rule("double_stream_modulation_txt.lin.weight", "double_stream_modulation_txt.linear.weight"),
    Rule("single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight"),
    # double blocks: image stream
    Rule("double_blocks.{n}.img_attn.qkv.weight",
         (_D + "to_q.weight", _D + "to_k.weight", _D + "to_v.weight"), op="cat"),
    Rule("double_blocks.{n}.img_attn.norm.query_norm.scale", _D + "norm_q.weight"),
    Rule("double_blocks.{n}.img_attn.norm.key_norm.scale", _D + "norm_k.weight"),
    Rule("double_blocks.{n}.img_attn.proj.weight", _D + "to_out.0.weight"),
    Rule("double_blocks.{n}.img_mlp.0.weight", "transformer_blocks.{n}.ff.linear_in.weight"),
    Rule("double_blocks.{n}.img_mlp.2.weight", "transformer_blocks.{n}.ff.linear_out.weight"),
    # double blocks: text stream
    Rule("double_blocks.{n}.txt_attn.qkv.weight",
         (_D + "add_q_proj.weight", _D + "add_k_proj.weight", _D + "add_v_proj.weight"), op="cat"),
    Rule("double_blocks.{n}.txt_attn.norm.query_norm.scale", _D + "norm_added_q.weight"),
    Rule("double_blocks.{n}.txt_attn.norm.key_norm.scale", _D + "norm_added_k.weight"),
    Rule("double_blocks.{n}.txt_attn.proj.weight", _D + "to_add_out.weight"),
    Rule("double_blocks.{n}.txt_mlp.0.weight", "transformer_blocks.{n}.ff_context.linear_in.weight"),
    Rule("double_blocks.{n}.txt_mlp.2.weight", "transformer_blocks.{n}.ff_context.linear_out.weight"),
    # single blocks: linear1 rows are [q | k | v | mlp_a | mlp_b], linear2 columns [attn | mlp] in both layouts
    Rule("single_blocks.{n}.linear1.weight", _S + "to_qkv_mlp_proj.weight"),
    Rule("single_blocks.{n}.linear2.weight", _S + "to_out.weight"),
    Rule("single_blocks.{n}.norm.query_norm.scale", _S + "norm_q.weight"),
    Rule("single_blocks.{n}.norm.key_norm.scale", _S + "norm_k.weight"),
    # final layer: BFL [shift; scale] vs diffusers [scale; shift]
    Rule("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight", op="swap_halves"),
    Rule("final_layer.linear.weight", "proj_out.weight"),
])

# ComfyUI's in-memory (and re-saved) names for the QK-norm weights.
_NORM_WEIGHT = re.compile(r"^((?:double_blocks\.\d+\.(?:img|txt)_attn|single_blocks\.\d+)\.norm\.(?:query|key)_norm)\.weight$")

_DIFFUSERS_MARKERS = ("x_embedder.", "transformer_blocks.", "single_transformer_blocks.", "norm_out.")
_BFL_MARKERS = ("img_in.", "double_blocks.", "single_blocks.", "final_layer.")


def detect_layout(sd: Mapping) -> str:
    """'bfl' (original / ComfyUI) or 'diffusers', from the keys (prefix already stripped). Raises WeightError otherwise."""
    keys = list(sd)
    if any(k.startswith(_DIFFUSERS_MARKERS) for k in keys):
        if not any(k.startswith("double_stream_modulation_img.") for k in keys):
            raise WeightError("this diffusers transformer is not FLUX.2 (no double_stream_modulation_img.linear): "
                              "FLUX.1 and other models are not supported by the klein loader.")
        return "diffusers"
    if any(k.startswith(_BFL_MARKERS) for k in keys):
        if not any(k.startswith("double_stream_modulation_img.") for k in keys):
            raise WeightError("this checkpoint looks like FLUX.1 (double_blocks without double_stream_modulation_img): "
                              "the klein loader needs a FLUX.2 [klein] transformer file.")
        return "bfl"
    shown = ", ".join(keys[:5]) or "(no keys)"
    raise WeightError(f"not a FLUX.2 transformer checkpoint: no img_in / x_embedder / double_blocks keys (first keys: {shown}). "
                      "Is this a text encoder, a VAE or a LoRA?")


def to_native(sd: Mapping) -> dict:
    """Any supported layout, with or without a prefix -> our (BFL) key layout. Tensors are not copied."""
    sd = strip_prefix(sd, PREFIXES)
    if detect_layout(sd) == "diffusers":
        sd = DIFFUSERS.to_native(sd)
    out = {}
    for k, v in sd.items():
        m = _NORM_WEIGHT.match(k)
        out[m.group(1) + ".scale" if m else k] = v
    return out


def is_flux2_config(config: Mapping | None) -> bool:
    """True for a diffusers Flux2Transformer2DModel config.json (not some unrelated 'config' metadata blob)."""
    if not config:
        return False
    if config.get("_class_name") == "Flux2Transformer2DModel":
        return True
    return all(k in config for k in ("num_attention_heads", "attention_head_dim", "joint_attention_dim", "num_single_layers"))


def config_from_diffusers(config: Mapping) -> dict:
    """diffusers transformer config.json -> KleinConfig keyword arguments (defaults are diffusers' own defaults)."""
    if config.get("patch_size", 1) != 1:
        raise WeightError(f"FLUX.2 transformer with patch_size {config['patch_size']} is not supported (klein uses 1)")
    heads = int(config.get("num_attention_heads", 48))
    head_dim = int(config.get("attention_head_dim", 128))
    in_ch = int(config.get("in_channels", 128))
    return dict(
        in_channels=in_ch,
        out_channels=int(config.get("out_channels") or in_ch),
        hidden_size=heads * head_dim,
        num_heads=heads,
        head_dim=head_dim,
        depth=int(config.get("num_layers", 8)),
        depth_single=int(config.get("num_single_layers", 48)),
        context_in_dim=int(config.get("joint_attention_dim", 15360)),
        time_dim=int(config.get("timestep_guidance_channels", 256)),
        mlp_ratio=float(config.get("mlp_ratio", 3.0)),
        axes_dim=tuple(int(a) for a in config.get("axes_dims_rope", (32, 32, 32, 32))),
        theta=float(config.get("rope_theta", 2000)),
        eps=float(config.get("eps", 1e-6)),
        guidance_embed=bool(config.get("guidance_embeds", True)),
    )


def size_name(config) -> str:
    """'4b' / '9b' from a KleinConfig's width (the published sizes); nothing for other widths (the tiny demo and test
    models are plain 'klein': a made-up size such as 'd64' reads like a real model users should look for)."""
    return {3072: "4b", 4096: "9b"}.get(config.hidden_size, "")


# ------------------------------------------------------------------------------------------------ LoRA files
# (flux_core/lora/names.py) Names that mark a LoRA module of this family, dotted or kohya-flattened, and the modules
# whose input width is the model width (their A matrices tell a LoRA's model size).
_SEP = "[._]"
LORA_MODULES = re.compile(rf"(^|{_SEP})(double{_SEP}blocks|single{_SEP}blocks|transformer{_SEP}blocks|"
                          rf"single{_SEP}transformer{_SEP}blocks){_SEP}\d+")
LORA_WIDTH_MODULES = re.compile(rf"img{_SEP}attn{_SEP}qkv$|attn{_SEP}to{_SEP}q$|linear1$|to{_SEP}qkv{_SEP}mlp{_SEP}proj$")


def model_width(shapes: Mapping) -> int | None:
    """The hidden width of a loaded klein transformer from its parameter shapes (None: not this family)."""
    w = shapes.get("double_stream_modulation_img.lin.weight")
    return None if w is None else int(w[1])


def describe_width(width: int | None) -> str:
    """What a user calls the model of this width: FLUX.2 [klein] 4B / 9B; 6144 is FLUX.2 [dev]."""
    if width == 6144:
        return "FLUX.2 [dev]"
    size = {3072: "4B", 4096: "9B"}.get(width)
    return f"FLUX.2 [klein] {size}" if size else (f"FLUX.2 [klein] (hidden size {width})" if width else "FLUX.2 [klein]")
