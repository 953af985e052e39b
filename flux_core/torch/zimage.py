"""Z-Image (Turbo / Base) diffusion transformer, torch.

Matches diffusers 0.42.1 `ZImageTransformer2DModel` (basic, non-Omni mode) to float32 rounding; module names are the
ORIGINAL checkpoint keys (Tongyi / ComfyUI single file), so those files load one to one and diffusers folders go
through `flux_core.weights.zimage.DIFFUSERS`. docs/MODELS.md §Z2, §Z3, §S1.

Architecture (Z-Image-Turbo, 6.155 B params):
  dim 3840 = 30 heads x 128, 30 main layers, 2 noise_refiner (modulated, image only), 2 context_refiner (unmodulated,
  caption only). Latent 16 ch, 2x2 patches -> 64-vector in (ph, pw, c) order (c fastest) -> x_embedder (64->3840).
  Caption: Qwen3-4B hidden_states[-2] (2560) -> RMSNorm -> Linear (2560->3840). t_embedder: 256-sinusoid of
  t*1000 -> 1024 -> 256 ("adaln", = min(dim, 256)). FFN hidden int(3840/3*8) = 10240, SwiGLU w2(silu(w1 x) * w3 x).
  RoPE on 3 axes (t, h, w) = (32, 48, 48) dims, theta 256, interleaved pairs.

Pitfalls (each cost someone an afternoon; see docs/NOTES.md):
  * t is 1 - sigma (not sigma) and the output is ~ x0 - noise: the sampler negates it. Don't "fix" either here.
  * Block modulation is Linear(adaln) with NO SiLU, gates are tanh(.), scales 1 + s, and there are FOUR RMSNorms
    per block (sandwich: norm before and after attention / FFN). The final layer is SiLU -> Linear and gives a
    scale only, applied after a non-affine LayerNorm with eps 1e-6 (the RMSNorms use 1e-5).
  * Caption and image are each padded to a multiple of 32 with learned pad tokens that are NOT masked: they attend and
    are attended to. Caption positions are (1+j, 0, 0) for all Lp = ceil32(L) slots (pads included); image patches
    (Lp+1, h, w); image pads (0, 0, 0). So the image RoPE depends on the caption length.
  * Attention masks exist only for batch padding (items whose padded caption lengths differ).
  * The sequence order [image | caption] is diffusers'; ComfyUI uses [caption | image]. Same math (positions live
    only in RoPE), different float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs import FREQ_DIM, ZImageConfig, caption_list, check_rope_cache, zimage_position_ids
from ..weights import zimage as zkeys
from ..weights.io import as_checkpoint
from . import kernels
from .common import load_into_torch, rotate_pairs, sdpa, timestep_embedding


# --------------------------------------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """Statistics in float32, result cast to the weight dtype before the weight multiply (diffusers RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # torch's rms_norm keeps the statistics and x * rsqrt(.) in float32 and rounds once to x's dtype: diffusers'
        # normalised value when x has the weight's dtype. The weight multiply follows in the weight dtype (diffusers'
        # order). Upcasting x first in that case (the earlier form) added a float32 copy and a cast per norm: ~3x the
        # memory traffic, ~200 norms of 4608 x 3840 per 1024² step. A float32 weight beside bf16 activations (as a
        # file may keep its norms) still gets the unrounded float32 value, as in diffusers.
        xin = x if x.dtype == self.weight.dtype else x.float()
        return F.rms_norm(xin, (x.shape[-1],), None, self.eps).to(self.weight.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.qk_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.qk_norm_eps)

    def forward(self, x, rope, mask):  # x [B, S, D]; rope (cos, sin) [B, S, 1, d/2]; mask [B, 1, 1, S] bool | None
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).unbind(2)  # each [B, S, H, d]
        q, k = norm_rope(q, self.q_norm, rope), norm_rope(k, self.k_norm, rope)
        o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.out(o.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * cfg.dim))

    def forward(self, x, rope, mask, adaln=None):  # x [B, S, D], adaln [B, A]
        if not self.modulated:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
        h = self.attention(self.attention_norm1(x) * (1 + scale_msa), rope, mask)
        x = x + gate_msa.tanh() * self.attention_norm2(h)
        h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(h)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, cfg.t_hidden), nn.SiLU(), nn.Linear(cfg.t_hidden, cfg.adaln_dim))

    def forward(self, t):  # t [B] already scaled by t_scale
        # the bias, not the weight: a GGUF file may keep this weight quantized (uint8 blocks, GGUFLinear)
        return self.mlp(timestep_embedding(t, FREQ_DIM).to(self.mlp[0].bias.dtype))


class FinalLayer(nn.Module):
    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.eps = cfg.final_eps
        self.linear = nn.Linear(cfg.dim, cfg.patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim))  # scale only

    def forward(self, x, adaln):
        scale = 1 + self.adaLN_modulation(adaln).unsqueeze(1)
        return self.linear(F.layer_norm(x, x.shape[-1:], eps=self.eps) * scale)


