"""What the torch model files share: strict loading into meta-built modules, the timestep sinusoid, block lists.

The twin of `flux_core/mlx/common.py`. Nothing here knows a model family; the config dataclasses and shape
derivation are backend-neutral and live in `flux_core/configs.py`.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ..configs import BLOCK_CONTAINERS
from ..weights.keymap import check_strict, shapes


def load_into_torch(module, sd: Mapping, what: str, dtype=None, device=None,
                    keep_float32: Callable[[str], bool] | None = None) -> None:
    """Strictly load `sd` (already in our layout) into a torch module that may live on the meta device.

    Tensors are cast once here (to `dtype`, except keys for which `keep_float32(key)` is true) and assigned, so a
    multi-GB model is never allocated twice."""
    own = module.state_dict()
    check_strict(shapes(own), shapes(sd), what)
    new = {}
    for k, p in own.items():
        v = sd[k]
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v)
        want = torch.float32 if (keep_float32 and keep_float32(k)) else (dtype or p.dtype)
        new[k] = v.to(device=device or "cpu", dtype=want)
    module.load_state_dict(new, strict=True, assign=True)


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
    """t [B] (already x1000) -> float32 [B, dim] = [cos(t f_k) | sin(t f_k)], f_k = max_period^(-k/(dim/2)).
    klein and Z-Image use the same sinusoid (cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotate_pairs(x, cos, sin):
    """RoPE on interleaved pairs (x[2j], x[2j+1]) written as one expression over the last dim, for compiled code:
    x * C + swap(x) * S with C = (cos_j, cos_j) and S = (-sin_j, +sin_j) per pair, swap exchanging each pair's two
    values. Same products and sums as (x0 cos - x1 sin, x1 cos + x0 sin); in this form inductor fuses it with a
    preceding per-row norm. x float [..., d]; cos, sin [..., d/2], broadcastable to x's leading dims."""
    c = cos.unsqueeze(-1).expand(*cos.shape, 2).flatten(-2)
    s = torch.stack([-sin, sin], dim=-1).flatten(-2)
    return x * c + x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * s


def blocks(module) -> list:
    """The repeated transformer blocks of a klein / Z-Image transformer or a Qwen3 encoder, in forward order
    within each container (what regional compilation and weight quantization walk over)."""
    return [b for name in BLOCK_CONTAINERS for b in (getattr(module, name, None) or ())]


# Attention runs outside the compiled regions (a graph break around the SDPA call): measured on an H200 (torch 2.11),
# PyTorch's cuDNN attention inside an inductor graph took 11.6 ms per klein step against 10.5 ms called eagerly
# (Z-Image 18.7 vs 16.9). Eager code is unaffected; a benchmark may flip this to compare (dynamo guards on it).
EAGER_ATTENTION = True


@torch.compiler.disable
def _sdpa_eager(q, k, v, attn_mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def sdpa(q, k, v, attn_mask=None):
    """F.scaled_dot_product_attention (default scale, no dropout), kept out of compiled graphs (EAGER_ATTENTION)."""
    if EAGER_ATTENTION:
        return _sdpa_eager(q, k, v, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
