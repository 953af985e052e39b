"""Z-Image (Turbo / Base) diffusion transformer (MLX).

The MLX twin of `flux_core/torch/zimage.py`: same classes, attribute (parameter) names and forward signature, the
same original-layout state dict (`flux_core.weights.zimage.to_native` converts diffusers folders) and the torch
file's `ZImageConfig`. Equal to the torch model to ~1e-6 relative in float32 (tests/test_mlx_zimage.py), and hence to
diffusers 0.42.1 `ZImageTransformer2DModel`. docs/MODELS.md §Z2, §Z3, §S1.

Architecture (Z-Image-Turbo, 6.155 B params): dim 3840 = 30 heads x 128, 30 main layers, 2 noise_refiner (modulated,
image only), 2 context_refiner (unmodulated, caption only). 2x2 patches -> 64-vector (ph, pw, c), c fastest ->
x_embedder. Caption: RMSNorm -> Linear (2560 -> 3840). t_embedder: sinusoid(t*1000) -> 1024 -> 256. SwiGLU FFN 10240.
Sandwich RMSNorms (eps 1e-5), tanh gates, final non-affine LayerNorm (eps 1e-6) with a scale-only adaLN.
RoPE on (t, h, w) = (32, 48, 48) dims, theta 256, interleaved pairs.

Pitfalls:
  * t is 1 - sigma and the output is ~ x0 - noise (the sampler negates it): don't "fix" either here.
  * Caption and image are padded to multiples of 32 with learned, UNMASKED pad tokens; caption slots (pads included)
    sit at (1+j, 0, 0), image patches at (Lp+1, h, w), image pads at (0, 0, 0): the image RoPE depends on the caption
    length, so `ZImageRope` is per (caption lengths, latent size), built once per generation, never a module attribute.
  * Masks exist only for batch padding (items whose padded caption lengths differ).
  * RMSNorm: float32 statistics, rounded to the weight dtype BEFORE the weight multiply (diffusers), which is exactly
    `mx.fast.rms_norm` (checked bit for bit in bf16); RoPE tables are float32 cos/sin of float32-rounded float64 angles.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..configs import FREQ_DIM, ZImageConfig, caption_list, check_rope_cache, zimage_position_ids
from ..weights import zimage as zkeys
from ..weights.io import as_checkpoint
from .common import (F32, SiLU, apply_rope, as_time, attention, axis_angles, layer_norm, load_into_mlx, mx_dtype,
                     silu, timestep_embedding)

logger = logging.getLogger(__name__)


__all__ = ["ZImageConfig", "ZImageTransformer", "ZImageRope", "load_zimage", "position_ids", "rope_angles"]


# --------------------------------------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """Statistics in float32, result cast to the weight dtype before the weight multiply (diffusers RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))

    def __call__(self, x):
        if x.dtype == self.weight.dtype:  # the fused kernel rounds exactly there (checked bit for bit in bf16)
            return mx.fast.rms_norm(x, self.weight, self.eps)
        return mx.fast.rms_norm(x.astype(F32), None, self.eps).astype(self.weight.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.qk_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.qk_norm_eps)

    def __call__(self, x, rope, mask):  # x [B, S, D]; rope (cos, sin) [B, S, 1, d/2]; mask [B, 1, 1, S] bool | None
        B, S, D = x.shape
        qkv = self.qkv(x).reshape(B, S, 3, self.n_heads, D // self.n_heads)  # each [B, S, H, d]
        q = apply_rope(self.q_norm(qkv[:, :, 0]), *rope)
        k = apply_rope(self.k_norm(qkv[:, :, 1]), *rope)
        return self.out(attention(q, k, qkv[:, :, 2], mask))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x):
        return self.w2(silu(self.w1(x)) * self.w3(x))


class ZImageBlock(nn.Module):
    """One layer of `layers`, `noise_refiner` (modulated) or `context_refiner` (modulated=False: no adaLN at all)."""

    def __init__(self, cfg: ZImageConfig, modulated: bool = True):
        super().__init__()
        self.modulated = modulated
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        if modulated:  # index .0: the original is a one-element Sequential; no SiLU before it (docs/MODELS.md §Z2)
            self.adaLN_modulation = [nn.Linear(cfg.adaln_dim, 4 * cfg.dim)]

    def __call__(self, x, rope, mask, adaln=None):  # x [B, S, D], adaln [B, A]
        if not self.modulated:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = mx.split(self.adaLN_modulation[0](adaln)[:, None], 4, axis=2)
        h = self.attention(self.attention_norm1(x) * (1 + scale_msa), rope, mask)
        x = x + mx.tanh(gate_msa) * self.attention_norm2(h)
        h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + mx.tanh(gate_mlp) * self.ffn_norm2(h)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.mlp = [nn.Linear(FREQ_DIM, cfg.t_hidden), SiLU(), nn.Linear(cfg.t_hidden, cfg.adaln_dim)]

    def __call__(self, t):  # t [B] already scaled by t_scale
        # the bias, not the weight: a pre-quantized file may hold this weight as uint32 codes
        h = timestep_embedding(t, FREQ_DIM).astype(self.mlp[0].bias.dtype)
        for layer in self.mlp:
            h = layer(h)
        return h


