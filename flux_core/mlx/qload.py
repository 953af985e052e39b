"""Loading pre-quantized weights on MLX: our format, GGUF and MLX affine folders (mflux / MLX-community).

Same flow as the torch side (flux_core/torch/qload.py): the model is built from the QState's logical shapes, each
quantized Linear is replaced by an MLX layer made from its stored parts, the other tensors are converted one at a
time. What each scheme becomes:
  fluxcore int8 / int4  nn.QuantizedLinear (affine, group 64), exactly (flux_core/mlx/quant.py explains the map)
  fluxcore fp8          DequantLinear (our per-row e4m3 scale; mxfp8's power-of-two scales cannot hold it)
  gguf Q8_0 / Q4_0      nn.QuantizedLinear (affine, group 32): w = d * q is scale d, bias -128 d / -8 d on the
                        unsigned codes, exact in float32 (d is an fp16 number, q*d needs 19 bits)
  gguf other types      dequantized at load with the `gguf` package (K-quants' two-level scales, Q5's fifth bit
                        and Q4_1/Q5_1's fp16 min do not map onto one affine scale + bias per group exactly)
  mlx affine            nn.QuantizedLinear with the file's own words, scales and biases (no dequantization)
Scales and biases are held in the compute dtype (mx.quantized_matmul promotes the output to the wider of the
activation and scale dtypes); in float32 every mapping above is exact, in bfloat16 the scales are rounded to bf16.
"""
from __future__ import annotations

import importlib
import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import WeightError
from ..weights import prequant
from ..weights.keymap import check_strict
from ..weights.qstate import Lazy, QWeight, layer_of, quantized_layers
from . import quant as Q
from .common import mx_dtype, to_mx

log = logging.getLogger(__name__)


def build(kind: str, qstate: dict, config: dict | None, max_layers: int | None = None):
    """The MLX model for `kind` (a family's module or "qwen3"), initial weights lazy and never evaluated."""
    cls_name, cfg, sd, kwargs = prequant.plan(kind, qstate, config, max_layers)
    return getattr(importlib.import_module(f".{kind}", __package__), cls_name)(cfg, **kwargs), sd


def load_qstate(kind: str, qstate: dict, config: dict | None, dtype="float32", max_layers: int | None = None,
                what: str = "") -> nn.Module:
    dtype = mx_dtype(dtype)
    model, sd = build(kind, qstate, config, max_layers)  # initial weights stay lazy, never evaluated
    what = what or kind
    own = dict(tree_flatten(model.parameters()))
    check_strict({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in sd.items()}, what)
    # quantized Linears stay quantized; any other quantized tensor (an Embedding, a pad token) is dequantized
    layers = {n: qw for n, qw in quantized_layers(sd).items() if isinstance(_module(model, n), nn.Linear)}
    for name, qw in layers.items():
        bias = sd.get(name + ".bias")
        layer = make_layer(qw, None if bias is None else to_mx(bias.read(), dtype), dtype, f"{what}: {name}")
        mx.eval(layer.parameters())
        Q.set_module(model, name, layer)
    rest = []
    for k in own:
        if layer_of(k) in layers or (k.endswith(".bias") and k[: -len(".bias")] in layers):
            continue
        v = sd[k]
        t = dequantize_qweight(v) if isinstance(v, QWeight) else v.read() if isinstance(v, Lazy) else v
        rest.append((k, to_mx(t, dtype)))
        mx.eval(rest[-1][1])
    model.update(tree_unflatten(rest))
    mx.eval(model.parameters())
    return model


def dequantize_qweight(qw: QWeight) -> mx.array:
    """A stored quantized tensor that is not a Linear weight -> float32 weights."""
    if qw.scheme == "gguf":
        from ..weights import gguf as G

        return mx.array(G.dequantize_numpy(_numpy_bytes(qw.read("data")), qw.mode, qw.shape))
    if qw.scheme == "mlx":
        words = mx.array(_numpy_bytes(qw.read("weight")).view(np.uint32))
        return mx.dequantize(words, to_mx(qw.read("scales")), to_mx(qw.read("biases")), group_size=qw.group_size,
                             bits=qw.bits)
    return Q.dequantize_weight(qw.mode, mx.array(_numpy_bytes(qw.read("weight"))), to_mx(qw.read("weight_scale")),
                               qw.shape[1])


