"""Reference FLUX VAEs (diffusers `AutoencoderKLFlux2` and `AutoencoderKL`) at tiny configs, their checkpoint layouts,
and the pipelines' own encode/decode paths.

The LDM (original) layout is written by `ldm_state_dict`, a hand-written rename that does not use our KeyMap, and is
verified by `check_ldm_with_diffusers`, which runs diffusers' own `convert_ldm_vae_checkpoint` on it (after moving the
FLUX.2 quant convs to top level, docs/MODELS.md §V3) and demands the exact diffusers state dict back. So a bug in
`flux_core.weights.vae` cannot hide behind a matching bug here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import torch

# docs/MODELS.md §X: four levels give the real 8x factor; groups 4 so that widths 8/16 work.
TINY_BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)
TINY_FLUX2 = dict(TINY_BLOCKS, latent_channels=4, batch_norm_eps=1e-4, patch_size=(2, 2))
TINY_FLUX1 = dict(TINY_BLOCKS, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                  use_quant_conv=False, use_post_quant_conv=False)

# Real sizes: docs/MODELS.md §V1 / §V2 (AutoencoderKLFlux2() defaults are FLUX.2's;
# AutoencoderKL needs explicit FLUX.1 settings).
REAL_FLUX2: dict = {}
REAL_FLUX1 = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                  norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                  use_quant_conv=False, use_post_quant_conv=False)

# The config keys our loader reads from config.json / safetensors metadata (the rest comes from shapes).
CONFIG_KEYS = ("norm_num_groups", "batch_norm_eps", "scaling_factor", "shift_factor")


def build_reference(kind: str, seed: int = 0, **overrides):
    """A tiny diffusers VAE with every parameter perturbed (GroupNorm weights around 1, biases non-zero) and, for
    FLUX.2, non-trivial batch-norm statistics, so that a swapped or ignored tensor changes the output."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    torch.manual_seed(seed)
    cls, cfg = (AutoencoderKLFlux2, TINY_FLUX2) if kind == "flux2" else (AutoencoderKL, TINY_FLUX1)
    model = cls(**{**cfg, **overrides}).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.add_(0.1 * p.std().clamp_min(1e-3) * noise)
        if kind == "flux2":
            n = model.bn.running_mean.numel()
            model.bn.running_mean.copy_(0.5 * torch.randn(n, generator=gen))
            model.bn.running_var.copy_(0.3 + 2.0 * torch.rand(n, generator=gen))
            model.bn.num_batches_tracked.fill_(1234)
    return model


def ldm_state_dict(model, layout: str = "bfl", prefix: str = "") -> dict:
    """diffusers names -> the LDM/BFL original layout, by hand. layout 'bfl': quant convs inside encoder/decoder
    (BFL flux2-vae.safetensors); 'comfy': quant convs at top level (ComfyUI's internal layout)."""
    levels = len(model.config.up_block_types)
    out = {}
    for key, value in model.state_dict().items():
        new = key
        m = re.match(r"decoder\.up_blocks\.(\d+)\.", new)
        if m:  # decoder levels run in opposite orders
            new = f"decoder.up.{levels - 1 - int(m.group(1))}." + new[m.end():]
        new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda mm: f"mid.block_{int(mm.group(1)) + 1}.", new)
        new = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1.", new)
        if ".mid.attn_1." in new:
            new = (new.replace(".group_norm.", ".norm.").replace(".to_q.", ".q.").replace(".to_k.", ".k.")
                   .replace(".to_v.", ".v.").replace(".to_out.0.", ".proj_out."))
            if new.endswith("weight") and value.dim() == 2:
                value = value[:, :, None, None]  # Linear -> 1x1 conv
        new = (new.replace("encoder.down_blocks.", "encoder.down.").replace(".resnets.", ".block.")
               .replace(".conv_shortcut.", ".nin_shortcut.").replace(".downsamplers.0.", ".downsample.")
               .replace(".upsamplers.0.", ".upsample.").replace(".conv_norm_out.", ".norm_out."))
        if layout == "bfl" and new.startswith("quant_conv."):
            new = "encoder." + new
        elif layout == "bfl" and new.startswith("post_quant_conv."):
            new = "decoder." + new
        out[prefix + new] = value.detach().clone().contiguous()
    return out