class FinalLayer(nn.Module):
    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.eps = cfg.final_eps
        self.linear = nn.Linear(cfg.dim, cfg.patch_dim)
        self.adaLN_modulation = [SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim)]  # scale only

    def __call__(self, x, adaln):
        scale = 1 + self.adaLN_modulation[1](silu(adaln))[:, None]
        return self.linear(layer_norm(x, self.eps) * scale)


# --------------------------------------------------------------------------------------------------------- model


@dataclass
class ZImageRope:
    """Everything in a forward that depends only on (caption lengths, latent size): RoPE tables and masks.

    Built once per generation by `ZImageTransformer.make_rope` (evaluated, float32) and passed to every step as
    `rope_cache`."""

    cap_lens: tuple
    height: int
    width: int
    img: tuple  # (cos, sin) [B, Np, 1, d/2]
    cap: tuple  # [B, Lmax, 1, d/2]
    joint: tuple  # [B, Np + Lmax, 1, d/2]: image tokens first, then the caption, then batch padding
    cap_mask: mx.array | None = None  # [B, 1, 1, Lmax] bool, None when every padded caption has the same length
    joint_mask: mx.array | None = None
    cap_padded: tuple = field(default=())  # Lp_i = ceil32(L_i)

    def check(self, cap_lens: Sequence[int], height: int, width: int) -> None:
        check_rope_cache(self, cap_lens, height, width)

    def arrays(self) -> list:
        return [a for a in (*self.img, *self.cap, *self.joint, self.cap_mask, self.joint_mask) if a is not None]


