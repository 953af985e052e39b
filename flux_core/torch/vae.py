"""The two FLUX VAEs in torch: FLUX.2 (klein) and FLUX.1 (Z-Image). Encoder and decoder.

Matches diffusers 0.42.1 `AutoencoderKLFlux2` + the `Flux2KleinPipeline` latent handling, and `AutoencoderKL` + the
Z-Image pipeline's scale/shift (docs/MODELS.md §V1, §V2), to <= 1e-5 relative in float32 (tests/test_vae.py).
Module names are the LDM / BFL checkpoint keys (BFL `src/flux2/autoencoder.py`), so original files load one to one;
diffusers folders go through flux_core/weights/vae.py.

Architecture (real size; both VAEs share it, only the latent side differs):
  encoder  conv_in 3->128 | 4 levels of 2 ResnetBlocks, widths (128, 256, 512, 512), a stride-2 downsample after
           levels 0-2 | mid: resnet, single-head attention over C=512, resnet | GroupNorm, SiLU, conv_out 512->2z
  decoder  conv_in z->512 | mid | 4 levels of 3 ResnetBlocks (LDM index 3 runs first), nearest 2x + conv after
           levels 3-1 | GroupNorm, SiLU, conv_out 128->3.       8x spatial per side.
  FLUX.2   z=32; encoder.quant_conv (64->64, 1x1) after conv_out, decoder.post_quant_conv (32->32) before conv_in;
           the posterior mean is patchified 2x2 (channel c*4 + ph*2 + pw) to 128 channels and normalised with the
           stored batch-norm statistics (eps 1e-4, no affine): latents [B,128,H/16,W/16]. 84.0 M params.
  FLUX.1   z=16, no quant convs; latent = (mean - 0.1159) * 0.3611: [B,16,H/8,W/8].
Pitfalls:
  - Downsampling pads (0,1,0,1) (right and bottom only) and convolves with padding 0, stride 2; symmetric padding
    shifts every latent by half a pixel.
  - GroupNorm eps is 1e-6 everywhere (not torch's 1e-5). The group count is NOT recoverable from the weights: it
    comes from the loader argument, else `norm_num_groups` in config.json (or a `config` JSON in the safetensors
    metadata), else 32 (every published FLUX VAE). Tiny test VAEs use 4.
  - Encoding uses the posterior MEAN (the first z channels of the moments), never a sample.
  - The BN statistics stay float32 whatever the model dtype; latents enter and leave in float32.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import tiling
from ..configs import GN_EPS, VAEConfig, config_from_weights
from ..errors import ConfigError
from ..weights.io import as_checkpoint
from ..weights.vae import detect_kind, to_native
from .common import load_into_torch

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ blocks

def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GN_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # 1x1 projection of the skip path only where the width changes (first block of a wider level)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with head dim = C (512 at real size), residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # contiguous [B,1,HW,C]: a transposed view can send SDPA (head dim 512) to its slow math fallback
        q, k, v = (p(n).reshape(b, 1, c, h * w).transpose(2, 3).contiguous() for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)                                                 # scale 1/sqrt(C)
        a = a.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right/bottom only (LDM, BFL, diffusers padding=0)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else None
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class DownLevel(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, groups: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(blocks))
        self.downsample = Downsample(cout) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(blocks))
        self.upsample = Upsample(cout) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """image [B,3,H,W] in [-1,1] -> moments [B,2z,H/8,W/8] (mean first, then log-variance)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, last = cfg.enc_channels, cfg.norm_num_groups, len(cfg.enc_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(DownLevel(ch[max(i - 1, 0)], ch[i], cfg.enc_blocks, g, i < last)
                                  for i in range(len(ch)))
        self.mid = MidBlock(ch[-1], g, cfg.mid_attention)
        self.norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1) if cfg.quant_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution part (tiled by a tiled encode): image -> level features at 1/8 scale."""
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return x

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """The 1/8-scale part (always whole: its attention and GroupNorms see the whole image): -> moments."""
        x = self.conv_out(F.silu(self.norm_out(self.mid(x))))
        return x if self.quant_conv is None else self.quant_conv(x)


class Decoder(nn.Module):
    """raw latent [B,z,h,w] -> image [B,3,8h,8w] in about [-1,1]. `up[0]` is the full-resolution level and runs last."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, last = cfg.dec_channels, cfg.norm_num_groups, len(cfg.dec_channels) - 1
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1) if cfg.quant_conv else None
        self.conv_in = nn.Conv2d(cfg.z_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1], g, cfg.mid_attention)
        # level i is fed by level i+1 (or by the mid block for the deepest level)
        self.up = nn.ModuleList(UpLevel(ch[min(i + 1, last)], ch[i], cfg.dec_blocks, g, i > 0)
                                for i in range(len(ch)))
        self.norm_out = _norm(ch[0], g)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(z))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """The latent-scale part (always whole: its attention and GroupNorms see the whole image)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.mid(self.conv_in(z))

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """The upsampling part (tiled by a tiled decode): mid-block features -> image."""
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class LatentNorm(nn.Module):
    """FLUX.2's BatchNorm2d(128, affine=False) used only in eval mode: a fixed per-channel standardisation."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.running_mean.view(1, -1, 1, 1).to(like.device)
        std = torch.sqrt(self.running_var.view(1, -1, 1, 1) + self.eps).to(like.device)
        return mean, std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return (z - mean) / std           # the pipeline's formula (not x*rsqrt), for bit-level agreement

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return z * std + mean


