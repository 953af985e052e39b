"""FLUX.2 [klein] flow transformer (torch).

Matches diffusers 0.42.1 `Flux2Transformer2DModel` (`diffusers/models/transformers/transformer_flux2.py`) to float32
round-off; parameter names are the original BFL / ComfyUI checkpoint keys (`flux_core/weights/klein.py` converts the
diffusers layout).

Architecture (klein-4B; 9B in brackets). No linear layer has a bias.
  img_in 128 -> 3072 [4096]; txt_in 7680 [12288] -> 3072; time_in: sinusoid(1000*sigma, 256) -> MLP -> vec [B, D].
  Modulation is shared by all blocks and computed once per forward from silu(vec):
    double_stream_modulation_img / _txt: D -> 6D  [shift, scale, gate] x (attention, MLP)
    single_stream_modulation:            D -> 3D  [shift, scale, gate]
  5 [8] double blocks: separate img / txt weights, joint attention over [txt, img], SwiGLU MLP (ratio 3).
  20 [24] single blocks on the concatenated [txt, img] sequence: linear1 = [q | k | v | mlp_a | mlp_b],
    linear2 over [attn | silu(mlp_a) * mlp_b].
  final_layer: drop the text rows, adaLN with [shift, scale] (BFL order), linear D -> 128.
  Heads 24 [32] x 128; QK-RMSNorm (eps 1e-6) per head; LayerNorms have no affine (eps 1e-6).
  RoPE over 4 position axes (t, h, w, l), 32 dims each, theta 2000, *interleaved pairs* (x[2j], x[2j+1]).

Pitfalls:
  - the time input is sigma in [0, 1]; it is multiplied by 1000 here (diffusers does the same inside the model).
  - text tokens come FIRST in the joint sequence, for attention and for RoPE.
  - final adaLN is [shift, scale] in this layout (diffusers norm_out is [scale, shift]); block modulations are not swapped.
  - diffusers rounds sigma to the model dtype before the sinusoid; we keep it in float32 (identical in float32, more
    accurate in bf16: sigma 0.958 in bf16 is off by ~0.002, i.e. ~2 timesteps).
  - RoPE tables are computed on the CPU in float64 (MPS has no float64; the model never branches on device) and
    applied in float32; LayerNorm / RMSNorm use torch's fused kernels, which accumulate in float32 for bf16.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import KleinConfig, klein_position_ids, klein_text_ids
from ..weights import klein as klein_keys
from ..weights.io import as_checkpoint
from . import kernels
from .common import load_into_torch, rotate_pairs, sdpa, timestep_embedding

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ small blocks

class RMSNorm(nn.Module):
    """Per-head QK norm; the weight is called `scale` in BFL files."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.scale, self.eps)


class QKNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.query_norm = RMSNorm(dim, eps)
        self.key_norm = RMSNorm(dim, eps)


