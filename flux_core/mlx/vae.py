"""The two FLUX VAEs on MLX: FLUX.2 (klein) and FLUX.1 (Z-Image). Encoder and decoder.

The MLX twin of `flux_core/torch/vae.py`: same classes, same parameter names (LDM / BFL checkpoint keys), same key
map (`flux_core.weights.vae`) and config (`VAEConfig` / `config_from_weights` of the torch file, pure Python), same
interface (`kind`, `latent_channels`, `downscale`, `config`, `encode`, `decode`). Equal to the torch VAEs to ~1e-6
relative in float32 (tests/test_mlx_vae.py), hence to diffusers `AutoencoderKLFlux2` / `AutoencoderKL`.

Architecture: see flux_core/torch/vae.py (4 levels, widths 128/256/512/512, mid attention, GroupNorm eps 1e-6;
FLUX.2 z=32 + quant convs + 2x2 patchify + BN statistics -> [B,128,H/16,W/16]; FLUX.1 z=16, (mean-shift)*scale).

Layout: `encode` / `decode` take and return NCHW arrays like the torch VAE (the pipeline and the transformers speak
NCHW latents); everything in between runs NHWC, MLX's convolution layout. Convolution weights are converted once at
load, OIHW -> OHWI; the strict key/shape check is made in the FILE layout first, so errors show the file's shapes.

Pitfalls:
  - `nn.GroupNorm` equals torch only with `pytorch_compatible=True` (its default normalises another way); groups
    come from the loader argument, else config.json / the safetensors metadata `config`, else 32 (never the weights).
  - GroupNorm and SiLU compute in float32 and round once (torch's CPU and CUDA kernels do the same for bf16).
  - The mid attention (head dim C = 512) is written out with float32 scores in query chunks (`attention`).
  - bf16: `nn.Conv2d` rounds the convolution, then adds the bias (a second rounding); torch adds it inside its float32
    accumulator. A 1-ulp difference, kept for speed (a float32 conv would double the activation traffic on Metal);
    the bf16 runs of both backends are equally far from float32 (tests/test_mlx_vae.py).
  - Downsampling pads right and bottom only, then a stride-2 conv with padding 0.
  - Latents enter and leave in float32; the BN statistics stay float32 whatever the model dtype.
"""
from __future__ import annotations

import logging
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .. import tiling
from ..configs import GN_EPS, VAEConfig, config_from_weights
from ..errors import ConfigError
from ..weights.io import as_checkpoint
from ..weights.keymap import check_strict, shapes
from ..weights.vae import detect_kind, to_native
from .common import F32, load_into_mlx, mx_dtype, silu, to_mx

log = logging.getLogger(__name__)

ATTN_CHUNK = 4096  # query rows per mid-attention chunk (bounds the float32 score matrix, as mflux does)

__all__ = ["VAEConfig", "Flux2VAE", "Flux1VAE", "load_vae", "patchify", "unpatchify"]


# ------------------------------------------------------------------------------------------------ blocks

class GroupNorm(nn.GroupNorm):
    """torch-compatible GroupNorm over NHWC, statistics and affine in float32, one rounding to the input dtype."""

    def __init__(self, channels: int, groups: int):
        super().__init__(groups, channels, eps=GN_EPS, affine=True, pytorch_compatible=True)

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x.astype(F32)).astype(x.dtype)


