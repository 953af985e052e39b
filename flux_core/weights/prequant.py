"""Pre-quantized checkpoints: which kind a path is, and loading one on either backend.

Three kinds of files arrive quantized, and none of them is ever expanded to full precision on the way in:
  fluxcore  our own safetensors format (`python -m flux_core quantize`; flux_core/weights/qfile.py)
  gguf      a .gguf file as ComfyUI-GGUF users have them (flux_core/weights/gguf.py)
  mlx       an MLX affine-quantized folder or file: mflux saves, MLX-community repos (flux_core/weights/mlx_affine.py)
Each reader returns a QState in our key layout; `load_checkpoint` (weights/io.py) hands it on as the Checkpoint's
`sd`, the family (klein / Z-Image) is detected from its names exactly as for plain files, and the backends'
`load_prequantized` (torch/qload.py, mlx/qload.py) build the model from it.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import WeightError

KINDS = ("fluxcore", "gguf", "mlx")


def detect(path, component: str | None = None) -> str | None:
    """'fluxcore' | 'gguf' | 'mlx' for a pre-quantized checkpoint, None for anything else. Reads headers only."""
    from . import gguf, mlx_affine, qfile

    p = Path(path).expanduser()
    if p.is_dir() and component and (p / component).is_dir():
        p = p / component
    if p.suffix == ".gguf" or gguf.is_gguf(p):
        return "gguf"
    if qfile.is_quantized_file(p):
        return "fluxcore"
    if mlx_affine.is_mlx_quantized(p):
        return "mlx"
    return None


def read(path, component: str | None = None) -> tuple[dict, dict, dict | None, str]:
    """(QState, metadata, config, source) of a pre-quantized checkpoint."""
    from . import gguf, mlx_affine, qfile

    p = Path(path).expanduser()
    if p.is_dir() and component and (p / component).is_dir():
        p = p / component
    kind = detect(p)
    if kind == "gguf":
        qstate, meta, config = gguf.read(p)
    elif kind == "fluxcore":
        qstate, meta, config = qfile.read(p)
    elif kind == "mlx":
        qstate, meta, config = mlx_affine.read(p)
    else:
        raise WeightError(f"{p} is not a pre-quantized checkpoint (FluxCore quantized, GGUF or MLX affine)")
    meta = dict(meta, **{"fluxcore.prequantized": kind})
    return qstate, meta, config, str(p)


def describe(meta: dict) -> str:
    """A short note for LoadedModel.notes: what the file holds."""
    kind = meta.get("fluxcore.prequantized")
    if kind == "gguf":
        return f"GGUF ({meta.get('gguf.architecture')}): {meta.get('gguf.types')}"
    if kind == "fluxcore":
        return f"FluxCore {meta.get('fluxcore.quantization')} file (quantized blocks stay quantized)"
    if kind == "mlx":
        return f"MLX affine {meta.get('mlx.bits')}-bit, group {meta.get('mlx.group_size')}"
    return ""


def quantization_label(meta: dict) -> str:
    kind = meta.get("fluxcore.prequantized")
    if kind == "fluxcore":
        return meta.get("fluxcore.quantization", "none")
    if kind == "gguf":
        return "gguf"
    if kind == "mlx":
        return f"mlx-q{meta.get('mlx.bits')}"
    return "none"


# model file (flux_core/{torch,mlx}/<name>.py, key map flux_core/weights/<name>.py) -> (config class in
# flux_core/configs.py, model class in the model file); `kind` is a family's `module` or "qwen3"
MODEL_CLASSES = {"klein": ("KleinConfig", "Flux2Transformer"), "zimage": ("ZImageConfig", "ZImageTransformer"),
                 "qwen3": ("Qwen3Config", "Qwen3Encoder")}


def plan(kind: str, qstate: dict, config: dict | None, max_layers: int | None = None):
    """What to build for a QState: (model class name, config, our-layout QState, kwargs for the class).

    The text encoder (its key map has `drop_unused`) is built with only the layers an encoding needs."""
    import importlib

    from .. import configs
    from ..errors import ConfigError

    if kind not in MODEL_CLASSES:
        raise ConfigError(f"unknown model kind {kind!r}: one of {', '.join(MODEL_CLASSES)}")
    cfg_name, cls_name = MODEL_CLASSES[kind]
    keys = importlib.import_module(f".{kind}", __package__)
    sd = keys.to_native(qstate)
    cfg = getattr(configs, cfg_name).from_state_dict(sd, config)
    kwargs = {}
    if hasattr(keys, "drop_unused"):
        n = cfg.num_layers if max_layers is None else min(int(max_layers), cfg.num_layers)
        sd = keys.drop_unused(sd, n, keep_norm=n == cfg.num_layers)
        kwargs["max_layers"] = n
    return cls_name, cfg, sd, kwargs
