"""Loading pre-quantized weights on torch (our format, GGUF, MLX affine folders) and writing our format.

`load_qstate` takes a `QState` (flux_core/weights/qstate.py: our keys -> Lazy tensors | QWeight), builds the model
on the meta device from the logical shapes, replaces each quantized Linear by a layer that keeps the stored parts
on the device (QuantLinear for ours, GGUFLinear for GGUF; MLX affine weights are dequantized to a plain Linear here,
exactly as mx.dequantize computes them), then reads every other tensor one at a time, casts it and assigns it.
Host memory: one tensor at a time on top of the model itself (a CPU model lives in host memory, of course).

`quantize_file` is the `python -m flux_core quantize` worker: load at the source precision, quantize with the
load-time quantizer (so the file is bit-identical to quantizing at load), save with our metadata.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ConfigError, WeightError
from ..weights import qfile
from ..weights import prequant
from ..weights.keymap import check_strict
from ..weights.qstate import Lazy, QWeight, quantized_layers
from . import quant as Q

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ loading

def build(kind: str, qstate: dict, config: dict | None, max_layers: int | None = None) -> tuple[nn.Module, dict]:
    """The model on the meta device for `kind` (a family's module or "qwen3"), sized from the QState's shapes;
    returns (model, the QState in our layout)."""
    cls_name, cfg, sd, kwargs = prequant.plan(kind, qstate, config, max_layers)
    with torch.device("meta"):
        return getattr(importlib.import_module(f".{kind}", __package__), cls_name)(cfg, **kwargs), sd


def load_qstate(kind: str, qstate: dict, config: dict | None, dtype=torch.float32, device="cpu",
                max_layers: int | None = None, what: str = "") -> nn.Module:
    model, sd = build(kind, qstate, config, max_layers)
    what = what or kind
    check_strict({k: tuple(v.shape) for k, v in model.state_dict().items()},
                 {k: tuple(v.shape) for k, v in sd.items()}, what)
    # quantized Linears stay quantized; any other quantized tensor (an Embedding, a pad token) is dequantized
    layers = {n: qw for n, qw in quantized_layers(sd).items() if type(_module(model, n)) is nn.Linear}
    for name, qw in layers.items():
        lin = model.get_submodule(name)
        _set(model, name, make_layer(qw, lin.bias is not None, dtype, device, what + ": " + name))
    done = {f"{n}.{p}" for n in layers for p, _ in _stored_parts(model.get_submodule(n))}
    for key in model.state_dict():
        if key in done:
            continue
        v = sd[key]
        t = dequantize_qweight(v) if isinstance(v, QWeight) else v.read() if isinstance(v, Lazy) else v
        _assign(model, key, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
    return model.eval().requires_grad_(False)


def make_layer(qw: QWeight, has_bias: bool, dtype, device, what: str) -> nn.Module:
    """The torch layer for one stored quantized weight (bias left on the meta device, filled by the caller)."""
    out_f, in_f = qw.shape
    bias = nn.Parameter(torch.empty(out_f, device="meta"), requires_grad=False) if has_bias else None
    if qw.scheme == "fluxcore":
        w, s = qw.read("weight").to(device), qw.read("weight_scale").to(device)
        return Q.QuantLinear(qw.mode, in_f, out_f, w, s, bias)
    if qw.scheme == "gguf":
        from .gguf import GGUFLinear

        return GGUFLinear(qw.mode, in_f, out_f, qw.read("data").to(device), bias)
    if qw.scheme == "mlx":
        w = Q.dequantize_affine(qw.read("weight"), qw.read("scales"), qw.read("biases"), qw.bits, qw.group_size)
        if tuple(w.shape) != (out_f, in_f):
            raise WeightError(f"{what}: MLX weight dequantizes to {tuple(w.shape)}, expected {(out_f, in_f)}")
        lin = nn.Linear(in_f, out_f, bias=has_bias, device="meta")
        lin.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
        return lin
    raise WeightError(f"{what}: unknown quantized weight scheme {qw.scheme!r}")


def dequantize_qweight(qw: QWeight) -> torch.Tensor:
    """A stored quantized tensor -> float weights (for tensors that are not Linear weights)."""
    if qw.scheme == "gguf":
        from .gguf import dequantize

        return dequantize(qw.read("data"), qw.mode, qw.shape)
    if qw.scheme == "mlx":
        return Q.dequantize_affine(qw.read("weight"), qw.read("scales"), qw.read("biases"), qw.bits, qw.group_size)
    return Q.DEQUANTIZERS[qw.mode](qw.read("weight"), qw.read("weight_scale"), qw.shape[1])


def _module(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _stored_parts(layer: nn.Module):
    """(name, tensor) of a replaced layer's quantized storage: everything but a bias still to be read."""
    return [(n, t) for n, t in list(layer.named_parameters()) + list(layer.named_buffers())
            if n != "bias" and t.device.type != "meta"]


def _set(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)


def _assign(model: nn.Module, key: str, t: torch.Tensor) -> None:
    parent, _, leaf = key.rpartition(".")
    mod = model.get_submodule(parent) if parent else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = t
    else:
        raise WeightError(f"{key}: not a parameter or buffer of the model")


def load_file(path, dtype=torch.float32, device="cpu", max_layers: int | None = None) -> tuple[nn.Module, dict]:
    """Our quantized file -> (torch model with QuantLinear layers, metadata)."""
    qstate, meta, config = qfile.read(path)
    kind = meta.get("fluxcore.family", "")
    if kind not in prequant.MODEL_CLASSES:
        raise WeightError(f"{path}: unknown fluxcore.family {kind!r} in the metadata")
    model = load_qstate(kind, qstate, config, dtype, device, max_layers, f"quantized {kind} ({Path(path).name})")
    return model, meta


# ------------------------------------------------------------------------------------------------ writing

def quantize_file(source, output, mode: str, component: str = "transformer") -> dict:
    """Quantize a transformer / Qwen3 checkpoint (any layout we read) into our format at `output`.

    The model is loaded at the source's own float precision on the CPU and quantized by `quant.quantize_model`,
    the load-time quantizer, so the stored codes equal quantizing the same source at load."""
    from ..families import detect_family
    from ..weights.io import load_checkpoint, save_safetensors
    from . import loaders

    if mode not in Q.MODES:
        raise ConfigError(f"unknown quantization {mode!r}: choose one of {', '.join(Q.MODES)}")
    if component not in ("transformer", "text_encoder"):
        raise ConfigError(f"component must be transformer or text_encoder, not {component!r}")
    ckpt = load_checkpoint(source, component=component)
    if ckpt.metadata.get("fluxcore.prequantized"):
        raise ConfigError(f"{source} is already quantized ({ckpt.metadata['fluxcore.prequantized']}): quantize the "
                          "full-precision file")
    src_dtype = _main_float_dtype(ckpt.sd)
    dtype_name = str(src_dtype).replace("torch.", "")
    if component == "transformer":
        fam = detect_family(ckpt.sd)
        family, model = fam.name, loaders.load_transformer(fam, ckpt, dtype_name, "cpu")
    else:
        family, model = "qwen3", loaders.load_qwen3(ckpt, dtype_name, "cpu")
    ckpt.sd.clear()
    n = Q.quantize_model(model, mode)
    layers = [name for name, m in model.named_modules() if isinstance(m, Q.QuantLinear)]
    extra = {k: v for k, v in ckpt.metadata.items() if k == "fluxcore.distilled"}
    meta = qfile.make_metadata(mode, component, family, layers, dtype_name, ckpt.config, extra)
    sd = model.state_dict()
    save_safetensors(sd, output, meta)
    size = Path(output).stat().st_size
    log.info("fluxcore: wrote %s (%s %s, %d layers quantized, %.3f GB)", output, family, mode, n, size / 1e9)
    return {"output": str(output), "family": family, "quantization": mode, "layers": n, "bytes": size}


def _main_float_dtype(sd: dict) -> torch.dtype:
    """The dtype holding most float elements (bf16 for every published file)."""
    count: dict = {}
    for v in sd.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.element_size() >= 2:
            count[v.dtype] = count.get(v.dtype, 0) + v.numel()
    return max(count, key=count.get) if count else torch.float32
