"""Weight-only quantization of an MLX model's block Linears: int8 | int4 (ours, in MLX's layout) | fp8 (mxfp8).

Same selection as the torch side (flux_core/torch/quant.py): the Linears inside the repeated blocks (klein
`double_blocks` / `single_blocks`, Z-Image `layers` / `noise_refiner` / `context_refiner`, Qwen3 `layers`), plus the
modulation Linears for int4 only, never embeddings, norms or the small input / output projections.

  int8 / int4  OUR symmetric codes and scales (the torch quantizer's math, op for op in mx: the same bytes on both
               backends, and the same bytes as a saved FluxCore quantized file), laid out as MLX's own affine
               `nn.QuantizedLinear` (uint32 words, a scale and a bias per group of 64) so Apple GPUs run MLX's
               quantized_matmul. The mapping is exact: symmetric q in [-7, 7] is stored as q + 8 (q + 128 for int8),
               so MLX's w = scale * q_u + bias holds with bias = -8 * scale (-128 * scale); our nibble order (low
               nibble = even column) read as little-endian uint32 is MLX's packing. int8's one scale per row is
               repeated over the row's groups. A layer whose input dim does not divide by 64 (int8 only; int4 skips
               it like torch) becomes a `DequantLinear` that holds our bytes and dequantizes in the forward.
  fp8          at load time: mode "mxfp8" (e4m3 values, one power-of-two uint8 scale per 32), when the installed mlx
               has it; otherwise refused with a ConfigError. A saved fp8 FILE holds our per-row e4m3 scale, which
               mxfp8 cannot represent: it loads as a `DequantLinear` (mx.from_fp8 * scale in the forward).

On a Linux CPU `quantized_matmul` is a slow scalar path (docs/PERF.md §P7): quantization is for Apple GPUs'
memory, not CPU speed.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..configs import BLOCK_CONTAINERS, MODULATION_CONTAINERS
from ..errors import ConfigError

SKIP_NAMES = ("modulation",)
GROUP = 64
FP8_MAX = 448.0
FP16_TINY, FP16_MAX = 2.0 ** -24, 65504.0
MXFP8 = dict(bits=8, group_size=32, mode="mxfp8")
# MLX's layout per mode (what a QuantizedLinear of that mode holds; mlx/lora.py re-quantizes merged weights with it)
SETTINGS = {"int8": dict(bits=8, group_size=GROUP, mode="affine"), "int4": dict(bits=4, group_size=GROUP, mode="affine"),
            "fp8": MXFP8}
ZERO = {"int4": 8, "int8": 128}   # our symmetric code -> MLX's unsigned affine code


def supported_modes() -> tuple[str, ...]:
    return ("int8", "int4", "fp8") if has_mxfp8() else ("int8", "int4")


def has_mxfp8() -> bool:
    try:
        mx.quantize(mx.zeros((32, 32)), group_size=32, bits=8, mode="mxfp8")
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


def can_quantize(in_features: int, mode: str) -> bool:
    return mode != "int4" or in_features % GROUP == 0


def selected(path: str, module, mode: str) -> bool:
    """The torch side's rule (torch/quant.py containers_for / skipped), on MLX module paths."""
    if not isinstance(module, nn.Linear):
        return False
    top = path.split(".")[0]
    if mode == "int4":
        return top in BLOCK_CONTAINERS + MODULATION_CONTAINERS
    return top in BLOCK_CONTAINERS and not any(n in path for n in SKIP_NAMES)


def quantize_model(model: nn.Module, mode: str) -> int:
    """Quantize, in place, the block Linears of `model`. Returns how many layers were quantized."""
    if mode == "none":
        return 0
    if mode not in supported_modes():
        raise ConfigError(f"quantization {mode!r} is not available on MLX {mx.__version__}: choose one of none, "
                          f"{', '.join(supported_modes())}")
    if mode == "fp8":
        picked = []

        def predicate(path: str, module) -> bool:
            ok = selected(path, module, mode) and module.weight.shape[1] % MXFP8["group_size"] == 0
            if ok:
                picked.append(path)
            return ok

        nn.quantize(model, class_predicate=predicate, **MXFP8)
        mx.eval(model.parameters())
        return len(picked)
    dtype = float_dtype(model)
    count = 0
    for path, lin in [(p, m) for p, m in model.named_modules() if selected(p, m, mode)]:
        if not can_quantize(lin.weight.shape[1], mode):
            continue
        q, scale = quantize_weight(lin.weight, mode)
        bias = lin.get("bias") if "bias" in lin else None
        layer = make_layer(mode, q, scale, bias, lin.weight.shape[1], dtype)
        mx.eval(layer.parameters())   # evaluated before the float weight is dropped: one layer extra at a time
        set_module(model, path, layer)
        count += 1
    mx.eval(model.parameters())
    return count


# ------------------------------------------------------------------------------------------------ our codes in mx

