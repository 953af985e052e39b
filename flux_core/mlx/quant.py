"""Load-time quantization of a loaded MLX model's block Linears with `nn.quantize`: int8 | int4 | fp8.

Same selection as the torch side (flux_core/torch/quant.py): the Linears inside the repeated blocks (klein
`double_blocks` / `single_blocks`, Z-Image `layers` / `noise_refiner` / `context_refiner`, Qwen3 `layers`), never a
modulation Linear, never embeddings, norms or the small input / output projections.

  int8  affine, bits 8, group 64 (MLX's own packed format: uint32 words, a scale and a bias per group)
  int4  affine, bits 4, group 64
  fp8   mode "mxfp8" (e4m3 values, one shared power-of-two uint8 scale per 32 weights), group 32, when the installed
        mlx has it (0.29+); otherwise fp8 is refused with a ConfigError.

A layer whose input dim does not divide by the group size is skipped (MLX raises on it), e.g. the tiny demo's
32-wide Qwen3 at group 64. On a Linux CPU `quantized_matmul` is a slow scalar path (docs/PERF.md §P7): quantization is for
Apple GPUs' memory, not CPU speed.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..configs import BLOCK_CONTAINERS
from ..errors import ConfigError

SKIP_NAMES = ("modulation",)
SETTINGS = {"int8": dict(bits=8, group_size=64, mode="affine"),
            "int4": dict(bits=4, group_size=64, mode="affine"),
            "fp8": dict(bits=8, group_size=32, mode="mxfp8")}


def supported_modes() -> tuple[str, ...]:
    return ("int8", "int4", "fp8") if has_mxfp8() else ("int8", "int4")


def has_mxfp8() -> bool:
    try:
        mx.quantize(mx.zeros((32, 32)), group_size=32, bits=8, mode="mxfp8")
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


def quantize_model(model: nn.Module, mode: str) -> int:
    """Quantize, in place, the block Linears of `model`. Returns how many layers were quantized."""
    if mode == "none":
        return 0
    if mode not in supported_modes():
        raise ConfigError(f"quantization {mode!r} is not available on MLX {mx.__version__}: choose one of none, "
                          f"{', '.join(supported_modes())}")
    s = SETTINGS[mode]
    picked = []

    def predicate(path: str, module) -> bool:
        ok = (isinstance(module, nn.Linear) and path.split(".")[0] in BLOCK_CONTAINERS
              and not any(n in path for n in SKIP_NAMES) and module.weight.shape[1] % s["group_size"] == 0)
        if ok:
            picked.append(path)
        return ok

    nn.quantize(model, group_size=s["group_size"], bits=s["bits"], mode=s["mode"], class_predicate=predicate)
    mx.eval(model.parameters())
    return len(picked)
