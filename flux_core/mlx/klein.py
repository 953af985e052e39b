"""FLUX.2 [klein] flow transformer (MLX).

The MLX twin of `flux_core/torch/klein.py`: same classes, same attribute (parameter) names, same forward signature,
so the two files diff cleanly and load the same BFL-layout state dict (`flux_core.weights.klein.to_native` converts
diffusers folders). Equal to the torch model to ~1e-6 relative in float32 (tests/test_mlx_klein.py), and hence to
diffusers 0.42.1 `Flux2Transformer2DModel`. The config dataclass is the torch file's `KleinConfig` (pure Python).

Architecture (klein-4B; 9B in brackets). No linear layer has a bias.
  img_in 128 -> 3072 [4096]; txt_in 7680 [12288] -> 3072; time_in: sinusoid(1000*sigma, 256) -> MLP -> vec [B, D].
  Shared modulation from silu(vec), computed once per forward: double_stream_modulation_img / _txt (D -> 6D),
  single_stream_modulation (D -> 3D). 5 [8] double blocks (joint attention over [txt, img]), 20 [24] single blocks
  (linear1 = [q | k | v | mlp_a | mlp_b], linear2 over [attn | silu(mlp_a) * mlp_b]), final adaLN [shift, scale].
  Heads 24 [32] x 128, QK-RMSNorm eps 1e-6, RoPE on 4 axes (t, h, w, l) x 32 dims, theta 2000, interleaved pairs.

Pitfalls:
  - The RoPE table `pe` depends only on the position ids: the runtime builds it ONCE per generation (`make_pe`,
    float64 on the host, float32 table) and passes it to every step; it is never a module attribute (an mx.array
    attribute would become a parameter and break strict loading).
  - Cast points copy the torch file, so bf16 runs round where torch rounds: QK-RMSNorm in float32 then the model
    dtype, RoPE rotation in float32, SiLU in float32, LayerNorm statistics in float32 (fused kernel).
  - The time input is sigma in [0, 1] (x1000 here); text tokens come FIRST in the joint sequence.
"""
from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..configs import KleinConfig, klein_position_ids, klein_text_ids
from ..weights import klein as klein_keys
from ..weights.io import as_checkpoint
from .common import (F32, SiLU, apply_rope, as_ids, as_time, attention as sdpa, axis_angles, layer_norm,
                     load_into_mlx, mx_dtype, silu, timestep_embedding)

logger = logging.getLogger(__name__)

__all__ = ["KleinConfig", "Flux2Transformer", "load_klein", "rope_table", "position_ids", "text_ids"]


# ------------------------------------------------------------------------------------------------ small blocks

class RMSNorm(nn.Module):
    """Per-head QK norm; the weight is called `scale` in BFL files. float32 in, model dtype out (torch F.rms_norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.scale = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x.astype(F32), self.scale.astype(F32), self.eps).astype(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.query_norm = RMSNorm(dim, eps)
        self.key_norm = RMSNorm(dim, eps)


class SiLUGate(nn.Module):
    """silu(first half) * second half; sits at index 1 so the MLP keys are `*_mlp.0` / `*_mlp.2`."""

    def __call__(self, x):
        a, b = mx.split(x, 2, axis=-1)
        return silu(a) * b


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def __call__(self, x):
        return self.out_layer(silu(self.in_layer(x)))


class Modulation(nn.Module):
    """silu(vec) -> Linear -> `n` chunks of [B, 1, D] (shift, scale, gate, ...)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim, bias=False)

    def __call__(self, vec):
        return mx.split(self.lin(silu(vec))[:, None, :], self.n, axis=-1)


