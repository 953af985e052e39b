"""Pre-quantized checkpoints: which kind a path is, and loading one on either backend.

Three kinds of files arrive quantized, and none of them is ever expanded to full precision on the way in:
  fluxcore  our own safetensors format (`python -m flux_core quantize`; flux_core/weights/qfile.py)
  gguf      a .gguf file as ComfyUI-GGUF users have them (flux_core/weights/gguf.py)
  mlx       an MLX affine-quantized folder or file: mflux saves, MLX-community repos (flux_core/weights/mlx_affine.py)
Each reader returns a QState in our key layout; `flux_core/torch/qload.py` / `flux_core/mlx/qload.py` build the
model from it. The family (klein / Z-Image) is detected from the tensor names, exactly as for plain files.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError, WeightError

KINDS = ("fluxcore", "gguf", "mlx")


def detect(path, component: str | None = None) -> str | None:
    """'fluxcore' | 'gguf' | 'mlx' for a pre-quantized checkpoint, None for anything else. Reads headers only."""
    from .weights import gguf, mlx_affine, qfile

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
    from .weights import gguf, mlx_affine, qfile

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


def transformer_family(qstate: dict) -> str:
    from .variants import detect_family

    return detect_family(qstate)


def load_module(backend: str, kind: str, qstate: dict, config: dict | None, dtype: str, device: str = "cpu",
                max_layers: int | None = None, what: str = ""):
    """The model for `kind` ('klein' | 'zimage' | 'qwen3') on `backend`, from a QState."""
    if backend == "mlx":
        from .mlx import qload

        return qload.load_qstate(kind, qstate, config, dtype, max_layers, what)
    if backend == "torch":
        import torch

        from .torch import qload

        dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
        return qload.load_qstate(kind, qstate, config, dt, device, max_layers, what)
    raise ConfigError(f"unknown backend {backend!r}")
