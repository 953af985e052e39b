"""GGUF weights on torch: vectorised dequantization of the ggml block types, and a Linear that keeps them quantized.

`GGUFLinear` holds a weight as its raw ggml blocks (uint8 [out, bytes per row]) on the device and dequantizes it in
the forward, layer by layer, as ComfyUI-GGUF does: the resident weights stay at the file's size. Every dequantizer
works on a [n_blocks, type_size] uint8 tensor and returns float32 [n_blocks, block_size], with the same operations
in the same order as the `gguf` package's numpy reference (gguf-py `quants.py`, which follows llama.cpp's
ggml-quants.c), so the float32 results are bit-identical to `gguf.quants.dequantize` (tests/test_gguf.py).
Pure tensor ops with no data-dependent control flow: torch.compile traces them (the type is a Python constant).

Block layouts (bytes; d, dmin, m are float16; QK_K = 256):
  Q8_0  32 w / 34 B   d, int8 q[32]                          w = q * d
  Q4_0  32 w / 18 B   d, nibbles[16] (low: w0..15, high: w16..31)      w = (q - 8) * d
  Q4_1  32 w / 20 B   d, m, nibbles[16]                      w = q * d + m
  Q5_0  32 w / 22 B   d, qh (uint32: bit i = fifth bit of w_i), nibbles[16]   w = (q - 16) * d
  Q5_1  32 w / 24 B   d, m, qh, nibbles[16]                  w = q * d + m
  Q4_K  256 w / 144 B d, dmin, 12 B of 6-bit scales+mins for 8 sub-blocks of 32, nibbles[128]
                      (each 32 bytes: low nibbles = sub-block 2j, high = 2j+1)   w = d*sc*q - dmin*m
  Q5_K  256 w / 176 B d, dmin, scales[12], qh[32] (bit j of byte l = fifth bit of sub-block j, element l), nibbles
  Q6_K  256 w / 210 B ql[128], qh[64], int8 scales[16], d     w = d*sc*(q - 32), 16 sub-blocks of 16
  Q3_K / Q2_K         as llama.cpp (three-bit / two-bit codes with 16 sub-block scales)
  F32 / F16 / BF16    plain floats (BF16 = the high half of a float32)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WeightError
from ..weights.gguf import SIZES

QK_K = 256
SUB16 = 16   # Q6_K / Q3_K / Q2_K: 16 sub-blocks of 16 weights


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] bytes -> float32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, n: int, group: int) -> torch.Tensor:
    """[n, k] bytes -> [n, k / group, 2, group]: low nibbles of each group of bytes, then high ones."""
    q = qs.reshape(n, -1, 1, group)
    return torch.cat([q & 0x0F, q >> 4], dim=2)


def _bits(b: torch.Tensor, shifts: range, mask: int) -> torch.Tensor:
    """[..., k] -> [..., len(shifts), k]: (b >> s) & mask for each shift."""
    return torch.stack([(b >> s) & mask for s in shifts], dim=-2)


def _q8_0(b):
    d, x = _f16(b[:, :2]), b[:, 2:].contiguous().view(torch.int8).float()
    return x * d


def _q4_0(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], n, 16).reshape(n, -1).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b):
    n = b.shape[0]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return (d * _nibbles(b[:, 4:], n, 16).reshape(n, -1).float()) + m


def _q5(b, off: int):
    n = b.shape[0]
    qh = b[:, off:off + 4].contiguous().view(torch.int32)               # [n, 1]
    high = ((qh >> torch.arange(32, device=b.device, dtype=torch.int32)) & 1).to(torch.uint8)
    low = _nibbles(b[:, off + 4:], n, 16).reshape(n, -1)
    return low | (high << 4)


def _q5_0(b):
    d = _f16(b[:, :2])
    return d * (_q5(b, 2).to(torch.int8) - 16).float()


def _q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return (d * _q5(b, 4).float()) + m


def _scale_min_k4(s: torch.Tensor):
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).reshape(n, -1, 1)
    ml = (dmin * mn.float()).reshape(n, -1, 1)
    q = _nibbles(b[:, 16:], n, 32).reshape(n, -1, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).reshape(n, -1, 1)
    ml = (dmin * mn.float()).reshape(n, -1, 1)
    low = _nibbles(b[:, 48:], n, 32).reshape(n, -1, 32)
    high = _bits(b[:, 16:48], range(8), 1).reshape(n, -1, 32)
    q = (low | (high << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * scales.contiguous().view(torch.int8).float()).reshape(n, SUB16, 1)
    low = _nibbles(ql, n, 64).reshape(n, -1, 32)
    high = _bits(qh.reshape(n, -1, 32), range(0, 8, 2), 3).reshape(n, -1, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, SUB16, -1).float()
    return (dl * q).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    lsc = _bits(scales[:, :8].reshape(n, 1, 8), range(0, 8, 4), 0xFF).reshape(n, 16)
    hsc = _bits(scales[:, 8:].reshape(n, 1, 4), range(0, 8, 2), 0xFF).reshape(n, 16)
    sc = ((lsc & 0x0F) | ((hsc & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.float()).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, -1, 32), range(0, 8, 2), 0xFF).reshape(n, 16, 16) & 3
    qh = (_bits(hmask.reshape(n, -1, 32), range(8), 0xFF).reshape(n, 16, 16) & 1) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _q2_k(b):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = (_bits(qs.reshape(n, -1, 32), range(0, 8, 2), 0xFF) & 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, -1)


def _bf16(b):
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


DEQUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k,
           "Q5_K": _q5_k, "Q6_K": _q6_k, "Q3_K": _q3_k, "Q2_K": _q2_k, "BF16": _bf16,
           "F16": lambda b: b.contiguous().view(torch.float16).float(),
           "F32": lambda b: b.contiguous().view(torch.float32)}
TYPES = tuple(DEQUANT)


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple) -> torch.Tensor:
    """Raw ggml bytes (uint8, any shape holding whole blocks in row-major order) -> float32 `shape`."""
    if qtype not in DEQUANT:
        raise WeightError(f"GGUF tensor type {qtype} is not supported: supported are {', '.join(TYPES)}")
    per, size = SIZES[qtype]
    blocks = raw.reshape(-1, size)
    return DEQUANT[qtype](blocks).reshape(shape)


class GGUFLinear(nn.Module):
    """A Linear whose weight stays in its ggml blocks (`weight`: uint8 [out, bytes per row]) on the device."""

    def __init__(self, qtype: str, in_features: int, out_features: int, raw: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        per, size = SIZES[qtype]
        if in_features % per or raw.numel() != out_features * in_features // per * size:
            raise WeightError(f"GGUF {qtype} weight of {raw.numel()} bytes does not hold [{out_features}, "
                              f"{in_features}] (blocks of {per} weights in {size} bytes)")
        self.qtype, self.in_features, self.out_features = qtype, in_features, out_features
        self.register_buffer("weight", raw.reshape(out_features, -1))
        self.bias = None if bias is None else (bias if isinstance(bias, nn.Parameter)
                                               else nn.Parameter(bias, requires_grad=False))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.qtype, (self.out_features, self.in_features)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, qtype={self.qtype}, bias={self.bias is not None}"