def _conv(cin: int, cout: int, k: int, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(cin, groups)
        self.conv1 = _conv(cin, cout, 3)
        self.norm2 = GroupNorm(cout, groups)
        self.conv2 = _conv(cout, cout, 3)
        # 1x1 projection of the skip path only where the width changes (first block of a wider level)
        self.nin_shortcut = _conv(cin, cout, 1) if cin != cout else None

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with head dim = C (512 at real size), residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = GroupNorm(channels, groups)
        self.q = _conv(channels, channels, 1)
        self.k = _conv(channels, channels, 1)
        self.v = _conv(channels, channels, 1)
        self.proj_out = _conv(channels, channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        n = self.norm(x)
        q, k, v = (p(n).reshape(b, h * w, c) for p in (self.q, self.k, self.v))                     # [B,HW,C]
        return x + self.proj_out(attention(q, k, v).reshape(b, h, w, c))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))  # asymmetric: right/bottom only (LDM, BFL)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, 3)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape  # nearest 2x: each pixel repeated into a 2x2 block
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else None
        self.block_2 = ResnetBlock(channels, channels, groups)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class DownLevel(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, groups: int, downsample: bool):
        super().__init__()
        self.block = [ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(blocks)]
        self.downsample = Downsample(cout) if downsample else None

    def __call__(self, x: mx.array) -> mx.array:
        for blk in self.block:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.block = [ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(blocks)]
        self.upsample = Upsample(cout) if upsample else None

    def __call__(self, x: mx.array) -> mx.array:
        for blk in self.block:
            x = blk(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """image NHWC [B,H,W,3] in [-1,1] -> moments [B,H/8,W/8,2z] (mean first, then log-variance)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, last = cfg.enc_channels, cfg.norm_num_groups, len(cfg.enc_channels) - 1
        self.conv_in = _conv(cfg.in_channels, ch[0], 3)
        self.down = [DownLevel(ch[max(i - 1, 0)], ch[i], cfg.enc_blocks, g, i < last) for i in range(len(ch))]
        self.mid = MidBlock(ch[-1], g, cfg.mid_attention)
        self.norm_out = GroupNorm(ch[-1], g)
        self.conv_out = _conv(ch[-1], 2 * cfg.z_channels, 3)
        self.quant_conv = _conv(2 * cfg.z_channels, 2 * cfg.z_channels, 1) if cfg.quant_conv else None

    def __call__(self, x: mx.array) -> mx.array:
        return self.tail(self.features(x))

    def features(self, x: mx.array) -> mx.array:
        """Full-resolution part (tiled by a tiled encode): image -> features at 1/8 scale."""
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return x

    def tail(self, x: mx.array) -> mx.array:
        """1/8-scale part (always whole): -> moments."""
        x = self.conv_out(silu(self.norm_out(self.mid(x))))
        return x if self.quant_conv is None else self.quant_conv(x)


class Decoder(nn.Module):
    """raw latent NHWC [B,h,w,z] -> image [B,8h,8w,3] in about [-1,1]. `up[0]` is full resolution and runs last."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, last = cfg.dec_channels, cfg.norm_num_groups, len(cfg.dec_channels) - 1
        self.post_quant_conv = _conv(cfg.z_channels, cfg.z_channels, 1) if cfg.quant_conv else None
        self.conv_in = _conv(cfg.z_channels, ch[-1], 3)
        self.mid = MidBlock(ch[-1], g, cfg.mid_attention)
        # level i is fed by level i+1 (or by the mid block for the deepest level)
        self.up = [UpLevel(ch[min(i + 1, last)], ch[i], cfg.dec_blocks, g, i > 0) for i in range(len(ch))]
        self.norm_out = GroupNorm(ch[0], g)
        self.conv_out = _conv(ch[0], cfg.out_channels, 3)

    def __call__(self, z: mx.array) -> mx.array:
        return self.tail(self.head(z))

    def head(self, z: mx.array) -> mx.array:
        """Latent-scale part (always whole: its attention and GroupNorms see the whole image)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.mid(self.conv_in(z))

    def tail(self, x: mx.array) -> mx.array:
        """Upsampling part (tiled by a tiled decode): mid-block features -> image."""
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(silu(self.norm_out(x)))


class LatentNorm(nn.Module):
    """FLUX.2's BatchNorm2d(128, affine=False) in eval mode: a fixed per-channel standardisation (NCHW latents)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))

    def _stats(self) -> tuple[mx.array, mx.array]:
        mean = self.running_mean.astype(F32).reshape(1, -1, 1, 1)
        std = mx.sqrt(self.running_var.astype(F32).reshape(1, -1, 1, 1) + self.eps)
        return mean, std

    def normalize(self, z: mx.array) -> mx.array:
        mean, std = self._stats()
        return (z - mean) / std           # the pipeline's formula (not x*rsqrt), for bit-level agreement

    def denormalize(self, z: mx.array) -> mx.array:
        mean, std = self._stats()
        return z * std + mean


# ------------------------------------------------------------------------------------------------ top models

class _FluxVAE(nn.Module):
    """Shared half of both wrappers: NCHW image <-> raw posterior mean. Subclasses add the latent convention."""

    kind = ""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def downscale(self) -> int:
        return 2 ** (self.config.levels - 1)

    @property
    def factor(self) -> int:
        """Pixels per raw-latent position per side (8)."""
        return 2 ** (self.config.levels - 1)

    def _mean(self, img01, tile: int | None = None) -> mx.array:
        """[B,3,H,W] in [0,1] -> posterior mean [B,z,H/8,W/8], float32 NCHW. `tile`: pixel tile side or None."""
        img01 = _as_mx(img01)
        b, c, h, w = img01.shape
        if h % self.downscale or w % self.downscale:
            raise ConfigError(f"{type(self).__name__}.encode: image size {h}x{w} must be a multiple of "
                              f"{self.downscale}; crop or resize it first.")
        x = (img01.astype(F32) * 2 - 1).astype(self.dtype).transpose(0, 2, 3, 1)                       # NHWC
        f, z = self.factor, self.config.z_channels
        if tile:
            t, o = tiling.decode_geometry(tile, factor=f)
            feats = _blend(lambda y0, y1, x0, x1: self.encoder.features(x[:, y0 * f:y1 * f, x0 * f:x1 * f]),
                           tiling.plan(h // f, w // f, t, o, 1), 1)
            moments = self.encoder.tail(feats.astype(self.dtype))
        else:
            moments = self.encoder(x)
        return moments[..., :z].astype(F32).transpose(0, 3, 1, 2)

    def _image(self, z: mx.array, tile: int | None = None) -> mx.array:
        """raw latent NCHW (float32) -> image [B,3,H,W] in [0,1], float32. `tile`: pixel tile side or None."""
        z = z.transpose(0, 2, 3, 1).astype(self.dtype)
        if tile:
            f = self.factor
            t, o = tiling.decode_geometry(tile, factor=f)
            mid = self.decoder.head(z)
            x = _blend(lambda y0, y1, x0, x1: self.decoder.tail(mid[:, y0:y1, x0:x1]),
                       tiling.plan(z.shape[1], z.shape[2], t, o, f), f)
        else:
            x = self.decoder(z)
        return mx.clip(x.astype(F32) / 2 + 0.5, 0.0, 1.0).transpose(0, 3, 1, 2)

    def _check_latent(self, z: mx.array) -> None:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
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

    def encode(self, img01, tile: int | None = None) -> mx.array:
        return self.bn.normalize(patchify(self._mean(img01, tile)))

    def decode(self, z, tile: int | None = None) -> mx.array:
        z = _as_mx(z)
        self._check_latent(z)
        return self._image(unpatchify(self.bn.denormalize(z.astype(F32))), tile)


class Flux1VAE(_FluxVAE):
    """FLUX.1 VAE (Z-Image). encode: [B,3,H,W] in [0,1] -> (mean - shift) * scale [B,16,H/8,W/8]; decode: inverse."""

    kind = "flux1"

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    def encode(self, img01, tile: int | None = None) -> mx.array:
        return (self._mean(img01, tile) - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, z, tile: int | None = None) -> mx.array:
        z = _as_mx(z)
        self._check_latent(z)
        return self._image(z.astype(F32) / self.config.scaling_factor + self.config.shift_factor, tile)


# ------------------------------------------------------------------------------------------------ loading

def load_vae(source, dtype="float32", norm_num_groups: int | None = None) -> Flux2VAE | Flux1VAE:
    """Load either FLUX VAE on MLX from a .safetensors file, a diffusers `vae/` folder, a pipeline folder, a
    `Checkpoint` or a state dict (torch tensors of any dtype, converted to mx once). The kind comes from the keys
    (`bn.running_mean` => FLUX.2), the structure from the shapes, the group count from `norm_num_groups`, else
    config.json / the safetensors metadata `config`, else 32. dtype: 'bfloat16' | 'float16' | 'float32'."""
    ckpt = as_checkpoint(source, component="vae")
    sd = to_native(ckpt.sd)
    kind = detect_kind(sd)
    cfg = config_from_weights(sd, kind, ckpt.config, norm_num_groups)
    cls = Flux2VAE if kind == "flux2" else Flux1VAE
    model = cls(cfg)  # initial weights stay lazy and are never evaluated: replaced below
    what = f"{cls.__name__} ({ckpt.source or 'state dict'})"
    own = shapes(dict(tree_flatten(model.parameters())))
    check_strict({k: _oihw(s) for k, s in own.items()}, shapes(sd), what)  # in the file's layout, for the message
    sd = {k: _to_ohwi(v) if len(own[k]) == 4 else v for k, v in sd.items()}
    load_into_mlx(model, sd, what, dtype=mx_dtype(dtype), keep_float32=lambda k: k.startswith("bn."))
    log.info("loaded %s (mlx): z=%d, widths %s, groups %d, %s", cls.__name__, cfg.z_channels, cfg.dec_channels,
             cfg.norm_num_groups, dtype)
    return model


# ------------------------------------------------------------------------------------------------ helpers

def patchify(z: mx.array) -> mx.array:
    """[B,C,H,W] -> [B,4C,H/2,W/2], channel c*4 + ph*2 + pw (BFL `c (i pi) (j pj) -> (c pi pj) i j`)."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: mx.array) -> mx.array:
    """Inverse of `patchify`."""
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def _blend(run, tiles, scale: int) -> mx.array:
    """Weighted sum of `run(y0, y1, x0, x1)` (NHWC outputs at `scale` x the tile) over the plan, divided by the
    weight sum. Each tile is evaluated before the next, so only one tile's activations exist at a time."""
    out = wsum = None
    for y0, y1, x0, x1, wy, wx in tiles:
        part = run(y0, y1, x0, x1).astype(F32)
        if out is None:
            b, _, _, c = part.shape
            h, w = tiles[-1][1] * scale, tiles[-1][3] * scale
            out, wsum = mx.zeros((b, h, w, c), dtype=F32), mx.zeros((1, h, w, 1), dtype=F32)
        wt = mx.array(np.outer(wy, wx))[None, :, :, None]
        ys, xs = slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale)
        out[:, ys, xs, :] = out[:, ys, xs, :] + part * wt
        wsum[:, ys, xs, :] = wsum[:, ys, xs, :] + wt
        mx.eval(out, wsum)
    return out / wsum


def attention(q: mx.array, k: mx.array, v: mx.array, chunk: int = ATTN_CHUNK) -> mx.array:
    """Single-head attention q, k, v [B, N, C] -> [B, N, C], scale 1/sqrt(C), with the precision of torch's flash
    kernels: float32 scores, softmax and accumulation, probabilities rounded to the model dtype for P @ V.

    Not `mx.fast.scaled_dot_product_attention`: with head dim C = 512 it has no fused kernel and its fallback (and the
    Linux-CPU one) rounds the bf16 scores. Queries go in chunks so the float32 scores stay [B, chunk, N] (256 MiB
    at 1024^2, where N = 128^2) instead of [B, N, N]."""
    n, c = q.shape[1], q.shape[2]
    kt = k.astype(F32).swapaxes(1, 2)
    vf = v.astype(F32)
    outs = []
    for i in range(0, n, chunk):
        s = (q[:, i:i + chunk].astype(F32) @ kt) * (1.0 / math.sqrt(c))                            # [B,chunk,N]
        p = mx.exp(s - mx.max(s, axis=-1, keepdims=True))
        outs.append((p.astype(q.dtype).astype(F32) @ vf) / mx.sum(p, axis=-1, keepdims=True))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
    return out.astype(q.dtype)


def _as_mx(a) -> mx.array:
    """mx / numpy / torch image or latent -> mx (float32 unless already mx)."""
    return a if isinstance(a, mx.array) else to_mx(a, "float32")


def _oihw(shape: tuple) -> tuple:
    """An MLX conv weight shape (O, kh, kw, I) as the checkpoint stores it (O, I, kh, kw); others unchanged."""
    return (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else tuple(shape)


def _to_ohwi(t):
    """OIHW conv weight (torch or numpy) -> OHWI, converted once at load."""
    return t.permute(0, 2, 3, 1) if hasattr(t, "permute") else np.transpose(t, (0, 2, 3, 1))