class SiLUGate(nn.Module):
    """silu(first half) * second half; sits at index 1 so the MLP keys are `*_mlp.0` / `*_mlp.2`."""

    def forward(self, x):
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """silu(vec) -> Linear -> `n` chunks of [B, 1, D] (shift, scale, gate, ...)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim, bias=False)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)


class SelfAttention(nn.Module):
    """One stream of a double block: fused qkv, per-head QK norm, output projection."""

    def __init__(self, cfg: KleinConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.norm = QKNorm(cfg.head_dim, cfg.eps)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def qkv_heads(self, x, pe):
        """[B, L, D] -> q, k, v each [B, L, H, d], q and k normed and rotated (pe: this stream's rows)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        return norm_rope(q, self.norm.query_norm, pe), norm_rope(k, self.norm.key_norm, pe), v


def _mlp(cfg: KleinConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cfg.hidden_size, 2 * cfg.mlp_hidden, bias=False), SiLUGate(),
                         nn.Linear(cfg.mlp_hidden, cfg.hidden_size, bias=False))


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: KleinConfig):
        super().__init__()
        self.eps = cfg.eps
        self.img_attn, self.txt_attn = SelfAttention(cfg), SelfAttention(cfg)
        self.img_mlp, self.txt_mlp = _mlp(cfg), _mlp(cfg)

    def forward(self, img, txt, mod_img, mod_txt, pe):
        """img [B, N, D], txt [B, T, D]; mod_* = 6 chunks [B, 1, D]; pe [B', T+N, d/2, 2, 2] (`rope_pairs`)."""
        i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = mod_img
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = mod_txt
        n_txt = txt.shape[1]   # RoPE is per token: each stream is rotated with its own rows of the joint table
        iq, ik, iv = self.img_attn.qkv_heads(_modulate(img, i_shift, i_scale, self.eps), pe[:, n_txt:])
        tq, tk, tv = self.txt_attn.qkv_heads(_modulate(txt, t_shift, t_scale, self.eps), pe[:, :n_txt])
        attn = attention(torch.cat([tq, iq], 1), torch.cat([tk, ik], 1), torch.cat([tv, iv], 1))
        txt_a, img_a = attn.split([txt.shape[1], img.shape[1]], dim=1)

        img = img + i_gate * self.img_attn.proj(img_a)
        img = img + i_gate2 * self.img_mlp(_modulate(img, i_shift2, i_scale2, self.eps))
        txt = txt + t_gate * self.txt_attn.proj(txt_a)
        txt = txt + t_gate2 * self.txt_mlp(_modulate(txt, t_shift2, t_scale2, self.eps))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel block: attention and MLP share linear1 (in) and linear2 (out)."""

    def __init__(self, cfg: KleinConfig):
        super().__init__()
        self.eps, self.heads, self.head_dim = cfg.eps, cfg.num_heads, cfg.head_dim
        self.split = (3 * cfg.hidden_size, 2 * cfg.mlp_hidden)
        self.linear1 = nn.Linear(cfg.hidden_size, sum(self.split), bias=False)
        self.linear2 = nn.Linear(cfg.hidden_size + cfg.mlp_hidden, cfg.hidden_size, bias=False)
        self.norm = QKNorm(cfg.head_dim, cfg.eps)
        self.mlp_act = SiLUGate()

    def forward(self, x, mod, pe):
        """x [B, T+N, D]; mod = (shift, scale, gate) each [B, 1, D]."""
        shift, scale, gate = mod
        qkv, mlp = self.linear1(_modulate(x, shift, scale, self.eps)).split(self.split, dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        attn = attention(norm_rope(q, self.norm.query_norm, pe), norm_rope(k, self.norm.key_norm, pe), v)
        return x + gate * self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1))


class LastLayer(nn.Module):
    def __init__(self, cfg: KleinConfig):
        super().__init__()
        self.eps = cfg.eps
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size, bias=False))
        self.linear = nn.Linear(cfg.hidden_size, cfg.out_channels, bias=False)

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)   # BFL order: shift first
        return self.linear(_modulate(x, shift, scale, self.eps))


# ------------------------------------------------------------------------------------------------ the model

class Flux2Transformer(nn.Module):
    def __init__(self, cfg: KleinConfig):
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, D, bias=False)
        self.txt_in = nn.Linear(cfg.context_in_dim, D, bias=False)
        self.time_in = MLPEmbedder(cfg.time_dim, D)
        self.guidance_in = MLPEmbedder(cfg.time_dim, D) if cfg.guidance_embed else None
        self.double_stream_modulation_img = Modulation(D, 6)
        self.double_stream_modulation_txt = Modulation(D, 6)
        self.single_stream_modulation = Modulation(D, 3)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single))
        self.final_layer = LastLayer(cfg)

    def make_pe(self, img_ids, txt_ids):
        """RoPE table for the joint [txt, img] sequence: float32 [B' or 1, T+N, head_dim/2, 2] (cos, sin).
        Depends only on the ids, so a sampler computes it once and passes it back as `pe=` every step."""
        return rope_table(img_ids, txt_ids, self.config.axes_dim, self.config.theta)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, pe=None, guidance=None):
        """img [B, N, C] packed latent tokens (noise and reference tokens), txt [B, T, context_in_dim],
        *_ids [N, 4] / [B, N, 4] (t, h, w, l), timesteps [B] = sigma in [0, 1]. Returns [B, N, out_channels]."""
        dtype = _float_dtype(self)  # not img_in.weight's: a GGUF file may keep it quantized (uint8 blocks)
        B = img.shape[0]
        # 1. time embedding (sinusoid in float32, MLP in the model dtype) and the shared modulations
        t = torch.as_tensor(timesteps, device=img.device).reshape(-1).float().expand(B) * 1000
        vec = self.time_in(timestep_embedding(t, self.config.time_dim).to(dtype))
        if self.guidance_in is not None and guidance is not None:
            g = torch.as_tensor(guidance, device=img.device).reshape(-1).float().expand(B) * 1000
            vec = vec + self.guidance_in(timestep_embedding(g, self.config.time_dim).to(dtype))
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)

        # 2. input projections: [B, N, C] -> [B, N, D], [B, T, Dt] -> [B, T, D]
        img = self.img_in(img.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        if pe is None:
            pe = self.make_pe(img_ids, txt_ids)
        pe = rope_pairs(pe.to(img.device))   # once per forward: the blocks' rotation factors

        # 3. double-stream blocks, then 4. single-stream blocks over [txt, img]
        for block in self.double_blocks:
            img, txt = block(img, txt, mod_img, mod_txt, pe)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, mod_single, pe)

        # 5. image rows only, final adaLN + projection
        return self.final_layer(x[:, txt.shape[1]:], vec)


def load_klein(path_or_checkpoint, dtype=torch.float32, device="cpu") -> Flux2Transformer:
    """Load a klein transformer from a BFL / ComfyUI .safetensors file, a diffusers transformer folder, a pipeline
    folder (its `transformer/`), a `Checkpoint` or a plain state dict. Built on the meta device, loaded strictly."""
    ckpt = as_checkpoint(path_or_checkpoint, component="transformer")
    sd = klein_keys.to_native(ckpt.sd)
    cfg = KleinConfig.from_state_dict(sd, ckpt.config)
    logger.debug("klein transformer %s: %s", ckpt.source, cfg)
    with torch.device("meta"):
        model = Flux2Transformer(cfg)
    load_into_torch(model, sd, f"FLUX.2 klein transformer ({ckpt.source})", dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ pure helpers

def _float_dtype(module: nn.Module) -> torch.dtype:
    """The compute dtype: of the first parameter (quantized weights are buffers, never parameters)."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def _modulate(x, shift, scale, eps):
    return (1 + scale) * F.layer_norm(x, (x.shape[-1],), eps=eps) + shift




def attention(q, k, v):
    """q, k, v [B, L, H, d] (q, k already rotated) -> SDPA (scale 1/sqrt(d), no mask) -> [B, L, H*d]."""
    out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def norm_rope(x, norm: RMSNorm, pe):
    """Per-head RMSNorm, then RoPE; pe [B', L, d/2, 2, 2] from `rope_pairs`. Eager: on CUDA one Triton kernel
    (`kernels.norm_rope`), elsewhere torch's rms_norm kernel, then `apply_rope`. Inside compiled code the same
    arithmetic is written as one row-wise expression (statistics in float32, the normed value rounded to the dtype
    as eager rounds it, then x*C + swap(x)*S) that inductor can fuse: the rms_norm + stack form compiled to three
    kernels (q norm, k norm, rotation; H200, torch 2.11), and the rewrite took the 1024² step from 59.6 to 58.8 ms."""
    if not torch.compiler.is_compiling():
        if kernels.usable(x, norm.scale):   # CUDA eager: one Triton kernel (kernels.py); None if it cannot run
            out = kernels.norm_rope(x, norm.scale, pe[..., 0, 0], pe[..., 0, 1], norm.eps, round_before_weight=False)
            if out is not None:
                return out
        return apply_rope(norm(x), pe)
    xf = x.float()
    xn = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.scale.float()).to(x.dtype)
    return rotate_pairs(xn.float(), pe[:, :, None, :, 0, 0], pe[:, :, None, :, 0, 1]).to(x.dtype)


