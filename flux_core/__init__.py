"""flux_core: FLUX.2 [klein] and Z-Image inference on torch and MLX, numerically faithful to diffusers.

The library never imports ComfyUI; the node pack (`nodes/`) is a thin layer over it.
"""
__version__ = "0.1.0"

from .errors import ConfigError, FluxCoreError, Interrupted, WeightError  # noqa: F401