def quantize_weight(w: mx.array, mode: str) -> tuple[mx.array, mx.array]:
    """The torch quantizer (flux_core/torch/quant.py) op for op: (codes, scale) with the same bytes."""
    w = w.astype(mx.float32)
    if mode == "int8":
        scale = mx.maximum(mx.max(mx.abs(w), axis=1, keepdims=True), 1e-12) / 127.0
        return mx.clip(mx.round(w / scale), -127, 127).astype(mx.int8), scale
    if mode == "fp8":
        scale = mx.maximum(mx.max(mx.abs(w), axis=1, keepdims=True), 1e-12) / FP8_MAX
        return mx.to_fp8(mx.clip(w / scale, -FP8_MAX, FP8_MAX)), scale
    if mode == "int4":
        out_f, in_f = w.shape
        g = w.reshape(out_f, in_f // GROUP, GROUP)
        scale = mx.clip(mx.max(mx.abs(g), axis=2, keepdims=True) / 7.0, FP16_TINY, FP16_MAX).astype(mx.float16)
        q = (mx.clip(mx.round(g / scale.astype(mx.float32)), -7, 7) + 8).astype(mx.uint8).reshape(out_f, in_f)
        return q[:, 0::2] | (q[:, 1::2] << 4), scale.squeeze(2)
    raise ConfigError(f"unknown quantization {mode!r}")


def dequantize_weight(mode: str, q: mx.array, scale: mx.array, in_features: int) -> mx.array:
    """float32 weight from our codes, the torch DEQUANTIZERS' math."""
    if mode == "int8":
        return q.astype(mx.float32) * scale
    if mode == "fp8":
        return mx.from_fp8(q, dtype=mx.float32) * scale
    out_f = q.shape[0]
    codes = mx.stack([q & 0x0F, q >> 4], axis=-1).reshape(out_f, in_features).astype(mx.int8) - 8
    return (codes.astype(mx.float32).reshape(out_f, -1, GROUP) * scale.astype(mx.float32)[..., None]).reshape(
        out_f, in_features)


def to_affine(mode: str, q, scale, in_features: int, dtype) -> tuple[mx.array, mx.array, mx.array, int]:
    """Our int8 / int4 codes + scales -> MLX affine (uint32 words, scales, biases, bits), exactly (module doc)."""
    qn = np.ascontiguousarray(np.asarray(q))
    if mode == "int8":
        qn = (qn.astype(np.int16) + ZERO["int8"]).astype(np.uint8)
    words = mx.array(qn.view(np.uint32))
    s = mx.array(scale) if not isinstance(scale, mx.array) else scale
    if mode == "int8":
        s = mx.broadcast_to(s.reshape(-1, 1), (s.shape[0], in_features // GROUP))
    s = s.astype(dtype)
    return words, s, s * -ZERO[mode], 8 if mode == "int8" else 4


def make_layer(mode: str, q, scale, bias, in_features: int, dtype) -> nn.Module:
    """The MLX layer for one of our quantized weights: native QuantizedLinear where exact, else DequantLinear."""
    out_f = q.shape[0]
    if mode in ZERO and in_features % GROUP == 0:
        words, s, b, bits = to_affine(mode, q, scale, in_features, dtype)
        layer = nn.QuantizedLinear(in_features, out_f, bias=bias is not None, group_size=GROUP, bits=bits)
        layer.weight, layer.scales, layer.biases = words, s, b
        if bias is not None:
            layer.bias = bias.astype(dtype)
        return layer
    return DequantLinear(mode, q, scale, None if bias is None else bias.astype(dtype), in_features)


class DequantLinear(nn.Module):
    """Our bytes (int8 / fp8 / int4 codes + scale), dequantized to the activation dtype inside each call."""

    def __init__(self, mode: str, q: mx.array, scale: mx.array, bias: mx.array | None, in_features: int):
        super().__init__()
        self.mode, self.in_features = mode, in_features
        self.weight, self.weight_scale = mx.array(q), mx.array(scale)
        if bias is not None:
            self.bias = bias

    def __call__(self, x: mx.array) -> mx.array:
        w = dequantize_weight(self.mode, self.weight, self.weight_scale, self.in_features).astype(x.dtype)
        y = x @ w.T
        return y + self.bias if "bias" in self else y


# ------------------------------------------------------------------------------------------------ module surgery

def set_module(model: nn.Module, path: str, layer: nn.Module) -> None:
    """Replace the submodule at dotted `path` (list indices included) by `layer`."""
    parts = path.split(".")
    parent = model
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else getattr(parent, p)
    leaf = parts[-1]
    if isinstance(parent, list):
        parent[int(leaf)] = layer
    else:
        setattr(parent, leaf, layer)


def float_dtype(model: nn.Module):
    """The compute dtype of a model: of its first floating-point parameter (quantized codes are integers)."""
    from mlx.utils import tree_flatten

    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32