def _module(model, name: str):
    m = model
    try:
        for p in name.split("."):
            m = m[int(p)] if isinstance(m, list) else getattr(m, p)
    except (AttributeError, ValueError, IndexError):
        return None
    return m


def make_layer(qw: QWeight, bias, dtype, what: str) -> nn.Module:
    out_f, in_f = qw.shape
    if qw.scheme == "fluxcore":
        return Q.make_layer(qw.mode, _numpy_bytes(qw.read("weight")), to_mx(qw.read("weight_scale")), bias, in_f,
                            dtype)
    if qw.scheme == "mlx":
        layer = nn.QuantizedLinear(in_f, out_f, bias=bias is not None, group_size=qw.group_size, bits=qw.bits)
        layer.weight = mx.array(_numpy_bytes(qw.read("weight")).view(np.uint32))
        layer.scales, layer.biases = to_mx(qw.read("scales"), dtype), to_mx(qw.read("biases"), dtype)
        if tuple(layer.weight.shape) != (out_f, in_f * qw.bits // 32):
            raise WeightError(f"{what}: packed weight {tuple(layer.weight.shape)} does not fit {qw.bits}-bit "
                              f"[{out_f}, {in_f}]")
        if bias is not None:
            layer.bias = bias
        return layer
    if qw.scheme == "gguf":
        return _gguf_layer(qw, bias, dtype)
    raise WeightError(f"{what}: unknown quantized weight scheme {qw.scheme!r}")


def _gguf_layer(qw: QWeight, bias, dtype) -> nn.Module:
    from ..weights import gguf as G

    out_f, in_f = qw.shape
    raw = _numpy_bytes(qw.read("data")).reshape(out_f, -1)
    if qw.mode in ("Q8_0", "Q4_0"):
        d, codes = G.split_q8_0(raw) if qw.mode == "Q8_0" else G.split_q4_0(raw)
        bits, zero = (8, 128) if qw.mode == "Q8_0" else (4, 8)
        codes = (codes.astype(np.int16) + zero).astype(np.uint8).reshape(out_f, in_f)
        packed = codes if bits == 8 else (codes[:, 0::2] | (codes[:, 1::2] << 4))
        layer = nn.QuantizedLinear(in_f, out_f, bias=bias is not None, group_size=32, bits=bits)
        scale = mx.array(d.reshape(out_f, in_f // 32).astype(np.float32)).astype(dtype)
        layer.weight, layer.scales, layer.biases = mx.array(np.ascontiguousarray(packed).view(np.uint32)), scale, \
            scale * -zero
    else:
        w = G.dequantize_numpy(raw, qw.mode, (out_f, in_f))
        layer = nn.Linear(in_f, out_f, bias=bias is not None)
        layer.weight = mx.array(w).astype(dtype)
    if bias is not None:
        layer.bias = bias
    return layer


def _numpy_bytes(t) -> np.ndarray:
    """A torch CPU tensor (int / uint8 / float8 / float) or numpy array -> numpy, float8 as its uint8 bytes."""
    if isinstance(t, np.ndarray):
        return t
    import torch

    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.view(torch.uint8)
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.contiguous().numpy()


def load_file(path, dtype="float32", max_layers: int | None = None):
    """Our quantized file -> (MLX model, metadata)."""
    from pathlib import Path

    from ..weights import qfile

    qstate, meta, config = qfile.read(path)
    kind = meta.get("fluxcore.family", "")
    model = load_qstate(kind, qstate, config, dtype, max_layers, f"quantized {kind} ({Path(path).name})")
    return model, meta