# ------------------------------------------------------------------------------------------------ top models

class _FluxVAE(nn.Module):
    """Shared half of both wrappers: image <-> raw posterior mean. Subclasses add the latent convention."""

    kind = ""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def downscale(self) -> int:
        return 2 ** (self.config.levels - 1)

    @property
    def factor(self) -> int:
        """Pixels per raw-latent position per side (8): the decoder's upsampling."""
        return 2 ** (self.config.levels - 1)

    def _mean(self, img01: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> posterior mean [B,z,H/8,W/8], float32. `tile`: pixel tile side (None: untiled)."""
        b, c, h, w = img01.shape
        if h % self.downscale or w % self.downscale:
            raise ConfigError(f"{type(self).__name__}.encode: image size {h}x{w} must be a multiple of "
                              f"{self.downscale}; crop or resize it first.")
        x = (img01.to(self.device, torch.float32) * 2 - 1).to(self.dtype)
        f, z = self.factor, self.config.z_channels
        if not tile:
            return self.encoder(x)[:, :z].float()
        t, o = tiling.decode_geometry(tile, factor=f)
        tiles = tiling.plan(h // f, w // f, t, o, 1)
        feats = None
        wsum = torch.zeros(h // f, w // f, dtype=torch.float32, device=x.device)
        for y0, y1, x0, x1, wy, wx in tiles:  # pixel tiles; their 1/8-scale features blended, then one tail
            part = self.encoder.features(x[..., y0 * f:y1 * f, x0 * f:x1 * f]).float()
            if feats is None:
                feats = torch.zeros(b, part.shape[1], h // f, w // f, dtype=torch.float32, device=x.device)
            wt = torch.from_numpy(np.outer(wy, wx)).to(x.device)
            feats[..., y0:y1, x0:x1] += part * wt
            wsum[y0:y1, x0:x1] += wt
        return self.encoder.tail((feats / wsum).to(self.dtype))[:, :z].float()

    def _image(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """raw latent (float32) -> image [B,3,H,W] in [0,1], float32. `tile`: pixel tile side (None: untiled)."""
        z = z.to(self.device, self.dtype)
        if not tile:
            x = self.decoder(z).float()
        else:
            f = self.factor
            t, o = tiling.decode_geometry(tile, factor=f)
            b, _, h, w = z.shape
            mid = self.decoder.head(z)  # latent scale, whole
            x = torch.zeros(b, self.config.out_channels, h * f, w * f, dtype=torch.float32, device=z.device)
            wsum = torch.zeros(h * f, w * f, dtype=torch.float32, device=z.device)
            for y0, y1, x0, x1, wy, wx in tiling.plan(h, w, t, o, f):  # latent tiles, blended in pixel space
                part = self.decoder.tail(mid[..., y0:y1, x0:x1]).float()
                wt = torch.from_numpy(np.outer(wy, wx)).to(z.device)
                x[..., y0 * f:y1 * f, x0 * f:x1 * f] += part * wt
                wsum[y0 * f:y1 * f, x0 * f:x1 * f] += wt
                del part
            x = x / wsum
        return (x / 2 + 0.5).clamp(0, 1)

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ConfigError(f"{type(self).__name__}.decode expects latents [B,{self.latent_channels},h,w], "
                              f"got {tuple(z.shape)}. Is this a latent from the other model family?")


class Flux2VAE(_FluxVAE):
    """FLUX.2 VAE. encode: [B,3,H,W] in [0,1] -> normalised latent [B,128,H/16,W/16]; decode: the inverse, clamped."""

    kind = "flux2"

    def __init__(self, cfg: VAEConfig):
        super().__init__(cfg)
        self.bn = LatentNorm(4 * cfg.z_channels, cfg.batch_norm_eps)

    @property
    def latent_channels(self) -> int:
        return 4 * self.config.z_channels

    @property
    def downscale(self) -> int:
        return 2 * super().downscale   # the 2x2 patchify

    @torch.no_grad()
    def encode(self, img01: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        return self.bn.normalize(patchify(self._mean(img01, tile)))

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        self._check_latent(z)
        return self._image(unpatchify(self.bn.denormalize(z.float())), tile)


class Flux1VAE(_FluxVAE):
    """FLUX.1 VAE (Z-Image). encode: [B,3,H,W] in [0,1] -> (mean - shift) * scale [B,16,H/8,W/8]; decode: inverse."""

    kind = "flux1"

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    @torch.no_grad()
    def encode(self, img01: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        return (self._mean(img01, tile) - self.config.shift_factor) * self.config.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        self._check_latent(z)
        return self._image(z.float() / self.config.scaling_factor + self.config.shift_factor, tile)


# ------------------------------------------------------------------------------------------------ loading

def load_vae(source, dtype: torch.dtype = torch.float32, device="cpu",
             norm_num_groups: int | None = None) -> Flux2VAE | Flux1VAE:
    """Load either FLUX VAE from a .safetensors file, a diffusers `vae/` folder, a pipeline folder, a `Checkpoint`
    or a state dict. The kind comes from the keys (`bn.running_mean` => FLUX.2), the structure from the shapes.
    `norm_num_groups` overrides config.json / metadata (only non-published VAEs need it)."""
    ckpt = as_checkpoint(source, component="vae")
    sd = to_native(ckpt.sd)
    kind = detect_kind(sd)
    cfg = config_from_weights(sd, kind, ckpt.config, norm_num_groups)
    cls = Flux2VAE if kind == "flux2" else Flux1VAE
    with torch.device("meta"):
        model = cls(cfg)
    load_into_torch(model, sd, f"{cls.__name__} ({ckpt.source or 'state dict'})", dtype=dtype, device=device,
                    keep_float32=lambda k: k.startswith("bn."))
    log.info("loaded %s: z=%d, widths %s, groups %d, %s", cls.__name__, cfg.z_channels, cfg.dec_channels,
             cfg.norm_num_groups, dtype)
    return model.eval().requires_grad_(False)



# ------------------------------------------------------------------------------------------------ helpers

def patchify(z: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B,4C,H/2,W/2], channel c*4 + ph*2 + pw (BFL `c (i pi) (j pj) -> (c pi pj) i j`)."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`."""
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)
