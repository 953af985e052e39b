"""Entry points the backend dispatcher calls (`flux_core/backend.py`): one per component, checkpoint in, MLX model out.

`ckpt` is a `flux_core.weights.io.Checkpoint` (torch CPU tensors of any dtype, fp8-scaled files already dequantized);
`dtype` is 'bfloat16' | 'float16' | 'float32'. Each model file converts its weights to mx once, at load.
"""
from __future__ import annotations

from ..errors import ConfigError

FAMILIES = ("klein", "zimage")


def load_transformer(family: str, ckpt, dtype: str):
    """A klein or Z-Image transformer on MLX; `model.config` is the torch side's KleinConfig / ZImageConfig.

    The checkpoint's tensors are released while they are converted (`ckpt.sd` is left empty): the caller
    (`models.load_transformer`) is done with it, and a 16 GB Mac cannot hold klein-4B twice."""
    if family == "klein":
        from .klein import load_klein

        return load_klein(ckpt, dtype, consume=True)
    if family == "zimage":
        from .zimage import load_zimage

        return load_zimage(ckpt, dtype, consume=True)
    raise ConfigError(f"unknown transformer family {family!r}: one of {', '.join(FAMILIES)}")


def load_qwen3(ckpt, dtype: str, max_layers: int | None = None):
    from .qwen3 import load_qwen3 as load

    return load(ckpt, dtype, max_layers=max_layers)


def load_vae(ckpt, dtype: str):
    from .vae import load_vae as load

    return load(ckpt, dtype)
