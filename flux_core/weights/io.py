"""Reading checkpoints: single safetensors files, diffusers component folders (sharded or not), pipeline folders.

Everything comes back as a plain `{key: torch.Tensor}` dict on the CPU plus the parsed config.json (if any) and the
safetensors metadata, with the `model.diffusion_model.`-style prefixes stripped by the caller's key map.
ComfyUI "fp8 scaled" files (`*.weight` in float8 + `*.scale_weight`) are dequantized here so every model sees
ordinary floating-point weights; the MLX path reads the same dicts, so no dtype is ever refused.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..errors import ConfigError, WeightError
from .meta import check_config, parse_json, read_config, read_index

log = logging.getLogger(__name__)

# Keys ComfyUI's fp8-scaled and other quantized exports add next to the weights.
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_DROP_SUFFIXES = (".scale_input", ".input_scale", "scaled_fp8", ".comfy_quant")
# PyTorch's own checkpoint formats are pickles (code runs on load); we never unpickle, we say what to use instead.
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch zip / pickle protocols


@dataclass
class Checkpoint:
    sd: dict
    config: dict | None = None
    metadata: dict = field(default_factory=dict)
    source: str = ""

    def keys(self):
        return self.sd.keys()


def read_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """One .safetensors file -> ({key: tensor}, metadata). Any dtype torch knows (incl. F8_E5M2, F64) is accepted."""
    from safetensors import safe_open

    path = str(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise WeightError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise WeightError(f"{path} is a folder; pass the .safetensors file inside it, or the folder itself as "
                          "the model") from None
    except Exception as e:  # safetensors raises its own types for truncated / non-safetensors files
        if is_pickle(path):
            raise WeightError(pickle_message(path)) from None
        raise WeightError(f"cannot read {path} as safetensors ({e}). Is the download complete? "
                          "Only .safetensors files are supported.") from None
    return sd, meta


def is_pickle(path: str | os.PathLike) -> bool:
    """A PyTorch pickle checkpoint (.pt/.ckpt/.bin, zip or bare pickle), recognised by its first bytes or name."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    return head.startswith(_PICKLE_MAGIC) or Path(path).suffix.lower() in PICKLE_SUFFIXES


def pickle_message(path) -> str:
    return (f"{path} is a pickle checkpoint (PyTorch .pt/.ckpt/.bin), which FluxCore never loads (unpickling can "
            "run code): use the .safetensors file of the same model (Comfy-Org and the model's Hugging Face page "
            "publish one)")


def dequantize_scaled(sd: dict, compute_dtype=None) -> dict:
    """Turn ComfyUI fp8-scaled weights into plain tensors: w = w_fp8.float() * scale."""
    import torch

    scales = {k[: -len(s)]: k for k in sd for s in _SCALE_SUFFIXES if k.endswith(s)}
    if not scales and not any(k.endswith(_DROP_SUFFIXES) for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        if k.endswith(_DROP_SUFFIXES) or k in scales.values():
            continue
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        if base is not None and base in scales:
            scale = sd[scales[base]].float()
            try:
                v = v.float() * (scale if scale.numel() == 1 else scale.reshape(-1, *([1] * (v.dim() - 1))))
            except RuntimeError:  # a scale that fits neither per-tensor nor per-row: a damaged or foreign export
                raise WeightError(f"{scales[base]} has shape {tuple(scale.shape)}, which does not scale {k} "
                                  f"{tuple(v.shape)}; the fp8 checkpoint is damaged: re-download it") from None
            v = v.to(compute_dtype or torch.bfloat16)
        out[k] = v
    return out


def _folder_files(folder: Path) -> list[Path]:
    for index in sorted(folder.glob("*.safetensors.index.json")):
        return [folder / s for s in read_index(index)]
    files = sorted(f for f in folder.glob("*.safetensors") if f.is_file())
    return files


def _metadata_config(meta: dict, source) -> dict | None:
    """The `config` JSON some exporters put in the safetensors metadata. Another tool's blob that is not a JSON
    object is skipped with a log line; a JSON object with a known key of the wrong kind is an error."""
    text = meta.get("config")
    if not text:
        return None
    where = f"the 'config' metadata of {source}"
    try:
        config = parse_json(text, where)
    except WeightError as e:
        log.warning("ignoring %s", e)
        return None
    if not isinstance(config, dict):
        log.warning("ignoring %s: a %s, not a JSON object", where, type(config).__name__)
        return None
    return check_config(config, where)


def load_checkpoint(path: str | os.PathLike, component: str | None = None) -> Checkpoint:
    """Load a .safetensors file, a component folder, or (with `component`) that subfolder of a pipeline folder.

    Pre-quantized checkpoints (FluxCore quantized files, .gguf, MLX affine folders; weights/prequant.py) come back
    with a lazy `sd` (a QState: nothing read but headers) and metadata["fluxcore.prequantized"] set."""
    from . import prequant

    if prequant.detect(path, component):
        qstate, meta, config, source = prequant.read(path, component)
        return Checkpoint(qstate, config, meta, source)
    p = Path(path).expanduser()
    if p.is_dir() and component and (p / component).is_dir():
        p = p / component
    if p.is_dir():
        files = _folder_files(p)
        if not files:
            pickles = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise WeightError(f"{p} holds only pickle checkpoints ({', '.join(pickles[:3])}); FluxCore never "
                                  "unpickles (loading a pickle can run code): download the .safetensors version")
            raise WeightError(f"no .safetensors files in {p}"
                              + (f" (looked for the '{component}' subfolder too)" if component else ""))
        sd, meta = {}, {}
        for f in files:
            part, m = read_safetensors(f)
            sd.update(part)
            meta.update(m)
        config = read_config(p / "config.json") if (p / "config.json").is_file() else None
        return Checkpoint(dequantize_scaled(sd), config, meta, str(p))
    if not p.exists():
        raise WeightError(f"checkpoint not found: {p}")
    sd, meta = read_safetensors(p)
    return Checkpoint(dequantize_scaled(sd), _metadata_config(meta, p), meta, str(p))


def as_checkpoint(source, component: str | None = None) -> Checkpoint:
    """What every model loader accepts: a path (file, component folder or pipeline folder, see `load_checkpoint`),
    an already-read `Checkpoint`, or a plain state dict {key: tensor}."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return Checkpoint(dict(source), None, {}, "<state dict>")
    if isinstance(source, (str, os.PathLike)):
        return load_checkpoint(source, component=component)
    raise ConfigError(f"expected a checkpoint path, a Checkpoint or a state dict, got {type(source).__name__}")


def is_prequantized(ckpt: Checkpoint) -> bool:
    return bool(ckpt.metadata.get("fluxcore.prequantized"))


def save_safetensors(sd: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
