"""Reference FLUX.2 [klein] transformer: diffusers `Flux2Transformer2DModel` at the tiny config of docs/MODELS.md §X,
with its weights written in the diffusers folder layout and in the BFL / ComfyUI single-file layout.

The BFL file is written by `diffusers_to_bfl` below, a plain hand-written inverse of diffusers' own converter
(`convert_flux2_transformer_checkpoint_to_diffusers`), deliberately NOT our `flux_core.weights.klein.DIFFUSERS`
map: a test checks that diffusers' converter turns it back into exactly the diffusers state dict, so our map is
then tested against something it did not produce.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=48, timestep_guidance_channels=256, mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, eps=1e-6, guidance_embeds=False)

# Published geometries (docs/MODELS.md §K1); everything else is the diffusers default.
KLEIN_4B = dict(in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=7680, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
                eps=1e-6, guidance_embeds=False)
KLEIN_9B = dict(KLEIN_4B, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288)


def build_reference(seed: int = 0, **overrides):
    """Tiny diffusers transformer, float32, eval; every weight perturbed by randn*0.05 so no norm weight is exactly 1."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**{**TINY, **overrides}).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def build_meta(**config):
    """Real-size diffusers transformer on the meta device (shapes only, nothing allocated)."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        return Flux2Transformer2DModel(**config)


def save_diffusers(model, root) -> Path:
    """`save_pretrained` into `<root>/transformer` (config.json + safetensors), as in a pipeline folder."""
    out = Path(root) / "transformer"
    model.save_pretrained(out, safe_serialization=True)
    return out


def save_bfl(model, path, prefix: str = "", norm_suffix: str = "scale") -> Path:
    """One .safetensors file in the original BFL / ComfyUI layout, keys optionally prefixed (`model.diffusion_model.`).
    `norm_suffix="weight"` writes the QK-norm names as ComfyUI holds them in memory."""
    from safetensors.torch import save_file

    sd = diffusers_to_bfl(model.state_dict())
    if norm_suffix != "scale":
        sd = {(k[:-len("scale")] + norm_suffix if k.endswith("_norm.scale") else k): v for k, v in sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def diffusers_to_bfl(sd: dict) -> dict:
    """diffusers Flux2Transformer2DModel state dict -> BFL keys, written out statement by statement."""
    out = {
        "img_in.weight": sd["x_embedder.weight"],
        "txt_in.weight": sd["context_embedder.weight"],
        "time_in.in_layer.weight": sd["time_guidance_embed.timestep_embedder.linear_1.weight"],
        "time_in.out_layer.weight": sd["time_guidance_embed.timestep_embedder.linear_2.weight"],
        "double_stream_modulation_img.lin.weight": sd["double_stream_modulation_img.linear.weight"],
        "double_stream_modulation_txt.lin.weight": sd["double_stream_modulation_txt.linear.weight"],
        "single_stream_modulation.lin.weight": sd["single_stream_modulation.linear.weight"],
        "final_layer.linear.weight": sd["proj_out.weight"],
    }
    if "time_guidance_embed.guidance_embedder.linear_1.weight" in sd:
        out["guidance_in.in_layer.weight"] = sd["time_guidance_embed.guidance_embedder.linear_1.weight"]
        out["guidance_in.out_layer.weight"] = sd["time_guidance_embed.guidance_embedder.linear_2.weight"]
    scale, shift = sd["norm_out.linear.weight"].chunk(2, dim=0)          # diffusers: [scale; shift]
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale], dim=0)   # BFL: [shift; scale]

    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    for n in range(n_double):
        d, o = f"transformer_blocks.{n}.", f"double_blocks.{n}."
        for stream, q, k, v, nq, nk, proj, ff in (
                ("img", "to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out.0", "ff"),
                ("txt", "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k", "to_add_out",
                 "ff_context")):
            out[o + f"{stream}_attn.qkv.weight"] = torch.cat(
                [sd[d + f"attn.{q}.weight"], sd[d + f"attn.{k}.weight"], sd[d + f"attn.{v}.weight"]], dim=0)
            out[o + f"{stream}_attn.norm.query_norm.scale"] = sd[d + f"attn.{nq}.weight"]
            out[o + f"{stream}_attn.norm.key_norm.scale"] = sd[d + f"attn.{nk}.weight"]
            out[o + f"{stream}_attn.proj.weight"] = sd[d + f"attn.{proj}.weight"]
            out[o + f"{stream}_mlp.0.weight"] = sd[d + f"{ff}.linear_in.weight"]
            out[o + f"{stream}_mlp.2.weight"] = sd[d + f"{ff}.linear_out.weight"]

    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for n in range(n_single):
        s, o = f"single_transformer_blocks.{n}.attn.", f"single_blocks.{n}."
        out[o + "linear1.weight"] = sd[s + "to_qkv_mlp_proj.weight"]
        out[o + "linear2.weight"] = sd[s + "to_out.weight"]
        out[o + "norm.query_norm.scale"] = sd[s + "norm_q.weight"]
        out[o + "norm.key_norm.scale"] = sd[s + "norm_k.weight"]
    if len(out) != len(sd) - 2 * 3 * n_double + 2 * n_double:   # 3 q/k/v tensors become 1 qkv, per stream
        raise AssertionError("diffusers_to_bfl did not account for every diffusers key")
    return out


def diffusers_converter(bfl_sd: dict) -> dict:
    """diffusers' own BFL -> diffusers converter (it mutates its input and does not strip prefixes: give it a copy)."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    return convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl_sd))


def inputs(n_img=(3, 5), n_txt=7, batch=1, refs=(), seed=0, in_channels=16, ctx=48):
    """Random inputs in the pipeline's shapes. `n_img` is the (h, w) packed grid of the noise image; `refs` a list of
    (h, w) grids appended after it with t = 10, 20, ... . Returns a dict for our model and the ids as int64."""
    from flux_core.torch.klein import position_ids, text_ids

    g = torch.Generator().manual_seed(seed)
    grids = [(*n_img, 0)] + [(h, w, 10 * (i + 1)) for i, (h, w) in enumerate(refs)]
    img_ids = torch.cat([position_ids(h, w, t) for h, w, t in grids])
    n = img_ids.shape[0]
    return dict(
        img=torch.randn(batch, n, in_channels, generator=g),
        img_ids=img_ids,
        txt=torch.randn(batch, n_txt, ctx, generator=g),
        txt_ids=text_ids(n_txt),
        timesteps=torch.rand(batch, generator=g) * 0.9 + 0.05,
    )


def reference_forward(model, x: dict):
    """Run the diffusers model on the `inputs` dict."""
    with torch.no_grad():
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                     img_ids=x["img_ids"], txt_ids=x["txt_ids"], return_dict=False)[0]