# --------------------------------------------------------------------------------------------------------- model


@dataclass
class ZImageRope:
    """Everything in a forward that depends only on (caption lengths, latent size): RoPE tables and masks.

    Built once per generation by `ZImageTransformer.make_rope` and passed to every step as `rope_cache`.
    Tables are float32 whatever the model dtype (the rotation runs in float32, like diffusers)."""

    cap_lens: tuple
    height: int
    width: int
    img: tuple  # (cos, sin, cos + i·sin) [B, Np, 1, d/2]
    cap: tuple  # [B, Lmax, 1, d/2]
    joint: tuple  # [B, Np + Lmax, 1, d/2]: image tokens first, then the caption, then batch padding
    cap_mask: torch.Tensor | None = None  # [B, 1, 1, Lmax] bool, None when every padded caption has the same length
    joint_mask: torch.Tensor | None = None
    cap_padded: tuple = field(default=())  # Lp_i = ceil32(L_i)

    def check(self, cap_lens: Sequence[int], height: int, width: int) -> None:
        check_rope_cache(self, cap_lens, height, width)


class ZImageTransformer(nn.Module):
    def __init__(self, config: ZImageConfig):
        super().__init__()
        self.config = cfg = config
        self.x_embedder = nn.Linear(cfg.patch_dim, cfg.dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.t_embedder = TimestepEmbedder(cfg)
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList(ZImageBlock(cfg) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(ZImageBlock(cfg, modulated=False) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(ZImageBlock(cfg) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg)

    def forward(self, x, t, cap_feats, rope_cache: ZImageRope | None = None):
        """x [B, C, H, W] latent; t [B] or scalar = 1 - sigma; cap_feats a list of [L_i, cap_dim] or [B, L, cap_dim].

        Returns the raw prediction [B, C, H, W] (~ x0 - noise; the sampler negates it) in x's dtype."""
        cfg = self.config
        B, C, H, W = x.shape
        caps = caption_list(cap_feats, B, cfg.cap_feat_dim)
        cap_lens = [c.shape[0] for c in caps]
        rope = self.make_rope(cap_lens, H, W, device=x.device) if rope_cache is None else rope_cache
        rope.check(cap_lens, H, W)
        dtype = self.x_embedder.bias.dtype  # not .weight: it may be a quantized buffer (GGUF)
        # 1. timestep -> adaln [B, A]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(B)
        adaln = self.t_embedder(t * cfg.t_scale).to(dtype)
        # 2. image tokens, padded to Np with x_pad_token: [B, Np, D]
        img = self.x_embedder(patchify(x.to(dtype), cfg.patch_size))
        n_img, n_pad = img.shape[1], rope.img[0].shape[1]
        img = torch.cat([img, self.x_pad_token.to(dtype).expand(B, n_pad - n_img, -1)], 1)
        for block in self.noise_refiner:
            img = block(img, rope.img, None, adaln)
        # 3. caption tokens, each padded to Lp_i with cap_pad_token, then batch-padded: [B, Lmax, D]
        cap = self._embed_captions(caps, rope, dtype)
        for block in self.context_refiner:
            cap = block(cap, rope.cap, rope.cap_mask)
        # 4. joint sequence [image | caption | batch padding]; the mask hides only the batch padding
        joint = torch.cat([img, cap], 1)
        for block in self.layers:
            joint = block(joint, rope.joint, rope.joint_mask, adaln)
        # 5. final layer on the real image tokens only (it is per token), back to the latent grid
        out = self.final_layer(joint[:, :n_img], adaln)
        return unpatchify(out, H, W, cfg.patch_size).to(x.dtype)

    def _embed_captions(self, caps, rope: ZImageRope, dtype):
        lens = [c.shape[0] for c in caps]
        emb = self.cap_embedder(torch.cat(caps).to(dtype)).split(lens)  # one matmul for the whole batch
        out = emb[0].new_zeros(len(caps), rope.cap[0].shape[1], self.config.dim)
        for i, (e, lp) in enumerate(zip(emb, rope.cap_padded)):
            out[i, : e.shape[0]] = e
            out[i, e.shape[0]: lp] = self.cap_pad_token.to(dtype)
        return out

    def make_rope(self, cap_lens: Sequence[int], height: int, width: int, device=None) -> ZImageRope:
        """Precompute RoPE tables and masks for captions of `cap_lens` tokens and a `height` x `width` latent."""
        cfg = self.config
        p = cfg.patch_size
        cap_lp = cfg.padded_caption_lengths(cap_lens, height, width)
        l_max = max(cap_lp)
        img_t, cap_t, joint_t = [], [], []
        for lp in cap_lp:
            cap_ids, img_ids = position_ids(lp, height // p, width // p)
            cfg.check_positions(torch.cat([cap_ids, img_ids]).max(0).values.tolist())
            ang_cap = rope_angles(cap_ids, cfg.axes_dims, cfg.rope_theta)
            ang_img = rope_angles(img_ids, cfg.axes_dims, cfg.rope_theta)
            ang_cap = F.pad(ang_cap, (0, 0, 0, l_max - lp))  # batch padding rows: angle 0 (masked anyway)
            img_t.append(ang_img), cap_t.append(ang_cap), joint_t.append(torch.cat([ang_img, ang_cap]))

        def table(angles):
            a = torch.stack(angles).unsqueeze(2).to(device)  # [B, S, 1, d/2]
            cos, sin = a.cos(), a.sin()
            return cos, sin, torch.complex(cos, sin)  # complex form: one multiply kernel per rotation

        cap_mask = joint_mask = None
        if len(set(cap_lp)) > 1:
            valid = torch.arange(l_max)[None, :] < torch.tensor(cap_lp)[:, None]  # [B, Lmax]
            cap_mask = valid[:, None, None, :].to(device)
            n_img = img_t[0].shape[0]
            joint_mask = F.pad(valid, (n_img, 0), value=True)[:, None, None, :].to(device)
        return ZImageRope(tuple(int(n) for n in cap_lens), height, width, table(img_t), table(cap_t), table(joint_t),
                          cap_mask, joint_mask, tuple(cap_lp))



def load_zimage(path_or_checkpoint, dtype=torch.float32, device="cpu") -> ZImageTransformer:
    """Load a Z-Image transformer from a single file (original / ComfyUI layout, any prefix), a diffusers folder, a
    pipeline folder (its `transformer/`), or an already-read `flux_core.weights.io.Checkpoint`."""
    ckpt = as_checkpoint(path_or_checkpoint, component="transformer")
    sd = zkeys.to_native(ckpt.sd)
    config = ZImageConfig.from_state_dict(sd, ckpt.config)
    with torch.device("meta"):
        model = ZImageTransformer(config)
    load_into_torch(model, sd, f"Z-Image transformer ({ckpt.source or 'state dict'})", dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------- helpers






def rope_angles(ids, axes_dims: Sequence[int], theta: float):
    """Angles [S, d/2] float32: per axis, position * theta^(-2j/d_axis), in float64 then rounded (as diffusers)."""
    out = []
    for axis, d in enumerate(axes_dims):
        inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        out.append((ids[:, axis].to(torch.float64)[:, None] * inv[None, :]).float())
    return torch.cat(out, -1)


def apply_rope(x, rope):
    """Rotate interleaved pairs (x[2j], x[2j+1]) in float32; x [B, S, H, d], rope = (cos, sin, cos + i·sin), each
    [B, S, 1, d/2]. The pairs are multiplied as complex64 numbers (as diffusers does): one kernel instead of six."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * rope[2]).flatten(-2).to(x.dtype)


def norm_rope(x, norm: RMSNorm, rope):
    """The per-head q / k RMSNorm, then RoPE. Eager: on CUDA one Triton kernel (`kernels.norm_rope`), elsewhere the
    norm module, then the complex rotation. Inside compiled
    code the same arithmetic (float32 statistics, the two roundings of RMSNorm.forward, then the real-valued
    rotation) is one row-wise expression that inductor can fuse (it leaves a complex multiply as a separate kernel:
    2.7 ms per 1024² step on an H200); the rewrite took the step from 109.8 to 105.7 ms."""
    if not torch.compiler.is_compiling():
        if kernels.usable(x, norm.weight):   # CUDA eager: one Triton kernel (kernels.py); None if it cannot run
            out = kernels.norm_rope(x, norm.weight, rope[0][:, :, 0], rope[1][:, :, 0], norm.eps,
                                    round_before_weight=True)
            if out is not None:
                return out
        return apply_rope(norm(x), rope)
    xf = x.float()
    xn = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(norm.weight.dtype) * norm.weight
    return rotate_pairs(xn.float(), rope[0], rope[1]).to(x.dtype)




def patchify(x, p: int):
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], row-major tokens, vector order (ph, pw, c) with c fastest."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens, H: int, W: int, p: int):
    """Inverse of `patchify`: [B, (H/p)(W/p), p*p*C] -> [B, C, H, W]."""
    B, _, D = tokens.shape
    C = D // (p * p)
    return tokens.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def position_ids(cap_padded: int, h_tokens: int, w_tokens: int):
    """(caption ids [Lp, 3], image ids [Np, 3]) as torch int64 (see configs.zimage_position_ids)."""
    cap, img = zimage_position_ids(cap_padded, h_tokens, w_tokens)
    return torch.from_numpy(cap), torch.from_numpy(img)
