"""Reference Z-Image transformer (diffusers `ZImageTransformer2DModel`) at a tiny config, and its checkpoint layouts.

The original-layout file is written by `original_state_dict`, a hand-written inverse of diffusers' single-file
converter that does not use our KeyMap, and is verified by running diffusers' own converter on it
(`diffusers_from_original`), so a bug in `flux_core.weights.zimage` cannot hide behind a matching bug here.
"""
from __future__ import annotations

from pathlib import Path

import torch

# docs/MODELS.md §X. sum(axes_dims) = dim / n_heads = 32.
TINY = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0,
            axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512])

# docs/MODELS.md §Z1, the published Z-Image-Turbo transformer/config.json.
REAL = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
            n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
            t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])

PREFIX = "model.diffusion_model."


def build_reference(seed: int = 0, **overrides):
    """A tiny diffusers Z-Image transformer with every parameter perturbed (norm weights around 1, pad tokens and
    adaLN weights non-zero), so that a swapped or ignored tensor changes the output."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**{**TINY, **overrides}).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in (name.split(".")[-2:] + [""])[0]:  # RMSNorm weights: parent module is a *norm*
                p.copy_(1.0 + 0.2 * noise)  # RMSNorm weights
            elif name.endswith("pad_token"):
                p.copy_(noise)
            else:
                p.add_(0.05 * noise)
    return model


def original_state_dict(model, prefix: str = "") -> dict:
    """diffusers names -> the original (Tongyi / ComfyUI) layout, written out by hand."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}
    for key, value in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q.weight" in key:
            base = key[: -len("to_q.weight")]
            out[base + "qkv.weight"] = torch.cat([sd[base + "to_q.weight"], sd[base + "to_k.weight"],
                                                  sd[base + "to_v.weight"]], 0)
            continue
        new = (key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
               .replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_q.", ".attention.q_norm.")
               .replace(".attention.norm_k.", ".attention.k_norm."))
        out[new] = value
    return {prefix + k: v for k, v in out.items()}


def diffusers_from_original(original_sd: dict) -> dict:
    """Run diffusers' own single-file converter (it strips `model.diffusion_model.` itself)."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    return convert_z_image_transformer_checkpoint_to_diffusers(dict(original_sd))


def save_layouts(model, folder: Path) -> dict:
    """Write the three layouts; returns {'diffusers': folder, 'original': file, 'prefixed': file}."""
    from safetensors.torch import save_file

    folder = Path(folder)
    model.save_pretrained(folder / "diffusers", safe_serialization=True)
    paths = {"diffusers": folder / "diffusers"}
    for name, prefix in (("original", ""), ("prefixed", PREFIX)):
        sd = {k: v.contiguous() for k, v in original_state_dict(model, prefix).items()}
        paths[name] = folder / f"zimage_{name}.safetensors"
        save_file(sd, str(paths[name]))
    return paths


def reference_forward(model, x, t, caps):
    """diffusers forward on our tensor convention: x [B,C,H,W] -> list of [C,1,H,W]; output stacked to [B,C,H,W]."""
    with torch.no_grad():
        out = model([xi.unsqueeze(1) for xi in x], t, list(caps), return_dict=False)[0]
    return torch.stack([o.squeeze(1) for o in out])
