"""Qwen3 decoder used as a text encoder (MLX): the shared text model of FLUX.2 [klein] and Z-Image.

The MLX twin of `flux_core/torch/qwen3.py`: same classes, same parameter names (HF keys without `model.`), same
`(input_ids, attention_mask, output_layers)` call returning HF `hidden_states[k]` for each k, same key map
(`flux_core.weights.qwen3`) and config (the torch file's `Qwen3Config`, pure Python). Equal to the torch model to
~1e-6 relative in float32 (tests/test_mlx_qwen3.py), hence to HF transformers `Qwen3Model`. docs/MODELS.md §Q1, §Q2.

Architecture (Qwen3-4B; Qwen3-8B for klein-9B in brackets):
  embed_tokens 151936 x 2560 [4096]; 36 pre-norm decoder layers; final RMSNorm `norm`.
  attention: 32 query heads, 8 KV heads (GQA x4, grouped, K/V never repeated), head_dim 128, no biases, per-head
             RMSNorm on q and k BEFORE rotate-half RoPE (theta 1e6). MLP 9728 [12288] SwiGLU. RMSNorm eps 1e-6.

`TextEncoder` (flux_core/text.py) keeps its prompt caches as torch tensors: `hidden_states` is the torch-facing entry (the torch twin has the same method)
(torch ids in, torch CPU tensors out, bf16 bits moved exactly); `__call__` is the pure-MLX forward.

Pitfalls:
  - Stop after the deepest requested layer, and BUILD only `max_layers` layers (klein needs 27 of 36, Z-Image 35);
    `norm` exists only when every layer is built.
  - Mask = causal AND key padding; no padding -> the cached causal mask. A row with no visible key (left padding)
    sees everything and its attention output is zeroed (what HF's SDPA path gives on torch >= 2.5).
  - Attention is written out (`attention`) with flash-kernel precision (float32 scores and sums, probabilities
    rounded to bf16 for P @ V): MLX's Linux-CPU SDPA rounds bf16 scores, and float32-then-round-once is 3e-3 off
    torch's bf16 kernels after ONE layer. In float32 it is plain attention.
  - RMSNorm statistics in float32, cast back to the activation dtype BEFORE the weight multiply (HF order).
  - RoPE is rotate-half (`mx.fast.rope(traditional=False)` would do it, but its `freqs` are PERIODS and its angles
    are computed on the device in float32); we build the float32 cos/sin tables on the host from torch's own
    float32 inv_freq (numpy's pow, float32 or float64-rounded, differs from torch's in 14-24 of 64 entries at
    head_dim 128) and rotate in float32.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError
from ..configs import Qwen3Config
from ..weights import qwen3 as qwen3_keys
from ..weights.io import as_checkpoint
from .common import F32, load_into_mlx, mx_dtype, silu

log = logging.getLogger(__name__)

__all__ = ["Qwen3Config", "Qwen3Encoder", "load_qwen3", "make_mask", "rope_tables", "apply_rope"]


# ----------------------------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        h = mx.fast.rms_norm(x.astype(F32), None, self.eps)
        return self.weight * h.astype(x.dtype)  # cast back first, then the weight multiply (HF order)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.n_heads, self.n_kv = d, hq, hkv
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)  # per head, over head_dim
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def __call__(self, x: mx.array, rope: tuple, mask: "AttnMask") -> mx.array:
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, S, self.n_heads, self.head_dim)).transpose(0, 2, 1, 3)  # [B,Hq,S,d]
        k = self.k_norm(self.k_proj(x).reshape(B, S, self.n_kv, self.head_dim)).transpose(0, 2, 1, 3)     # [B,Hkv,S,d]
        v = self.v_proj(x).reshape(B, S, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attention(q, k, v, 1.0 / math.sqrt(self.head_dim), mask)                                  # [B,Hq,S,d]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, S, self.n_heads * self.head_dim))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, x: mx.array, rope: tuple, mask: "AttnMask") -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# -------------------------------------------------------------------------------------------------------- top model
class Qwen3Encoder(nn.Module):
    """Qwen3 decoder stack returning selected hidden states. Parameter names = HF keys without `model.`."""

    def __init__(self, cfg: Qwen3Config, max_layers: int | None = None):
        super().__init__()
        self.config = cfg
        n = cfg.num_layers if max_layers is None else int(max_layers)
        if not 1 <= n <= cfg.num_layers:
            raise ConfigError(f"max_layers={max_layers}: the checkpoint has {cfg.num_layers} Qwen3 layers")
        self.n_built = n
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Qwen3Layer(cfg) for _ in range(n)]
        # The final norm only serves hidden_states[num_layers]; a truncated model has no use (and no key) for it.
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if n == cfg.num_layers else None

    @property
    def dtype(self) -> mx.Dtype:
        return self.embed_tokens.weight.dtype

    def resolve_layer(self, k: int) -> int:
        """HF hidden_states index -> 0..num_layers (configs.Qwen3Config.resolve_layer)."""
        return self.config.resolve_layer(k, self.n_built, self.norm is not None)

    def __call__(self, input_ids, attention_mask=None, output_layers: Sequence[int] = (-1,)) -> list[mx.array]:
        """input_ids [B, S] and attention_mask [B, S] (1 = real token) as mx, numpy or torch -> lazy mx arrays."""
        want = [self.resolve_layer(k) for k in output_layers]
        last = max(want)
        ids = _host_ints(input_ids)
        B, S = ids.shape
        # 1. embeddings, RoPE tables and the mask, computed once for all layers
        x = self.embed_tokens(mx.array(ids.astype(np.int32)))                                # [B, S, H]
        rope = rope_tables(S, self.config.head_dim, self.config.rope_theta)
        mask = make_mask(None if attention_mask is None else _host_ints(attention_mask), S)
        taps = {0: x} if 0 in want else {}
        # 2. decoder layers, stopping after the deepest requested one; only requested taps are kept referenced, so the
        #    lazy graph can free every other layer's output while it is evaluated
        for i in range(last):
            x = self.layers[i](x, rope, mask)
            if i + 1 in want:
                taps[i + 1] = x
        # 3. hidden_states[num_layers] is the final-normed output, not the raw last layer (HF semantics)
        if last == self.config.num_layers:
            taps[last] = self.norm(x)
        return [taps[i] for i in want]

    def hidden_states(self, input_ids, attention_mask=None, output_layers: Sequence[int] = (-1,)) -> list:
        """The entry `TextEncoder` uses on both backends: torch (or numpy) ids in, torch CPU tensors in the model
        dtype out, evaluated in one `mx.eval`."""
        outs = self(input_ids, attention_mask, output_layers)
        mx.eval(outs)
        return [_to_torch(o) for o in outs]


def load_qwen3(path_or_checkpoint, dtype="float32", max_layers: int | None = None) -> Qwen3Encoder:
    """Load a Qwen3 text encoder on MLX from a single HF-layout file (with or without `model.`), a diffusers
    `text_encoder/` folder, a pipeline folder, a `Checkpoint` or a plain state dict (torch tensors of any dtype,
    converted to mx once). dtype: 'bfloat16' | 'float16' | 'float32'.

    Only the first `max_layers` decoder layers are built and loaded (the rest of the file is skipped on purpose)."""
    ckpt = as_checkpoint(path_or_checkpoint, component="text_encoder")
    sd = qwen3_keys.to_native(ckpt.sd)
    cfg = Qwen3Config.from_state_dict(sd, ckpt.config)
    n = cfg.num_layers if max_layers is None else min(int(max_layers), cfg.num_layers)
    sd = qwen3_keys.drop_unused(sd, n, keep_norm=n == cfg.num_layers)
    model = Qwen3Encoder(cfg, max_layers=n)  # initial weights stay lazy and are never evaluated: replaced below
    load_into_mlx(model, sd, f"Qwen3 text encoder ({ckpt.source or 'state dict'})", dtype=mx_dtype(dtype))
    log.debug("Qwen3 text encoder (mlx) %s: %d of %d layers, %s", ckpt.source, n, cfg.num_layers, dtype)
    return model


# ------------------------------------------------------------------------------------------------------ pure helpers
@dataclass
class AttnMask:
    keep: mx.array | None = None   # [B, 1, S, S] bool, True = may attend; None = plain causal
    dead: mx.array | None = None   # [B, 1, S, 1] bool rows that see no key at all (zeroed after SDPA)


def make_mask(attention_mask: np.ndarray | None, S: int) -> AttnMask:
    """Causal AND key-padding mask, built on the host once per forward. No padding -> `keep` None (plain causal)."""
    if attention_mask is None or bool(attention_mask.astype(bool).all()):
        return AttnMask()
    causal = np.tril(np.ones((S, S), dtype=bool))
    keep = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
    dead = ~keep.any(-1, keepdims=True)
    if dead.any():
        keep = keep | dead  # an all-masked row would be NaN; its output is zeroed instead
        return AttnMask(mx.array(keep), mx.array(dead))
    return AttnMask(mx.array(keep))


def rope_tables(S: int, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """Rotate-half RoPE cos/sin [S, head_dim] float32: float32 angles pos * inv_freq (as HF), cos/sin on the host."""
    angles = np.arange(S, dtype=np.float32)[:, None] * _inv_freq(head_dim, float(theta))[None, :]  # float32 product
    emb = np.concatenate([angles, angles], axis=-1).astype(np.float64)
    return mx.array(np.cos(emb).astype(np.float32)), mx.array(np.sin(emb).astype(np.float32))


def apply_rope(x: mx.array, rope: tuple) -> mx.array:
    """x [B, H, S, d] rotated in float32 (halves, not interleaved pairs), result in x's dtype."""
    cos, sin = rope
    h = x.astype(F32)
    half = h.shape[-1] // 2
    rotated = mx.concatenate([-h[..., half:], h[..., :half]], axis=-1)
    return (h * cos + rotated * sin).astype(x.dtype)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: AttnMask) -> mx.array:
    """Causal (+ padding) GQA attention with the precision of the flash kernels torch uses (CPU and GPU): scores,
    softmax and both accumulations in float32, the probabilities rounded to the activation dtype for P @ V.

    Written out instead of `mx.fast.scaled_dot_product_attention`: MLX's Linux-CPU fallback rounds bf16 SCORES (5e-3
    from torch after one layer), and a float32 SDPA rounded once is 3e-3 from torch's bf16 kernel, which rounds P.
    At S <= 512 the [S, S] scores cost little next to the MLPs. q [B, Hq, S, d], k, v [B, Hkv, S, d]."""
    B, Hq, S, d = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, S, d).astype(F32)  # query head h reads KV head h // (Hq/Hkv) (HF repeat_kv)
    kt = k[:, :, None].astype(F32).swapaxes(-1, -2)
    s = (qg @ kt) * scale                                                                           # [B,Hkv,r,S,S]
    keep = _causal(S) if mask.keep is None else mask.keep[:, :, None]
    s = mx.where(keep, s, -mx.inf)
    p = mx.exp(s - mx.max(s, axis=-1, keepdims=True))
    out = (p.astype(q.dtype).astype(F32) @ v[:, :, None].astype(F32)) / mx.sum(p, axis=-1, keepdims=True)
    out = out.reshape(B, Hq, S, d)
    if mask.dead is not None:
        out = mx.where(mask.dead, 0.0, out)
    return out.astype(q.dtype)


@functools.lru_cache(maxsize=4)
def _causal(S: int) -> mx.array:
    return mx.array(np.tril(np.ones((S, S), dtype=bool)))


@functools.lru_cache(maxsize=8)
def _inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """HF's float32 inv_freq = 1 / theta^(arange(0, d, 2) / d), taken from torch itself (a host-side constant; torch is
    a flux_core dependency): numpy's pow rounds differently in up to a third of the entries."""
    try:
        import torch

        exps = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return (1.0 / (theta ** exps)).numpy()
    except ImportError:  # pragma: no cover - torch is installed wherever flux_core is
        exps = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
        return (1.0 / (np.float64(theta) ** exps.astype(np.float64))).astype(np.float32)


def _host_ints(a) -> np.ndarray:
    """Token ids / masks (mx, numpy, torch, nested lists) -> int64 numpy [B, S]."""
    if isinstance(a, mx.array):
        a = np.array(a.astype(mx.int64))
    elif hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.int64)
    return a[None] if a.ndim == 1 else a


def _to_torch(a: mx.array):
    """mx -> torch CPU tensor of the same dtype (bf16 moved as its 16-bit pattern: exact, no float32 detour)."""
    import torch

    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.view(mx.int16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(a, copy=True))