def rope_pairs(pe):
    """(cos, sin) table [B', L, d/2, 2] -> rotation factors [B', L, d/2, 2, 2]: row 0 = (cos, sin) multiplies each
    pair's first value, row 1 = (-sin, cos) its second, so (x0, x1) -> x0 * row0 + x1 * row1 =
    (x0 cos - x1 sin, x0 sin + x1 cos). Built once per forward (a few MB) so every block rotates in two kernels."""
    cos, sin = pe.unbind(-1)
    return torch.stack([pe, torch.stack([-sin, cos], dim=-1)], dim=-2)


def apply_rope(x, pe):
    """Rotate interleaved pairs (x[2j], x[2j+1]) in float32. x [B, L, H, d]; pe [B', L, d/2, 2, 2] (`rope_pairs`).

    Two kernels and a cast (the ComfyUI form): out = x0 * (cos, sin), then out += x1 * (-sin, cos) in place, the
    bf16 x read and widened inside each kernel. The products and sums are diffusers' (x0 cos + (-x1) sin,
    x1 cos + x0 sin), so float32 results are equal; on CUDA the in-place multiply-add may round once (FMA), a
    float32 ulp (its rare flipped bf16 roundings add up to ~2e-2 between ours and diffusers over a full-size
    random-weight klein, docs/NOTES.md). The earlier form (upcast, unbind, four products, two sums, stack: ~9 kernels over a float32 copy
    of q or k) moved ~2.5x the memory per tensor."""
    xp = x.unflatten(-1, (-1, 2))
    t = pe[:, :, None]
    out = xp[..., :1] * t[..., 0, :]
    out.addcmul_(xp[..., 1:], t[..., 1, :])
    return out.flatten(-2).to(x.dtype)


def rope_table(img_ids, txt_ids, axes_dim, theta):
    """ids [N, 4] or [B, N, 4] -> float32 [B' or 1, T+N, sum(axes)/2, 2]. Frequencies theta^(-2j/axis) per axis,
    angles in float64 on the CPU (as diffusers, which uses float64 where the device has it), then cos / sin -> float32."""
    device = img_ids.device
    img_ids, txt_ids = (i.detach().to("cpu") for i in (img_ids, txt_ids))
    img_ids = img_ids[None] if img_ids.dim() == 2 else img_ids
    txt_ids = txt_ids[None] if txt_ids.dim() == 2 else txt_ids
    b = max(img_ids.shape[0], txt_ids.shape[0])
    ids = torch.cat([txt_ids.expand(b, -1, -1), img_ids.expand(b, -1, -1)], dim=1)
    pos = ids.to(torch.float32).to(torch.float64)   # diffusers reads ids as float32 first
    angles = []
    for i, dim in enumerate(axes_dim):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles.append(pos[..., i, None] * freqs)
    angles = torch.cat(angles, dim=-1)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).to(torch.float32).to(device)


def position_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    """klein latent-token ids as a torch int64 tensor [h*w, 4] (see configs.klein_position_ids)."""
    return torch.from_numpy(klein_position_ids(h, w, t))


def text_ids(n: int) -> torch.Tensor:
    return torch.from_numpy(klein_text_ids(n))
