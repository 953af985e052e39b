"""What the MLX models share: dtype names, torch/numpy -> mx conversion at load, strict loading, float32 helpers.

Weights arrive as `flux_core.weights.io.Checkpoint` dicts of torch CPU tensors of any dtype (fp8 "scaled" files
already dequantized there; F8_E5M2 / F64, which `mx.load` refuses, read by safetensors into torch). They are converted
to mx ONCE, here, with the same rounding as the torch path's `tensor.to(dtype)` (so both backends hold bit-identical
bf16 weights): bf16 goes through a uint16 view (no float32 copy of a multi-GB model), everything else through numpy.

Numerics mirror the torch files op for op where the reference keeps float32 (norm statistics, SiLU, RoPE, timestep
sinusoid): in bf16 the MLX and torch outputs then differ only by matmul / attention accumulation order.

Pitfalls (docs/NOTES.md, "MLX path"):
  * `np.array(bf16 mx array)` fails (no PEP 3118 bf16): cast to float32 first (`to_numpy`).
  * `np.asarray(mx_array)` is a WRITABLE zero-copy view: never write through it.
  * An mx.array attribute of an `nn.Module` is a parameter: keep RoPE tables and masks out of the modules.
  * `mx.fast.rope(freqs=...)` takes periods, not frequencies, and only positions offset + arange(L): FLUX.2 and
    Z-Image need per-token multi-axis ids, so the rotation is written out (`apply_rope`).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..weights.keymap import check_strict, shapes

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
F32 = mx.float32


def mx_dtype(dtype) -> mx.Dtype:
    """'bfloat16' | 'float16' | 'float32' | an mx dtype | a torch dtype -> mx dtype."""
    if isinstance(dtype, mx.Dtype):
        return dtype
    name = str(dtype).replace("torch.", "").replace("mlx.core.", "")
    if name not in DTYPES:
        raise ValueError(f"unsupported MLX compute dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def to_mx(t, dtype=None) -> mx.array:
    """torch tensor / numpy array / mx array -> mx array, cast to `dtype` (None: keep floats' own dtype when MLX has
    it, float64 and fp8 become float32). Rounding equals torch's `tensor.to(dtype)` (round to nearest even)."""
    if isinstance(t, mx.array):
        return t if dtype is None else t.astype(mx_dtype(dtype))
    if type(t).__module__.startswith("torch"):
        return _torch_to_mx(t, dtype)
    a = np.asarray(t)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    out = mx.array(a)
    return out if dtype is None else out.astype(mx_dtype(dtype))


def _torch_to_mx(t, dtype) -> mx.array:
    import torch

    t = t.detach().cpu()
    if not t.is_floating_point():
        return mx.array(t.numpy())
    if dtype is None:
        dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(t.dtype, "float32")
    target = mx_dtype(dtype)
    if target == mx.bfloat16:  # numpy has no bf16: round in torch (exact from bf16 / fp8), move the bits as uint16
        bits = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return mx.array(bits).view(mx.bfloat16)
    tt = torch.float16 if target == mx.float16 else torch.float32
    return mx.array(t.to(tt).contiguous().numpy())


def to_numpy(a) -> np.ndarray:
    """Any mx array (bf16 included) -> a float32 numpy COPY (never a view into MLX memory)."""
    if isinstance(a, mx.array):
        return np.array(a.astype(F32), copy=True)
    if type(a).__module__.startswith("torch"):
        return a.detach().float().cpu().numpy()
    return np.array(a, dtype=np.float32)


def load_into_mlx(module: nn.Module, sd: Mapping, what: str, dtype="float32",
                  keep_float32: Callable[[str], bool] | None = None, consume: bool = False) -> None:
    """Strictly load `sd` (already in our key layout) into an MLX module and evaluate the weights.

    The module's own (lazy, never evaluated) initial parameters only supply names and shapes, so a model is never
    allocated twice. Every key used, every shape checked (WeightError names offenders), like `load_into_torch`.
    consume=True pops each tensor from `sd` (a dict the caller owns) once converted: the host copy is released as
    the MLX copy is made, so loading peaks at one model plus one tensor instead of two models (8 GB for klein-4B)."""
    own = dict(tree_flatten(module.parameters()))
    check_strict(shapes(own), shapes(sd), what)
    new = []
    for k in own:
        want = "float32" if (keep_float32 and keep_float32(k)) else dtype
        new.append((k, to_mx(sd.pop(k) if consume else sd[k], want)))
    module.update(tree_unflatten(new))
    mx.eval(module.parameters())


# ------------------------------------------------------------------------------------------------ float32 helpers

def silu(x: mx.array) -> mx.array:
    """SiLU computed in float32 and rounded once, as torch does for bf16 / fp16 (its "opmath" upcast)."""
    x32 = x.astype(F32)
    return (x32 * mx.sigmoid(x32)).astype(x.dtype)