class ZImageTransformer(nn.Module):
    def __init__(self, config: ZImageConfig):
        super().__init__()
        self.config = cfg = config
        self.x_embedder = nn.Linear(cfg.patch_dim, cfg.dim)
        self.cap_embedder = [RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim)]
        self.t_embedder = TimestepEmbedder(cfg)
        self.x_pad_token = mx.zeros((1, cfg.dim))
        self.cap_pad_token = mx.zeros((1, cfg.dim))
        self.noise_refiner = [ZImageBlock(cfg) for _ in range(cfg.n_refiner_layers)]
        self.context_refiner = [ZImageBlock(cfg, modulated=False) for _ in range(cfg.n_refiner_layers)]
        self.layers = [ZImageBlock(cfg) for _ in range(cfg.n_layers)]
        self.final_layer = FinalLayer(cfg)

    @property
    def dtype(self) -> mx.Dtype:
        return self.x_embedder.bias.dtype  # not .weight: it may be quantized codes (GGUF / MLX affine files)

    def __call__(self, x, t, cap_feats, rope_cache: ZImageRope | None = None):
        """x [B, C, H, W] latent; t [B] or scalar = 1 - sigma; cap_feats a list of [L_i, cap_dim] or [B, L, cap_dim].

        Returns the raw prediction [B, C, H, W] (~ x0 - noise; the sampler negates it) in x's dtype."""
        cfg = self.config
        B, C, H, W = x.shape
        caps = caption_list(cap_feats, B, cfg.cap_feat_dim)
        cap_lens = [c.shape[0] for c in caps]
        rope = self.make_rope(cap_lens, H, W) if rope_cache is None else rope_cache
        rope.check(cap_lens, H, W)
        dtype = self.dtype
        # 1. timestep -> adaln [B, A]
        adaln = self.t_embedder(as_time(t, B) * cfg.t_scale).astype(dtype)
        # 2. image tokens, padded to Np with x_pad_token: [B, Np, D]
        img = self.x_embedder(patchify(x.astype(dtype), cfg.patch_size))
        n_img, n_pad = img.shape[1], rope.img[0].shape[1]
        pad = mx.broadcast_to(self.x_pad_token.astype(dtype)[None], (B, n_pad - n_img, cfg.dim))
        img = mx.concatenate([img, pad], axis=1)
        for block in self.noise_refiner:
            img = block(img, rope.img, None, adaln)
        # 3. caption tokens, each padded to Lp_i with cap_pad_token, then batch-padded: [B, Lmax, D]
        cap = self._embed_captions(caps, rope, dtype)
        for block in self.context_refiner:
            cap = block(cap, rope.cap, rope.cap_mask)
        # 4. joint sequence [image | caption | batch padding]; the mask hides only the batch padding
        joint = mx.concatenate([img, cap], axis=1)
        for block in self.layers:
            joint = block(joint, rope.joint, rope.joint_mask, adaln)
        # 5. final layer on the real image tokens only (it is per token), back to the latent grid
        out = self.final_layer(joint[:, :n_img], adaln)
        return unpatchify(out, H, W, cfg.patch_size).astype(x.dtype)

    def _embed_captions(self, caps, rope: ZImageRope, dtype):
        lens = [c.shape[0] for c in caps]
        flat = mx.concatenate([c.astype(dtype) for c in caps], axis=0)
        for layer in self.cap_embedder:  # one matmul for the whole batch
            flat = layer(flat)
        l_max, dim = rope.cap[0].shape[1], self.config.dim
        pad_token = self.cap_pad_token.astype(dtype)
        rows, start = [], 0
        for n, lp in zip(lens, rope.cap_padded):
            parts = [flat[start:start + n], mx.broadcast_to(pad_token, (lp - n, dim))]
            if l_max > lp:  # batch padding: masked as keys, dropped as queries
                parts.append(mx.zeros((l_max - lp, dim), dtype=dtype))
            rows.append(mx.concatenate(parts, axis=0))
            start += n
        return mx.stack(rows)

    def make_rope(self, cap_lens: Sequence[int], height: int, width: int) -> ZImageRope:
        """Precompute RoPE tables and masks (evaluated) for captions of `cap_lens` tokens and a `height` x `width`
        latent."""
        cfg = self.config
        p = cfg.patch_size
        cap_lp = cfg.padded_caption_lengths(cap_lens, height, width)
        l_max = max(cap_lp)
        img_t, cap_t, joint_t = [], [], []
        for lp in cap_lp:
            cap_ids, img_ids = position_ids(lp, height // p, width // p)
            cfg.check_positions(np.concatenate([cap_ids, img_ids]).max(0).tolist())
            ang_cap = rope_angles(cap_ids, cfg.axes_dims, cfg.rope_theta)
            ang_img = rope_angles(img_ids, cfg.axes_dims, cfg.rope_theta)
            ang_cap = np.pad(ang_cap, ((0, l_max - lp), (0, 0)))  # batch padding rows: angle 0 (masked anyway)
            img_t.append(ang_img), cap_t.append(ang_cap), joint_t.append(np.concatenate([ang_img, ang_cap]))

        def table(angles):
            a = np.stack(angles)[:, :, None, :]  # [B, S, 1, d/2] float32
            a = a.astype(np.float64)  # float32 angles, correctly rounded cos / sin (torch: float32 cos / sin)
            return mx.array(np.cos(a).astype(np.float32)), mx.array(np.sin(a).astype(np.float32))

        cap_mask = joint_mask = None
        if len(set(cap_lp)) > 1:
            valid = np.arange(l_max)[None, :] < np.array(cap_lp)[:, None]  # [B, Lmax]
            cap_mask = mx.array(valid[:, None, None, :])
            n_img = img_t[0].shape[0]
            joint_mask = mx.array(np.pad(valid, ((0, 0), (n_img, 0)), constant_values=True)[:, None, None, :])
        rope = ZImageRope(tuple(int(n) for n in cap_lens), height, width, table(img_t), table(cap_t), table(joint_t),
                          cap_mask, joint_mask, tuple(cap_lp))
        mx.eval(rope.arrays())  # constants of every compiled step: evaluate before anything is traced (mflux #714)
        return rope



def load_zimage(path_or_checkpoint, dtype="float32", consume: bool = False) -> ZImageTransformer:
    """Load a Z-Image transformer from a single file (original / ComfyUI layout, any prefix), a diffusers folder, a
    pipeline folder (its `transformer/`), or a `Checkpoint`. dtype: 'bfloat16' | 'float16' | 'float32'.
    consume=True empties a given Checkpoint's `sd` while converting (peak memory: one model, not two)."""
    ckpt = as_checkpoint(path_or_checkpoint, component="transformer")
    sd = zkeys.to_native(ckpt.sd)
    config = ZImageConfig.from_state_dict(sd, ckpt.config)
    model = ZImageTransformer(config)  # initial weights stay lazy and are never evaluated: replaced below
    if consume:
        ckpt.sd.clear()  # `sd` now holds the only references; load_into_mlx drops each once converted
    load_into_mlx(model, sd, f"Z-Image transformer ({ckpt.source or 'state dict'})", dtype=mx_dtype(dtype),
                  consume=consume)
    return model


# --------------------------------------------------------------------------------------------------------- helpers


def position_ids(cap_padded: int, h_tokens: int, w_tokens: int):
    """(caption ids [Lp, 3], image ids [Np, 3]) int64 numpy (configs.zimage_position_ids)."""
    return zimage_position_ids(cap_padded, h_tokens, w_tokens)


def rope_angles(ids: np.ndarray, axes_dims: Sequence[int], theta: float) -> np.ndarray:
    """Angles [S, d/2] float32: per axis, position * theta^(-2j/d_axis), in float64 then rounded (as diffusers)."""
    return np.concatenate([axis_angles(ids[:, a], d, theta) for a, d in enumerate(axes_dims)], -1).astype(np.float32)


def patchify(x, p: int):
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], row-major tokens, vector order (ph, pw, c) with c fastest."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens, H: int, W: int, p: int):
    """Inverse of `patchify`: [B, (H/p)(W/p), p*p*C] -> [B, C, H, W]."""
    B, _, D = tokens.shape
    C = D // (p * p)
    return tokens.reshape(B, H // p, W // p, p, p, C).transpose(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)