def check_ldm_with_diffusers(ldm_sd: dict, model) -> None:
    """diffusers' own LDM converter must map our LDM dict back to exactly the model's state dict."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    moved = {re.sub(r"^(encoder\.quant_conv|decoder\.post_quant_conv)\.",
                    lambda m: m.group(1).split(".")[1] + ".", k): v for k, v in ldm_sd.items()}
    got = convert_ldm_vae_checkpoint(moved, dict(model.config))
    want = model.state_dict()
    got.update({k: moved[k] for k in moved if k.startswith("bn.")})  # the converter has no bn rule; same names
    assert set(got) == set(want), (sorted(set(want) - set(got))[:8], sorted(set(got) - set(want))[:8])
    bad = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k])]
    assert not bad, f"LDM file does not convert back exactly: {bad[:8]}"


def config_metadata(model) -> dict:
    """The few non-shape hyperparameters, as a safetensors metadata `config` JSON (read by flux_core.weights.io)."""
    cfg = {k: model.config[k] for k in CONFIG_KEYS if k in model.config}
    return {"config": json.dumps(cfg)}


def save_layouts(model, kind: str, folder: Path) -> dict:
    """Write every layout. Returns paths: 'diffusers' (component folder), 'pipeline' (its parent, holding `vae/`),
    'ldm' (BFL single file, config in metadata),
    'ldm_noconfig' (no metadata: groups must be passed), 'prefixed' (`vae.` prefix), and for FLUX.2 'comfy'."""
    from safetensors.torch import save_file

    folder = Path(folder)
    model.save_pretrained(folder / "pipeline" / "vae", safe_serialization=True)
    paths = {"diffusers": folder / "pipeline" / "vae", "pipeline": folder / "pipeline"}
    meta = config_metadata(model)
    files = {"ldm": ("bfl", "", meta), "ldm_noconfig": ("bfl", "", None), "prefixed": ("bfl", "vae.", meta)}
    if kind == "flux2":
        files["comfy"] = ("comfy", "", meta)
    for name, (layout, prefix, metadata) in files.items():
        sd = ldm_state_dict(model, layout, prefix)
        if name == "ldm":
            check_ldm_with_diffusers(sd, model)
        paths[name] = folder / f"{name}.safetensors"
        save_file(sd, str(paths[name]), metadata=metadata)
    return paths


# ------------------------------------------------------------------------------------ the pipelines' own paths

def _image_processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor()


@torch.no_grad()
def flux2_encode(vae, img01: torch.Tensor) -> torch.Tensor:
    """Flux2KleinPipeline._encode_vae_image (argmax posterior, patchify, BN normalise) on a [0,1] image."""
    from diffusers import Flux2KleinPipeline

    x = _image_processor().normalize(img01)  # [0,1] -> [-1,1], as preprocess does
    host = SimpleNamespace(vae=vae, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    return Flux2KleinPipeline._encode_vae_image(host, x, generator=None)


@torch.no_grad()
def flux2_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """The tail of Flux2KleinPipeline.__call__: BN de-normalise, unpatchify, vae.decode, postprocess to [0,1]."""
    from diffusers import Flux2KleinPipeline

    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
    latents = Flux2KleinPipeline._unpatchify_latents(z * std + mean)
    image = vae.decode(latents, return_dict=False)[0]
    return _image_processor().postprocess(image, output_type="pt")


@torch.no_grad()
def flux1_encode(vae, img01: torch.Tensor) -> torch.Tensor:
    """Z-Image (controlnet / inpaint pipelines): argmax posterior, then (mean - shift) * scale."""
    from diffusers.pipelines.z_image.pipeline_z_image_controlnet import retrieve_latents

    x = _image_processor().normalize(img01)
    latents = retrieve_latents(vae.encode(x), sample_mode="argmax")
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def flux1_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """ZImagePipeline.__call__ tail: z / scale + shift, vae.decode, postprocess to [0,1]."""
    latents = z / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    return _image_processor().postprocess(image, output_type="pt")


def meta_reference(kind: str):
    """The real-size diffusers VAE on the meta device (for key/shape lists)."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    with torch.device("meta"):
        return AutoencoderKLFlux2(**REAL_FLUX2) if kind == "flux2" else AutoencoderKL(**REAL_FLUX1)