class SiLU(nn.Module):
    """Parameter-free slot in a list of layers (keeps checkpoint indices such as `adaLN_modulation.1`)."""

    def __call__(self, x):
        return silu(x)


def layer_norm(x: mx.array, eps: float) -> mx.array:
    """Affine-free LayerNorm over the last axis; statistics in float32 inside the fused kernel (as torch)."""
    return mx.fast.layer_norm(x, None, None, eps)


def timestep_embedding(t: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """t [B] float32 (already x1000) -> float32 [B, dim] = [cos(t f_k) | sin(t f_k)], f_k = max_period^(-k/half)."""
    args = _reduce_2pi(t.astype(F32)[:, None] * _sinusoid_freqs(dim // 2, max_period)[None])
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


@functools.lru_cache(maxsize=8)
def _sinusoid_freqs(half: int, max_period: float) -> mx.array:
    """The reference's own float32 frequencies, exp(-ln(max_period) * k / half) as torch computes them. They are
    not correctly rounded (3 of 128 differ from exact), and at t = 1000 one ulp moves cos by ~6e-5, so we take
    torch's values (a host-side constant; torch is a flux_core dependency) and fall back to numpy without it."""
    try:
        import torch

        f = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).numpy()
    except ImportError:  # pragma: no cover - torch is installed wherever flux_core is
        arg = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
        f = np.exp(arg.astype(np.float64)).astype(np.float32)
    out = mx.array(f)
    mx.eval(out)
    return out


# 2*pi in three float32 parts; the first has 8 significant bits, so k * _TWO_PI[0] is exact for |k| < 2^16.
_TWO_PI = (6.28125, float(np.float32(2 * math.pi - 6.28125)),
           float(np.float32(2 * math.pi - 6.28125 - float(np.float32(2 * math.pi - 6.28125)))))


def _reduce_2pi(x: mx.array) -> mx.array:
    """x - 2*pi*round(x / 2*pi), to ~1 ulp (Cody-Waite). Timestep arguments reach 1000 rad, where MLX's float32
    cos / sin lose ~3e-5 (torch's do not); after this reduction they agree with torch to float32 rounding."""
    k = mx.round(x * np.float32(1 / (2 * math.pi)))
    return ((x - k * _TWO_PI[0]) - k * _TWO_PI[1]) - k * _TWO_PI[2]


def as_time(t, batch: int) -> mx.array:
    """A scalar / [1] / [B] time (number, numpy, torch or mx) -> float32 mx [B]."""
    if not isinstance(t, mx.array):
        t = to_mx(t if hasattr(t, "detach") else np.asarray(t, dtype=np.float32), "float32")
    return mx.broadcast_to(t.astype(F32).reshape(-1), (batch,))


def as_ids(ids) -> np.ndarray:
    """Position ids (numpy, torch or mx) -> int64 numpy (RoPE tables are built on the host in float64)."""
    if isinstance(ids, mx.array):
        return np.array(ids, dtype=np.int64)
    if hasattr(ids, "detach"):
        return ids.detach().cpu().numpy().astype(np.int64)
    return np.asarray(ids, dtype=np.int64)


def axis_angles(pos: np.ndarray, dim: int, theta: float) -> np.ndarray:
    """float64 angles [..., dim/2] = pos * theta^(-2j/dim), the per-axis RoPE frequencies of FLUX.2 and Z-Image."""
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    return pos.astype(np.float64)[..., None] * inv


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (x[2j], x[2j+1]) in float32, result in x's dtype. x [B, L, H, d]; cos/sin broadcast
    to [B, L, H, d/2]."""
    # One broadcast expression over the pairs, cast before the reshape: under mx.compile it is ONE fused elementwise
    # kernel (x read once, result written once in x's dtype). The stack form (two fused halves, a concatenate, a
    # cast) took 0.31 ms per klein q at 1024² on an H200 (mlx-cuda 0.32.4), 50 calls a step. Same products and sums:
    # (x0 cos + x1 (-sin), x0 sin + x1 cos).
    shape = x.shape
    xp = x.reshape(*shape[:-1], shape[-1] // 2, 2)
    c, s = cos[..., None], sin[..., None]
    out = (xp[..., :1].astype(F32) * mx.concatenate([c, s], axis=-1)
           + xp[..., 1:].astype(F32) * mx.concatenate([-s, c], axis=-1))
    return out.astype(x.dtype).reshape(shape)


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None) -> mx.array:
    """q, k, v [B, L, H, d] -> [B, L, H*d]; scale 1/sqrt(d); bool mask [B, 1, 1, L] (True = attend) or None.

    `mx.fast.scaled_dot_product_attention` accumulates in float32 in its Metal kernel; the Linux CPU fallback rounds
    the bf16 scores (a known, CPU-only source of bf16 difference: docs/NOTES.md, "MLX path")."""
    B, L, H, d = q.shape
    out = mx.fast.scaled_dot_product_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale=1.0 / math.sqrt(d), mask=mask)
    return out.transpose(0, 2, 1, 3).reshape(B, L, H * d)
