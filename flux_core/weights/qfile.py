"""FluxCore's quantized safetensors format (written by `python -m flux_core quantize`), version 1.

A file holds a transformer (klein / Z-Image) or a Qwen3 text encoder in OUR key layout, with every quantized Linear
stored as the torch QuantLinear's buffers (flux_core/torch/quant.py):
  <layer>.weight        int8 [O, I] (int8) | uint8 [O, I/2] two nibbles a byte, low = even column (int4) |
                        float8_e4m3fn [O, I] (fp8)
  <layer>.weight_scale  float32 [O, 1] (int8, fp8) | float16 [O, I/64] (int4)
  <layer>.bias          as stored in the source
Everything else (embeddings, norms, modulation, input / output projections) is stored at the source's precision.

Metadata (all strings, as safetensors requires):
  fluxcore.format = "fluxcore-quantized"     fluxcore.format_version = "1"
  fluxcore.quantization = int8 | int4 | fp8  fluxcore.group_size = "64" (int4; per-row scales otherwise)
  fluxcore.component = transformer | text_encoder          fluxcore.family = klein | zimage | qwen3
  fluxcore.quantized = JSON list of the quantized layer names
  fluxcore.source_dtype = the source's float dtype         config = the source's config.json (when it had one)
  fluxcore.distilled = copied from the source when it said
The loaders detect the format from this metadata; the family and sizes are still read from the tensors, whose
logical shapes ([O, I]) the reader restores for the int4 weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import WeightError
from .qstate import QState, QWeight, SafetensorsStream

FORMAT = "fluxcore-quantized"
VERSION = 1
MODES = ("int8", "int4", "fp8")
GROUP = 64
KEY = "fluxcore.format"


def is_quantized_file(path) -> bool:
    """True for a single .safetensors file in our quantized format (reads the header only)."""
    p = Path(path)
    if not (p.is_file() and p.suffix == ".safetensors"):
        return False
    try:
        return SafetensorsStream(p).metadata.get(KEY) == FORMAT
    except WeightError:
        return False


def make_metadata(mode: str, component: str, family: str, layers: list[str], source_dtype: str,
                  config: dict | None = None, extra: dict | None = None) -> dict:
    meta = {KEY: FORMAT, "fluxcore.format_version": str(VERSION), "fluxcore.quantization": mode,
            "fluxcore.group_size": str(GROUP), "fluxcore.component": component, "fluxcore.family": family,
            "fluxcore.quantized": json.dumps(sorted(layers)), "fluxcore.source_dtype": source_dtype}
    if config:
        meta["config"] = json.dumps(config)
    meta.update(extra or {})
    return meta


def read(path) -> tuple[dict, dict, dict | None]:
    """Our quantized file -> (QState, metadata, config.json or None). Nothing but the header is read here."""
    stream = SafetensorsStream(path)
    meta = stream.metadata
    if meta.get(KEY) != FORMAT:
        raise WeightError(f"{path} is not a FluxCore quantized file (no {KEY}={FORMAT} metadata)")
    try:
        version = int(meta.get("fluxcore.format_version", "0"))
        layers = json.loads(meta.get("fluxcore.quantized", "[]"))
        config = json.loads(meta["config"]) if meta.get("config") else None
        group = int(meta.get("fluxcore.group_size", GROUP))
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise ValueError("fluxcore.quantized is not a list of layer names")
    except (ValueError, TypeError) as e:
        raise WeightError(f"{path}: damaged FluxCore quantized metadata ({e}); re-run `python -m flux_core "
                          "quantize` on the full-precision file") from None
    if version > VERSION:
        raise WeightError(f"{path} is FluxCore quantized format version {version}; this flux_core reads up to "
                          f"{VERSION}: update flux_core (or re-run `python -m flux_core quantize` with this one).")
    mode = meta.get("fluxcore.quantization")
    if mode not in MODES or group != GROUP:
        raise WeightError(f"{path}: unsupported quantization {mode!r} / group size {meta.get('fluxcore.group_size')}")
    qstate: QState = {}
    for layer in layers:
        w, s = layer + ".weight", layer + ".weight_scale"
        if w not in stream.entries or s not in stream.entries:
            raise WeightError(f"{path}: quantized layer {layer} has no {w} / {s}: the file is damaged or truncated")
        out_f, stored_in = stream.shape(w)
        qstate[w] = QWeight("fluxcore", mode, (out_f, stored_in * 2 if mode == "int4" else stored_in),
                            {"weight": stream.lazy(w), "weight_scale": stream.lazy(s)}, group_size=GROUP)
    for k in stream.keys():
        if k not in qstate and not (k.endswith(".weight_scale") and k[: -len("_scale")] in qstate):
            qstate[k] = stream.lazy(k)
    return qstate, meta, config