class SelfAttention(nn.Module):
    """One stream of a double block: fused qkv, per-head QK norm, output projection."""

    def __init__(self, cfg: KleinConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.norm = QKNorm(cfg.head_dim, cfg.eps)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def qkv_heads(self, x):
        """[B, L, D] -> q, k, v each [B, L, H, d], q and k normed."""
        B, L, _ = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def _mlp(cfg: KleinConfig) -> list:
    return [nn.Linear(cfg.hidden_size, 2 * cfg.mlp_hidden, bias=False), SiLUGate(),
            nn.Linear(cfg.mlp_hidden, cfg.hidden_size, bias=False)]


def _seq(layers: list, x):
    for layer in layers:
        x = layer(x)
    return x


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: KleinConfig):
        super().__init__()
        self.eps = cfg.eps
        self.img_attn, self.txt_attn = SelfAttention(cfg), SelfAttention(cfg)
        self.img_mlp, self.txt_mlp = _mlp(cfg), _mlp(cfg)

    def __call__(self, img, txt, mod_img, mod_txt, pe):
        """img [B, N, D], txt [B, T, D]; mod_* = 6 chunks [B, 1, D]; pe [B', T+N, d/2, 2]."""
        i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = mod_img
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = mod_txt
        iq, ik, iv = self.img_attn.qkv_heads(_modulate(img, i_shift, i_scale, self.eps))
        tq, tk, tv = self.txt_attn.qkv_heads(_modulate(txt, t_shift, t_scale, self.eps))
        cat = lambda a, b: mx.concatenate([a, b], axis=1)  # noqa: E731
        attn = attention(cat(tq, iq), cat(tk, ik), cat(tv, iv), pe)
        T = txt.shape[1]
        txt_a, img_a = attn[:, :T], attn[:, T:]

        img = img + i_gate * self.img_attn.proj(img_a)
        img = img + i_gate2 * _seq(self.img_mlp, _modulate(img, i_shift2, i_scale2, self.eps))
        txt = txt + t_gate * self.txt_attn.proj(txt_a)
        txt = txt + t_gate2 * _seq(self.txt_mlp, _modulate(txt, t_shift2, t_scale2, self.eps))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel block: attention and MLP share linear1 (in) and linear2 (out)."""

    def __init__(self, cfg: KleinConfig):
        super().__init__()
        self.eps, self.heads, self.head_dim = cfg.eps, cfg.num_heads, cfg.head_dim
        self.n_qkv = 3 * cfg.hidden_size  # linear1 rows: [q | k | v] then [mlp_a | mlp_b]
        self.linear1 = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size + 2 * cfg.mlp_hidden, bias=False)
        self.linear2 = nn.Linear(cfg.hidden_size + cfg.mlp_hidden, cfg.hidden_size, bias=False)
        self.norm = QKNorm(cfg.head_dim, cfg.eps)
        self.mlp_act = SiLUGate()

    def __call__(self, x, mod, pe):
        """x [B, T+N, D]; mod = (shift, scale, gate) each [B, 1, D]."""
        shift, scale, gate = mod
        B, L, _ = x.shape
        h = self.linear1(_modulate(x, shift, scale, self.eps))
        qkv = h[..., :self.n_qkv].reshape(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attn = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, pe)
        mlp = self.mlp_act(h[..., self.n_qkv:])
        return x + gate * self.linear2(mx.concatenate([attn, mlp], axis=-1))


class LastLayer(nn.Module):
    def __init__(self, cfg: KleinConfig):
        super().__init__()
        self.eps = cfg.eps
        self.adaLN_modulation = [SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size, bias=False)]
        self.linear = nn.Linear(cfg.hidden_size, cfg.out_channels, bias=False)

    def __call__(self, x, vec):
        shift, scale = mx.split(_seq(self.adaLN_modulation, vec)[:, None, :], 2, axis=-1)  # BFL order: shift first
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
        if cfg.guidance_embed:
            self.guidance_in = MLPEmbedder(cfg.time_dim, D)
        self.double_stream_modulation_img = Modulation(D, 6)
        self.double_stream_modulation_txt = Modulation(D, 6)
        self.single_stream_modulation = Modulation(D, 3)
        self.double_blocks = [DoubleStreamBlock(cfg) for _ in range(cfg.depth)]
        self.single_blocks = [SingleStreamBlock(cfg) for _ in range(cfg.depth_single)]
        self.final_layer = LastLayer(cfg)

    @property
    def dtype(self) -> mx.Dtype:
        from .quant import float_dtype

        return float_dtype(self)  # not img_in.weight's: a pre-quantized file may hold it as uint32 codes

    def make_pe(self, img_ids, txt_ids) -> mx.array:
        """RoPE table for the joint [txt, img] sequence: float32 [B' or 1, T+N, head_dim/2, 2] (cos, sin), evaluated.
        Depends only on the ids, so a sampler computes it once and passes it back as `pe=` every step."""
        return rope_table(img_ids, txt_ids, self.config.axes_dim, self.config.theta)

    def __call__(self, img, img_ids, txt, txt_ids, timesteps, pe=None, guidance=None):
        """img [B, N, C] packed latent tokens (noise and reference tokens), txt [B, T, context_in_dim],
        *_ids [N, 4] / [B, N, 4] (t, h, w, l), timesteps [B] = sigma in [0, 1]. Returns [B, N, out_channels]."""
        dtype = self.dtype
        B = img.shape[0]
        # 1. time embedding (sinusoid in float32, MLP in the model dtype) and the shared modulations
        vec = self.time_in(timestep_embedding(as_time(timesteps, B) * 1000, self.config.time_dim).astype(dtype))
        if "guidance_in" in self and guidance is not None:
            g = timestep_embedding(as_time(guidance, B) * 1000, self.config.time_dim)
            vec = vec + self.guidance_in(g.astype(dtype))
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)

        # 2. input projections: [B, N, C] -> [B, N, D], [B, T, Dt] -> [B, T, D]
        img = self.img_in(img.astype(dtype))
        txt = self.txt_in(txt.astype(dtype))
        if pe is None:
            pe = self.make_pe(img_ids, txt_ids)

        # 3. double-stream blocks, then 4. single-stream blocks over [txt, img]
        for block in self.double_blocks:
            img, txt = block(img, txt, mod_img, mod_txt, pe)
        x = mx.concatenate([txt, img], axis=1)
        for block in self.single_blocks:
            x = block(x, mod_single, pe)

        # 5. image rows only, final adaLN + projection
        return self.final_layer(x[:, txt.shape[1]:], vec)


def load_klein(path_or_checkpoint, dtype="float32", consume: bool = False) -> Flux2Transformer:
    """Load a klein transformer from a BFL / ComfyUI .safetensors file, a diffusers transformer folder, a pipeline
    folder (its `transformer/`), a `Checkpoint` or a plain state dict. dtype: 'bfloat16' | 'float16' | 'float32'.
    consume=True empties a given Checkpoint's `sd` while converting (peak memory: one model, not two)."""
    ckpt = as_checkpoint(path_or_checkpoint, component="transformer")
    sd = klein_keys.to_native(ckpt.sd)
    cfg = KleinConfig.from_state_dict(sd, ckpt.config)
    logger.debug("klein transformer (mlx) %s: %s", ckpt.source, cfg)
    model = Flux2Transformer(cfg)  # initial weights stay lazy and are never evaluated: replaced below
    if consume:
        ckpt.sd.clear()  # `sd` now holds the only references; load_into_mlx drops each once converted
    load_into_mlx(model, sd, f"FLUX.2 klein transformer ({ckpt.source})", dtype=mx_dtype(dtype), consume=consume)
    return model


# ------------------------------------------------------------------------------------------------ pure helpers

def _modulate(x, shift, scale, eps):
    return (1 + scale) * layer_norm(x, eps) + shift


def attention(q, k, v, pe):
    """q, k, v [B, L, H, d] -> RoPE on q, k -> SDPA (scale 1/sqrt(d), no mask) -> [B, L, H*d]."""
    cos, sin = pe[:, :, None, :, 0], pe[:, :, None, :, 1]
    return sdpa(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)


def rope_table(img_ids, txt_ids, axes_dim, theta) -> mx.array:
    """ids [N, 4] or [B, N, 4] -> float32 [B' or 1, T+N, sum(axes)/2, 2] (cos, sin), evaluated. Angles in float64 on
    the host from ids read as float32 (as diffusers / the torch file), cos and sin in float64, then float32."""
    img_ids, txt_ids = as_ids(img_ids), as_ids(txt_ids)
    img_ids = img_ids[None] if img_ids.ndim == 2 else img_ids
    txt_ids = txt_ids[None] if txt_ids.ndim == 2 else txt_ids
    b = max(img_ids.shape[0], txt_ids.shape[0])
    ids = np.concatenate([np.broadcast_to(txt_ids, (b, *txt_ids.shape[1:])),
                          np.broadcast_to(img_ids, (b, *img_ids.shape[1:]))], axis=1)
    pos = ids.astype(np.float32)
    angles = np.concatenate([axis_angles(pos[..., i], dim, theta) for i, dim in enumerate(axes_dim)], axis=-1)
    table = mx.array(np.stack([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32))
    mx.eval(table)  # a constant of every compiled step: evaluate it before anything is traced (mflux #714)
    return table


position_ids = klein_position_ids  # numpy ids, shared with the torch path (flux_core/configs.py)
text_ids = klein_text_ids
