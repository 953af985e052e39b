"""LoRA files for FLUX.2 [klein] and Z-Image: read any common format, resolve it against a loaded model by lookup,
and hand backend appliers (`flux_core/torch/lora.py`, `flux_core/mlx/lora.py`) the pieces to merge.

Imports neither torch nor MLX at module level. docs/LORA.md describes the formats and rules.
"""
from __future__ import annotations

from .formats import LoraFile, read_lora
from .resolve import Report, ResolvedLora, resolve
from .spec import LoraSpec, parse_lora_arg

__all__ = ["LoraFile", "LoraSpec", "Report", "ResolvedLora", "parse_lora_arg", "read_lora", "resolve"]
