"""Load-time, weight-only quantization of a loaded torch model's block Linears: int8 | int4 | fp8.

What is quantized: every `nn.Linear` inside the repeated blocks (klein `double_blocks` / `single_blocks`, Z-Image
`layers` / `noise_refiner` / `context_refiner`, Qwen3 `layers`) -- that is >97% of the weights of the real models.
int4 also quantizes the modulation Linears (klein's shared `double_stream_modulation_*` / `single_stream_modulation`,
Z-Image's per-block `adaLN_modulation`): without them klein-4B int4 is 2.35 GB, with them 2.14 GB, and on tiny
models with outlier channels they add 4-18% to int4's one-step error (docs/QUANTIZATION.md). int8 / fp8 keep the
modulation at the compute dtype (they would save only 0.14 GB of 4.07). Never quantized: embeddings, norms, the
small input / output projections (img_in, txt_in, x_embedder, cap_embedder, final_layer incl. its adaLN) and the
timestep / guidance MLPs.

Formats (weights only; activations stay in the compute dtype, each layer dequantizes its weight inside forward):
  int8  symmetric, one float32 scale per output channel: w ~ q * scale, q in [-127, 127]            (8 bits + O*4 B)
  int4  symmetric, group-wise along the input dim (GROUP=64), q in [-7, 7] stored +8 as two nibbles a byte (low
        nibble = even column), one float16 scale per group, rounded to fp16 BEFORE the weights are
        divided by it (so the stored scale is exactly the one used)                                  (4.25 bits/weight)
  fp8   float8_e4m3fn with one float32 scale per output channel (amax -> 448)                       (8 bits + O*4 B)

Pitfalls:
  * The packed / int8 / fp8 tensors are BUFFERS, not Parameters: `module.to(torch.bfloat16)` would cast a
    float8 buffer to bf16 (float8 counts as floating point): never `.to(dtype)` a quantized model, load it at the
    dtype you want instead (the loaders do).
  * int4 needs in_features % GROUP == 0; layers that do not divide are left unquantized (the tiny demo's 32-wide
    Qwen3) -- the same rule as MLX's class_predicate.
  * The model is quantized after it was loaded at the compute dtype, one layer at a time (each full-precision weight
    is dropped as soon as its quantized copy exists): the peak is the unquantized model plus one layer, never two.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs import BLOCK_CONTAINERS, MODULATION_CONTAINERS
from ..errors import ConfigError

MODES = ("int8", "int4", "fp8")
GROUP = 64                   # int4 group size along in_features
FP8_MAX = 448.0              # largest finite float8_e4m3fn
SKIP_NAMES = ("modulation",)  # adaLN_modulation / *_modulation: kept at the compute dtype except for int4 (header)


def containers_for(mode: str) -> tuple[str, ...]:
    return BLOCK_CONTAINERS + (MODULATION_CONTAINERS if mode == "int4" else ())


def skipped(name: str, mode: str) -> bool:
    return mode != "int4" and any(s in name for s in SKIP_NAMES)


class QuantLinear(nn.Module):
    """A Linear whose weight is stored quantized (`weight` + `weight_scale` buffers) and dequantized in forward."""

    def __init__(self, mode: str, in_features: int, out_features: int, weight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None):
        super().__init__()
        self.mode, self.in_features, self.out_features = mode, in_features, out_features
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, mode: str) -> "QuantLinear":
        w = lin.weight.detach()
        q, scale = QUANTIZERS[mode](w)
        bias = None if lin.bias is None else lin.bias.detach()
        return cls(mode, lin.in_features, lin.out_features, q, scale, bias)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return DEQUANTIZERS[self.mode](self.weight, self.weight_scale, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "fp8" and _scaled_mm_ok(x, self.out_features, self.in_features):
            return _fp8_scaled_mm(x, self.weight, self.weight_scale, self.bias)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}, bias={self.bias is not None}"


# ------------------------------------------------------------------------------------------------ model surgery

def quantize_model(model: nn.Module, mode: str, containers=None) -> int:
    """Replace, in place, the block Linears of `model` by QuantLinear(mode). Returns how many were replaced."""
    if mode == "none":
        return 0
    if mode not in MODES:
        raise ConfigError(f"unknown quantization {mode!r}: choose one of none, {', '.join(MODES)}")
    count = 0
    for cname in containers or containers_for(mode):
        container = getattr(model, cname, None)
        if container is None:
            continue
        for name, lin in [(n, m) for n, m in container.named_modules() if type(m) is nn.Linear]:
            if skipped(name, mode) or not can_quantize(lin.in_features, mode):
                continue
            parent_name, _, leaf = name.rpartition(".")
            parent = container.get_submodule(parent_name) if parent_name else container
            setattr(parent, leaf, QuantLinear.from_linear(lin, mode))  # the old weight is freed here
            count += 1
    return count


def can_quantize(in_features: int, mode: str) -> bool:
    return mode != "int4" or in_features % GROUP == 0


def module_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters and buffers of `model` (what a footprint test compares)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------------------ formats

def _quant_int8(w):
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(w.float() / scale).clamp_(-127, 127).to(torch.int8), scale


def _dequant_int8(q, scale, in_features):
    return q.float() * scale


FP16_TINY, FP16_MAX = 2.0 ** -24, 65504.0  # smallest fp16 subnormal / largest finite fp16


def _quant_int4(w):
    # fp16 scales: 2 bytes per 64 weights instead of 4 (klein-4B int4 2.46 -> 2.3 GB); an all-zero group keeps the
    # smallest subnormal so the division stays finite.
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // GROUP, GROUP)
    scale = (g.abs().amax(dim=2, keepdim=True) / 7.0).clamp_(FP16_TINY, FP16_MAX).to(torch.float16)
    q = (torch.round(g / scale.float()).clamp_(-7, 7) + 8).to(torch.uint8).reshape(out_f, in_f)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale.squeeze(2)


def _dequant_int4(packed, scale, in_features):
    out_f = packed.shape[0]
    q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(out_f, in_features).to(torch.int8) - 8
    return (q.float().reshape(out_f, -1, GROUP) * scale.float().unsqueeze(2)).reshape(out_f, in_features)


def _quant_fp8(w):
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (w.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _dequant_fp8(q, scale, in_features):
    return q.float() * scale


QUANTIZERS = {"int8": _quant_int8, "int4": _quant_int4, "fp8": _quant_fp8}
DEQUANTIZERS = {"int8": _dequant_int8, "int4": _dequant_int4, "fp8": _dequant_fp8}


# ------------------------------------------------------------------------------------------------ fp8 tensor cores

def _scaled_mm_ok(x: torch.Tensor, out_f: int, in_f: int) -> bool:
    """torch._scaled_mm (fp8 tensor cores) needs CUDA sm >= 8.9, 16-aligned dims and a bf16 output for row-wise
    scales; everything else dequantizes."""
    if not x.is_cuda or x.dtype != torch.bfloat16 or in_f % 16 or out_f % 16 or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 9)


def _fp8_scaled_mm(x, w8, w_scale, bias):
    """x @ W^T with W in fp8: the activations are quantized per row (dynamic scale, amax -> 448) to e4m3."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_scale = (x2.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX).to(x2.dtype)
    # clamp: a value that rounds past 448 would become NaN in the cast (e4m3fn has no inf and does not saturate)
    x8 = (x2 / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    b = None if bias is None else bias.to(torch.bfloat16)
    out = torch._scaled_mm(x8, w8.t(), scale_a=x_scale.float(), scale_b=w_scale.reshape(1, -1), bias=b,
                           out_dtype=torch.bfloat16)
    return out.reshape(*shape[:-1], w8.shape[0])


# ------------------------------------------------------------------------------------------------ MLX affine

def dequantize_affine(words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                      group_size: int) -> torch.Tensor:
    """MLX's affine layout (mx.quantize / nn.QuantizedLinear) -> weights, as mx.dequantize computes them.

    `words` is uint32 [O, I * bits / 32]: a little-endian bit stream per row, value i in bits [i*bits, (i+1)*bits)
    (for 2/4/8 bits that is "low bits first in each word"; 3/5/6-bit values straddle bytes). Each group of
    `group_size` values has w = scale * q + bias, computed IN the scales' dtype (two roundings in bf16 / fp16,
    as MLX does; float32 first and one cast differs by an ulp of bf16 in places)."""
    rows = words.shape[0]
    b = words.contiguous().view(torch.uint8).reshape(rows, -1)
    if bits == 8:
        q = b
    else:
        # `bits` bytes hold exactly 8 values: gather them into one little-endian integer, then shift out
        chunk = b.reshape(rows, -1, bits).to(torch.int64)
        acc = sum(chunk[..., i] << (8 * i) for i in range(bits))
        shifts = torch.arange(8, device=b.device, dtype=torch.int64) * bits
        q = ((acc.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)
    q = q.to(scales.dtype).reshape(rows, -1, group_size)   # codes < 256: exact in every float dtype
    w = q * scales.unsqueeze(-1) + biases.to(scales.dtype).unsqueeze(-1)
    return w.reshape(rows, -1)
